"""Small networks, batches and a CLI runner shared by the tests."""
import hashlib
import os
import subprocess
import sys

import numpy as np

from distmulti.data import digit_strips
from distmulti.models import BaseCNN, MLPHead, MultiHeadNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_TIMEOUT = 600


def small_net(n_heads=3, seed=0, n_classes=10):
    """A small BaseCNN with MLP heads, initialised deterministically on 8 x 8K strips."""
    np.random.seed(seed)
    net = MultiHeadNet(BaseCNN(channels=4, features=16),
                       [MLPHead(n_classes, hidden=8) for _ in range(n_heads)])
    net.initialize(np.zeros((1, 1, 8, 8 * n_heads), dtype=np.float32))
    return net


def small_batch(n_heads=3, n=16, seed=0):
    """``n`` embedded digit strips: x float32 (n, 1, 8, 8K), y int32 (n, K)."""
    train, _ = digit_strips(n_heads, n, 1, seed=seed)
    return train.x, train.y


def params(link):
    """{path: copy of the parameter array} for every parameter of ``link``."""
    return {name: np.array(p.array) for name, p in link.namedparams()}


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_cli(args, cwd=None, timeout=CLI_TIMEOUT):
    """Runs ``python -m distmulti ARGS`` in a new process under a timeout."""
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    return subprocess.run([sys.executable, '-m', 'distmulti'] + [str(a) for a in args],
                          cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)
