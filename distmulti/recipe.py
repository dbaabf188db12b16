"""The large-batch recipe for one run, from its config: every part's learning-rate schedule
(warm-up, decay, the linear scaling rule), its regularisation hooks (gradient clipping,
weight decay), and synchronised BatchNorm across ranks."""
import math
from typing import Callable, Dict

import chainer

from distmulti.batchnorm import batch_norm_links, sync_batch_norm
from distmulti.config import TrainConfig
from distmulti.models import MultiHeadNet
from distmulti.optim import add_regularization
from distmulti.schedule import LRSchedule, linear_scale, rate_attribute


def total_iterations(config: TrainConfig, shard_size: int) -> int:
    """Iterations of the whole run: ``iterations``, or enough steps of ``accumulate``
    batches of ``batchsize`` for ``epoch`` passes over this rank's shard."""
    length, unit = config.stop_trigger
    if unit == 'iteration':
        return length
    return math.ceil(length * shard_size / (config.batchsize * config.accumulate))


def apply(config: TrainConfig, net: MultiHeadNet, optimizers: Dict[str, chainer.Optimizer],
          world, total: int, log: Callable[[str], None]) -> Dict[str, LRSchedule]:
    """Adds each part's hooks, synchronises BatchNorm (``sync_bn``, several ranks) or says
    once that its statistics are per rank, and returns each part's schedule.

    ``optimizers`` are set up on their parts; ``log`` is rank 0's. Parts whose rate stays
    constant and unscaled, and parts without a rate (AdaDelta), get no schedule.
    """
    for name, optimizer in optimizers.items():
        spec = config.optimizer_spec(name)
        add_regularization(optimizer, spec['weight_decay'], spec['grad_clip'])
    if world.size > 1:
        bns = len(batch_norm_links(net))
        if config.sync_bn:
            sync_batch_norm(net, world, optimizers)
            log(f'sync_bn: {bns} BatchNormalization link(s) normalise over the global batch '
                f'of {world.size} ranks')
        elif bns:
            log(f'note: the network has {bns} BatchNormalization link(s); each of the '
                f'{world.size} ranks normalises with the statistics of its own batch of '
                f'{config.batchsize} (--sync-bn: the global batch\'s)')
    factor = (linear_scale(world.size, config.accumulate, config.batchsize,
                           config.lr_reference_batch)
              if config.lr_scaling == 'linear' else 1.0)
    schedules = {}
    for name, optimizer in optimizers.items():
        spec = config.optimizer_spec(name)
        attr = rate_attribute(optimizer)
        if attr is None or (factor == 1.0 and spec['warmup'] == 0
                            and spec['lr_decay'] == 'constant'):
            continue
        schedules[name] = LRSchedule(
            peak=float(getattr(optimizer, attr)) * factor, total=total,
            warmup=spec['warmup'], decay=spec['lr_decay'], step=spec['lr_step'],
            gamma=spec['lr_gamma'], floor=spec['lr_floor'])
    if factor != 1.0:
        log(f'lr_scaling linear: every rate x {factor:g} (global batch {world.size} x '
            f'{config.accumulate} x {config.batchsize} over the reference batch '
            f'{config.lr_reference_batch or config.batchsize})')
    return schedules
