"""The default network (BatchNormCNN and linear heads), other building blocks (BaseCNN,
MLPHead), and MultiHeadNet, the chain that holds a base and K heads.

``MultiHeadNet`` keeps the base under ``base/`` and head i under ``head{i}/``, so one
``save_npz`` writes every parameter and each part has its own optimizer target.
"""
import re
from typing import Callable, List, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

import chainer
import chainer.functions as F
import chainer.links as L

from distmulti.errors import DataError

IGNORE_LABEL = -1
_NAME_RE = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')


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


class BatchNormCNN(chainer.Chain):
    """The default base: two blocks of 3x3 convolution, BatchNormalization, ReLU and 2x2
    max-pool (``channels``, then twice as many), then a fully connected feature layer.

    On the embedded 1 x 8 x 24 strips the second convolution runs at 4 x 12 and the features
    read 2 x 6 positions, so it costs less per sample than convolving at full resolution,
    and the normalisation lets it train fast at a high rate (measured in
    ``bench/default_vs_client.py``).
    """

    def __init__(self, channels: int = 32, features: int = 256):
        super().__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(None, channels, ksize=3, pad=1, nobias=True)
            self.bn1 = L.BatchNormalization(channels)
            self.conv2 = L.Convolution2D(channels, 2 * channels, ksize=3, pad=1, nobias=True)
            self.bn2 = L.BatchNormalization(2 * channels)
            self.fc = L.Linear(None, features)

    def forward(self, x):
        h = F.max_pooling_2d(F.relu(self.bn1(self.conv1(x))), 2)
        h = F.max_pooling_2d(F.relu(self.bn2(self.conv2(h))), 2)
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


class LossHead(chainer.Chain):
    """Marks a head that computes its own loss instead of returning logits.

    The wrapped link is called as ``link(features, t)`` with ``t`` the head's label column
    (-1 = no label) and must return the mean loss over the labelled samples, a scalar.
    Such a head reports its loss but no accuracy, and has no predictions.
    """

    def __init__(self, link: chainer.Link):
        super().__init__()
        with self.init_scope():
            self.link = link

    def forward(self, h, t):
        return self.link(h, t)


class HeadOutput(NamedTuple):
    """One head's result on a batch: the sum of its loss over labelled samples, and its
    logits (None for a LossHead)."""

    loss_sum: chainer.Variable
    logits: Optional[chainer.Variable]


class MultiHeadNet(chainer.Chain):
    """One shared base feeding K heads, each with its own label column and loss.

    Args:
        base: link mapping inputs to shared features.
        heads: a list of links (named ``head0``, ``head1``, ...) or a dict ``{name: link}``
            (names in order = label columns). A head maps the features to logits of shape
            (N, classes), or is a ``LossHead`` returning its own loss.
        loss_funcs: optional per-head functions ``f(logits, t)`` returning per-sample losses
            (shape (N,), 0 where t == -1) or their mean over labelled samples; default
            softmax cross-entropy with ``ignore_label=-1``.
    """

    def __init__(self, base: chainer.Link,
                 heads: Union[Sequence[chainer.Link], Mapping[str, chainer.Link]],
                 loss_funcs: Optional[Sequence[Optional[Callable]]] = None):
        super().__init__()
        if isinstance(heads, Mapping):
            names, links = [str(n) for n in heads], list(heads.values())
        else:
            links = list(heads)
            names = [f'head{i}' for i in range(len(links))]
        if not links:
            raise ValueError('MultiHeadNet needs at least one head, got none')
        if not isinstance(base, chainer.Link):
            raise TypeError(f'base must be a chainer.Link, got {type(base).__name__}')
        for name, head in zip(names, links):
            if not _NAME_RE.match(name) or name == 'base':
                raise ValueError(f'head name {name!r} is not allowed; use letters, digits and _ '
                                 f'(not starting with a digit, not "base")')
            if not isinstance(head, chainer.Link):
                raise TypeError(f'head {name!r} must be a chainer.Link, got '
                                f'{type(head).__name__}')
        if len(set(names)) != len(names):
            raise ValueError(f'head names must be unique, got {names}')
        loss_funcs = list(loss_funcs) if loss_funcs is not None else [None] * len(links)
        if len(loss_funcs) != len(links):
            raise ValueError(f'loss_funcs must hold one entry per head ({len(links)}), '
                             f'got {len(loss_funcs)}')
        with self.init_scope():
            self.base = base
        for name, head in zip(names, links):
            self.add_link(name, head)
        self._head_names = names
        self._loss_funcs = [f or _softmax_cross_entropy for f in loss_funcs]
        self.n_heads = len(links)

    @property
    def head_names(self) -> List[str]:
        return list(self._head_names)

    @property
    def heads(self) -> List[chainer.Link]:
        return [getattr(self, name) for name in self._head_names]

    @property
    def has_logits(self) -> List[bool]:
        return [not isinstance(head, LossHead) for head in self.heads]

    def forward(self, x) -> List[Optional[chainer.Variable]]:
        """Runs the base once and every logits head on its features (None for a LossHead)."""
        features = self.base(x)
        return [None if isinstance(head, LossHead) else head(features) for head in self.heads]

    def head_outputs(self, x, t) -> List[HeadOutput]:
        """Runs the base once; every head's loss sum over its labelled samples, and logits."""
        features = self.base(x)
        outputs = []
        for i, (name, head) in enumerate(zip(self._head_names, self.heads)):
            col = t[:, i]
            if isinstance(head, LossHead):
                logits, loss = None, head(features, col)
            else:
                logits = head(features)
                loss = self._loss_funcs[i](logits, col)
            if loss.ndim == 0:  # a mean over labelled samples: back to their sum
                xp = chainer.backend.get_array_module(col)
                n = (col != IGNORE_LABEL).sum()
                loss = loss * xp.asarray(n, dtype=loss.dtype)
            elif loss.shape == (len(col),):
                loss = F.sum(loss)
            else:
                raise DataError(f'the loss of {name} has shape {loss.shape}; it must be a '
                                f'scalar (mean over labelled samples) or one value per sample')
            outputs.append(HeadOutput(loss, logits))
        return outputs

    def initialize(self, x, t=None) -> List[Optional[int]]:
        """Runs one forward pass on ``x`` (labels ``t``, default all 0) so lazily sized layers
        get their parameters. Returns each head's number of classes (None for a LossHead)."""
        if t is None:
            xp = chainer.backend.get_array_module(x)
            t = xp.zeros((len(x), self.n_heads), dtype=np.int32)
        with chainer.using_config('train', False), chainer.no_backprop_mode():
            outputs = self.head_outputs(x, t)
        widths = []
        for name, out in zip(self._head_names, outputs):
            if out.logits is None:
                widths.append(None)
                continue
            if out.logits.ndim != 2:
                raise DataError(f'{name} must return logits of shape (batch, classes), '
                                f'got shape {out.logits.shape}')
            widths.append(int(out.logits.shape[1]))
        return widths


def _softmax_cross_entropy(logits, t):
    return F.softmax_cross_entropy(logits, t, ignore_label=IGNORE_LABEL, reduce='no')


def default_net(n_heads: int, n_classes: int = 10) -> MultiHeadNet:
    """The default network: BatchNormCNN with ``n_heads`` linear classifiers."""
    return MultiHeadNet(BatchNormCNN(), [L.Linear(None, n_classes) for _ in range(n_heads)])
