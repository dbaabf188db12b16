"""The output folder: its lock (real processes), hygiene at start, rotation by lineage, file
modes and the completion status."""
import json
import os
import subprocess
import sys

import pytest

from distmulti import outdir
from distmulti.checkpoint import atomic_file, checkpoint_paths, list_checkpoints, rotation
from distmulti.errors import OutputError
from distmulti.runfiles import LOCK_FILE, RESULT_FILE


def lock(out, run_id='r1', job=None, logs=None):
    return outdir.OutputLock(str(out), run_id, job, (logs if logs is not None else []).append)


def test_a_second_run_on_a_locked_folder_is_refused_with_the_holder_named(tmp_path):
    first = lock(tmp_path, 'first').acquire()
    with pytest.raises(OutputError) as info:
        lock(tmp_path, 'second').acquire()
    message = str(info.value)
    assert f'--out {tmp_path} is in use by another run (run first, pid {os.getpid()}' in message
    assert outdir.in_use_by_other(str(tmp_path), None) == message
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    assert outdir.in_use_by_other(str(tmp_path), None) is None
    lock(tmp_path, 'second').acquire().release()


def test_a_lock_held_by_another_live_process_is_refused_and_taken_over_once_it_died(tmp_path):
    script = ('import sys, time; sys.path.insert(0, %r)\n'
              'import distmulti.outdir as o\n'
              'o.OutputLock(%r, "other", None, print).acquire()\n'
              'print("locked", flush=True); time.sleep(60)\n') % (os.getcwd(), str(tmp_path))
    holder = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(OutputError, match=f'run other, pid {holder.pid}'):
            lock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # SIGKILLed: its lock file stays, but its flock is gone.
    assert (tmp_path / LOCK_FILE).exists()
    logs = []
    mine = lock(tmp_path, 'mine', logs=logs).acquire()
    assert f'its process {holder.pid} on this host is gone' in logs[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())['run_id'] == 'mine'
    mine.release()


def test_a_later_attempt_of_the_same_job_takes_over_its_own_lock(tmp_path):
    old = lock(tmp_path, 'attempt1', job='job-7').acquire()
    logs = []
    new = lock(tmp_path, 'attempt2', job='job-7', logs=logs).acquire()
    assert 'an earlier attempt of this job (job-7)' in logs[0]
    old.release()  # the old attempt's release must not remove the new attempt's lock
    assert json.loads((tmp_path / LOCK_FILE).read_text())['run_id'] == 'attempt2'
    new.release()


@pytest.mark.parametrize('holder,age,flock_free,expected', [
    (None, 0, True, 'it is gone'),
    ({'host': 'h1', 'boot_id': 'b', 'pid': 5}, 1, False, None),           # alive here
    ({'host': 'h1', 'boot_id': 'b', 'pid': 5}, 1, True, 'its process 5 on this host is gone'),
    ({}, 1, True, None),                                                  # being written
    ({'host': 'h2', 'pid': 9}, 30, True, None),                           # other host, fresh
    ({'host': 'h2', 'pid': 9}, 61, True, 'has not refreshed it for 61 s'),
    ({'host': 'h2', 'pid': 9}, 600, False, None),                          # flocked: alive
    ({'host': 'h2', 'job_id': 'j', 'run_id': 'x'}, 1, False, 'an earlier attempt of this job'),
])
def test_stale_lock_rules(holder, age, flock_free, expected):
    me = {'host': 'h1', 'boot_id': 'b', 'job_id': 'j'}
    reason = outdir.stale_reason(holder, me, age, flock_free, stale_after=60)
    if expected is None:
        assert reason is None
    else:
        assert expected in reason


def test_prepare_refuses_a_file_and_an_unwritable_folder(tmp_path):
    (tmp_path / 'f').write_text('x')
    with pytest.raises(OutputError, match='is an existing file, not a folder'):
        outdir.prepare(str(tmp_path / 'f'))
    with pytest.raises(OutputError, match='cannot create the folder'):
        outdir.prepare(str(tmp_path / 'f' / 'sub'))
    outdir.prepare(str(tmp_path / 'a' / 'b'))
    assert (tmp_path / 'a' / 'b').is_dir()


