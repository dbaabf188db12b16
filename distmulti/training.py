"""Builds and runs one training on every rank: data, network, optimizers, updater, trainer.

``train(config)`` is what ``distmulti train`` runs, in one process or under mpiexec; it also
takes user objects (a network, datasets) from Python. Rank 0 alone writes logs, plots,
checkpoints, ``model.npz`` and then ``result.json``, the marker that the run completed.
"""
import contextlib
import dataclasses
import importlib
import json
import os
import sys
import threading
import time
import uuid
from typing import Any, Callable, Dict, Optional

import numpy as np

import chainer
from chainer import training
from chainer.iterators import SerialIterator
from chainer.training import extensions

from distmulti import (checkpoint, devices, errors, outdir, plots, recipe, stopping,
                       user_extensions)
from distmulti.runfiles import HEARTBEAT_FILE, MODEL_FILE, RESULT_FILE, TENSORBOARD_DIR
from distmulti._version import __version__
from distmulti.comm import NCCL_COMMUNICATORS, choose_communicator, create_world
from distmulti import watchdog as watchdog_module
from distmulti.watchdog import Watchdog, WatchdogExtension, busy as watchdog_busy
from distmulti.config import TrainConfig
from distmulti.data import (ShuffledIterator, check_embedded_size, check_label_shape,
                            check_labels, digit_strips)
from distmulti.datasets import labels_array, load_dataset, split_dataset
from distmulti.errors import (CheckpointError, ConfigError, DataError, DeviceError,
                              DistmultiError, TrainingStopped)
from distmulti.evaluator import MultiHeadEvaluator
from distmulti.models import MultiHeadNet, default_net
from distmulti.optim import create_optimizer
from distmulti.schedule import RateObserver
from distmulti.timing import IterationTimer
from distmulti.updater import MultiHeadUpdater

EVAL_BATCHSIZE = 500
# Iterator positions are recomputed from the iteration count on resume (see ShuffledIterator).
_ITERATOR_KEYS = 'updater/iterator:'


def _stderr_log(msg: str) -> None:
    print(f'distmulti: {msg}', file=sys.stderr, flush=True)


