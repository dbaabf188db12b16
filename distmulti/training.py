"""Builds and runs one training on every rank: data, network, optimizers, updater, trainer.

``train(config)`` is what ``distmulti train`` runs, in one process or under mpiexec; it also
takes user objects (a network, datasets) from Python. Rank 0 alone writes logs, plots,
checkpoints, ``model.npz`` and then ``result.json``, the marker that the run completed.
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
from distmulti.comm import create_world, rank_device_spec, resolve_device
from distmulti.watchdog import Watchdog
from distmulti.config import TrainConfig
from distmulti.data import ShuffledIterator, check_labels, digit_strips, labels_of
from distmulti.errors import CheckpointError, ConfigError, DataError
from distmulti.evaluator import MultiHeadEvaluator
from distmulti.models import MultiHeadNet, default_net
from distmulti.optim import create_optimizer
from distmulti.updater import MultiHeadUpdater

RESULT_FILE = 'result.json'
MODEL_FILE = 'model.npz'
EVAL_BATCHSIZE = 500
# Iterator positions are recomputed from the iteration count on resume (see ShuffledIterator).
_ITERATOR_KEYS = 'updater/iterator:'


def _stderr_log(msg: str) -> None:
    print(f'distmulti: {msg}', file=sys.stderr, flush=True)


def train(config: TrainConfig, net: Optional[MultiHeadNet] = None, train_data=None,
          test_data=None, comm=None, log: Callable[[str], None] = None) -> Dict[str, Any]:
    """Trains ``net`` (default: the built-in CNN) and returns the final result dictionary.

    Every rank calls this with the same config; collective steps are marked below.

    Args:
        config: the run's options; validated here.
        net: a ``MultiHeadNet``; ``config.heads`` is taken from it.
        train_data, test_data: datasets of (x, t) pairs, t of shape (K,); default: the
            embedded digit strips. Under MPI only rank 0's are used (others may pass None).
        comm: the process group (default: MPI.COMM_WORLD under mpiexec, else one process).
        log: where one-line messages go (default: stderr).
    """
    log = log or _stderr_log
    if net is not None:
        config = dataclasses.replace(config, heads=net.n_heads)
    config = dataclasses.replace(config).validate()
    on_gpu = config.device.startswith('@cupy')
    world = comm or create_world(config.communicator, on_gpu=on_gpu, log=log)
    root_log = log if world.is_root else (lambda msg: None)
    _check_same_run(world, config)                                      # collective
    device = resolve_device(rank_device_spec(config.device, world))
    _seed_everything(config.seed, device)

    if world.is_root and train_data is None and test_data is None:
        train_split, test_split = digit_strips(config.heads, config.train_size,
                                               config.test_size, seed=config.seed)
        train_data, test_data = train_split.dataset(), test_split.dataset()
    if world.is_root and (train_data is None or test_data is None):
        raise ConfigError('give both train_data and test_data, or neither for the embedded '
                          'data', collective=world.size == 1)
    full_train, full_test = train_data, test_data
    if world.size > 1:                                                  # collective
        import chainermn
        train_data = chainermn.scatter_dataset(train_data, world.mn, shuffle=True,
                                               seed=config.seed)
        test_data = chainermn.scatter_dataset(test_data, world.mn, force_equal_length=False)
        full_train, full_test = train_data._dataset, test_data._dataset
    # From here every rank holds the same full datasets: the checks agree on every rank.
    for name, data in (('training data', full_train), ('test data', full_test)):
        if len(data) == 0:
            raise DataError(f'the {name} is empty', collective=True)
    if config.batchsize > len(train_data):
        shard = (f'this rank\'s shard ({len(train_data)} of {len(full_train)} samples over '
                 f'{world.size} ranks)' if world.size > 1
                 else f'the training data ({len(train_data)} samples)')
        raise ConfigError(f'batchsize {config.batchsize} is larger than {shard}; use at most '
                          f'{len(train_data)}', collective=True)

    net = net if net is not None else default_net(config.heads)
    net.to_device(device)
    first_x = chainer.dataset.concat_examples([full_train[0]], device)[0]
    classes = net.initialize(first_x)
    check_labels(labels_of(full_train), classes, 'training data')
    check_labels(labels_of(full_test), classes, 'test data')

    optimizers = {}
    for name in config.optimizer_names:
        spec = config.optimizer_spec(name)
        optimizers[name] = create_optimizer(spec['type'], spec['lr'])
        optimizers[name].setup(getattr(net, name))

    train_iter = ShuffledIterator(train_data, config.batchsize, seed=config.seed + world.rank)
    test_iter = SerialIterator(test_data, max(config.batchsize, EVAL_BATCHSIZE),
                               repeat=False, shuffle=False)
    updater = MultiHeadUpdater(train_iter, net, optimizers, loss_weights=config.weights,
                               backward=config.backward, frozen=config.freeze, comm=world,
                               grad_sync=config.grad_sync, device=device)  # collective
    if world.is_root:
        os.makedirs(config.out, exist_ok=True)
    trainer = training.Trainer(updater, config.stop_trigger, out=config.out)
    evaluator = MultiHeadEvaluator(test_iter, net, loss_weights=config.weights,
                                   device=device, comm=world)
    watchdog = None
    if config.hang_timeout:
        watchdog = Watchdog(config.hang_timeout, world.rank, on_fire=_abort_job(world), log=log)
        updater.heartbeat = watchdog.beat
        evaluator.heartbeat = watchdog.beat
    _add_extensions(trainer, evaluator, config, len(train_data), world, watchdog)

    if config.resume:
        _resume(trainer, updater, train_iter, config, world, root_log)  # collective

    if watchdog is not None:
        watchdog.start()
    start = time.perf_counter()
    try:
        trainer.run(show_loop_exception_msg=False)
        final = evaluator.evaluate()                                    # collective
    finally:
        if watchdog is not None:
            watchdog.stop()
    wall = time.perf_counter() - start
    prefix = 'validation/main/'
    result = {
        'test': {key[len(prefix):]: value for key, value in final.items()},
        'iterations': updater.iteration,
        'epoch_detail': updater.epoch_detail,
        'wall_time_s': wall,
        'run_id': os.environ.get('DISTMULTI_RUN_ID'),
        'world_size': world.size,
        'global_batchsize': config.batchsize * world.size,
        'version': __version__,
        'config': config.to_dict(),
    }
    if world.is_root:
        checkpoint.save_npz(os.path.join(config.out, MODEL_FILE), net)
        result_path = os.path.join(config.out, RESULT_FILE)
        _write_json(result_path, result)
        accs = '  '.join(f'{name} {result["test"].get(name + "/accuracy", float("nan")):.4f}'
                         for name in net.head_names)
        root_log(f'test accuracy: {accs}  all heads {result["test"].get("accuracy_all", 0):.4f} '
                 f'({int(result["test"]["samples"])} samples, {updater.iteration} iterations, '
                 f'{wall:.1f} s); wrote {os.path.join(config.out, MODEL_FILE)} and {result_path}')
    return result


def _check_same_run(world, config: TrainConfig) -> None:
    """Stops every rank with the same error when ranks were started with different configs."""
    if world.size == 1:
        return
    configs = world.allgather_obj(config.to_dict())
    diffs = []
    for rank, other in enumerate(configs):
        for key in sorted(other):
            if other[key] != configs[0][key]:
                diffs.append(f'rank {rank} has {key}={other[key]!r} (rank 0: {configs[0][key]!r})')
    if diffs:
        raise ConfigError(f'ranks were started with different configurations: {"; ".join(diffs)}'
                          f'; start every rank with the same arguments', collective=True)


def _resume(trainer, updater, train_iter, config: TrainConfig, world, log) -> None:
    """Loads ``config.resume`` (a file, or ``auto``: the newest valid checkpoint) on every rank."""
    path = config.resume
    if path == 'auto':
        found = None
        if world.is_root:
            found = checkpoint.newest_valid_checkpoint(config.out, log)
        found = world.allgather_obj(found)[0]
        if found is None:
            log(f'--resume auto: no valid checkpoint in {config.out}; starting from the beginning')
            return
        path, manifest = found
        if manifest.get('config_hash') != checkpoint.config_hash(config.to_dict()):
            changed = sorted(k for k, v in manifest.get('config', {}).items()
                             if k not in checkpoint.RESUME_FREE_KEYS
                             and config.to_dict().get(k) != v)
            log(f'note: {path} was written with different settings for: '
                f'{", ".join(changed) or "(unknown)"}')
    found_here = world.allgather_obj(os.path.isfile(path))
    missing = [rank for rank, ok in enumerate(found_here) if not ok]
    if missing:
        where = ('' if world.size == 1 else
                 f' on rank(s) {", ".join(map(str, missing))} (every rank reads it: put --out '
                 f'on a filesystem that all hosts share)')
        raise CheckpointError(f'checkpoint {path!r} does not exist{where}', collective=True)
    checkpoint.load_npz(path, trainer,
                        ignore_names=lambda key: key.startswith(_ITERATOR_KEYS))
    train_iter.seek(updater.iteration)
    written_by = updater.checkpoint_world_size
    ranks = (f'; same number of ranks ({world.size})' if written_by == world.size else
             f'; it was written by {written_by} rank(s) and continues on {world.size}, so the '
             f'data is re-sharded from here')
    log(f'resumed from {path} at iteration {updater.iteration}{ranks}')


def _abort_job(world):
    def abort():
        if world.size > 1:
            world.abort(3)
    return abort


def _is_last_iteration(config: TrainConfig):
    length, unit = config.stop_trigger
    if unit == 'iteration':
        return lambda updater: updater.iteration >= length
    return lambda updater: updater.is_new_epoch and updater.epoch >= length


def _add_extensions(trainer, evaluator, config: TrainConfig, n_train: int, world,
                    watchdog) -> None:
    per_epoch = max(1, -(-n_train // config.batchsize))
    if config.eval_interval is not None:
        report_trigger = (config.eval_interval, 'iteration')
    elif config.iterations is not None:
        report_trigger = (min(config.iterations, per_epoch), 'iteration')
    else:
        report_trigger = (1, 'epoch')
    # Both on every rank: they are collective.
    trainer.extend(evaluator, trigger=report_trigger)
    trainer.extend(checkpoint.Checkpointer(
        world, config.out, config.checkpoint_interval, config.keep_checkpoints,
        _is_last_iteration(config),
        {'config_hash': checkpoint.config_hash(config.to_dict()), 'config': config.to_dict(),
         'version': __version__},
        pause=watchdog.paused if watchdog is not None else None))
    if not world.is_root:
        return
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
