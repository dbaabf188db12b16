"""Using a trained run: per-head accuracy and confusion matrices, and per-head predictions.

``distmulti evaluate RUN`` and ``distmulti predict RUN INPUT...`` rebuild the network a run
was trained with (the built-in CNN or its ``--model`` factory, from ``RUN/result.json``), load
``RUN/model.npz`` without pickles, and run it. The accuracies come from the same per-batch sums
the training's evaluator used (same batch size), so on the same data they are the numbers
training wrote. Data is read batch by batch (lazy ``npy:``/``csv:`` data through loader
workers), never whole.
"""
import json
import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

import chainer
from chainer.dataset import concat_examples

from distmulti import checkpoint
from distmulti.config import TrainConfig
from distmulti.errors import ConfigError, DataError
from distmulti.iterators import EvalIterator
from distmulti.loader import Loader, SampleSpec, Source, read_example
from distmulti.metrics import Layout, batch_stats, summarize
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


def eval_batchsize(config: TrainConfig, sample_x: np.ndarray) -> int:
    """The evaluation batch the run's training used (so that the sums match it)."""
    from distmulti.sampling import default_eval_batchsize
    return config.eval_batchsize or default_eval_batchsize(np.asarray(sample_x).nbytes,
                                                           config.batchsize)


def default_workers() -> int:
    """Loader workers for evaluating in one process (none start for in-memory data)."""
    from distmulti.sampling import cores_per_rank, default_loader_workers
    return default_loader_workers(cores_per_rank(1))


def evaluate_model(net: MultiHeadNet, dataset, batchsize: int = BATCHSIZE, device='@numpy',
                   loss_weights=None, workers: int = 0,
                   name: str = 'evaluation data') -> Dict[str, Any]:
    """Per-head loss, accuracy and confusion matrix (rows: true class, columns: predicted),
    in one pass over ``dataset`` in batches (read by ``workers`` processes)."""
    device = chainer.get_device(device)
    first_x, _ = read_example(Source(dataset, name), 0)
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        widths = [None if y is None else int(y.shape[1])
                  for y in net(device.send(first_x[None]))]
    layout = Layout(net.n_heads)
    totals = np.zeros(layout.size)
    confusion = {head: np.zeros((n, n), dtype=np.int64)
                 for head, n in zip(net.head_names, widths) if n is not None}
    spec = SampleSpec(first_x.shape, widths, net.head_names)
    with Loader({'data': Source(dataset, name, spec)}, workers, max_batch=batchsize) as loader:
        batches = EvalIterator(loader, 'data', 0, len(dataset), batchsize)
        batches.reset()
        with chainer.using_config('train', False), chainer.no_backprop_mode():
            for batch in batches:
                x, t = concat_examples(batch, device)
                outputs = net.head_outputs(x, t)
                totals += batch_stats(outputs, t)
                labels = chainer.backend.CpuDevice().send(t)
                for column, (head, out) in enumerate(zip(net.head_names, outputs)):
                    if out.logits is None:
                        continue
                    pred = chainer.backend.CpuDevice().send(out.logits.array.argmax(1))
                    keep = labels[:, column] != IGNORE_LABEL
                    np.add.at(confusion[head], (labels[keep, column], pred[keep]), 1)
    weights = [1.0] * net.n_heads if loss_weights is None else list(loss_weights)
    metrics = {k[len('test/main/'):]: v
               for k, v in summarize(totals, weights, 'test/main/', net.head_names).items()}
    metrics['samples'] = float(totals[-1])
    return {'metrics': metrics, 'confusion': confusion}


def predict(net: MultiHeadNet, x: np.ndarray, batchsize: int = BATCHSIZE,
            device='@numpy') -> Dict[str, np.ndarray]:
    """Predicted class of every logits head for each input: ``{head name: int array (N,)}``."""
    device = chainer.get_device(device)
    out: Dict[str, List[np.ndarray]] = {name: [] for name, ok in
                                        zip(net.head_names, net.has_logits) if ok}
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        for start in range(0, len(x), batchsize):
            batch = device.send(np.ascontiguousarray(x[start:start + batchsize],
                                                     dtype=np.float32))
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


def read_inputs(inputs: Sequence[str], like: np.ndarray) -> Tuple[Any, List[str]]:
    """Model inputs from ``npz:PATH`` (its ``x``), ``npy:DIR`` (its ``x.npy``, memory-mapped:
    :func:`predict` reads it batch by batch) or image files; returns (x, names)."""
    from distmulti import csvdata, datasets, npydata
    arrays, names = [], []
    for item in inputs:
        if item.startswith('npz:'):
            data = datasets.load_npz_inputs(item[4:])
            arrays.append(data)
            names += [f'{item[4:]}[{i}]' for i in range(len(data))]
        elif item.startswith('npy:'):
            data = npydata.load_npy_inputs(item[4:])
            arrays.append(data)
            names += [f'{item[4:]}[{i}]' for i in range(len(data))]
        else:
            mode = 'L' if like.shape[0] == 1 else 'RGB'
            arrays.append(csvdata.open_image(item, mode)[None])
            names.append(item)
    x = arrays[0] if len(arrays) == 1 else np.concatenate(arrays).astype(np.float32)
    if x.shape[1:] != like.shape:
        raise DataError(f'inputs have shape {x.shape[1:]} but the model was trained on '
                        f'{like.shape}', collective=True)
    return x, names