def train(config: TrainConfig, net: Optional[MultiHeadNet] = None, *, base=None, heads=None,
          optimizers=None, train_data=None, test_data=None, comm=None,
          log: Callable[[str], None] = None, handle_signals: bool = True,
          extensions=None) -> Dict[str, Any]:
    """Trains a multi-head network and returns the final result dictionary.

    Every rank calls this with the same arguments; collective steps are marked below.

    Args:
        config: the run's options; validated here.
        net: a ``MultiHeadNet``; or give ``base`` and ``heads`` (a list, or a dict of named
            heads) instead; or neither for ``config.model`` or the built-in CNN.
            ``config.heads`` is taken from the network.
        optimizers: ``{'base': opt, '<head>': opt, ...}`` (set up here if not yet), or a
            factory ``f(name, link) -> optimizer``; default: ``config.optimizer(s)``/``lr``.
        train_data, test_data: datasets of (x, t) pairs, t of shape (K,); without
            ``test_data`` a seeded ``config.test_fraction`` of ``train_data`` is held out.
            Default: ``config.dataset`` or the embedded digit strips. Under MPI only rank 0's
            are used (others may pass None).
        comm: the process group (default: MPI.COMM_WORLD under mpiexec, else one process).
        log: where one-line messages go (default: stderr).
        handle_signals: when called from the main thread, SIGTERM, SIGINT, SIGHUP and
            SIGUSR1 stop the training at a checkpoint (``TrainingStopped`` is raised, on every
            rank); see ``distmulti.stopping``.
        extensions: your own Chainer extensions, added after distmulti's: each an extension,
            an ``(extension, trigger)`` pair or a dict of ``Trainer.extend`` arguments (plus
            ``root_only``); they run on every rank unless ``root_only`` (see
            ``distmulti.user_extensions``).

    Raises:
        TrainingStopped: a stop signal arrived; the checkpoint it wrote continues the run
            with ``--resume auto``.
    """
    log = log or _stderr_log
    extra_extensions = user_extensions.normalize(extensions)
    network = 'python' if (net is not None or base is not None or heads is not None) else (
        config.model or 'default')
    if net is None and base is None and heads is None:
        config = dataclasses.replace(config).validate(check_parts=config.model is None)
        np.random.seed(config.seed)  # parameter initialisation
        net = load_model(config.model) if config.model else default_net(config.heads)
    elif net is None:
        net = MultiHeadNet(base, heads)
    config = dataclasses.replace(config, heads=net.n_heads).validate(net.head_names)
    run_id = os.environ.get('DISTMULTI_RUN_ID') or uuid.uuid4().hex
    with contextlib.ExitStack() as stack:
        stop = None
        if handle_signals and threading.current_thread() is threading.main_thread():
            stop = stack.enter_context(stopping.StopRequest(config.stop_grace, log))
        watchdog = None
        if config.hang_timeout:
            # From here to the end: start-up, collectives, evaluation and writes included.
            watchdog = Watchdog(config.hang_timeout, log=log).start()
            stack.callback(watchdog.stop)
        on_gpu = config.device.startswith('@cupy')
        # The rank's GPU becomes current before anything touches CUDA (NCCL's communicator,
        # parameters, random generators, metrics): its rank on the node comes from MPI alone.
        layout = (comm.size, comm.intra_rank) if comm is not None else devices.node_layout()[:2]
        device = devices.select(config.device, *layout)                 # collective (layout)
        world = comm or create_world(config.communicator, on_gpu=on_gpu, log=log,
                                     cuda_aware_mpi=config.cuda_aware_mpi)
        if stop is not None:
            stop.announce = world.is_root
        if watchdog is not None:
            watchdog.rank = world.rank
            if world.size > 1:
                watchdog.attach(world.mpi)                              # collective
            else:
                watchdog.startup_done()
        _check_same_run(world, config)                                  # collective
        _check_one_gpu_per_rank(world, device, config)                  # collective
        devices.seed(config.seed, device, world.rank)
        lock = _on_root(world, lambda: _claim_output(config, run_id, log), None)  # collective
        if lock is not None:
            stack.callback(lock.release)
            if watchdog is not None:
                watchdog.heartbeat_path = os.path.join(config.out, HEARTBEAT_FILE)
        result = _train(config, net, world, device, run_id, network, optimizers,
                        train_data, test_data, log, extra_extensions)
        if watchdog is not None:
            watchdog.close()                                            # collective
        return result


def _claim_output(config: TrainConfig, run_id: str, log) -> outdir.OutputLock:
    """Rank 0: the output folder made or checked, locked for this run, its stale temporary
    files removed."""
    outdir.prepare(config.out)
    lock = outdir.OutputLock(config.out, run_id, outdir.job_id(), log).acquire()
    outdir.remove_stale_tmp(config.out, log)
    return lock


def _train(config: TrainConfig, net: MultiHeadNet, world, device, run_id: str, network: str,
           optimizers, train_data, test_data, log, extra_extensions) -> Dict[str, Any]:
    with watchdog_busy('setting up'):
        # Local work and start-up collectives: a rank that stops or dies here is still seen
        # by the watchdog (its heartbeats stop); a slow set-up does not count as a hang.
        trainer, updater, evaluator, checkpointer, lineage = _set_up(
            config, net, world, device, run_id, optimizers, train_data, test_data, log,
            extra_extensions)
    start = time.perf_counter()
    trainer.run(show_loop_exception_msg=False)
    return _finish(config, net, world, run_id, network, trainer, updater, evaluator,
                   checkpointer, lineage, start, log)


