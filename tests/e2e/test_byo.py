"""Users' own networks and data: examples, --model, --dataset npz:/csv:, bad datasets,
evaluate and predict. Real files, real processes (mpiexec under a timeout)."""
import csv
import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from distmulti.data import digit_strips
from tests.helpers import MPIEXEC, ROOT, image_folder, mpiexec, run, run_cli

PYTHON = sys.executable
QUICK = ['--no-progress', '--no-plot', '--batchsize', '16']


def result_of(out):
    return json.loads((out / 'result.json').read_text())


@pytest.mark.parametrize('ranks', [1, 2])
@pytest.mark.parametrize('example,heads', [('seed_pattern', ['head0', 'head1', 'head2']),
                                           ('mixed_heads', ['digit', 'even'])])
def test_examples_run_as_one_process_and_under_mpiexec(tmp_path, example, heads, ranks):
    if ranks > 1 and not os.access(MPIEXEC, os.X_OK):
        pytest.skip('no mpiexec beside this Python')
    script = os.path.join(ROOT, 'examples', f'{example}.py')
    cmd = [PYTHON, script, tmp_path, 40]
    code, out, _ = run(cmd if ranks == 1 else mpiexec('-n', 2, PYTHON, '-m', 'mpi4py', *cmd[1:]),
                       timeout=300)
    assert code == 0, out[-3000:]
    result = result_of(tmp_path)
    assert result['world_size'] == ranks and result['iterations'] == 40
    assert {f'{h}/accuracy' for h in heads} <= set(result['test'])
    assert result['network'] == 'python'


@pytest.mark.slow
def test_mixed_heads_example_learns_both_heads(tmp_path):
    code, out, _ = run([PYTHON, os.path.join(ROOT, 'examples', 'mixed_heads.py'), tmp_path],
                       timeout=300)
    assert code == 0, out[-3000:]
    test = result_of(tmp_path)['test']
    assert test['digit/accuracy'] >= 0.95 and test['even/accuracy'] >= 0.95, test


def _strips(k=2, n=600, seed=0):
    train, _ = digit_strips(k, n, 1, seed=seed)
    return train.x, train.y


