"""Builds and runs one training on every rank: data, network, optimizers, updater, trainer.

``train(config)`` is what ``distmulti train`` runs, in one process or under mpiexec; it also
takes user objects (a network, datasets) from Python. Rank 0 alone writes logs, plots,
checkpoints, ``model.npz`` and then ``result.json``, the marker that the run completed.
"""
import dataclasses
import importlib
import json
import os
import sys
import time
from typing import Any, Callable, Dict, Optional

import numpy as np

import chainer
from chainer import training
from chainer.training import extensions

from distmulti import checkpoint, errors
from distmulti.runfiles import HEARTBEAT_FILE, MODEL_FILE, RESULT_FILE
from distmulti._version import __version__
from distmulti.comm import create_world, rank_device_spec, resolve_device
from distmulti.watchdog import Watchdog
from distmulti.config import TrainConfig
from distmulti.csvdata import parse_image_size
from distmulti.data import check_label_shape, check_labels, digit_strips
from distmulti.datasets import cheap_labels, load_dataset, split_dataset
from distmulti.errors import CheckpointError, ConfigError, DataError, DistmultiError
from distmulti.evaluator import MultiHeadEvaluator
from distmulti.iterators import EvalIterator, TrainIterator
from distmulti.loader import Loader, SampleSpec, Source, read_example
from distmulti.models import MultiHeadNet, default_net
from distmulti.optim import create_optimizer
from distmulti.runstats import RunStats
from distmulti.sampling import (cores_per_rank, default_eval_batchsize, default_loader_workers,
                                shard_bounds)
from distmulti.updater import MultiHeadUpdater


def _stderr_log(msg: str) -> None:
    print(f'distmulti: {msg}', file=sys.stderr, flush=True)


def train(config: TrainConfig, net: Optional[MultiHeadNet] = None, *, base=None, heads=None,
          optimizers=None, train_data=None, test_data=None, comm=None,
          log: Callable[[str], None] = None) -> Dict[str, Any]:
    """Trains a multi-head network and returns the final result dictionary.

    Every rank calls this with the same arguments; collective steps are marked below.

    Args:
        config: the run's options; validated here.
        net: a ``MultiHeadNet``; or give ``base`` and ``heads`` (a list, or a dict of named
            heads) instead; or neither for ``config.model`` or the built-in CNN.
            ``config.heads`` is taken from the network.
        optimizers: ``{'base': opt, '<head>': opt, ...}`` (set up here if not yet), or a
            factory ``f(name, link) -> optimizer``; default: ``config.optimizer(s)``/``lr``.
        train_data, test_data: datasets of (x, t) pairs (any Chainer dataset, lazy ones
            included), x float32, t int32 of shape (K,); without ``test_data`` a seeded
            ``config.test_fraction`` of ``train_data`` is held out. Default:
            ``config.dataset`` or the embedded digit strips. Under MPI every rank passes the
            same datasets and reads only its own samples of them (nothing is sent between
            ranks); ``config.loader_workers`` processes per rank read them ahead.
        comm: the process group (default: MPI.COMM_WORLD under mpiexec, else one process).
        log: where one-line messages go (default: stderr).
    """
    log = log or _stderr_log
    network = 'python' if (net is not None or base is not None or heads is not None) else (
        config.model or 'default')
    if net is None and base is None and heads is None:
        config = dataclasses.replace(config).validate(check_parts=config.model is None)
        np.random.seed(config.seed)  # parameter initialisation
        net = load_model(config.model) if config.model else default_net(config.heads)
    elif net is None:
        net = MultiHeadNet(base, heads)
    config = dataclasses.replace(config, heads=net.n_heads).validate(net.head_names)
    on_gpu = config.device.startswith('@cupy')
    world = comm or create_world(config.communicator, on_gpu=on_gpu, log=log)
    root_log = log if world.is_root else (lambda msg: None)
    _check_same_run(world, config)                                      # collective
    device = resolve_device(rank_device_spec(config.device, world))
    _seed_everything(config.seed, device)

    stats = RunStats()
    loader, train_iter, test_iter = _open_data(config, world, net, device, train_data,
                                               test_data)                 # collective
    optimizers = _make_optimizers(config, net, optimizers)
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
        watchdog = Watchdog(config.hang_timeout, world.rank, on_fire=_abort_job(world), log=log,
                            heartbeat_path=(os.path.join(config.out, HEARTBEAT_FILE)
                                            if world.is_root else None))
        updater.heartbeat = watchdog.beat
        evaluator.heartbeat = watchdog.beat
    _add_extensions(trainer, evaluator, config, train_iter.n, world, watchdog)
    trainer.extend(stats)

    if config.resume:
        _resume(trainer, updater, train_iter, config, world, root_log)  # collective

    loader.start()  # forks the loader workers before the watchdog starts a thread
    if watchdog is not None:
        watchdog.start()
    start = time.perf_counter()
    try:
        trainer.run(show_loop_exception_msg=False)
        # The last report's evaluation when it ran at this iteration (the same on every
        # rank), else one now.
        final = evaluator.result_at(updater.iteration)
        if final is None:
            final = evaluator.evaluate()                                # collective
    finally:
        if watchdog is not None:
            watchdog.stop()
        loader.close()
    wall = time.perf_counter() - start
    prefix = 'validation/main/'
    result = {
        'test': {key[len(prefix):]: value for key, value in final.items()},
        'iterations': updater.iteration,
        'epoch_detail': updater.epoch_detail,
        'wall_time_s': wall,
        'run_id': os.environ.get('DISTMULTI_RUN_ID'),
        'network': network,
        'world_size': world.size,
        'global_batchsize': config.batchsize * world.size,
        'train_samples_seen': train_iter.samples_seen,
        'resources': stats.summary(world, config.batchsize * world.size, loader,
                                   train_iter.wait_s),                  # collective
        'version': __version__,
        'config': config.to_dict(),
    }
    if world.is_root:
        checkpoint.save_npz(os.path.join(config.out, MODEL_FILE), net)
        result_path = os.path.join(config.out, RESULT_FILE)
        with checkpoint.atomic_file(result_path) as f:
            json.dump(result, f, indent=2, sort_keys=True)
        accs = '  '.join(f'{name} {result["test"].get(name + "/accuracy", float("nan")):.4f}'
                         for name in net.head_names)
        root_log(f'test accuracy: {accs}  all heads {result["test"].get("accuracy_all", 0):.4f} '
                 f'({int(result["test"]["samples"])} samples, {updater.iteration} iterations, '
                 f'{wall:.1f} s); wrote {os.path.join(config.out, MODEL_FILE)} and {result_path}')
    return result


