"""Small networks, batches and a CLI runner shared by the tests."""
import hashlib
import os
import signal
import subprocess
import sys
import time

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


MPIEXEC = os.path.join(os.path.dirname(sys.executable), 'mpiexec')


def mpiexec(*rest):
    """The venv's mpiexec with what root and a 2-core machine need, then ``rest``."""
    root = ['--allow-run-as-root'] if os.geteuid() == 0 else []
    return [MPIEXEC] + root + ['--oversubscribe'] + [str(a) for a in rest]


def start(argv, cwd=None, env=None):
    """Starts ``argv`` in a process group of its own, output (stdout and stderr) captured."""
    full_env = dict(os.environ, PYTHONWARNINGS='ignore', OMP_NUM_THREADS='1',
                    PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    full_env.update(env or {})
    return subprocess.Popen([str(a) for a in argv], cwd=cwd or ROOT, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc, timeout):
    """(exit status, output); past ``timeout`` kills the whole group and fails the test."""
    import pytest
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f'{proc.args[:6]}... did not end within {timeout} s; output:\n'
                    f'{out[-4000:]}')
    return proc.returncode, out


def run(argv, timeout, cwd=None, env=None):
    """(exit status, output, seconds) of ``argv`` run under ``timeout``."""
    started = time.monotonic()
    code, out = finish(start(argv, cwd, env), timeout)
    return code, out, time.monotonic() - started


class Payload:
    """Unpickling this creates (opens for writing) the file ``marker``: proof that a loader
    ran code from a file when the marker exists."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


def wait_for(path, proc, timeout):
    """Waits until ``path`` exists; fails the test (killing ``proc``'s group) if ``proc``
    ends first or ``timeout`` passes."""
    import pytest
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f'{path} never appeared (job status {proc.poll()}):\n'
                        f'{proc.communicate()[0][-3000:]}')
        time.sleep(0.02)


#: The variables by which launchers tell a process its rank (Open MPI, PMIx, PMI, Slurm).
RANK_VARS = ('OMPI_COMM_WORLD_RANK', 'PMIX_RANK', 'PMI_RANK', 'SLURM_PROCID')


def rank_processes(token):
    """{rank: pid} of the Python processes started as MPI ranks (or Slurm tasks) whose
    command line has an argument containing ``token`` (e.g. the run's --out folder)."""
    ranks = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/cmdline', 'rb') as f:
                argv = f.read().decode(errors='replace').split('\0')
            if not (os.path.basename(argv[0]).startswith('python')
                    and any(token in arg for arg in argv)):
                continue
            with open(f'/proc/{entry}/environ', 'rb') as f:
                env = dict(item.split('=', 1) for item in
                           f.read().decode(errors='replace').split('\0') if '=' in item)
        except OSError:  # the process ended meanwhile
            continue
        rank = next((env[v] for v in RANK_VARS if v in env), None)
        if rank is not None and rank.isdigit():
            ranks[int(rank)] = int(entry)
    return ranks


def rank_pids(out_dir):
    """PIDs of the rank processes training into ``out_dir``, in rank order."""
    ranks = rank_processes(str(out_dir))
    return [ranks[r] for r in sorted(ranks)]


def image_folder(folder, x, y, header=True):
    """Writes ``x`` (N x 1 x H x W in [0, 1]) as PNGs under ``folder/img`` and their labels
    ``y`` (N x 2) as ``folder/labels.csv`` (columns file, left, right); returns the CSV's path."""
    import csv
    from PIL import Image
    (folder / 'img').mkdir(parents=True)
    rows = [['file', 'left', 'right']] if header else []
    for i, (image, labels) in enumerate(zip(x, y)):
        name = f'img/{i:04d}.png'
        Image.fromarray((image[0] * 255).round().astype(np.uint8), mode='L').save(folder / name)
        rows.append([name] + [int(v) for v in labels])
    with open(folder / 'labels.csv', 'w', newline='') as f:
        csv.writer(f).writerows(rows)
    return folder / 'labels.csv'
