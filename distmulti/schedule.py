"""Learning-rate schedules: linear warm-up, then constant, step, exponential or cosine decay.

A schedule is a pure function of the iteration count, so a resumed run sets exactly the rates
an uninterrupted one would (nothing about it needs to be saved). The updater sets every part's
rate from its schedule before each step; ``RateObserver`` puts the rates into the log as
``lr/<part>``.

The linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD"): a rate given for
a reference batch is multiplied by global batch / reference batch, where the global batch is
ranks x micro-batches accumulated per step x per-rank batch size (see ``linear_scale``).
"""
import dataclasses
import math
from typing import Dict, Mapping, Optional

import chainer
from chainer.training import extension

from distmulti.config import DECAYS


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """The rate of one optimizer at every iteration of a run of ``total`` iterations.

    Iteration ``i`` is the 0-based index of the update being computed. During warm-up
    (``i < warmup``) the rate rises linearly, ``peak * (i + 1) / warmup``: the first update
    uses ``peak / warmup`` and update ``warmup - 1`` uses ``peak``. After it, with
    ``s = i - warmup`` updates since the warm-up and ``low = floor * peak``:

    - ``constant``: ``peak``;
    - ``step``: ``max(low, peak * gamma ** (s // step))``, a factor ``gamma`` every ``step``
      iterations;
    - ``exponential``: ``max(low, peak * gamma ** (s / step))``, the same factor spread
      smoothly over each ``step`` iterations;
    - ``cosine``: ``low + (peak - low) * (1 + cos(pi * s / (total - warmup))) / 2``, from
      ``peak`` down to ``low`` just after the last iteration.
    """

    peak: float
    total: int
    warmup: int = 0
    decay: str = 'constant'
    step: Optional[int] = None
    gamma: float = 0.1
    floor: float = 0.0

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ValueError(f'decay must be one of {", ".join(DECAYS)}, got {self.decay!r}')
        if self.decay in ('step', 'exponential') and not (self.step and self.step >= 1):
            raise ValueError(f'{self.decay} decay needs step >= 1 (iterations per factor '
                             f'gamma), got {self.step!r}')

    def rate(self, iteration: int) -> float:
        """The rate of update number ``iteration`` (0-based)."""
        if iteration < self.warmup:
            return self.peak * (iteration + 1) / self.warmup
        since = iteration - self.warmup
        low = self.floor * self.peak
        if self.decay == 'constant':
            return self.peak
        if self.decay == 'step':
            return max(low, self.peak * self.gamma ** (since // self.step))
        if self.decay == 'exponential':
            return max(low, self.peak * self.gamma ** (since / self.step))
        span = max(1, self.total - self.warmup)
        progress = min(1.0, since / span)
        return low + (self.peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_scale(world_size: int, accumulate: int, batchsize: int,
                 reference_batch: Optional[int]) -> float:
    """The linear scaling rule's factor: global batch / reference batch.

    The global batch of one step is ``world_size * accumulate * batchsize``; the reference
    batch is the batch the given rates were chosen for (default ``batchsize``: one rank, one
    micro-batch, so the factor is ``world_size * accumulate``).
    """
    reference = batchsize if reference_batch is None else reference_batch
    return world_size * accumulate * batchsize / reference


def rate_attribute(optimizer: chainer.Optimizer) -> Optional[str]:
    """The name of ``optimizer``'s learning-rate hyperparameter (``alpha`` for Adam and its
    variants, ``lr`` for SGD and most others), or None when it has none (AdaDelta)."""
    names = optimizer.hyperparam.get_dict()
    for name in ('alpha', 'lr'):
        if name in names:
            return name
    return None


class RateObserver(extension.Extension):
    """Writes every part's current rate into the trainer's observation as ``lr/<part>``.

    It runs at the log's trigger, as a writer (before LogReport and the plots read the
    observation), so each log entry holds the rate of the last update before it, not a
    mean over the interval.
    """

    priority = extension.PRIORITY_WRITER

    def __init__(self, optimizers: Mapping[str, chainer.Optimizer]):
        self._attrs: Dict[str, str] = {}
        self._optimizers = dict(optimizers)
        for name, optimizer in self._optimizers.items():
            attr = rate_attribute(optimizer)
            if attr is not None:
                self._attrs[name] = attr

    @property
    def keys(self):
        return [f'lr/{name}' for name in self._attrs]

    def __call__(self, trainer):
        for name, attr in self._attrs.items():
            trainer.observation[f'lr/{name}'] = float(getattr(self._optimizers[name], attr))
