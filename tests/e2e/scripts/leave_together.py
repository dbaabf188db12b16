"""Every rank ends with one collective error through the CLI's error path (``cli._fail``);
rank 0 gets there ``DELAY_S`` seconds after the others, which wait in its final barrier and
say so by creating ``OUT/waiting-<rank>``. Exits with the error's status: 75 for the stop
(``argv[2] == 'stop'``), 2 for a usage error.

Run under mpiexec by tests/e2e/test_leave_together.py, which sends SIGTERM to a waiting rank,
as srun -K and mpiexec do to the remaining ranks once the first one has exited.
"""
import os
import sys
import time

import distmulti  # noqa: F401  (first: it makes chainer import on numpy 2)
from distmulti import cli
from distmulti.comm import create_world
from distmulti.errors import ConfigError, TrainingStopped

DELAY_S = 3.0

out, kind = sys.argv[1], sys.argv[2]
world = create_world('naive')
error = (TrainingStopped('stopped at iteration 7; wrote a checkpoint', collective=True)
         if kind == 'stop' else ConfigError('a usage error on every rank', collective=True))
if world.rank == 0:
    time.sleep(DELAY_S)
else:
    open(os.path.join(out, f'waiting-{world.rank}'), 'w').close()
sys.exit(cli._fail(error))
