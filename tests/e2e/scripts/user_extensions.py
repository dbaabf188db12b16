"""Trains through the Python API with user extensions in every accepted form; each rank then
writes ``calls_rank<R>.json`` into OUT: how often each extension ran there, and what a
collective inside an extension returned.

Run by tests/e2e/test_user_extensions.py, in one process and under ``mpiexec -n 2``.
Usage: python -m mpi4py user_extensions.py OUT
"""
import json
import os
import sys

import distmulti  # noqa: F401  (first: it makes chainer import on numpy 2)
import chainer
import numpy as np
from chainer.training import PRIORITY_WRITER, Extension, triggers

from distmulti import TrainConfig, train
from distmulti.comm import current_world

calls = {'plain': 0, 'pair': 0, 'schedule': 0, 'root_only': 0, 'collective': []}


def plain(trainer):
    calls['plain'] += 1


def pair(trainer):
    calls['pair'] += 1


def schedule(trainer):
    calls['schedule'] += 1


class RootOnly(Extension):
    trigger = (2, 'iteration')

    def __call__(self, trainer):
        calls['root_only'] += 1


class RankSum(Extension):
    """Sums the ranks with a collective, every 5 iterations, and reports it into the log."""

    trigger = (5, 'iteration')
    priority = PRIORITY_WRITER

    def __call__(self, trainer):
        comm = trainer.updater.comm
        total = float(comm.allreduce_sum(np.array([comm.rank]))[0])
        calls['collective'].append(total)
        chainer.report({'user/rank_sum': total})


out = sys.argv[1]
config = TrainConfig(out=out, iterations=10, eval_interval=5, batchsize=8, train_size=160,
                     test_size=32, progress=False, plot=False)
train(config, extensions=[
    plain,
    (pair, (5, 'iteration')),
    (schedule, triggers.ManualScheduleTrigger([3, 7], 'iteration')),
    {'extension': RootOnly(), 'root_only': True},
    RankSum(),
])
rank = current_world().rank
with open(os.path.join(out, f'calls_rank{rank}.json'), 'w') as f:
    json.dump(calls, f)
