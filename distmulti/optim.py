"""String-keyed optimizer factory: one named optimizer per part of the network."""
from typing import Callable, Dict

import chainer
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