def test_an_npz_dataset_loads_and_trains(tmp_path):
    x, y = _strips()
    np.savez(tmp_path / 'd.npz', x=x, y=y)
    proc = run_cli(['train', '--dataset', f'npz:{tmp_path / "d.npz"}', '--heads', 2,
                    '--iterations', 60, '--out', tmp_path / 'o'] + QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = result_of(tmp_path / 'o')
    assert result['test']['samples'] == 120  # the seeded 0.2 held out
    assert result['test']['head0/accuracy'] > 0.5


def test_an_image_folder_with_a_label_csv_loads_and_trains(tmp_path):
    x, y = _strips(n=400)
    labels = image_folder(tmp_path / 'data', x, y)
    proc = run_cli(['train', '--dataset', f'csv:{labels}', '--heads', 2, '--iterations', 60,
                    '--test-fraction', 0.25, '--out', tmp_path / 'o'] + QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = result_of(tmp_path / 'o')
    assert result['test']['samples'] == 100
    assert result['test']['head1/accuracy'] > 0.5


def _bad_npz(tmp_path, kind):
    x, y = _strips(n=50)
    path = tmp_path / f'{kind}.npz'
    if kind == 'dtype':
        np.savez(path, x=x.astype(np.float64), y=y)
    elif kind == 'columns':
        np.savez(path, x=x, y=y[:, :1])
    elif kind == 'lengths':
        np.savez(path, x=x, y=y[:40])
    elif kind == 'range':
        y = y.copy()
        y[7, 1] = 10
        np.savez(path, x=x, y=y)
    return f'npz:{path}', str(path)


@pytest.mark.parametrize('kind,message', [
    ('dtype', 'x has dtype float64 but float32 is required'),
    ('columns', 'the labels have 1 columns but the model has 2 heads'),
    ('lengths', 'x has 50 samples but y has 40'),
    ('range', 'head1 label 10 at row 7 is outside [0, 10)'),
])
def test_each_bad_npz_dataset_gets_an_error_naming_the_file(tmp_path, kind, message):
    spec, path = _bad_npz(tmp_path, kind)
    proc = run_cli(['train', '--dataset', spec, '--heads', 2, '--out', tmp_path / 'o'] + QUICK)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    line = [l for l in proc.stderr.splitlines() if l.startswith('distmulti: error')]
    assert len(line) == 1 and path in line[0] and message in line[0], proc.stderr


def test_a_missing_image_file_gets_an_error_naming_the_csv_row_and_the_file(tmp_path):
    x, y = _strips(n=20)
    labels = image_folder(tmp_path / 'data', x, y)
    os.unlink(tmp_path / 'data' / 'img' / '0003.png')
    proc = run_cli(['train', '--dataset', f'csv:{labels}', '--heads', 2,
                    '--out', tmp_path / 'o'] + QUICK)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith('distmulti: error')]
    assert lines == [f'distmulti: error: CSV file {labels}, row 5: image img/0003.png does not '
                     f'exist (names are relative to the CSV file\'s folder {tmp_path / "data"} '
                     f'unless absolute)'], proc.stderr


def test_a_bad_dataset_stops_every_rank_with_the_same_error(tmp_path):
    if not os.access(MPIEXEC, os.X_OK):
        pytest.skip('no mpiexec beside this Python')
    spec, path = _bad_npz(tmp_path, 'range')
    code, out, _ = run(mpiexec('-n', 2, PYTHON, '-m', 'mpi4py', '-m', 'distmulti', 'train',
                               '--dataset', spec, '--heads', 2, '--out', tmp_path / 'o',
                               *QUICK), timeout=120)
    assert code == 2
    # Every rank stops with it; rank 0 says it once for the job, and nothing aborts.
    assert out.count(f'distmulti: error: {spec}: head1 label 10 at row 7') == 1, out
    assert 'MPI_ABORT' not in out and 'Traceback' not in out


MODELS = '''
import chainer.links as L
from distmulti import BaseCNN

def build():
    return BaseCNN(channels=8, features=32), {'left': L.Linear(None, 10), 'right': L.Linear(None, 10)}
'''


def test_model_factory_plugin_and_evaluate_predict_agree_with_training(tmp_path):
    (tmp_path / 'mymodels.py').write_text(MODELS)
    x, y = _strips(n=600)
    np.savez(tmp_path / 'd.npz', x=x, y=y)
    out = tmp_path / 'run'
    proc = run_cli(['train', '--model', 'mymodels:build', '--dataset', 'npz:d.npz',
                    '--iterations', 80, '--out', out] + QUICK, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = result_of(out)
    assert trained['network'] == 'mymodels:build'
    assert set(trained['test']) >= {'left/accuracy', 'right/accuracy', 'accuracy_all'}

    proc = run_cli(['evaluate', out], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((out / 'evaluation' / 'evaluation.json').read_text())
    for key in ('left/accuracy', 'right/accuracy', 'accuracy_all', 'loss'):
        assert evaluated['metrics'][key] == trained['test'][key], key
    assert f'left: accuracy {trained["test"]["left/accuracy"]:.4f}' in proc.stdout
    left = np.array(evaluated['confusion']['left'])
    assert left.shape == (10, 10) and left.sum() == 120
    assert np.trace(left) / left.sum() == pytest.approx(trained['test']['left/accuracy'])
    assert (out / 'evaluation' / 'confusion_right.png').stat().st_size > 1000

    # predict on the very test split the run held out (rebuilt from the same seed)
    from distmulti.datasets import split_dataset
    from chainer.datasets import TupleDataset
    _, test = split_dataset(TupleDataset(x, y), 0.2, 0)
    tx = np.stack([test[i][0] for i in range(len(test))])
    ty = np.stack([test[i][1] for i in range(len(test))])
    np.savez(tmp_path / 'inputs.npz', x=tx)
    proc = run_cli(['predict', out, 'npz:inputs.npz', '--output', tmp_path / 'p.csv'],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / 'p.csv')))
    assert len(rows) == 120
    for column, head in enumerate(('left', 'right')):
        predicted = np.array([int(r[head]) for r in rows])
        assert (predicted == ty[:, column]).mean() == pytest.approx(
            trained['test'][f'{head}/accuracy'])


def test_predict_reads_image_files(tmp_path):
    out = tmp_path / 'run'
    proc = run_cli(['train', '--heads', 2, '--iterations', 30, '--train-size', 480,
                    '--test-size', 50, '--out', out] + QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, test = digit_strips(2, 480, 50, seed=0)
    paths = []
    for i in range(3):
        path = tmp_path / f'in{i}.png'
        Image.fromarray((test.x[i, 0] * 255).round().astype(np.uint8), mode='L').save(path)
        paths.append(str(path))
    proc = run_cli(['predict', out] + paths)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.reader(io.StringIO(proc.stdout)))
    assert rows[0] == ['input', 'head0', 'head1'] and [r[0] for r in rows[1:]] == paths
    assert all(0 <= int(v) < 10 for r in rows[1:] for v in r[1:])


def test_evaluate_without_a_completed_run_is_a_clear_error(tmp_path):
    proc = run_cli(['evaluate', tmp_path])
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert 'is not the --out folder of a completed distmulti train run' in proc.stderr