def _open_data(config: TrainConfig, world, net: MultiHeadNet, device, train_data, test_data):
    """(loader, train iterator, test iterator) of this rank; also moves ``net`` to ``device``
    and sizes its lazy layers on the first training sample. Collective.

    Every rank opens the same datasets and reads only its own samples of them; what can be
    checked without reading images (lengths, labels) is checked here, on every rank alike.
    """
    given = world.allgather_obj(train_data is not None)                 # collective
    if len(set(given)) > 1:
        missing = ', '.join(str(rank) for rank, ok in enumerate(given) if not ok)
        raise ConfigError(f'train_data was not given on rank(s) {missing}; every rank must '
                          f'pass the same datasets (each reads only its own samples of them, '
                          f'nothing is sent between ranks)', collective=True)
    train_data, test_data, sources, names = _on_every_rank(
        world, lambda: _load_data(config, train_data, test_data))     # collective
    n_train, n_test = _agree_on_lengths(world, train_data, test_data)  # collective
    for name, n in (('training data', n_train), ('test data', n_test)):
        if n == 0:
            raise DataError(f'the {name} is empty', collective=True)
    if config.batchsize * world.size > n_train:
        raise ConfigError(_batch_too_large(config.batchsize, world.size, n_train),
                          collective=True)

    _on_root(world, lambda: [check_label_shape(labels, net.n_heads, name)
                             for labels, name in _cheap_sources(sources)], None)  # collective
    first_x, first_t = _on_every_rank(
        world, lambda: read_example(Source(train_data, names[0]), 0))  # collective
    if cheap_labels(train_data) is None:
        _on_every_rank(world, lambda: check_label_shape(first_t[None], net.n_heads,
                                                        names[0]))     # collective
    net.to_device(device)
    first = chainer.dataset.concat_examples([(first_x, first_t)], device)
    try:
        classes = net.initialize(*first)
    except DataError as e:
        raise DataError(str(e), collective=True) from None
    _on_root(world, lambda: [check_labels(labels, classes, name, net.head_names)
                             for labels, name in _cheap_sources(sources)], None)  # collective

    spec = SampleSpec(first_x.shape, classes, net.head_names)
    eval_batch = config.eval_batchsize or default_eval_batchsize(first_x.nbytes,
                                                                  config.batchsize)
    loader = Loader({'train': Source(train_data, names[0], spec),
                     'test': Source(test_data, names[1], spec)}, _loader_workers(config, world),
                    max_batch=max(config.batchsize, eval_batch))
    train_iter = TrainIterator(loader, 'train', n_train, config.batchsize,
                               world_size=world.size, rank=world.rank, seed=config.seed)
    test_iter = EvalIterator(loader, 'test', *shard_bounds(n_test, world.size, world.rank),
                             eval_batch)
    return loader, train_iter, test_iter


