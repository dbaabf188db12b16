"""MultiHeadUpdater: the shared-base multi-loss update, one iteration at a time, on every rank.

One iteration runs three stages, each in one method:

- **compute** (``_compute``): ``accumulate`` micro-batches of the rank's iterator, each one
  forward of the base, every head's per-sample loss on the shared features, and a backward
  of the weighted sum (``fused``, default) or one per loss (``per_loss``, like hand-written
  updaters; same gradients), gradients summing over the micro-batches. One small all-reduce
  of per-head sums (loss, correct, labelled samples), before the last backward, gives exact
  global metrics, a global NaN check and each head's global labelled count.
- **exchange** (``_exchange``): gradients averaged over ranks, in the dtype set once at
  construction (``grad_dtype``).
- **step** (``_step``): every part's learning rate set from its schedule, every named
  optimizer (``base``, ``head0``, ...) stepping on its own part (with its hooks: gradient
  clipping, weight decay), and ``optimizer.new_epoch(auto=True)`` at epoch boundaries, as
  Chainer's ``StandardUpdater`` does.

Each head's loss is its sum over the rank's labelled samples divided by the global labelled
count (times the world size, which the gradient average divides out), so N ranks with batch B
and A micro-batches per step compute exactly the gradients of one process with batch N*A*B,
also when heads ignore samples (label -1) unevenly across ranks and micro-batches.
"""
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

import chainer
from chainer.dataset import convert
from chainer.training import StandardUpdater