def _set_up(config: TrainConfig, net: MultiHeadNet, world, device, run_id: str, optimizers,
            train_data, test_data, log, extra_extensions):
    """Data, optimizers, updater, trainer and extensions; resumes if asked."""
    root_log = log if world.is_root else (lambda msg: None)

    train_data, test_data, sources = _on_root(
        world, lambda: _load_data(config, train_data, test_data), (None, None, []))  # collective
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

    _on_root(world, lambda: [check_label_shape(labels_array(data), net.n_heads, name)
                             for data, name in sources], None)          # collective
    net.to_device(device)
    first_x, first_t = chainer.dataset.concat_examples([full_train[0]], device)
    try:
        classes = net.initialize(first_x, first_t)
    except DataError as e:
        raise DataError(str(e), collective=True) from None
    _on_root(world, lambda: [check_labels(labels_array(data), classes, name, net.head_names)
                             for data, name in sources], None)          # collective
    optimizers = _make_optimizers(config, net, optimizers)
    schedules = recipe.apply(config, net, optimizers, world,
                             recipe.total_iterations(config, len(train_data)), root_log)

    train_iter = ShuffledIterator(train_data, config.batchsize, seed=config.seed + world.rank)
    test_iter = SerialIterator(test_data, max(config.batchsize, EVAL_BATCHSIZE),
                               repeat=False, shuffle=False)
    updater = MultiHeadUpdater(train_iter, net, optimizers, loss_weights=config.weights,
                               backward=config.backward, frozen=config.freeze, comm=world,
                               grad_sync=config.grad_sync, device=device,
                               accumulate=config.accumulate, lr_schedules=schedules,
                               grad_dtype=config.grad_dtype)            # collective
    trainer = training.Trainer(updater, StopTrigger(config.stop_trigger, updater),
                               out=config.out)
    evaluator = MultiHeadEvaluator(test_iter, net, loss_weights=config.weights,
                                   device=device, comm=world)
    checkpointer = _add_extensions(trainer, evaluator, config, len(train_data), world,
                                   watchdog_module.current(), run_id)
    user_extensions.register(trainer, extra_extensions, world.is_root)

    lineage = run_id
    if config.resume:
        lineage = _resume(trainer, updater, train_iter, config, world, root_log) or run_id
    checkpointer.manifest['lineage'] = lineage
    _on_root(world, lambda: outdir.set_aside(                           # collective
        config.out, updater.iteration if config.resume else None, log), None)
    return trainer, updater, evaluator, checkpointer, lineage


def _finish(config: TrainConfig, net: MultiHeadNet, world, run_id: str, network: str,
            trainer, updater, evaluator, checkpointer, lineage, start: float, log
            ) -> Dict[str, Any]:
    """After the training loop: a stop, or the final evaluation, model and result."""
    root_log = log if world.is_root else (lambda msg: None)
    if updater.stop_agreed and not _is_last_iteration(config)(updater):
        request = stopping.current()
        why = (f'on {stopping.signal_name(request.signum)}' if request and request.signum
               else 'on another rank\'s request')
        raise TrainingStopped(
            f'stopped {why} at iteration {updater.iteration}; wrote '
            f'{checkpointer.last_written[1]}; continue with --resume auto', collective=True)
    final = evaluator.evaluate()                                        # collective
    wall = time.perf_counter() - start
    prefix = 'validation/main/'
    result = {
        'test': {key[len(prefix):]: value for key, value in final.items()},
        'iterations': updater.iteration,
        'epoch_detail': updater.epoch_detail,
        'wall_time_s': wall,
        'run_id': run_id,
        'job_id': outdir.job_id(),
        'lineage': lineage,
        'network': network,
        'world_size': world.size,
        'global_batchsize': config.batchsize * config.accumulate * world.size,
        'version': __version__,
        'config': config.to_dict(),
    }
    _on_root(world, lambda: _write_results(config, net, result), None)  # collective
    accs = '  '.join(f'{name} {result["test"].get(name + "/accuracy", float("nan")):.4f}'
                     for name in net.head_names)
    root_log(f'test accuracy: {accs}  all heads {result["test"].get("accuracy_all", 0):.4f} '
             f'({int(result["test"]["samples"])} samples, {updater.iteration} iterations, '
             f'{wall:.1f} s); wrote {os.path.join(config.out, MODEL_FILE)} and '
             f'{os.path.join(config.out, RESULT_FILE)}')
    return result