def _on_root(world, load, empty):
    """Runs ``load`` on rank 0; a user error there is raised on every rank alike."""
    result, error = empty, None
    if world.is_root:
        try:
            result = load()
        except DistmultiError as e:
            error = (type(e).__name__, str(e))
    error = world.allgather_obj(error)[0]
    if error is not None:
        raise getattr(errors, error[0])(error[1], collective=True)
    return result


def _on_every_rank(world, load):
    """Runs ``load`` on every rank; a user error on any rank is raised on every rank alike."""
    result, error = None, None
    try:
        result = load()
    except DistmultiError as e:
        error = (type(e).__name__, str(e))
    found = world.allgather_obj(error)
    for rank, error in enumerate(found):
        if error is not None:
            alike = all(other == error for other in found)
            where = '' if world.size == 1 or alike else f' (on rank {rank})'
            raise getattr(errors, error[0])(error[1] + where, collective=True)
    return result


def _agree_on_lengths(world, train_data, test_data):
    """(n_train, n_test), the same on every rank, or a collective DataError."""
    lengths = world.allgather_obj((len(train_data), len(test_data)))
    if len(set(lengths)) > 1:
        seen = '; '.join(f'rank {rank}: {n} training and {m} test samples'
                         for rank, (n, m) in enumerate(lengths))
        raise DataError(f'the ranks opened datasets of different lengths ({seen}); every rank '
                        f'must open the same data (put it on a filesystem all hosts share)',
                        collective=True)
    return lengths[0]


def _batch_too_large(batchsize: int, ranks: int, n: int) -> str:
    if ranks == 1:
        return (f'batchsize {batchsize} is larger than the training data ({n} samples); use '
                f'at most {n}')
    return (f'batchsize {batchsize} on {ranks} ranks (a global batch of {batchsize * ranks}) '
            f'is larger than the training data ({n} samples); use at most {n // ranks} per '
            f'rank, or fewer ranks')


def _cheap_sources(sources):
    """(labels, name) of the sources whose labels can be had without reading images; the
    others' labels are checked sample by sample as they are read."""
    found = []
    for data, name in sources:
        labels = cheap_labels(data)
        if labels is not None:
            found.append((labels, name))
    return found


def _loader_workers(config: TrainConfig, world) -> int:
    """``config.loader_workers``, else from the cores per rank (the Loader starts none when
    all the data is in memory)."""
    if config.loader_workers is not None:
        return config.loader_workers
    local_ranks = getattr(getattr(world, 'mn', None), 'intra_size', 1)
    return default_loader_workers(cores_per_rank(local_ranks))


def _load_data(config: TrainConfig, train_data, test_data):
    """(train, test, sources, names) from the caller's datasets, ``config.dataset`` or the
    embedded data. ``sources`` are the datasets as given or opened, with the names errors use,
    so a bad label is reported at its row in the user's file (before any split); ``names``
    are the names of train and test."""
    if train_data is None and test_data is not None:
        raise ConfigError('test_data was given without train_data')
    names = ('training data', 'test data')
    if train_data is None and config.dataset:
        size = parse_image_size(config.image_size)
        train_data = load_dataset(config.dataset, size)
        names = (config.dataset, 'test data')
        if config.test_dataset:
            test_data = load_dataset(config.test_dataset, size)
            names = (config.dataset, config.test_dataset)
    if train_data is None:
        train_split, test_split = digit_strips(config.heads, config.train_size,
                                               config.test_size, seed=config.seed)
        train_data, test_data = train_split.dataset(), test_split.dataset()
    if test_data is None:
        return split_dataset(train_data, config.test_fraction, config.seed) + (
            [(train_data, names[0])], (names[0], names[0]))
    return train_data, test_data, [(train_data, names[0]), (test_data, names[1])], names


