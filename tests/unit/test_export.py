"""ONNX export of networks built from each converted Chainer function, run in ONNX Runtime."""
import numpy as np
import pytest

import chainer
import chainer.functions as F
import chainer.links as L

from distmulti import ExportError, LossHead, MultiHeadNet, export_onnx
from distmulti.export import OPSET, register_converter, supported_functions

onnx = pytest.importorskip('onnx', reason='the onnx extra is not installed '
                                          '(pip install ".[onnx]")')
ort = pytest.importorskip('onnxruntime', reason='the onnx extra is not installed '
                                                '(pip install ".[onnx]")')


class Lambda(chainer.Chain):
    """A base computing ``fn(self, x)``, with optional parameters named by ``params``."""

    def __init__(self, fn, links=None, **params):
        super().__init__()
        self.fn = fn
        with self.init_scope():
            for name, link in (links or {}).items():
                setattr(self, name, link)
            for name, value in params.items():
                setattr(self, name, chainer.Parameter(np.asarray(value, dtype=np.float32)))

    def forward(self, *args):
        return self.fn(self, *args)


def rand(*shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def bn():
    link = L.BatchNormalization(3, eps=0.3)  # far from ONNX's default 1e-5
    link.avg_mean[...] = rand(3, seed=1)
    link.avg_var[...] = np.abs(rand(3, seed=2)) + 0.5
    link.gamma.array[...] = rand(3, seed=3)
    link.beta.array[...] = rand(3, seed=4)
    return {'bn': link}


CONV = dict(W=rand(3, 1, 3, 3), b=rand(3))
BASES = {
    'conv cover_all stride 2': (lambda s, x: F.relu(F.convolution_2d(
        x, s.W, s.b, stride=2, pad=1, cover_all=True)), None, CONV),
    'conv dilated, no bias': (lambda s, x: F.convolution_2d(x, s.W, dilate=2, pad=2),
                              None, {'W': CONV['W']}),
    'grouped conv': (lambda s, x: F.convolution_2d(F.concat([x, x * 2.0]), s.W, s.b,
                                                   groups=2),
                     None, dict(W=rand(4, 1, 3, 3), b=rand(4))),
    'max pool cover_all': (lambda s, x: F.max_pooling_2d(x, 3, 2), None, {}),
    'max pool no cover_all': (lambda s, x: F.max_pooling_2d(x, 2, 1, pad=1, cover_all=False),
                              None, {}),
    'average pool': (lambda s, x: F.average_pooling_2d(x, 3, 2, pad=1), None, {}),
    'average pool nd excluding pads': (lambda s, x: F.average_pooling_nd(
        x, 3, 2, pad=1, pad_value=None), None, {}),
    'batch normalization': (lambda s, x: s.bn(F.convolution_2d(x, s.W, s.b)), bn(), CONV),
    'activations': (lambda s, x: F.concat([
        F.leaky_relu(x, 0.1), F.elu(x, 0.7), F.sigmoid(x), F.tanh(x), F.clipped_relu(x, 0.5),
        F.softmax(x, axis=3), F.log_softmax(x, axis=2), F.exp(x), F.log(abs(x) + 1),
        F.sqrt(abs(x)), -x, F.identity(x), F.copy(x, -1)], axis=1), None, {}),
    'arithmetic': (lambda s, x: F.maximum(x + 1.5, x * s.c) - F.minimum(1 - x, 2 / (x * x + 3))
                   + F.add(x, x, x) + x / s.c, None, {'c': rand(1, 1, 1, 8)}),
    'reshape, transpose, reductions': (lambda s, x: F.concat([
        F.sum(x, axis=(2, 3)), F.mean(F.transpose(x, (0, 2, 3, 1)), axis=1).reshape(len(x), -1),
        F.sum(x.reshape(len(x), 8, 8), axis=2, keepdims=True).reshape(len(x), 8)], axis=1),
        None, {}),
    'dropout is left out in test mode': (lambda s, x: F.dropout(x, 0.5), None, {}),
}


def export_and_run(tmp_path, net, x, trace_batch=2):
    net.initialize(x[:1])
    path = tmp_path / 'm.onnx'
    model = export_onnx(net, x[:trace_batch], str(path))
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {'x': x})))
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        want = {name: y.array for name, y in zip(net.head_names, net(x)) if y is not None}
    return model, got, want


