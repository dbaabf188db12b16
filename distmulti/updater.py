"""MultiHeadUpdater: the shared-base multi-loss update, one iteration at a time.

One forward of the base per iteration, every head's loss on the shared features, all
gradients cleared, then either one backward of the weighted sum (``fused``, the default) or
one backward per loss as hand-written updaters do (``per_loss``); both give the same
gradients. Then every named optimizer (``base``, ``head0``, ...) updates its own part.
"""
from typing import Dict, Optional, Sequence

import numpy as np

import chainer
from chainer import backend
from chainer.dataset import convert
from chainer.training import StandardUpdater

from distmulti.errors import NonFiniteLossError
from distmulti.metrics import accuracies, count_stats
from distmulti.models import MultiHeadNet

BACKWARD_MODES = ('fused', 'per_loss')


class MultiHeadUpdater(StandardUpdater):
    """Updater for a ``MultiHeadNet`` with one optimizer per part.

    Args:
        iterator: the training iterator (or ``{'main': iterator}``); yields (x, t) with t (B, K).
        net: the network; its base and heads are the optimizers' targets.
        optimizers: ``{'base': opt, 'head0': opt, ...}``, each set up on ``net.<name>``.
        loss_weights: one weight per head for the summed loss (default all 1).
        backward: ``'fused'`` (one backward of the weighted sum) or ``'per_loss'``.
        frozen: indices of heads whose parameters stay fixed (their optimizers never step);
            their losses still train the base unless their weight is 0.
        converter, device: as for ``StandardUpdater``.
    """

    def __init__(self, iterator, net: MultiHeadNet, optimizers: Dict[str, chainer.Optimizer],
                 loss_weights: Optional[Sequence[float]] = None, backward: str = 'fused',
                 frozen: Sequence[int] = (), converter=convert.concat_examples, device=None):
        _check_optimizers(net, optimizers)
        if backward not in BACKWARD_MODES:
            raise ValueError(f'backward must be one of {", ".join(BACKWARD_MODES)}, '
                             f'got {backward!r}')
        weights = [1.0] * net.n_heads if loss_weights is None else [float(w) for w in loss_weights]
        if len(weights) != net.n_heads:
            raise ValueError(f'loss_weights must hold one weight per head ({net.n_heads}), '
                             f'got {len(weights)}')
        for i in frozen:
            if not 0 <= i < net.n_heads:
                raise ValueError(f'frozen head {i} does not exist; heads are 0..{net.n_heads - 1}')
        super().__init__(iterator, dict(optimizers), converter=converter, device=device)
        self.net = net
        self.frozen = frozenset(f'head{i}' for i in frozen)
        for name in self.frozen:
            # After optimizer.setup(), which would replace a disabled update rule.
            getattr(net, name).disable_update()
        self.loss_weights = weights
        self.backward_mode = backward

    def update_core(self):
        batch = self.get_iterator('main').next()
        x, t = self.converter(batch, self.input_device)
        net = self.net
        logits = net(x)
        losses = net.head_losses(logits, t)

        xp = backend.get_array_module(t)
        host = backend.CpuDevice().send(xp.stack([loss.array for loss in losses]))
        loss_values = host.astype(np.float64)
        if not np.isfinite(loss_values).all():
            self._raise_non_finite(loss_values)

        for optimizer in self._optimizers.values():
            optimizer.target.cleargrads()
        weighted = [loss * w if w != 1.0 else loss for loss, w in zip(losses, self.loss_weights)]
        if self.backward_mode == 'fused':
            total = weighted[0]
            for term in weighted[1:]:
                total = total + term
            total.backward()
        else:
            for term in weighted:
                term.backward()
        for name, optimizer in self._optimizers.items():
            if name not in self.frozen:
                optimizer.update()

        self._report(loss_values, count_stats(logits, t))

    def _report(self, loss_values: np.ndarray, stats: np.ndarray) -> None:
        k = self.net.n_heads
        observation = {'main/loss': float(np.dot(loss_values, self.loss_weights))}
        for i in range(k):
            observation[f'main/head{i}/loss'] = float(loss_values[i])
        observation.update(accuracies(stats, k, 'main/'))
        chainer.report(observation)

    def _raise_non_finite(self, loss_values: np.ndarray) -> None:
        bad = [f'head{i} ({v})' for i, v in enumerate(loss_values) if not np.isfinite(v)]
        raise NonFiniteLossError(
            f'non-finite loss at iteration {self.iteration + 1}: {", ".join(bad)}; training '
            f'stopped before this update, earlier snapshots are kept (try a lower learning '
            f'rate, or check the inputs for NaN/inf)')


def _check_optimizers(net: MultiHeadNet, optimizers: Dict[str, chainer.Optimizer]) -> None:
    if not isinstance(optimizers, dict):
        raise TypeError(f'optimizers must be a dict of name -> optimizer, got '
                        f'{type(optimizers).__name__}')
    expected = ['base'] + net.head_names
    if sorted(optimizers) != sorted(expected):
        raise ValueError(f'optimizers must have exactly the names {", ".join(expected)}, '
                         f'got {", ".join(sorted(optimizers)) or "none"}')
    for name, optimizer in optimizers.items():
        if getattr(optimizer, 'target', None) is not getattr(net, name):
            raise ValueError(f'optimizer {name!r} must be set up on net.{name} '
                             f'(call optimizer.setup(net.{name}))')
