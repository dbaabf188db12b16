"""String-keyed optimizer factory: one named optimizer per part of the network, with the
part's regularisation hooks (gradient clipping, weight decay)."""
from typing import Callable, Dict, Optional

import chainer
from chainer import optimizer_hooks
from chainer import optimizers as O

from distmulti.errors import ConfigError

# name -> builder taking the learning rate. Adam's rate is called alpha in Chainer.
OPTIMIZERS: Dict[str, Callable[[float], chainer.Optimizer]] = {
    'adam': lambda lr: O.Adam(alpha=lr),
    'sgd': lambda lr: O.SGD(lr=lr),
    'momentum_sgd': lambda lr: O.MomentumSGD(lr=lr),
    'nesterov': lambda lr: O.NesterovAG(lr=lr),
    'rmsprop': lambda lr: O.RMSprop(lr=lr),
    'adagrad': lambda lr: O.AdaGrad(lr=lr),
    'adadelta': lambda lr: O.AdaDelta(),
}


def check_optimizer_type(name, where: str) -> None:
    if name not in OPTIMIZERS:
        raise ConfigError(f'{where} must be one of {", ".join(sorted(OPTIMIZERS))}, '
                          f'got {name!r}')


def create_optimizer(kind: str, lr: float) -> chainer.Optimizer:
    """Creates an optimizer by name (``adam``, ``momentum_sgd``, ...) with learning rate ``lr``."""
    check_optimizer_type(kind, 'optimizer')
    return OPTIMIZERS[kind](lr)


def add_regularization(optimizer: chainer.Optimizer, weight_decay: float = 0.0,
                       grad_clip: Optional[float] = None) -> None:
    """Adds Chainer's optimizer hooks to a set-up optimizer: ``GradientClipping(grad_clip)``
    (the L2 norm over all of its part's gradients), then ``WeightDecay(weight_decay)``.

    Both run inside ``optimizer.update()``, on the gradients already averaged over ranks, so
    every rank clips and decays alike. Clipping comes first, so the decay term is not clipped
    (as with PyTorch's ``clip_grad_norm_`` before an optimizer with ``weight_decay``).
    """
    if grad_clip is not None:
        optimizer.add_hook(optimizer_hooks.GradientClipping(grad_clip))
    if weight_decay:
        optimizer.add_hook(optimizer_hooks.WeightDecay(weight_decay))
