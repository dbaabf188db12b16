"""ONNX export: a trained multi-head network as one graph with one named output per head.

``export_onnx(net, sample_x, path)`` runs the network once on ``sample_x`` in test mode,
records every Chainer function it applies (a ``chainer.FunctionHook``), and writes each as
ONNX operators of opset :data:`OPSET` (ONNX IR version :data:`IR_VERSION`), so that ONNX
Runtime and other ONNX runtimes can load it. The graph has one input, ``x``, whose first
dimension is the symbolic ``batch``, and one output per head that returns logits, named as
the head (``net.head_names``: ``head0``, ``head1``, ... or the names of a dict of heads).
A ``LossHead`` computes a loss from labels and has no logits: it is left out of the graph.

The converters are written here (onnx-chainer's last release, 1.6.0, declares ``onnx<1.7``,
which no current Python can install). They cover the functions of typical classification
networks (:func:`supported_functions`); a network that uses another one gets an ExportError
naming it, and ``register_converter`` adds a converter for it. Every converter keeps the
batch axis where it is, so the graph runs on any batch size.
"""
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

import chainer

from distmulti.errors import ExportError
from distmulti.models import MultiHeadNet

#: The ONNX operator set the graph uses: opset 13 is run by ONNX Runtime 1.6 and newer and by
#: most other runtimes (TensorRT, OpenVINO, ONNX Runtime Mobile).
OPSET = 13
#: The ONNX file format version matching opset 13, so that runtimes of that age can read it.
IR_VERSION = 7
INPUT_NAME = 'x'
BATCH_DIM = 'batch'


@dataclasses.dataclass
class Call:
    """One application of a Chainer function, as a converter sees it.

    Attributes:
        function: the ``chainer.FunctionNode`` (the wrapped ``chainer.Function`` for old-style
            functions), with its attributes (``stride``, ``axis``, ...).
        inputs, outputs: the ONNX value names of its inputs and outputs.
        input_shapes, output_shapes: their shapes in the traced run.
        batched: for each input, whether it depends on the network input (has a batch axis);
            the others are parameters and constants.
        constants: the arrays of the inputs that are neither computed nor parameters.
    """

    function: Any
    inputs: List[str]
    outputs: List[str]
    input_shapes: List[Tuple[int, ...]]
    output_shapes: List[Tuple[int, ...]]
    batched: List[bool]
    constants: Dict[int, np.ndarray]
    graph: '_Graph'
    dtype: np.dtype

    @property
    def name(self) -> str:
        return type(self.function).__name__

    def node(self, op: str, inputs: Optional[Sequence[str]] = None,
             outputs: Optional[Sequence[str]] = None, **attrs) -> None:
        """Adds an ONNX node (default: from this call's inputs to its outputs)."""
        self.graph.node(op, self.inputs if inputs is None else inputs,
                        self.outputs if outputs is None else outputs, **attrs)

    def constant(self, value, dtype=None) -> str:
        """An initializer holding ``value`` (default dtype: the network's); returns its name."""
        return self.graph.constant(np.asarray(value, dtype=dtype or self.dtype))

    def temp(self) -> str:
        """A fresh name for an intermediate value."""
        return self.graph.fresh()

    def fail(self, why: str) -> ExportError:
        return ExportError(f'cannot export {self.name} to ONNX: {why}')

    def keep_batch_axis(self, axes: Sequence[int], ndim: int, what: str) -> None:
        """Raises when the function works along axis 0 of a batched input."""
        if any(self.batched) and any(a % ndim == 0 for a in axes):
            raise self.fail(f'its {what} includes the batch axis (axis 0), so the graph would '
                            f'depend on the batch size')


Converter = Callable[[Call], None]
_CONVERTERS: Dict[str, Converter] = {}


def register_converter(name: str, converter: Converter) -> None:
    """Teaches the exporter a Chainer function: ``name`` is its class name (e.g. ``'Swish'``),
    ``converter(call)`` adds ONNX nodes with ``call.node(...)`` (see :class:`Call`)."""
    if not callable(converter):
        raise TypeError(f'converter for {name!r} must be callable, got '
                        f'{type(converter).__name__}')
    _CONVERTERS[name] = converter


