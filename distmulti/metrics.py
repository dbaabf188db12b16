"""Per-head sums for one batch, computed on the device and fetched to the host in one transfer.

The same vector layout serves the updater (summed over ranks before the backward) and the
evaluator (summed over batches, then over ranks), so every number divides exact global sums.
"""
from typing import Dict, Sequence

import numpy as np

import chainer
from chainer import backend

from distmulti.models import IGNORE_LABEL


class Layout:
    """Offsets in a stats vector of a K-head net: loss sums, correct, labelled, all-heads."""

    def __init__(self, n_heads: int):
        self.k = n_heads
        self.size = 3 * n_heads + 2

    def loss_sums(self, v: np.ndarray) -> np.ndarray:
        return v[:self.k]

    def correct(self, v: np.ndarray) -> np.ndarray:
        return v[self.k:2 * self.k]

    def labelled(self, v: np.ndarray) -> np.ndarray:
        return v[2 * self.k:3 * self.k]


def batch_stats(logits: Sequence[chainer.Variable], sample_losses: Sequence[chainer.Variable],
                t) -> np.ndarray:
    """Sums for one batch as a host float64 vector of length 3K + 2.

    Layout: loss_sum_0..K-1, correct_0..K-1, labelled_0..K-1, all_correct, all_labelled.
    A head's sample counts when its label is not -1; ``all_correct`` counts samples whose every
    labelled head is right, among samples with at least one labelled head.
    """
    xp = backend.get_array_module(t)
    sums, correct, labelled = [], [], []
    all_right = any_label = None
    for i, (y, loss) in enumerate(zip(logits, sample_losses)):
        col = t[:, i]
        valid = col != IGNORE_LABEL
        right = (y.array.argmax(axis=1) == col) | ~valid
        sums.append(loss.array.sum(dtype=np.float64))
        correct.append((right & valid).sum())
        labelled.append(valid.sum())
        all_right = right if all_right is None else all_right & right
        any_label = valid if any_label is None else any_label | valid
    parts = [xp.asarray(p, dtype=np.float64) for p in sums + correct + labelled]
    parts += [xp.asarray((all_right & any_label).sum(), dtype=np.float64),
              xp.asarray(any_label.sum(), dtype=np.float64)]
    return backend.CpuDevice().send(xp.stack(parts))


def summarize(stats: np.ndarray, weights: Sequence[float], prefix: str) -> Dict[str, float]:
    """Mean loss per head and in total (weighted), per-head and all-heads accuracy.

    A head with no labelled sample has loss 0 and no accuracy entry (undefined, not 0).
    """
    layout = Layout(len(weights))
    labelled = layout.labelled(stats)
    head_loss = layout.loss_sums(stats) / np.maximum(labelled, 1)
    out = {f'{prefix}loss': float(np.dot(head_loss, weights))}
    for i in range(layout.k):
        out[f'{prefix}head{i}/loss'] = float(head_loss[i])
        if labelled[i] > 0:
            out[f'{prefix}head{i}/accuracy'] = float(layout.correct(stats)[i] / labelled[i])
    if stats[-1] > 0:
        out[f'{prefix}accuracy_all'] = float(stats[-2] / stats[-1])
    return out