def _fake_checkpoint(out, iteration, lineage):
    npz, manifest = checkpoint_paths(str(out), iteration)
    open(npz, 'wb').close()
    with open(manifest, 'w') as f:
        json.dump({'lineage': lineage, 'iteration': iteration}, f)


def test_rotation_only_deletes_checkpoints_of_its_own_lineage(tmp_path):
    for it, lineage in [(100, 'old'), (200, 'old'), (150, 'new'), (250, 'new'), (300, 'new')]:
        _fake_checkpoint(tmp_path, it, lineage)
    assert rotation(str(tmp_path), 'new', keep=1) == [250, 150]
    assert rotation(str(tmp_path), 'old', keep=1) == [100]
    assert rotation(str(tmp_path), None, keep=1) == []


def test_checkpoints_newer_than_the_start_are_set_aside_not_deleted(tmp_path):
    for it in (100, 200, 300):
        _fake_checkpoint(tmp_path, it, 'a')
    logs = []
    assert outdir.set_aside(str(tmp_path), 100, logs.append) == [200, 300]
    assert list_checkpoints(str(tmp_path)) == [100]
    (aside,) = (tmp_path / 'abandoned').iterdir()
    assert sorted(p.name for p in aside.iterdir()) == [
        'checkpoint_iter_200.json', 'checkpoint_iter_200.npz',
        'checkpoint_iter_300.json', 'checkpoint_iter_300.npz']
    assert 'set aside 2 checkpoint(s) newer than the resume point (iteration 100)' in logs[0]
    assert outdir.set_aside(str(tmp_path), None, logs.append) == [100]  # a fresh start
    assert list_checkpoints(str(tmp_path)) == []


def test_stale_temporary_files_are_removed(tmp_path):
    (tmp_path / '.tmp-model.npzab12').write_bytes(b'x' * 10)
    (tmp_path / 'keep.txt').write_text('x')
    logs = []
    assert outdir.remove_stale_tmp(str(tmp_path), logs.append) == ['.tmp-model.npzab12']
    assert sorted(os.listdir(tmp_path)) == ['keep.txt']


@pytest.mark.parametrize('umask,mode', [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_written_files_get_the_mode_the_umask_allows(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with atomic_file(str(tmp_path / 'r.json')) as f:
            f.write('{}')
        lock(tmp_path).acquire().release()
        probe = outdir.OutputLock(str(tmp_path), 'p', None, print).acquire()
        lock_mode = (tmp_path / LOCK_FILE).stat().st_mode & 0o777
        probe.release()
    finally:
        os.umask(old)
    assert (tmp_path / 'r.json').stat().st_mode & 0o777 == mode
    assert lock_mode == mode


def test_status_needs_this_runs_result(tmp_path):
    assert not outdir.status(str(tmp_path)).completed
    _fake_checkpoint(tmp_path, 40, 'a')
    assert 'newest checkpoint is at iteration 40' in outdir.status(str(tmp_path)).message
    (tmp_path / RESULT_FILE).write_text(json.dumps({'run_id': 'r1', 'world_size': 2,
                                                   'iterations': 80}))
    assert outdir.status(str(tmp_path)).completed
    assert outdir.status(str(tmp_path), run_id='r1', world_size=2).completed
    other = outdir.status(str(tmp_path), run_id='r2')
    assert not other.completed and 'written by run r1' in other.message
    assert not outdir.status(str(tmp_path), world_size=4).completed


def test_the_status_command_exits_0_only_for_a_completed_run(tmp_path, capsys):
    from distmulti.cli import main
    assert main(['status', str(tmp_path)]) == 1
    assert 'result.json does not exist' in capsys.readouterr().err
    (tmp_path / RESULT_FILE).write_text(json.dumps({'run_id': 'r1', 'world_size': 2}))
    assert main(['status', str(tmp_path), '--run-id', 'r1', '--world-size', '2']) == 0
    assert 'completed' in capsys.readouterr().out
    assert main(['status', str(tmp_path), '--run-id', 'r9']) == 1
    assert main(['status', str(tmp_path), '--world-size', '3']) == 1