def supported_functions() -> List[str]:
    """Class names of the Chainer functions the exporter converts."""
    return sorted(_CONVERTERS)


def _converts(*names: str):
    def register(fn: Converter) -> Converter:
        for name in names:
            register_converter(name, fn)
        return fn
    return register


class _Graph:
    """The ONNX nodes and initializers being built, and a supply of fresh value names."""

    def __init__(self):
        import onnx
        self.onnx = onnx
        self.nodes: List[Any] = []
        self.initializers: List[Any] = []
        self._count = 0

    def fresh(self, hint: str = 'v') -> str:
        self._count += 1
        return f'{hint}{self._count}'

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], **attrs) -> None:
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), list(outputs),
                                                     name=f'{op}_{len(self.nodes)}', **attrs))

    def constant(self, array: np.ndarray, name: Optional[str] = None) -> str:
        name = name or self.fresh('const')
        self.initializers.append(self.onnx.numpy_helper.from_array(
            np.ascontiguousarray(chainer.backend.CpuDevice().send(array)), name))
        return name


class _Recorder(chainer.FunctionHook):
    """Records every function application, with its input arrays, in the order they ran."""

    name = 'distmulti_onnx_recorder'

    def __init__(self):
        self.calls: List[Tuple[Any, Tuple[Any, ...]]] = []

    def forward_postprocess(self, function, in_data):
        self.calls.append((function, tuple(in_data)))


def to_onnx(net: MultiHeadNet, sample_x) -> Any:
    """The ONNX model (an ``onnx.ModelProto``) of ``net``; see :func:`export_onnx`."""
    try:
        import onnx
    except ImportError:
        raise ExportError('ONNX export needs the onnx package: pip install '
                          '"distmulti[onnx]" (or sh install.sh -e ".[onnx]")') from None
    if not isinstance(net, MultiHeadNet):
        raise ExportError(f'net must be a MultiHeadNet, got {type(net).__name__}')
    heads = [name for name, ok in zip(net.head_names, net.has_logits) if ok]
    left_out = [name for name, ok in zip(net.head_names, net.has_logits) if not ok]
    if not heads:
        raise ExportError(f'the network has no head that returns logits (loss-only heads: '
                          f'{", ".join(left_out)}); there is nothing to export')
    x = chainer.Variable(sample_x)
    if x.ndim < 1 or len(x) < 1:
        raise ExportError(f'sample_x must be a batch of at least one input, got shape '
                          f'{x.shape}')
    recorder = _Recorder()
    with chainer.using_config('train', False), chainer.using_config('enable_backprop', True):
        with recorder:
            outputs = net(x)
    graph = _Graph()
    finals = {name: y for name, y in zip(net.head_names, outputs) if y is not None}
    _convert(recorder.calls, x, finals, net, graph)

    dtype = onnx.helper.np_dtype_to_tensor_dtype(x.dtype)
    inputs = [onnx.helper.make_tensor_value_info(INPUT_NAME, dtype, [BATCH_DIM] + list(x.shape[1:]))]
    outs = [onnx.helper.make_tensor_value_info(
        name, onnx.helper.np_dtype_to_tensor_dtype(finals[name].dtype),
        [BATCH_DIM] + list(finals[name].shape[1:])) for name in heads]
    doc = (f'distmulti multi-head network: outputs {", ".join(heads)} (logits per head)'
           + (f'; loss-only heads left out: {", ".join(left_out)}' if left_out else ''))
    model = onnx.helper.make_model(
        onnx.helper.make_graph(graph.nodes, 'distmulti', inputs, outs, graph.initializers,
                               doc_string=doc),
        opset_imports=[onnx.helper.make_opsetid('', OPSET)], producer_name='distmulti',
        producer_version=_version(), doc_string=doc)
    model.ir_version = IR_VERSION
    onnx.helper.set_model_props(model, {'heads': ','.join(heads),
                                        'loss_only_heads': ','.join(left_out)})
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(net: MultiHeadNet, sample_x, path: str) -> Any:
    """Writes ``net`` to ``path`` as an ONNX model and returns it (an ``onnx.ModelProto``).

    Args:
        net: a ``MultiHeadNet`` with its parameters (lazily sized layers must have seen data:
            ``net.initialize(sample_x)`` does that).
        sample_x: a batch of inputs (any batch size) on the network's device; the network runs
            on it once, in test mode, to record its graph.
        path: the ``.onnx`` file to write (atomically).

    Returns:
        The model: input ``x`` of shape (batch, ...), one output per logits head, named as
        the head.

    Raises:
        ExportError: onnx is not installed, the network has no logits head, or it uses a
            function the exporter does not convert (the message names it).
    """
    from distmulti import checkpoint
    model = to_onnx(net, sample_x)
    with checkpoint.atomic_file(path, 'wb') as f:
        f.write(model.SerializeToString())
    return model


