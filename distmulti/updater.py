"""MultiHeadUpdater: the shared-base multi-loss update, one iteration at a time, on every rank.

Per iteration: the rank's batch; one forward of the base; every head's per-sample loss on the
shared features; one small all-reduce of per-head sums (loss, correct, labelled samples) that
gives exact global metrics, a global NaN check and each head's global labelled count; all
gradients cleared; one backward of the weighted sum (``fused``, default) or one per loss
(``per_loss``, like hand-written updaters; same gradients); gradients averaged over ranks;
every named optimizer (``base``, ``head0``, ...) steps on its own part.

Each head's loss is its sum over the rank's labelled samples divided by the global labelled
count (times the world size, which the gradient average divides out), so N ranks with batch B
compute exactly the gradients of one process with batch N*B, also when heads ignore samples
(label -1) unevenly across ranks.
"""
from typing import Dict, Optional, Sequence

import numpy as np

import chainer
from chainer.dataset import convert
from chainer.training import StandardUpdater

from distmulti.comm import LocalComm
from distmulti.config import BACKWARD_MODES, GRAD_SYNC_MODES
from distmulti.errors import NonFiniteLossError, SampleError
from distmulti.loader import raise_if_any_failed
from distmulti.metrics import Layout, batch_stats, summarize
from distmulti.models import MultiHeadNet

# grad_sync 'net': one packed all-reduce of every gradient, then plain optimizers.
# 'optimizers': ChainerMN multi-node optimizers wrap each part's optimizer (one collective per
# part with GPU communicators, one per parameter array with the naive one).


