"""Using a trained run: per-head accuracy and confusion matrices, and per-head predictions.

``distmulti evaluate RUN`` and ``distmulti predict RUN INPUT...`` rebuild the network a run
was trained with (the built-in CNN or its ``--model`` factory, from ``RUN/result.json``), load
``RUN/model.npz`` without pickles, and run it. The accuracies come from the same evaluator the
training used, so on the same data they are the numbers training wrote.
"""
import json
import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

import chainer
from chainer.iterators import SerialIterator

from distmulti import checkpoint
from distmulti.config import TrainConfig
from distmulti.errors import ConfigError, DataError
from distmulti.evaluator import MultiHeadEvaluator
from distmulti.models import IGNORE_LABEL, MultiHeadNet, default_net
from distmulti.runfiles import RESULT_FILE

BATCHSIZE = 500


def load_run(run_dir: str) -> Tuple[TrainConfig, MultiHeadNet]:
    """The config of a finished run and its (untrained) network; see ``load_parameters``."""
    result_path = os.path.join(run_dir, RESULT_FILE)
    try:
        with open(result_path, encoding='utf-8') as f:
            result = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f'{result_path} does not exist: {run_dir!r} is not the --out folder '
                          f'of a completed distmulti train run') from None
    except (OSError, ValueError) as e:
        raise ConfigError(f'{result_path} is unreadable: {e}') from None
    config = TrainConfig.from_mapping(result['config'], source=result_path)
    network = result.get('network', 'default')
    if network == 'python':
        raise ConfigError(f'{run_dir!r} was trained with a network built in Python; use it '
                          f'from Python: distmulti.inference.evaluate_model(net, data), '
                          f'distmulti.export_onnx(net, sample_x, path)')
    if config.model:
        from distmulti.training import load_model
        net = load_model(config.model)
    else:
        net = default_net(config.heads)
    return config, net


def load_parameters(net: MultiHeadNet, path: str, sample_x: np.ndarray) -> List[Any]:
    """Sizes lazy layers on one input, loads ``path`` (no pickles); returns classes per head."""
    classes = net.initialize(np.asarray(sample_x)[None])
    checkpoint.load_npz(path, net)
    return classes


def run_data(config: TrainConfig):
    """(train, test) datasets exactly as the run built them (same seed, same split)."""
    from distmulti.training import _load_data
    return _load_data(config, None, None)[:2]


def evaluate_model(net: MultiHeadNet, dataset, batchsize: int = BATCHSIZE,
                   device='@numpy') -> Dict[str, Any]:
    """Per-head loss, accuracy and confusion matrix (rows: true class, columns: predicted)."""
    it = SerialIterator(dataset, batchsize, repeat=False, shuffle=False)
    evaluator = MultiHeadEvaluator(it, net, device=device, name='test')
    metrics = {k[len('test/main/'):]: v for k, v in evaluator.evaluate().items()}
    confusion = {}
    x = np.stack([np.asarray(dataset[i][0]) for i in range(len(dataset))])
    labels = np.stack([np.asarray(dataset[i][1]) for i in range(len(dataset))])
    predictions = predict(net, x, batchsize, device)
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        widths = [None if y is None else int(y.shape[1])
                  for y in net(chainer.get_device(device).send(x[:1]))]
    for column, (name, n_classes) in enumerate(zip(net.head_names, widths)):
        if n_classes is None:
            continue
        true, pred = labels[:, column], predictions[name]
        keep = true != IGNORE_LABEL
        matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
        np.add.at(matrix, (true[keep], pred[keep]), 1)
        confusion[name] = matrix
    return {'metrics': metrics, 'confusion': confusion}


def predict(net: MultiHeadNet, x: np.ndarray, batchsize: int = BATCHSIZE,
            device='@numpy') -> Dict[str, np.ndarray]:
    """Predicted class of every logits head for each input: ``{head name: int array (N,)}``."""
    device = chainer.get_device(device)
    out: Dict[str, List[np.ndarray]] = {name: [] for name, ok in
                                        zip(net.head_names, net.has_logits) if ok}
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        for start in range(0, len(x), batchsize):
            batch = device.send(np.asarray(x[start:start + batchsize]))
            for name, logits in zip(net.head_names, net(batch)):
                if logits is not None:
                    out[name].append(chainer.backend.CpuDevice().send(logits.array.argmax(1)))
    return {name: np.concatenate(parts).astype(np.int64) for name, parts in out.items()}


def plot_confusion(matrix: np.ndarray, title: str, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(matrix), 1 + 0.45 * len(matrix)))
    ax.imshow(matrix, cmap='Blues')
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha='center', va='center', fontsize=7,
                color='white' if v > matrix.max() / 2 else 'black')
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    ax.set_title(title)
    ax.set_xticks(range(len(matrix)))
    ax.set_yticks(range(len(matrix)))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_confusion(name: str, matrix: np.ndarray) -> str:
    width = max(3, len(str(matrix.max())))
    head = ' ' * 8 + ' '.join(f'{j:>{width}}' for j in range(len(matrix)))
    rows = [f'{i:>6}  ' + ' '.join(f'{v:>{width}}' for v in row) for i, row in enumerate(matrix)]
    return '\n'.join([f'{name} confusion (rows: true class, columns: predicted)', head] + rows)


def read_inputs(inputs: Sequence[str], like: np.ndarray) -> Tuple[np.ndarray, List[str]]:
    """Model inputs from ``npz:PATH`` (its ``x``) or image files; returns (x, names)."""
    from distmulti import datasets
    arrays, names = [], []
    for item in inputs:
        if item.startswith('npz:'):
            data = datasets.load_npz_inputs(item[4:])
            arrays.append(data)
            names += [f'{item[4:]}[{i}]' for i in range(len(data))]
        else:
            mode = 'L' if like.shape[0] == 1 else 'RGB'
            arrays.append(datasets.open_image(item, mode)[None])
            names.append(item)
    x = np.concatenate(arrays).astype(np.float32)
    if x.shape[1:] != like.shape:
        raise DataError(f'inputs have shape {x.shape[1:]} but the model was trained on '
                        f'{like.shape}', collective=True)
    return x, names
