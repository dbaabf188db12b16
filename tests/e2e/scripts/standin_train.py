"""`distmulti train ARGS` on the CUDA stand-in (tests/standin_cuda): runs distmulti's real
start-up until the first array allocation, where the stand-in stops it, then creates the
NCCL communicator exactly as ChainerMN's first collective would (``_init_comms``), so that the
stand-in's log shows which device each of these happened on."""
import sys

import distmulti  # noqa: F401  (compatibility layer first)
import cupy

from distmulti.cli import config_from_args, parse_args
from distmulti.comm import current_world
from distmulti.training import train

try:
    train(config_from_args(parse_args(['train'] + sys.argv[1:])))
except cupy.StandInStop as e:
    print(f'stopped: {e}', flush=True)
world = current_world()
if world is not None and world.size > 1:
    world.mn._init_comms()  # NCCL's communicator, on the current device
    world.mpi.Barrier()