def _version() -> str:
    from distmulti._version import __version__
    return __version__


def _convert(calls, x: chainer.Variable, finals: Dict[str, chainer.Variable],
             net: MultiHeadNet, graph: _Graph) -> None:
    """Adds the nodes of every recorded call that an output depends on, in execution order."""
    needed: Set[int] = set()
    stack = [y.node for y in finals.values()]
    while stack:
        creator = stack.pop().creator_node
        if creator is not None and id(creator) not in needed:
            needed.add(id(creator))
            stack.extend(creator.inputs)
    params = {id(p.node): (path.lstrip('/'), p) for path, p in net.namedparams()}
    constants_seen: Set[int] = set()
    wanted = {}  # output node -> head name, so that the last node writes the head's output
    for name, y in finals.items():
        wanted.setdefault(id(y.node), name)
    names = {id(x.node): INPUT_NAME}
    batched = {id(x.node)}
    for function, in_data in calls:
        if id(function) not in needed:
            continue
        inner = function.function if isinstance(function, chainer.function.FunctionAdapter) \
            else function
        kind = type(inner).__name__
        converter = _CONVERTERS.get(kind)
        if converter is None:
            raise ExportError(
                f'the network uses the Chainer function {kind}, which distmulti cannot export '
                f'to ONNX yet; supported: {", ".join(supported_functions())}; add one with '
                f'distmulti.export.register_converter({kind!r}, converter)')
        input_names, constants = [], {}
        for i, node in enumerate(function.inputs):
            key = id(node)
            is_constant = key not in params and key not in names and node.creator_node is None
            if is_constant or (key in constants_seen):
                constants[i] = chainer.backend.CpuDevice().send(in_data[i])
                constants_seen.add(key)
            if key not in names:
                if key in params:
                    names[key] = graph.constant(params[key][1].array, params[key][0])
                elif is_constant:
                    names[key] = graph.constant(constants[i])
                else:
                    raise ExportError(f'{kind} reads a value computed outside the network\'s '
                                      f'forward pass; cannot export it')
            input_names.append(names[key])
        output_names, output_shapes = [], []
        for ref in function.outputs:
            node = ref()
            if node is None:  # an output nobody kept (e.g. an unused split)
                output_names.append(graph.fresh('unused'))
                output_shapes.append(())
                continue
            names[id(node)] = wanted.pop(id(node), None) or graph.fresh()
            output_names.append(names[id(node)])
            output_shapes.append(tuple(node.shape))
        in_batched = [id(node) in batched for node in function.inputs]
        if any(in_batched):
            batched.update(id(ref()) for ref in function.outputs if ref() is not None)
        converter(Call(inner, input_names, output_names,
                       [tuple(node.shape) for node in function.inputs], output_shapes,
                       in_batched, constants, graph, np.dtype(x.dtype)))
    for name, y in finals.items():  # an output that is the input, a parameter or another head's
        if names[id(y.node)] != name:
            graph.node('Identity', [names[id(y.node)]], [name])


# -- converters (opset 13) --------------------------------------------------------------------

_UNARY = {'ReLU': 'Relu', 'Sigmoid': 'Sigmoid', 'Tanh': 'Tanh', 'Neg': 'Neg', 'Exp': 'Exp',
          'Log': 'Log', 'Sqrt': 'Sqrt', 'Absolute': 'Abs', 'Identity': 'Identity',
          'Copy': 'Identity'}
