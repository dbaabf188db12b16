"""Builds and runs one training: data, network, optimizers, updater, trainer and extensions.

``train(config)`` is what ``distmulti train`` runs; it also takes user objects (a network,
datasets) from Python. It ends by writing ``model.npz`` and then ``result.json``, the marker
that the run completed.
"""
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Dict, Optional

import numpy as np

import chainer
from chainer import training
from chainer.iterators import SerialIterator
from chainer.training import extensions

from distmulti import checkpoint
from distmulti._version import __version__
from distmulti.comm import LocalComm, resolve_device
from distmulti.config import TrainConfig
from distmulti.data import ShuffledIterator, check_labels, digit_strips, labels_of
from distmulti.errors import ConfigError, DataError
from distmulti.evaluator import MultiHeadEvaluator
from distmulti.models import MultiHeadNet, default_net
from distmulti.optim import create_optimizer
from distmulti.updater import MultiHeadUpdater

RESULT_FILE = 'result.json'
MODEL_FILE = 'model.npz'
SNAPSHOT_PATTERN = 'snapshot_iter_{.updater.iteration}.npz'
EVAL_BATCHSIZE = 500


def train(config: TrainConfig, net: Optional[MultiHeadNet] = None, train_data=None,
          test_data=None, comm=None, log: Callable[[str], None] = None) -> Dict[str, Any]:
    """Trains ``net`` (default: the built-in CNN) and returns the final result dictionary.

    Args:
        config: the run's options; validated here.
        net: a ``MultiHeadNet``; ``config.heads`` is taken from it.
        train_data, test_data: datasets of (x, t) pairs, t of shape (K,); default: the
            embedded digit strips. Give both or neither.
        comm: the process group (default: a single process).
        log: where one-line messages go (default: stderr).
    """
    log = log or (lambda msg: print(f'distmulti: {msg}', file=sys.stderr, flush=True))
    comm = comm or LocalComm()
    if net is not None:
        config = dataclasses.replace(config, heads=net.n_heads)
    config = dataclasses.replace(config).validate()
    if (train_data is None) != (test_data is None):
        raise ConfigError('give both train_data and test_data, or neither for the embedded data')
    device = resolve_device(config.device)
    _seed_everything(config.seed, device)

    if train_data is None:
        train_split, test_split = digit_strips(config.heads, config.train_size,
                                               config.test_size, seed=config.seed)
        train_data, test_data = train_split.dataset(), test_split.dataset()
    for name, data in (('training data', train_data), ('test data', test_data)):
        if len(data) == 0:
            raise DataError(f'the {name} is empty')
    if config.batchsize > len(train_data):
        raise ConfigError(f'batchsize {config.batchsize} is larger than the training data '
                          f'({len(train_data)} samples); use at most {len(train_data)}')

    net = net if net is not None else default_net(config.heads)
    net.to_device(device)
    first_x = chainer.dataset.concat_examples([train_data[0]], device)[0]
    classes = net.initialize(first_x)
    check_labels(labels_of(train_data), classes, 'training data')
    check_labels(labels_of(test_data), classes, 'test data')

    optimizers = {}
    for name in config.optimizer_names:
        spec = config.optimizer_spec(name)
        optimizers[name] = create_optimizer(spec['type'], spec['lr'])
        optimizers[name].setup(getattr(net, name))

    train_iter = ShuffledIterator(train_data, config.batchsize, seed=config.seed)
    test_iter = SerialIterator(test_data, max(config.batchsize, EVAL_BATCHSIZE),
                               repeat=False, shuffle=False)
    updater = MultiHeadUpdater(train_iter, net, optimizers, loss_weights=config.weights,
                               backward=config.backward, frozen=config.freeze,
                               device=device)
    os.makedirs(config.out, exist_ok=True)
    result_path = os.path.join(config.out, RESULT_FILE)
    trainer = training.Trainer(updater, config.stop_trigger, out=config.out)
    evaluator = MultiHeadEvaluator(test_iter, net, loss_weights=config.weights,
                                   device=device, comm=comm)
    _add_extensions(trainer, evaluator, config, len(train_data), comm)

    if config.resume:
        checkpoint.load_npz(config.resume, trainer)
        log(f'resumed from {config.resume} at iteration {updater.iteration}')

    start = time.perf_counter()
    trainer.run(show_loop_exception_msg=False)
    wall = time.perf_counter() - start

    final = evaluator.evaluate()
    prefix = 'validation/main/'
    result = {
        'test': {key[len(prefix):]: value for key, value in final.items()},
        'iterations': updater.iteration,
        'epoch_detail': updater.epoch_detail,
        'wall_time_s': wall,
        'world_size': comm.size,
        'version': __version__,
        'config': config.to_dict(),
    }
    if comm.is_root:
        checkpoint.save_npz(os.path.join(config.out, MODEL_FILE), net)
        _write_json(result_path, result)
        accs = '  '.join(f'{name} {result["test"].get(name + "/accuracy", float("nan")):.4f}'
                         for name in net.head_names)
        log(f'test accuracy: {accs}  all heads {result["test"].get("accuracy_all", 0):.4f} '
            f'({int(result["test"]["samples"])} samples, {updater.iteration} iterations, '
            f'{wall:.1f} s); wrote {os.path.join(config.out, MODEL_FILE)} and {result_path}')
    return result


def _add_extensions(trainer, evaluator, config: TrainConfig, n_train: int, comm) -> None:
    per_epoch = max(1, -(-n_train // config.batchsize))
    if config.eval_interval is not None:
        report_trigger = (config.eval_interval, 'iteration')
    elif config.iterations is not None:
        report_trigger = (min(config.iterations, per_epoch), 'iteration')
    else:
        report_trigger = (1, 'epoch')
    trainer.extend(evaluator, trigger=report_trigger)
    if not comm.is_root:
        return
    trainer.extend(extensions.snapshot(filename=SNAPSHOT_PATTERN, savefun=checkpoint.save_npz,
                                       n_retains=config.keep_snapshots),
                   trigger=(config.snapshot_interval, 'iteration'))
    trainer.extend(extensions.LogReport(trigger=report_trigger))
    heads = range(config.heads)
    trainer.extend(extensions.PrintReport(
        ['epoch', 'iteration', 'main/loss', 'validation/main/loss']
        + [f'validation/main/head{i}/accuracy' for i in heads]
        + ['validation/main/accuracy_all', 'elapsed_time']))
    if config.progress:
        trainer.extend(extensions.ProgressBar(update_interval=10))
    if config.plot and extensions.PlotReport.available():
        plots = {'loss.png': ['main/loss', 'validation/main/loss'],
                 'accuracy_all.png': ['main/accuracy_all', 'validation/main/accuracy_all']}
        for i in heads:
            for what in ('loss', 'accuracy'):
                plots[f'head{i}_{what}.png'] = [f'main/head{i}/{what}',
                                                f'validation/main/head{i}/{what}']
        for filename, keys in plots.items():
            trainer.extend(extensions.PlotReport(keys, x_key=report_trigger[1],
                                                 trigger=report_trigger, filename=filename))


def _seed_everything(seed: int, device) -> None:
    np.random.seed(seed)
    if device.xp is not np:
        device.xp.random.seed(seed)


def _write_json(path: str, payload: Dict[str, Any]) -> None:
    tmp = f'{path}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
