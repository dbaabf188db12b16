"""Which device a rank computes on, made current before anything touches CUDA.

A rank's GPU is its rank on its node modulo the GPUs it can see (one when a scheduler binds a
GPU per task or per container). The rank on the node comes from MPI itself (the ranks that
share memory with this one, ``MPI_COMM_TYPE_SHARED``), which needs no CUDA and holds for
every launcher; launcher variables such as ``SLURM_LOCALID`` are not trusted, because ranks
that mpiexec starts inside a Slurm step inherit the step's value.

Pure rank arithmetic (``gpu_index``, ``duplicate_gpus``) is kept apart from the thin
boundaries: MPI (``node_layout``) and CUDA through CuPy (``visible_gpus``, ``select``,
``seed``, the checkpointed generator seed). Only this module and chainer's device objects
call CuPy before training starts.
"""
import os
import socket
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

import chainer

from distmulti.errors import DeviceError

#: The GPU device this process made current through :func:`select`, if any.
_current: Optional[chainer.backend.Device] = None


def gpu_index(requested: int, world_size: int, local_rank: int, visible: int) -> int:
    """The GPU a rank uses: ``requested`` in a single process; with several ranks, the rank on
    its node modulo the GPUs it can see (``requested`` then only says "GPUs")."""
    if world_size == 1:
        return requested
    if visible < 1:
        raise DeviceError('a GPU device was requested, but this rank sees no CUDA GPU; use '
                          '--device -1 for the CPU', collective=True)
    return local_rank % visible


def node_layout(environ: Optional[Mapping[str, str]] = None) -> Tuple[int, int, int]:
    """(world size, rank on this node, ranks on this node), from MPI when launched by it.

    Collective under MPI: every rank calls it at the same point. Outside MPI (or when mpi4py
    cannot load, in which case training falls back to one process) it is ``(1, 0, 1)``.
    """
    from distmulti.comm import launched_by_mpi
    environ = os.environ if environ is None else environ
    if not launched_by_mpi(environ):
        return 1, 0, 1
    try:
        from distmulti.comm import import_mpi
        MPI = import_mpi(environ)
    except Exception:  # create_world reports it and trains in one process
        return 1, 0, 1
    world = MPI.COMM_WORLD
    if world.size == 1:
        return 1, 0, 1
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return world.size, node.rank, node.size
    finally:
        node.Free()


def visible_gpus() -> int:
    """CUDA GPUs this process can see (0 without CuPy or a driver). Creates no context."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no CuPy, no driver: select() explains when a GPU was asked for
        return 0


def select(spec: str, world_size: int = 1, local_rank: int = 0) -> chainer.backend.Device:
    """The rank's device for ``spec`` (``@numpy``, ``@cupy:N``, ``@intel64``), made current.

    For ``@cupy:N`` this is the first CUDA call besides counting GPUs: the rank's GPU becomes
    the current device, so that everything after it (NCCL communicators, CuPy's random
    generator, arrays, kernels) is on that GPU. Raises DeviceError with the reason when the
    device cannot be used here.
    """
    global _current
    if spec.startswith('@cupy:'):
        try:
            import cupy
        except ImportError:
            raise DeviceError(f'device {spec} needs CuPy, which is not installed; install '
                              f"distmulti with the gpu extra (sh install.sh -e '.[gpu]') or use "
                              f'--device -1 for the CPU') from None
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # CUDA driver missing or broken
            raise DeviceError(f'device {spec}: no usable CUDA GPU here ({e}); use --device -1 '
                              f'for the CPU (distmulti doctor tells what is missing)') from None
        index = gpu_index(int(spec.split(':', 1)[1]), world_size, local_rank, count)
        if index >= count:
            raise DeviceError(f'device {spec} does not exist: this machine has {count} GPU(s), '
                              f'numbered 0..{count - 1}')
        device = chainer.get_device(f'@cupy:{index}')
        device.use()
        _current = device
        return device
    if spec == '@intel64' and not chainer.backends.intel64.is_ideep_available():
        raise DeviceError('device @intel64 needs iDeep (pip install ideep4py), which is not '
                          'available here; use --device -1')
    return chainer.get_device(spec)


def seed(value: int, device: chainer.backend.Device, rank: int = 0) -> None:
    """Seeds numpy and, on a GPU, CuPy's generator of ``device`` (CuPy keeps one generator
    per device and ``cupy.random.seed`` seeds the current one's only) and the seed of
    chainer's cuDNN dropout states (``CHAINER_SEED``, unless set)."""
    np.random.seed(value)
    if device.xp is np:
        return
    import cupy
    with cupy.cuda.Device(device.device.id):
        cupy.random.seed(value)
    os.environ.setdefault('CHAINER_SEED', str(value + rank))


# -- the GPU generator in checkpoints --------------------------------------------------------
# cuRAND cannot give back a generator's position (CuPy only sets seed and offset), so the state
# that a checkpoint holds is a seed: at each checkpoint the rank's generator draws a new seed
# from itself and is reseeded with it. The run goes on from "seeded with s", and a run
# resumed from that checkpoint seeds with s too, so both draw the same numbers.

def checkpoint_gpu_seed() -> Optional[int]:
    """At a checkpoint: the seed the rank's GPU generator continues from, or None on the CPU."""
    if _current is None:
        return None
    import cupy
    with cupy.cuda.Device(_current.device.id):
        state = cupy.random.get_random_state()
        value = int(state.randint(0, 2 ** 31 - 1))
        state.seed(value)
    return value


def restore_gpu_seed(value: Optional[int]) -> None:
    """On resume: continues the rank's GPU generator from a checkpoint's seed."""
    if _current is None or value is None:
        return
    import cupy
    with cupy.cuda.Device(_current.device.id):
        cupy.random.get_random_state().seed(int(value))


# -- one GPU per rank -------------------------------------------------------------------------

def gpu_identity(device: chainer.backend.Device) -> Optional[str]:
    """``host/PCI bus id`` of a GPU device (the same physical GPU gives the same string
    whatever CUDA_VISIBLE_DEVICES numbers it), None for the CPU."""
    if device.xp is np:
        return None
    return f'{socket.gethostname()}/{device.device.pci_bus_id}'


def duplicate_gpus(identities: Sequence[Optional[str]]) -> Dict[str, List[int]]:
    """``{gpu: [ranks]}`` for every GPU that more than one rank uses."""
    ranks: Dict[str, List[int]] = {}
    for rank, gpu in enumerate(identities):
        if gpu is not None:
            ranks.setdefault(gpu, []).append(rank)
    return {gpu: used for gpu, used in ranks.items() if len(used) > 1}