def load_model(spec: str) -> MultiHeadNet:
    """Calls the factory named by ``package.module:factory``; it returns (base, heads) or a
    MultiHeadNet. The current directory is importable, as for ``python -m``."""
    module_name, attr = spec.split(':', 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f'--model {spec}: cannot import {module_name!r} ({e})') from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f'--model {spec}: {module_name} has no callable {attr!r}')
    made = factory()
    if isinstance(made, MultiHeadNet):
        return made
    if (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], chainer.Link)
            and isinstance(made[1], (list, tuple, dict)) and made[1]):
        try:
            return MultiHeadNet(*made)
        except (TypeError, ValueError) as e:
            raise ConfigError(f'--model {spec}: {e}') from None
    raise ConfigError(f'--model {spec}: the factory must return (base, heads) with heads a '
                      f'non-empty list or dict of links, or a MultiHeadNet; got '
                      f'{type(made).__name__}')


def _make_optimizers(config: TrainConfig, net: MultiHeadNet, given) -> Dict[str, Any]:
    names = ['base'] + net.head_names
    if given is None:
        made = {}
        for name in names:
            spec = config.optimizer_spec(name)
            made[name] = create_optimizer(spec['type'], spec['lr'])
    elif callable(given) and not isinstance(given, dict):
        made = {name: given(name, getattr(net, name)) for name in names}
    elif isinstance(given, dict):
        if sorted(given) != sorted(names):
            raise ConfigError(f'optimizers must have exactly the names {", ".join(names)}, '
                              f'got {", ".join(sorted(given)) or "none"}')
        made = dict(given)
    else:
        raise ConfigError(f'optimizers must be a dict of name -> optimizer or a factory '
                          f'f(name, link), got {type(given).__name__}')
    for name, optimizer in made.items():
        if not isinstance(optimizer, chainer.Optimizer):
            raise ConfigError(f'optimizer for {name!r} must be a chainer.Optimizer, got '
                              f'{type(optimizer).__name__}')
        link = getattr(net, name)
        if optimizer.target is None:
            optimizer.setup(link)
        elif optimizer.target is not link:
            raise ConfigError(f'optimizer for {name!r} is set up on another link; set it up on '
                              f'net.{name} or leave it unset')
    return made


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
                             if k not in TrainConfig.resume_free_keys()
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
    checkpoint.load_npz(path, trainer)
    written_by = updater.checkpoint_world_size
    if train_iter.legacy_checkpoint:  # no stream position saved: continue after the samples
        train_iter.seek(updater.iteration * config.batchsize * written_by)
    ranks = (f'; same number of ranks ({world.size})' if written_by == world.size else
             f'; it was written by {written_by} rank(s) and continues on {world.size} from '
             f'the same sample ({train_iter.samples_seen} seen, epoch '
             f'{train_iter.epoch_detail:.3f})')
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
    per_epoch = max(1, -(-n_train // (config.batchsize * world.size)))
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
    net = evaluator.get_target('main')
    with_acc = [name for name, ok in zip(net.head_names, net.has_logits) if ok]
    trainer.extend(extensions.PrintReport(
        ['epoch', 'iteration', 'main/loss', 'validation/main/loss']
        + [f'validation/main/{name}/accuracy' for name in with_acc]
        + ['validation/main/accuracy_all', 'elapsed_time']))
    if config.progress:
        trainer.extend(extensions.ProgressBar(update_interval=10))
    if config.plot and extensions.PlotReport.available():
        plots = {'loss.png': ['main/loss', 'validation/main/loss'],
                 'accuracy_all.png': ['main/accuracy_all', 'validation/main/accuracy_all']}
        for name in net.head_names:
            for what in ('loss', 'accuracy') if name in with_acc else ('loss',):
                plots[f'{name}_{what}.png'] = [f'main/{name}/{what}',
                                               f'validation/main/{name}/{what}']
        for filename, keys in plots.items():
            trainer.extend(extensions.PlotReport(keys, x_key=report_trigger[1],
                                                 trigger=report_trigger, filename=filename))


def _seed_everything(seed: int, device) -> None:
    np.random.seed(seed)
    if device.xp is not np:
        device.xp.random.seed(seed)
