"""Synchronised BatchNormalization: every ``L.BatchNormalization`` of a network replaced by
ChainerMN's ``MultiNodeBatchNormalization``, so that N ranks with batch B normalise with the
mean and variance of the global batch N*B, as one process with that batch would.

ChainerMN's link corrects the running variance for bias with the local count B
(``B / (B - 1)``); ``SyncBatchNormalization`` applies the global count's factor instead, so
its running statistics, too, equal those of one process with batch N*B.
"""
import warnings
from typing import Dict, List, Tuple

import chainer
import chainer.links as L

from distmulti.errors import ConfigError

try:  # ChainerMN imports mpi4py; a single process without MPI never needs this class.
    from chainermn.links import MultiNodeBatchNormalization
except ImportError:  # pragma: no cover - chainermn is part of chainer
    MultiNodeBatchNormalization = None


def batch_norm_links(link: chainer.Link) -> List[Tuple[str, chainer.Link]]:
    """(path, link) of every ``L.BatchNormalization`` inside ``link`` (not synchronised ones;
    not ``link`` itself)."""
    return [(path, sub) for path, sub in link.namedlinks(skipself=True)
            if isinstance(sub, L.BatchNormalization)]


def sync_batch_norm(net: chainer.Link, comm, optimizers: Dict[str, chainer.Optimizer]) -> int:
    """Replaces every ``L.BatchNormalization`` of ``net``'s parts with a
    ``SyncBatchNormalization`` on ``comm`` (an ``MPIComm`` of several ranks), keeping its
    parameters, running statistics and settings. Returns how many were replaced.

    ``optimizers`` are the parts' optimizers, already set up: the new links' parameters get
    update rules from their part's optimizer. Call it after the network is initialised
    (lazily sized links have their shapes) and before the updater is built.
    """
    replaced = 0
    for path, bn in batch_norm_links(net):
        part = path.split('/')[1]
        if path == '/' + part:
            raise ConfigError(f'{part} is itself a BatchNormalization link, which sync_bn '
                              f'cannot replace under its optimizer; put it inside a Chain',
                              collective=True)
        new = _convert(bn, comm, path[1:])
        _replace(net, path, new)
        optimizer = optimizers[part]
        for param in new.params():
            if isinstance(optimizer, chainer.GradientMethod):
                param.update_rule = optimizer.create_update_rule()
        replaced += 1
    return replaced


class SyncBatchNormalization(MultiNodeBatchNormalization or object):
    """ChainerMN's ``MultiNodeBatchNormalization`` whose running variance uses the unbiased
    factor of the global batch (ranks x local batch) instead of the local one."""

    def __call__(self, x, finetune=False):
        if not chainer.config.train:
            return super().__call__(x, finetune=finetune)
        old_var = self.avg_var.copy()
        y = super().__call__(x, finetune=finetune)
        decay = 1.0 - 1.0 / self.N if finetune else self.decay
        local = x.size // self.avg_mean.size
        total = local * self.comm.size
        local_adjust = local / max(local - 1.0, 1.0)
        global_adjust = total / max(total - 1.0, 1.0)
        # avg_var = decay * old + (1 - decay) * local_adjust * var: swap in global_adjust.
        fresh = self.avg_var - decay * old_var
        self.avg_var[...] = decay * old_var + fresh * (global_adjust / local_adjust)
        return y


def _convert(bn: L.BatchNormalization, comm, where: str) -> chainer.Link:
    if bn.avg_mean is None:
        raise ConfigError(f'{where}: a BatchNormalization without a size cannot be '
                          f'synchronised before its first forward; give it a size',
                          collective=True)
    axis = getattr(bn, 'axis', None)
    if axis is not None and tuple(axis) != _default_axis(len(axis)):
        raise ConfigError(f'{where}: sync_bn supports BatchNormalization over the batch and '
                          f'spatial axes only (axis (0, 2, ...)); this one has axis {axis}',
                          collective=True)
    gamma, beta = getattr(bn, 'gamma', None), getattr(bn, 'beta', None)
    with warnings.catch_warnings():  # ChainerMN marks the link experimental (FutureWarning)
        warnings.simplefilter('ignore', FutureWarning)
        new = SyncBatchNormalization(bn.avg_mean.shape, comm.mn, decay=bn.decay, eps=bn.eps,
                                     dtype=bn.avg_mean.dtype, use_gamma=gamma is not None,
                                     use_beta=beta is not None)
    new.to_device(bn.device)
    new.avg_mean[...] = bn.avg_mean
    new.avg_var[...] = bn.avg_var
    new.N = bn.N
    if gamma is not None:
        new.gamma.array[...] = gamma.array
    if beta is not None:
        new.beta.array[...] = beta.array
    return new


def _default_axis(n: int) -> Tuple[int, ...]:
    return (0,) + tuple(range(2, n + 1))


def _replace(root: chainer.Link, path: str, new: chainer.Link) -> None:
    """Puts ``new`` where ``path`` (as ``namedlinks`` names it) is under ``root``."""
    names = [p for p in path.split('/') if p]
    parent = root
    for name in names[:-1]:
        parent = _child(parent, name)
    last = names[-1]
    old = _child(parent, last)
    if isinstance(parent, chainer.Sequential):  # its layers hold functions too
        parent[next(i for i, layer in enumerate(parent) if layer is old)] = new
    elif isinstance(parent, chainer.ChainList):  # no public way to replace a child
        parent._children[int(last)] = new
        new.name = last
    else:
        delattr(parent, last)
        with parent.init_scope():
            setattr(parent, last, new)


def _child(parent: chainer.Link, name: str) -> chainer.Link:
    if isinstance(parent, chainer.ChainList):
        return list(parent.children())[int(name)]
    return getattr(parent, name)
