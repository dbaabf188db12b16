"""The default base CNN and heads, and MultiHeadNet, the chain that holds a base and K heads.

``MultiHeadNet`` keeps the base under ``base/`` and head i under ``head{i}/``, so one
``save_npz`` writes every parameter and each part has its own optimizer target.
"""
from typing import List, Sequence

import chainer
import chainer.functions as F
import chainer.links as L

from distmulti.errors import DataError

IGNORE_LABEL = -1


class BaseCNN(chainer.Chain):
    """Two 3x3 convolutions, a 2x2 max-pool and a fully connected feature layer."""

    def __init__(self, channels: int = 16, features: int = 128):
        super().__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(None, channels, ksize=3, pad=1)
            self.conv2 = L.Convolution2D(channels, 2 * channels, ksize=3, pad=1)
            self.fc = L.Linear(None, features)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = F.max_pooling_2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h))


class MLPHead(chainer.Chain):
    """A classifier head: one hidden layer on the shared features, then logits."""

    def __init__(self, n_classes: int = 10, hidden: int = 64):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(None, hidden)
            self.l2 = L.Linear(hidden, n_classes)

    def forward(self, h):
        return self.l2(F.relu(self.l1(h)))


class MultiHeadNet(chainer.Chain):
    """One shared base feeding K heads; each head returns logits for its own labels.

    Args:
        base: link mapping inputs to shared features.
        heads: links mapping those features to logits of shape (N, classes_i).
    """

    def __init__(self, base: chainer.Link, heads: Sequence[chainer.Link]):
        super().__init__()
        heads = list(heads)
        if not heads:
            raise ValueError('MultiHeadNet needs at least one head, got none')
        for i, head in enumerate(heads):
            if not isinstance(head, chainer.Link):
                raise TypeError(f'head {i} must be a chainer.Link, got {type(head).__name__}')
        if not isinstance(base, chainer.Link):
            raise TypeError(f'base must be a chainer.Link, got {type(base).__name__}')
        with self.init_scope():
            self.base = base
        for i, head in enumerate(heads):
            self.add_link(f'head{i}', head)
        self.n_heads = len(heads)

    @property
    def head_names(self) -> List[str]:
        return [f'head{i}' for i in range(self.n_heads)]

    @property
    def heads(self) -> List[chainer.Link]:
        return [getattr(self, name) for name in self.head_names]

    def forward(self, x) -> List[chainer.Variable]:
        """Runs the base once and every head on its features; returns the list of logits."""
        features = self.base(x)
        return [head(features) for head in self.heads]

    def sample_losses(self, logits: Sequence[chainer.Variable], t) -> List[chainer.Variable]:
        """Per-sample softmax cross-entropy of each head on its label column, shape (N,).

        Samples labelled -1 for a head get loss 0 from it. Callers normalise the sums by the
        number of labelled samples (over all ranks, for exact data-parallel means).
        """
        return [F.softmax_cross_entropy(y, t[:, i], ignore_label=IGNORE_LABEL, reduce='no')
                for i, y in enumerate(logits)]

    def initialize(self, x) -> List[int]:
        """Runs one forward pass on ``x`` so lazily sized layers get their parameters.

        Returns the number of classes (logit width) of each head.
        """
        with chainer.using_config('train', False), chainer.no_backprop_mode():
            logits = self.forward(x)
        widths = []
        for name, y in zip(self.head_names, logits):
            if y.ndim != 2:
                raise DataError(f'{name} must return logits of shape (batch, classes), '
                                f'got shape {y.shape}')
            widths.append(int(y.shape[1]))
        return widths


def default_net(n_heads: int, n_classes: int = 10) -> MultiHeadNet:
    """The default network: BaseCNN with ``n_heads`` MLPHead classifiers."""
    return MultiHeadNet(BaseCNN(), [MLPHead(n_classes) for _ in range(n_heads)])