class MultiHeadUpdater(StandardUpdater):
    """Updater for a ``MultiHeadNet`` with one optimizer per part, data-parallel over ``comm``.

    Args:
        iterator: the training iterator (or ``{'main': iterator}``) over this rank's shard;
            yields (x, t) with t of shape (B, K).
        net: the network; its base and heads are the optimizers' targets.
        optimizers: ``{'base': opt, '<head name>': opt, ...}`` (heads are ``head0``, ``head1``,
            ... unless the net was built from a dict), each set up on ``net.<name>``.
        loss_weights: one weight per head for the summed loss (default all 1).
        backward: ``'fused'`` (one backward of the weighted sum) or ``'per_loss'``.
        frozen: indices of heads whose parameters stay fixed (their optimizers never step);
            their losses still train the base unless their weight is 0.
        comm: the process group (default: one process). With several ranks the constructor
            is collective: it broadcasts rank 0's parameters.
        grad_sync: how gradients are averaged over ranks: ``'optimizers'`` (default; each
            optimizer wrapped by ``chainermn.create_multi_node_optimizer``) or ``'net'``
            (one packed all-reduce of all gradients, then the plain optimizers).
        converter, device: as for ``StandardUpdater``.
    """

    def __init__(self, iterator, net: MultiHeadNet, optimizers: Dict[str, chainer.Optimizer],
                 loss_weights: Optional[Sequence[float]] = None, backward: str = 'fused',
                 frozen: Sequence[int] = (), comm=None, grad_sync: str = 'optimizers',
                 converter=convert.concat_examples, device=None):
        _check_optimizers(net, optimizers)
        if backward not in BACKWARD_MODES:
            raise ValueError(f'backward must be one of {", ".join(BACKWARD_MODES)}, '
                             f'got {backward!r}')
        if grad_sync not in GRAD_SYNC_MODES:
            raise ValueError(f'grad_sync must be one of {", ".join(GRAD_SYNC_MODES)}, '
                             f'got {grad_sync!r}')
        weights = [1.0] * net.n_heads if loss_weights is None else [float(w) for w in loss_weights]
        if len(weights) != net.n_heads:
            raise ValueError(f'loss_weights must hold one weight per head ({net.n_heads}), '
                             f'got {len(weights)}')
        for i in frozen:
            if not 0 <= i < net.n_heads:
                raise ValueError(f'frozen head {i} does not exist; heads are 0..{net.n_heads - 1}')
        super().__init__(iterator, dict(optimizers), converter=converter, device=device)
        self.net = net
        self.loss_weights = weights
        self.backward_mode = backward
        self.comm = comm or LocalComm()
        self.grad_sync = grad_sync
        self.heartbeat = None  # called with the iteration count after every update
        self.frozen = frozenset(net.head_names[i] for i in frozen)
        for name in self.frozen:
            # After optimizer.setup(), which would replace a disabled update rule.
            getattr(net, name).disable_update()
        if self.comm.size > 1:
            self.comm.bcast_data(net)
            if grad_sync == 'optimizers':
                self._optimizers = {name: _multi_node(opt, self.comm)
                                    for name, opt in self._optimizers.items()}

    def update(self):
        super().update()
        if self.heartbeat is not None:
            self.heartbeat(self.iteration)

    def update_core(self):
        net, comm = self.net, self.comm
        layout = Layout(net.n_heads)
        try:
            batch, error = self.get_iterator('main').next(), None
        except SampleError as e:  # this rank's batch cannot be read: the all-reduce says so
            batch, error = None, e
        if error is None:
            x, t = self.converter(batch, self.input_device)
            outputs = net.head_outputs(x, t)
            local = batch_stats(outputs, t)
        else:
            local = np.zeros(layout.size)
        # The same small collective on every rank, every iteration, before any decision; its
        # last element counts the ranks whose batch failed (then all raise the same error).
        stats = comm.allreduce_sum(np.append(local, float(error is not None)))
        stats, failed = stats[:-1], stats[-1]
        raise_if_any_failed(comm, failed, error)                          # collective
        if not np.isfinite(layout.loss_sums(stats)).all():
            self._raise_non_finite(layout.loss_sums(stats))

        for optimizer in self._optimizers.values():
            optimizer.target.cleargrads()
        terms = [out.loss_sum * float(w * comm.size / n)
                 for out, w, n in zip(outputs, self.loss_weights, layout.labelled(stats))
                 if n > 0]
        if self.backward_mode == 'fused' and terms:
            total = terms[0]
            for term in terms[1:]:
                total = total + term
            total.backward()
        else:
            for term in terms:
                term.backward()
        if self.grad_sync == 'net':
            comm.mean_grads(net)
        for name, optimizer in self._optimizers.items():
            if name not in self.frozen:
                optimizer.update()
        chainer.report(summarize(stats, self.loss_weights, 'main/', net.head_names))

    def serialize(self, serializer):
        super().serialize(serializer)
        # Saved so that a resumed run can say how many ranks wrote the checkpoint.
        self.checkpoint_world_size = int(serializer('world_size', self.comm.size))

    def _raise_non_finite(self, loss_sums: np.ndarray) -> None:
        bad = [f'{name} ({v})' for name, v in zip(self.net.head_names, loss_sums)
               if not np.isfinite(v)]
        raise NonFiniteLossError(
            f'non-finite loss at iteration {self.iteration + 1}: {", ".join(bad)}; training '
            f'stopped before this update, earlier checkpoints are kept (try a lower learning '
            f'rate, or check the inputs for NaN/inf)', collective=True)


def _multi_node(optimizer: chainer.Optimizer, comm) -> chainer.Optimizer:
    """Wraps ``optimizer`` in a ChainerMN multi-node optimizer (gradients averaged, zero_fill).

    ChainerMN's wrapper treats its first update as a parameter broadcast and skips the step;
    parameters are already broadcast here, so it is primed to step from the first update.
    """
    import chainermn
    wrapped = chainermn.create_multi_node_optimizer(optimizer, comm.mn, zero_fill=True)
    wrapped.is_changed(wrapped.target)  # records the parameter layout: no broadcast-only step
    return wrapped


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
