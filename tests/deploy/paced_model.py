"""A tiny network whose training iterations take at least ``PACE_S`` seconds, for tests that
must interrupt a training at a known pace (``--model tests.deploy.paced_model:build``).

The pause is a sleep in one head's training forward pass: it changes no number, so a paced
run gives the same parameters as the same network without it, and the pace does not depend
on how fast the machine is (a faster machine shortens only the part that computes).
Evaluation is not paced.
"""
import time

import chainer

from distmulti.models import BaseCNN, MLPHead

PACE_S = 0.25


class PacedHead(MLPHead):
    """An MLPHead that sleeps ``PACE_S`` seconds in every training forward pass."""

    def forward(self, h):
        if chainer.config.train:
            time.sleep(PACE_S)
        return super().forward(h)


def build():
    """(base, heads): a 4-channel BaseCNN and three small heads, the first one paced."""
    return BaseCNN(channels=4, features=16), [PacedHead(10, hidden=8), MLPHead(10, hidden=8),
                                              MLPHead(10, hidden=8)]