_BINARY = {'Add': 'Add', 'Sub': 'Sub', 'Mul': 'Mul', 'Div': 'Div', 'Maximum': 'Max',
           'Minimum': 'Min'}


def _unary(call: Call) -> None:
    call.node(_UNARY[call.name])


def _binary(call: Call) -> None:
    _check_broadcast_constants(call)
    call.node(_BINARY[call.name])


for _name in _UNARY:
    register_converter(_name, _unary)
for _name in _BINARY:
    register_converter(_name, _binary)


def _check_broadcast_constants(call: Call) -> None:
    # An operand that is not computed from the input broadcasts against the batched one. If it
    # spans the whole traced batch (not 1 along axis 0), it was built for that batch size.
    ndim = len(call.output_shapes[0])
    for i, shape in enumerate(call.input_shapes):
        if any(call.batched) and not call.batched[i] and len(shape) == ndim and shape[0] != 1:
            raise call.fail(f'its operand {i} (shape {shape}) is a constant as large as the '
                            f'traced batch, so the graph would only run on that batch size')


@_converts('MultiAdd')
def _multi_add(call: Call) -> None:
    _check_broadcast_constants(call)
    call.node('Sum')


@_converts('AddConstant', 'MulConstant', 'SubFromConstant', 'DivFromConstant')
def _with_constant(call: Call) -> None:
    value = np.asarray(chainer.backend.CpuDevice().send(call.function.value))
    if value.ndim == len(call.input_shapes[0]) and value.ndim and value.shape[0] != 1:
        raise call.fail(f'its constant of shape {value.shape} spans the traced batch')
    const = call.constant(value)
    op, operands = {'AddConstant': ('Add', [call.inputs[0], const]),
                    'MulConstant': ('Mul', [call.inputs[0], const]),
                    'SubFromConstant': ('Sub', [const, call.inputs[0]]),
                    'DivFromConstant': ('Div', [const, call.inputs[0]])}[call.name]
    call.node(op, operands)


@_converts('LeakyReLU')
def _leaky_relu(call: Call) -> None:
    call.node('LeakyRelu', alpha=float(call.function.slope))


@_converts('ELU')
def _elu(call: Call) -> None:
    call.node('Elu', alpha=float(call.function.alpha))


@_converts('ClippedReLU')
def _clipped_relu(call: Call) -> None:
    call.node('Clip', [call.inputs[0], call.constant(0.0), call.constant(call.function.cap)])


@_converts('Softmax', 'LogSoftmax')
def _softmax(call: Call) -> None:
    ndim = len(call.input_shapes[0])
    axis = call.function.axis % ndim
    call.keep_batch_axis([axis], ndim, 'axis')
    call.node(call.name, axis=axis)


@_converts('LinearFunction')
def _linear(call: Call) -> None:
    # y = x W^T + b; chainer.links.Linear has already flattened x to (batch, features).
    if len(call.input_shapes[0]) != 2:
        raise call.fail(f'its input has shape {call.input_shapes[0]}; expected 2 axes')
    call.node('Gemm', transB=1)


def _end_pads(in_size: Sequence[int], out_size: Sequence[int], ksize: Sequence[int],
              stride: Sequence[int], pad: Sequence[int], dilate: Sequence[int]) -> List[int]:
    """ONNX pads (begins, then ends) giving Chainer's output size: ``cover_all`` makes Chainer
    add up to ``stride - 1`` cells at the end of each spatial axis, ONNX pads them explicitly."""
    ends = []
    for h, out, k, s, p, d in zip(in_size, out_size, ksize, stride, pad, dilate):
        needed = (out - 1) * s + d * (k - 1) + 1 - h - p
        ends.append(max(p, needed))
    return list(pad) + ends


@_converts('Convolution2DFunction')
def _convolution(call: Call) -> None:
    f = call.function
    w_shape = call.input_shapes[1]
    stride, pad, dilate = [f.sy, f.sx], [f.ph, f.pw], [f.dy, f.dx]
    pads = _end_pads(call.input_shapes[0][2:], call.output_shapes[0][2:], w_shape[2:], stride,
                     pad, dilate)
    call.node('Conv', kernel_shape=list(w_shape[2:]), strides=stride, dilations=dilate,
              pads=pads, group=int(f.groups))


