"""`distmulti export RUN --onnx FILE` end to end, checked by running the file in ONNX Runtime."""
import csv

import numpy as np
import pytest

import chainer

from distmulti import inference
from tests.helpers import run_cli

onnx = pytest.importorskip('onnx', reason='the onnx extra is not installed '
                                          '(pip install ".[onnx]")')
ort = pytest.importorskip('onnxruntime', reason='the onnx extra is not installed '
                                                '(pip install ".[onnx]")')

QUICK = ['--no-progress', '--no-plot', '--train-size', '480', '--test-size', '120',
         '--batchsize', '16']


def session(path):
    return ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])


def test_exported_run_gives_predicts_logits_and_classes_on_the_whole_test_set(tmp_path):
    out, model_path = tmp_path / 'run', tmp_path / 'model.onnx'
    proc = run_cli(['train', '--out', out, '--iterations', 40] + QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(['export', out, '--onnx', model_path])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'wrote {model_path}: ONNX opset 13, input x (batch, 1, 8, 24)' in proc.stdout
    assert 'head0 (batch, 10), head1 (batch, 10), head2 (batch, 10)' in proc.stdout

    model = onnx.load(str(model_path))
    assert [(o.domain, o.version) for o in model.opset_import] == [('', 13)]
    assert [o.name for o in model.graph.output] == ['head0', 'head1', 'head2']

    # The network exactly as `distmulti predict` builds it, on the run's whole test split.
    config, net = inference.load_run(str(out))
    test = inference.run_data(config)[1]
    x = np.stack([np.asarray(test[i][0]) for i in range(len(test))])
    inference.load_parameters(net, str(out / 'model.npz'), x[0])
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        expected = [y.array for y in net(x)]
    sess = session(model_path)
    got = sess.run(None, {'x': x})
    assert len(got) == 3 and len(x) == 120
    for want, have in zip(expected, got):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)
    # The batch size is free: one sample at a time and batches of 7 give the same logits.
    for size in (1, 7):
        parts = [sess.run(None, {'x': x[i:i + size]}) for i in range(0, len(x), size)]
        for head, have in enumerate(got):
            np.testing.assert_allclose(np.concatenate([p[head] for p in parts]), have,
                                       rtol=1e-5, atol=1e-6)

    np.savez(tmp_path / 'inputs.npz', x=x)
    proc = run_cli(['predict', out, f'npz:{tmp_path / "inputs.npz"}', '--output',
                    tmp_path / 'p.csv'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / 'p.csv')))
    for head, logits in enumerate(got):
        predicted = np.array([int(row[f'head{head}']) for row in rows])
        np.testing.assert_array_equal(logits.argmax(axis=1), predicted)


def test_export_of_something_that_is_not_a_run_is_a_clear_error(tmp_path):
    proc = run_cli(['export', tmp_path, '--onnx', tmp_path / 'm.onnx'])
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert 'is not the --out folder of a completed distmulti train run' in proc.stderr
    assert not (tmp_path / 'm.onnx').exists()