def _write_results(config: TrainConfig, net: MultiHeadNet, result: Dict[str, Any]) -> None:
    """Rank 0: model.npz, then result.json (last: it marks the run as completed)."""
    checkpoint.save_npz(os.path.join(config.out, MODEL_FILE), net)
    with checkpoint.atomic_file(os.path.join(config.out, RESULT_FILE)) as f:
        json.dump(result, f, indent=2, sort_keys=True)


class StopTrigger:
    """The run's stop trigger, or the iteration at which the ranks agreed to stop (see
    ``distmulti.stopping``). Saved in checkpoints exactly as the trigger it wraps."""

    def __init__(self, trigger, updater):
        self.trigger = chainer.training.get_trigger(trigger)
        self.updater = updater

    def __call__(self, trainer) -> bool:
        return self.trigger(trainer) or self.updater.stop_agreed

    def serialize(self, serializer) -> None:
        if hasattr(self.trigger, 'serialize'):
            self.trigger.serialize(serializer)

    def get_training_length(self):
        """The wrapped trigger's length (the progress bar asks for it)."""
        return self.trigger.get_training_length()


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


def _load_data(config: TrainConfig, train_data, test_data):
    """(train, test, sources) from the caller's datasets, ``config.dataset`` or the embedded
    data; ``sources`` are the datasets as given or loaded, with the names errors use, so a bad
    label is reported at its row in the user's file (before any split)."""
    if train_data is None and test_data is not None:
        raise ConfigError('test_data was given without train_data')
    names = ('training data', 'test data')
    if train_data is None and config.dataset:
        train_data = load_dataset(config.dataset)
        names = (config.dataset, 'test data')
        if config.test_dataset:
            test_data = load_dataset(config.test_dataset)
            names = (config.dataset, config.test_dataset)
    if train_data is None:
        check_embedded_size(config.heads, config.train_size + config.test_size)
        train_split, test_split = digit_strips(config.heads, config.train_size,
                                               config.test_size, seed=config.seed)
        train_data, test_data = train_split.dataset(), test_split.dataset()
    if test_data is None:
        return split_dataset(train_data, config.test_fraction, config.seed) + (
            [(train_data, names[0])],)
    return train_data, test_data, [(train_data, names[0]), (test_data, names[1])]


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


def _resume(trainer, updater, train_iter, config: TrainConfig, world, log) -> Optional[str]:
    """Loads ``config.resume`` (a file, or ``auto``: the newest valid checkpoint) on every
    rank; returns the lineage of the checkpoint (None: unknown, or nothing to resume)."""
    path = config.resume
    manifest = None
    if path == 'auto':
        found = None
        if world.is_root:
            found = checkpoint.newest_valid_checkpoint(config.out, log)
        found = world.allgather_obj(found)[0]
        if found is None:
            log(f'--resume auto: no valid checkpoint in {config.out}; starting from the beginning')
            return None
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
    checkpoint.load_npz(path, trainer,
                        ignore_names=lambda key: key.startswith(_ITERATOR_KEYS))
    train_iter.seek(updater.iteration * updater.accumulate)
    written_by = updater.checkpoint_world_size
    ranks = (f'; same number of ranks ({world.size})' if written_by == world.size else
             f'; it was written by {written_by} rank(s) and continues on {world.size}, so the '
             f'data is re-sharded from here')
    log(f'resumed from {path} at iteration {updater.iteration}{ranks}')
    if manifest is None and path.endswith('.npz'):
        manifest = world.allgather_obj(checkpoint.read_manifest(
            os.path.dirname(path) or '.', updater.iteration) if world.is_root else None)[0]
    return (manifest or {}).get('lineage')