@_converts('MaxPoolingND')
def _max_pooling(call: Call) -> None:
    f = call.function
    if f.return_indices:
        raise call.fail('return_indices=True has no ONNX equivalent here')
    pads = _end_pads(call.input_shapes[0][2:], call.output_shapes[0][2:], f.ksize, f.stride,
                     f.pad, [1] * f.ndim)
    ends = pads[f.ndim:]
    if any(e >= k for e, k in zip(ends, f.ksize)):
        raise call.fail(f'with cover_all it needs end padding {ends}, not smaller than the '
                        f'window {list(f.ksize)}; use cover_all=False or a smaller stride')
    call.node('MaxPool', kernel_shape=list(f.ksize), strides=list(f.stride), pads=pads)


@_converts('AveragePooling2D', 'AveragePoolingND')
def _average_pooling(call: Call) -> None:
    f = call.function
    if call.name == 'AveragePooling2D':
        ksize, stride, pad, include = [f.kh, f.kw], [f.sy, f.sx], [f.ph, f.pw], 1
    else:
        ksize, stride, pad = list(f.ksize), list(f.stride), list(f.pad)
        include = 0 if f.pad_value is None else 1
    if f.cover_all:
        raise call.fail('cover_all=True is not supported')
    call.node('AveragePool', kernel_shape=ksize, strides=stride, pads=pad + pad,
              count_include_pad=include)


@_converts('FixedBatchNormalization')
def _batch_normalization(call: Call) -> None:
    x_shape, gamma_shape = call.input_shapes[0], call.input_shapes[1]
    axis = call.function.axis  # the axes averaged over; set by the forward pass
    per_channel = (0,) + tuple(range(2, len(x_shape)))
    if (axis is not None and tuple(axis) != per_channel) or len(gamma_shape) != 1 \
            or len(x_shape) < 2 or x_shape[1] != gamma_shape[0]:
        raise call.fail('only normalisation per channel (axis 1, the default of '
                        'chainer.links.BatchNormalization) is supported')
    call.node('BatchNormalization', epsilon=float(call.function.eps))


@_converts('Reshape')
def _reshape(call: Call) -> None:
    in_shape, out_shape = call.input_shapes[0], call.output_shapes[0]
    if not call.batched[0]:
        shape = list(out_shape)
    elif out_shape and in_shape[0] == out_shape[0]:
        shape = [0] + list(out_shape[1:])  # 0: "this axis as in the input", the batch
    else:
        raise call.fail(f'it reshapes {in_shape} to {out_shape}, merging the batch axis into '
                        f'others, so the graph would depend on the batch size')
    call.node('Reshape', [call.inputs[0], call.constant(shape, np.int64)])


@_converts('Transpose')
def _transpose(call: Call) -> None:
    ndim = len(call.input_shapes[0])
    axes = call.function.axes
    perm = list(range(ndim))[::-1] if axes is None else [a % ndim for a in axes]
    if call.batched[0] and perm[0] != 0:
        raise call.fail(f'it moves the batch axis (axes {perm})')
    call.node('Transpose', perm=perm)


@_converts('Concat')
def _concat(call: Call) -> None:
    ndim = len(call.input_shapes[0])
    axis = call.function.axis % ndim
    call.keep_batch_axis([axis], ndim, 'axis')
    call.node('Concat', axis=axis)


def _reduce_axes(call: Call) -> List[int]:
    ndim = len(call.input_shapes[0])
    axis = call.function.axis
    axes = list(range(ndim)) if axis is None else [a % ndim for a in
                                                    (axis if isinstance(axis, tuple) else (axis,))]
    call.keep_batch_axis(axes, ndim, 'reduction axes')
    return axes


@_converts('Sum')
def _sum(call: Call) -> None:
    axes = _reduce_axes(call)
    call.node('ReduceSum', [call.inputs[0], call.constant(axes, np.int64)],
              keepdims=int(bool(call.function.keepdims)))


@_converts('Mean')
def _mean(call: Call) -> None:
    call.node('ReduceMean', axes=_reduce_axes(call), keepdims=int(bool(call.function.keepdims)))
