"""Per-head sums for one batch, computed on the device and fetched to the host in one transfer.

The same vector layout serves the updater (summed over ranks before the backward) and the
evaluator (summed over batches, then over ranks), so every number divides exact global sums.
"""
from typing import Dict, Sequence

import numpy as np

from chainer import backend

from distmulti.models import IGNORE_LABEL, HeadOutput


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


def label_counts(t) -> np.ndarray:
    """Labelled samples per head (label column != -1) of a label batch, as a host float64
    vector of length K: the ``labelled`` part of ``batch_stats``, known before any forward."""
    xp = backend.get_array_module(t)
    counts = (t != IGNORE_LABEL).sum(axis=0).astype(np.float64)
    return np.asarray(backend.CpuDevice().send(xp.asarray(counts)), dtype=np.float64)


def batch_stats(outputs: Sequence[HeadOutput], t) -> np.ndarray:
    """Sums for one batch as a host float64 vector of length 3K + 2.

    Layout: loss_sum_0..K-1, correct_0..K-1, labelled_0..K-1, all_correct, all_labelled.
    A head's sample counts when its label is not -1; a head without logits (LossHead) has
    ``correct`` NaN. ``all_correct`` counts samples whose every labelled logits head is right,
    among samples with at least one labelled logits head.
    """
    xp = backend.get_array_module(t)
    sums, correct, labelled = [], [], []
    all_right = any_label = None
    for i, out in enumerate(outputs):
        col = t[:, i]
        valid = col != IGNORE_LABEL
        sums.append(out.loss_sum.array.astype(np.float64))
        labelled.append(valid.sum())
        if out.logits is None:
            correct.append(xp.asarray(np.nan))
            continue
        right = (out.logits.array.argmax(axis=1) == col) | ~valid
        correct.append((right & valid).sum())
        all_right = right if all_right is None else all_right & right
        any_label = valid if any_label is None else any_label | valid
    if all_right is None:
        tail = [xp.asarray(0.0), xp.asarray(0.0)]
    else:
        tail = [(all_right & any_label).sum(), any_label.sum()]
    parts = [xp.asarray(p, dtype=np.float64) for p in sums + correct + labelled + tail]
    return backend.CpuDevice().send(xp.stack(parts))


def summarize(stats: np.ndarray, weights: Sequence[float], prefix: str,
              names: Sequence[str]) -> Dict[str, float]:
    """Mean loss per head and in total (weighted), per-head and all-heads accuracy.

    Keys: ``{prefix}loss``, ``{prefix}{name}/loss``, ``{prefix}{name}/accuracy``,
    ``{prefix}accuracy_all``. A head with no labelled sample has loss 0 and no accuracy
    entry (undefined, not 0); a head without logits never has one.
    """
    layout = Layout(len(weights))
    labelled = layout.labelled(stats)
    correct = layout.correct(stats)
    head_loss = layout.loss_sums(stats) / np.maximum(labelled, 1)
    out = {f'{prefix}loss': float(np.dot(head_loss, weights))}
    for i, name in enumerate(names):
        out[f'{prefix}{name}/loss'] = float(head_loss[i])
        if labelled[i] > 0 and not np.isnan(correct[i]):
            out[f'{prefix}{name}/accuracy'] = float(correct[i] / labelled[i])
    if stats[-1] > 0:
        out[f'{prefix}accuracy_all'] = float(stats[-2] / stats[-1])
    return out
