"""Per-head counts computed on the device and fetched to the host in one transfer."""
from typing import Dict, Sequence

import numpy as np

import chainer
from chainer import backend

from distmulti.models import IGNORE_LABEL


def count_stats(logits: Sequence[chainer.Variable], t) -> np.ndarray:
    """Counts for one batch as a host float64 vector of length 2K + 2.

    Layout: correct_0..correct_{K-1}, labelled_0..labelled_{K-1}, all_correct, all_labelled.
    A head's sample counts when its label is not -1; ``all_correct`` counts samples whose every
    labelled head is right, among samples with at least one labelled head.
    """
    xp = backend.get_array_module(t)
    correct, labelled = [], []
    all_right = None
    any_label = None
    for i, y in enumerate(logits):
        col = t[:, i]
        valid = col != IGNORE_LABEL
        right = (y.array.argmax(axis=1) == col) | ~valid
        correct.append((right & valid).sum())
        labelled.append(valid.sum())
        all_right = right if all_right is None else all_right & right
        any_label = valid if any_label is None else any_label | valid
    parts = correct + labelled + [(all_right & any_label).sum(), any_label.sum()]
    return backend.CpuDevice().send(xp.stack(parts)).astype(np.float64)


def accuracies(stats: np.ndarray, n_heads: int, prefix: str) -> Dict[str, float]:
    """``{prefix}head{i}/accuracy`` and ``{prefix}accuracy_all`` from summed count vectors."""
    out = {}
    for i in range(n_heads):
        if stats[n_heads + i] > 0:
            out[f'{prefix}head{i}/accuracy'] = float(stats[i] / stats[n_heads + i])
    if stats[-1] > 0:
        out[f'{prefix}accuracy_all'] = float(stats[-2] / stats[-1])
    return out