@pytest.mark.parametrize('case', sorted(BASES))
def test_each_function_gives_chainers_numbers_in_onnx_runtime(tmp_path, case):
    fn, links, params = BASES[case]
    net = MultiHeadNet(Lambda(fn, links, **params), {'a': L.Linear(None, 4),
                                                     'b': L.Linear(None, 3)})
    x = rand(5, 1, 8, 8, seed=9)
    model, got, want = export_and_run(tmp_path, net, x)
    assert list(got) == ['a', 'b']
    for name in want:
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    if case.startswith('dropout'):
        assert 'Dropout' not in {node.op_type for node in model.graph.node}


def test_graph_states_its_opset_a_dynamic_batch_and_leaves_loss_heads_out(tmp_path):
    loss_only = LossHead(Lambda(lambda s, h, t: F.mean(h)))
    net = MultiHeadNet(Lambda(lambda s, x: F.relu(x.reshape(len(x), -1))),
                       {'digit': L.Linear(None, 10), 'score': loss_only,
                        'same': Lambda(lambda s, h: h)})
    x = rand(3, 1, 4, 4)
    model, got, want = export_and_run(tmp_path, net, x)
    assert model.opset_import[0].version == OPSET == 13 and model.ir_version == 7
    assert [o.name for o in model.graph.output] == ['digit', 'same']
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.input) + list(model.graph.output)]
    assert dims == [['batch', 1, 4, 4], ['batch', 10], ['batch', 16]]
    props = {p.key: p.value for p in model.metadata_props}
    assert props == {'heads': 'digit,same', 'loss_only_heads': 'score'}
    np.testing.assert_allclose(got['same'], want['same'], rtol=1e-6)
    np.testing.assert_allclose(got['digit'], want['digit'], rtol=1e-5, atol=1e-6)


def test_a_network_of_loss_heads_only_has_nothing_to_export(tmp_path):
    net = MultiHeadNet(Lambda(lambda s, x: x), [LossHead(Lambda(lambda s, h, t: F.mean(h)))])
    with pytest.raises(ExportError, match='no head that returns logits'):
        export_onnx(net, rand(2, 3), str(tmp_path / 'm.onnx'))
    assert not (tmp_path / 'm.onnx').exists()


@pytest.mark.parametrize('fn,message', [
    (lambda s, x: F.flatten(x), 'merging the batch axis'),
    (lambda s, x: F.sum(x), 'reduction axes includes the batch axis'),
    (lambda s, x: F.softmax(x, axis=0), 'axis includes the batch axis'),
    (lambda s, x: x + np.ones(x.shape, np.float32), 'as large as the traced batch'),
    (lambda s, x: F.transpose(x, (1, 0, 2, 3)), 'moves the batch axis'),
])
def test_what_would_fix_the_batch_size_is_refused(tmp_path, fn, message):
    net = MultiHeadNet(Lambda(fn), [Lambda(lambda s, h: h * 2.0)])
    x = rand(2, 1, 4, 4)
    with pytest.raises(ExportError, match=message):
        export_onnx(net, x, str(tmp_path / 'm.onnx'))


def test_an_unknown_function_is_named_and_a_registered_converter_exports_it(tmp_path):
    net = MultiHeadNet(Lambda(lambda s, x: F.hard_sigmoid(x)), [L.Linear(None, 2)])
    x = rand(4, 6)
    net.initialize(x)
    assert 'HardSigmoid' not in supported_functions()
    with pytest.raises(ExportError, match=r'uses the Chainer function HardSigmoid, which '
                                          r'distmulti cannot export.*register_converter'):
        export_onnx(net, x, str(tmp_path / 'm.onnx'))
    register_converter('HardSigmoid', lambda call: call.node('HardSigmoid', alpha=0.2,
                                                             beta=0.5))
    try:
        _, got, want = export_and_run(tmp_path, net, x)
    finally:
        from distmulti import export
        del export._CONVERTERS['HardSigmoid']
    np.testing.assert_allclose(got['head0'], want['head0'], rtol=1e-5, atol=1e-6)