def _is_last_iteration(config: TrainConfig):
    length, unit = config.stop_trigger
    if unit == 'iteration':
        return lambda updater: updater.iteration >= length
    return lambda updater: updater.is_new_epoch and updater.epoch >= length


def _add_extensions(trainer, evaluator, config: TrainConfig, n_train: int, world,
                    watchdog, run_id: str) -> checkpoint.Checkpointer:
    """Every extension of a run; returns the checkpointer (its manifest gets the lineage)."""
    per_epoch = max(1, -(-n_train // (config.batchsize * config.accumulate)))
    if config.eval_interval is not None:
        report_trigger = (config.eval_interval, 'iteration')
    elif config.iterations is not None:
        report_trigger = (min(config.iterations, per_epoch), 'iteration')
    else:
        report_trigger = (1, 'epoch')
    if watchdog is not None:
        trainer.extend(WatchdogExtension(watchdog))
    # Both on every rank: they are collective.
    trainer.extend(evaluator, trigger=report_trigger)
    checkpointer = checkpoint.Checkpointer(
        world, config.out, config.checkpoint_interval, config.keep_checkpoints,
        _is_last_iteration(config),
        {'config_hash': checkpoint.config_hash(config.to_dict()), 'config': config.to_dict(),
         'version': __version__, 'run_id': run_id})
    trainer.extend(checkpointer)
    net = evaluator.get_target('main')
    if config.tensorboard:
        from distmulti import tensorboard
        _on_root(world, tensorboard.check_available, None)              # collective
    if not world.is_root:
        return checkpointer
    log_report = extensions.LogReport(trigger=report_trigger)
    trainer.extend(log_report)
    for extension, name in IterationTimer(config.batchsize * config.accumulate * world.size,
                                          report_trigger).extensions():
        trainer.extend(extension, name=name)
    if config.tensorboard:
        trainer.extend(tensorboard.TensorBoardReport(
            log_report, os.path.join(config.out, TENSORBOARD_DIR), net.head_names))
    with_acc = [name for name, ok in zip(net.head_names, net.has_logits) if ok]
    trainer.extend(extensions.PrintReport(
        ['epoch', 'iteration', 'main/loss', 'validation/main/loss']
        + [f'validation/main/{name}/accuracy' for name in with_acc]
        + ['validation/main/accuracy_all', 'elapsed_time']))
    if config.progress:
        trainer.extend(extensions.ProgressBar(update_interval=10))
    rates = RateObserver(trainer.updater.get_all_optimizers())
    trainer.extend(rates, trigger=report_trigger)
    if config.plot and plots.available():
        figures = {'loss.png': ['main/loss', 'validation/main/loss'],
                   'accuracy_all.png': ['main/accuracy_all', 'validation/main/accuracy_all']}
        for name in net.head_names:
            for what in ('loss', 'accuracy') if name in with_acc else ('loss',):
                figures[f'{name}_{what}.png'] = [f'main/{name}/{what}',
                                                 f'validation/main/{name}/{what}']
        if rates.keys:
            figures['lr.png'] = rates.keys
        trainer.extend(plots.LogPlots(log_report, figures, x_key=report_trigger[1],
                                      log=_stderr_log), trigger=report_trigger)
    return checkpointer


def _check_one_gpu_per_rank(world, device, config: TrainConfig) -> None:
    """NCCL refuses two ranks on one GPU ("Duplicate GPU detected" at the first collective):
    say so, with the ranks, before it."""
    if world.size == 1 or device.xp is np:
        return
    shared = devices.duplicate_gpus(world.allgather_obj(devices.gpu_identity(device)))
    name = choose_communicator(config.communicator, True, config.cuda_aware_mpi)
    if shared and name in NCCL_COMMUNICATORS:
        gpu, ranks = next(iter(shared.items()))
        raise DeviceError(f'ranks {", ".join(map(str, ranks))} all use GPU {gpu}, but the '
                          f'{name} communicator (NCCL) needs one GPU per rank; start at most '
                          f'as many ranks per node as it has GPUs', collective=True)