from distmulti import stopping
from distmulti.comm import LocalComm
from distmulti.config import BACKWARD_MODES, GRAD_DTYPES, GRAD_SYNC_MODES
from distmulti.errors import NonFiniteLossError, SampleError
from distmulti.loader import raise_if_any_failed
from distmulti.metrics import Layout, batch_stats, label_counts, summarize
from distmulti.models import HeadOutput, MultiHeadNet
from distmulti.schedule import rate_attribute

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
        accumulate: micro-batches (iterator batches) per step: their gradients add up
            before one exchange and one step (gradient accumulation).
        lr_schedules: ``{part name: schedule}`` with ``schedule.rate(iteration)`` (e.g. a
            ``distmulti.schedule.LRSchedule``): the part's learning rate (``alpha`` for Adam,
            ``lr`` for the others) is set from it before every step. Parts not named keep
            their optimizer's own rate.
        grad_dtype: dtype of the gradient exchange, ``'float32'`` or ``'float16'`` (ChainerMN's
            ``allreduce_grad_dtype``; only its ``pure_nccl`` communicator has it).
    """

    def __init__(self, iterator, net: MultiHeadNet, optimizers: Dict[str, chainer.Optimizer],
                 loss_weights: Optional[Sequence[float]] = None, backward: str = 'fused',
                 frozen: Sequence[int] = (), comm=None, grad_sync: str = 'optimizers',
                 converter=convert.concat_examples, device=None, *, accumulate: int = 1,
                 lr_schedules: Optional[Mapping[str, object]] = None,
                 grad_dtype: str = 'float32'):
        _check_optimizers(net, optimizers)
        if backward not in BACKWARD_MODES:
            raise ValueError(f'backward must be one of {", ".join(BACKWARD_MODES)}, '
                             f'got {backward!r}')
        if grad_sync not in GRAD_SYNC_MODES:
            raise ValueError(f'grad_sync must be one of {", ".join(GRAD_SYNC_MODES)}, '
                             f'got {grad_sync!r}')
        if grad_dtype not in GRAD_DTYPES:
            raise ValueError(f'grad_dtype must be one of {", ".join(GRAD_DTYPES)}, '
                             f'got {grad_dtype!r}')
        if not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f'accumulate must be an integer >= 1, got {accumulate!r}')
        weights = [1.0] * net.n_heads if loss_weights is None else [float(w) for w in loss_weights]
        if len(weights) != net.n_heads:
            raise ValueError(f'loss_weights must hold one weight per head ({net.n_heads}), '
                             f'got {len(weights)}')
        for i in frozen:
            if not 0 <= i < net.n_heads:
                raise ValueError(f'frozen head {i} does not exist; heads are 0..{net.n_heads - 1}')
        schedules = dict(lr_schedules or {})
        rate_attrs = {}
        for name in schedules:
            if name not in optimizers:
                raise ValueError(f'lr_schedules names {name!r}, which is not a part; parts are '
                                 f'{", ".join(optimizers)}')
            rate_attrs[name] = rate_attribute(optimizers[name])
            if rate_attrs[name] is None:
                raise ValueError(f'lr_schedules[{name!r}]: {type(optimizers[name]).__name__} '
                                 f'has no learning rate to schedule')
        super().__init__(iterator, dict(optimizers), converter=converter, device=device)
        self.net = net
        self.loss_weights = weights
        self.backward_mode = backward
        self.comm = comm or LocalComm()
        self.grad_sync = grad_sync
        # True from the iteration at which any rank had been asked to stop (see stopping.py):
        # every rank learns it from the same all-reduce, so all stop at the same iteration.
        self.stop_agreed = False
        self.accumulate = accumulate
        self.lr_schedules = schedules
        self._rate_attrs = rate_attrs
        self.frozen = frozenset(net.head_names[i] for i in frozen)
        self._new_epoch = False
        self._epoch_detail_before: Optional[float] = None
        for name in self.frozen:
            # After optimizer.setup(), which would replace a disabled update rule.
            getattr(net, name).disable_update()
        if self.comm.size > 1:
            self.comm.set_grad_dtype(grad_dtype)
            self.comm.bcast_data(net)
            if grad_sync == 'optimizers':
                self._optimizers = {name: _multi_node(opt, self.comm)
                                    for name, opt in self._optimizers.items()}

    @property
    def is_new_epoch(self) -> bool:
        """Whether the last update read past an epoch boundary (in any of its micro-batches)."""
        return self._new_epoch

    @property
    def previous_epoch_detail(self):
        if self._epoch_detail_before is None:
            return super().previous_epoch_detail
        return self._epoch_detail_before

    def update_core(self):
        batches = self._read_batches()
        stats = self._compute(batches)
        self._exchange()
        self._step()
        chainer.report(summarize(stats, self.loss_weights, 'main/', self.net.head_names))

    # -- the three stages -----------------------------------------------------
    def _read_batches(self) -> List[tuple]:
        """``accumulate`` converted batches; records whether they crossed an epoch boundary,
        and the SampleError of a batch this rank could not read (then it reads no more)."""
        iterator = self.get_iterator('main')
        self._epoch_detail_before = iterator.epoch_detail
        batches, crossed, self._sample_error = [], False, None
        for _ in range(self.accumulate):
            try:
                batch = iterator.next()
            except SampleError as e:  # this rank cannot read its batch: the all-reduce says so
                self._sample_error = e
                break
            # As StandardUpdater: an old-style converter(batch, device) gets -1 or the GPU id.
            batches.append(convert._call_converter(self.converter, batch, self.input_device))
            crossed = crossed or iterator.is_new_epoch
        self._new_epoch = crossed
        return batches

    def _compute(self, batches: Sequence[tuple]) -> np.ndarray:
        """Clears every gradient, then forward and backward of each micro-batch (gradients add
        up); returns the global per-head sums over all of them (``metrics.Layout``).

        Collectives, the same on every rank and in the same order whatever the data (a rank
        whose batch could not be read computes nothing but still takes part): with several
        micro-batches, first one all-reduce of their labelled counts (each head's loss
        normaliser must be known before the first backward); then, before the last backward,
        the all-reduce of the summed per-head statistics. Its last two elements count the
        ranks whose batch failed (then every rank raises that rank's SampleError) and the
        ranks asked to stop (see distmulti.stopping: all stop after this iteration); its NaN
        check stops every rank before any exchange or step.
        """
        net, comm = self.net, self.comm
        layout = Layout(net.n_heads)
        for optimizer in self._optimizers.values():
            optimizer.target.cleargrads()
        failed = self._sample_error is not None
        if failed:
            batches = []
        normaliser = None
        if self.accumulate > 1:
            local = sum((label_counts(t) for _, t in batches), np.zeros(net.n_heads))
            normaliser = comm.allreduce_sum(local)
        totals = np.zeros(layout.size)
        last = None
        for i, (x, t) in enumerate(batches):
            outputs = net.head_outputs(x, t)
            totals = totals + batch_stats(outputs, t)
            if i < len(batches) - 1:
                self._backward(outputs, normaliser)
            else:
                last = outputs
        # The same small collective on every rank, every iteration, before any decision.
        flags = [float(failed), 1.0 if stopping.requested() else 0.0]
        reduced = comm.allreduce_sum(np.concatenate([totals, flags]))
        stats, n_failed, n_stopping = reduced[:-2], reduced[-2], reduced[-1]
        self.stop_agreed = self.stop_agreed or bool(n_stopping > 0)
        raise_if_any_failed(comm, n_failed, self._sample_error)           # collective
        if not np.isfinite(layout.loss_sums(stats)).all():
            self._raise_non_finite(layout.loss_sums(stats))
        if normaliser is None:
            normaliser = layout.labelled(stats)
        if last is not None:
            self._backward(last, normaliser)
        return stats

    def _backward(self, outputs: Sequence[HeadOutput], normaliser: np.ndarray) -> None:
        size = self.comm.size
        terms = [out.loss_sum * float(w * size / n)
                 for out, w, n in zip(outputs, self.loss_weights, normaliser) if n > 0]
        if self.backward_mode == 'fused' and terms:
            total = terms[0]
            for term in terms[1:]:
                total = total + term
            total.backward()
        else:
            for term in terms:
                term.backward()

    def _exchange(self) -> None:
        """Averages gradients over ranks. With ``grad_sync='optimizers'`` each ChainerMN
        multi-node optimizer averages its own part's gradients as the first thing its
        ``update()`` does (in ``_step``); with ``'net'``, one packed all-reduce runs here."""
        if self.grad_sync == 'net':
            self.comm.mean_grads(self.net)

    def _step(self) -> None:
        """Sets each scheduled part's rate for this update (a pure function of the iteration
        count, so a resumed run sets the same rates), steps every part that is not frozen, and
        at an epoch boundary advances every optimizer's epoch (``new_epoch(auto=True)``)."""
        for name, optimizer in self._optimizers.items():
            schedule = self.lr_schedules.get(name)
            if schedule is not None:
                setattr(optimizer, self._rate_attrs[name], schedule.rate(self.iteration))
            if name not in self.frozen:
                optimizer.update()
        if self._new_epoch:  # StandardUpdater's contract: optimizers count epochs
            for optimizer in self._optimizers.values():
                optimizer.new_epoch(auto=True)

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
