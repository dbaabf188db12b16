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
from typing import Any, Callable, Dict, NamedTuple, Optional

import numpy as np

import chainer
from chainer import training
from chainer.training import extensions

from distmulti import (checkpoint, devices, errors, outdir, plots, recipe, stopping,
                       user_extensions)
from distmulti.runfiles import HEARTBEAT_FILE, MODEL_FILE, RESULT_FILE, TENSORBOARD_DIR
from distmulti._version import __version__
from distmulti.comm import NCCL_COMMUNICATORS, choose_communicator, create_world
from distmulti import watchdog as watchdog_module
from distmulti.watchdog import Watchdog, WatchdogExtension, busy as watchdog_busy
from distmulti.config import TrainConfig
from distmulti.csvdata import parse_image_size
from distmulti.data import check_embedded_size, check_label_shape, check_labels, digit_strips
from distmulti.datasets import cheap_labels, load_dataset, split_dataset
from distmulti.errors import (CheckpointError, ConfigError, DataError, DeviceError,
                              DistmultiError, TrainingStopped)
from distmulti.evaluator import MultiHeadEvaluator
from distmulti.iterators import EvalIterator, TrainIterator
from distmulti.loader import Loader, SampleSpec, Source, read_example
from distmulti.models import MultiHeadNet, default_net
from distmulti.optim import create_optimizer
from distmulti.runstats import RunStats
from distmulti.sampling import (cores_per_rank, default_eval_batchsize, default_loader_workers,
                                shard_bounds)
from distmulti.schedule import RateObserver
from distmulti.timing import IterationTimer
from distmulti.updater import MultiHeadUpdater


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
        train_data, test_data: datasets of (x, t) pairs (any Chainer dataset, lazy ones
            included), x float32, t int32 of shape (K,); without ``test_data`` a seeded
            ``config.test_fraction`` of ``train_data`` is held out. Default:
            ``config.dataset`` or the embedded digit strips. Under MPI every rank passes the
            same datasets and reads only its own samples of them (nothing is sent between
            ranks); ``config.loader_workers`` processes per rank read them ahead.
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


class Run(NamedTuple):
    """What ``_set_up`` built for one training, on this rank."""

    trainer: training.Trainer
    updater: MultiHeadUpdater
    evaluator: MultiHeadEvaluator
    checkpointer: checkpoint.Checkpointer
    lineage: str
    loader: Loader
    train_iter: TrainIterator
    stats: RunStats


def _train(config: TrainConfig, net: MultiHeadNet, world, device, run_id: str, network: str,
           optimizers, train_data, test_data, log, extra_extensions) -> Dict[str, Any]:
    with watchdog_busy('setting up'):
        # Local work and start-up collectives: a rank that stops or dies here is still seen
        # by the watchdog (its heartbeats stop); a slow set-up does not count as a hang.
        run = _set_up(config, net, world, device, run_id, optimizers, train_data, test_data,
                      log, extra_extensions)
    run.loader.start()  # forks the loader workers (they ignore stop signals, die with us)
    try:
        start = time.perf_counter()
        run.trainer.run(show_loop_exception_msg=False)
        return _finish(config, net, world, run_id, network, run, start, log)
    finally:
        run.loader.close()


def _set_up(config: TrainConfig, net: MultiHeadNet, world, device, run_id: str, optimizers,
            train_data, test_data, log, extra_extensions) -> Run:
    """Data, optimizers, updater, trainer and extensions; resumes if asked."""
    root_log = log if world.is_root else (lambda msg: None)

    stats = RunStats()
    loader, train_iter, test_iter = _open_data(config, world, net, device, train_data,
                                               test_data)                 # collective
    optimizers = _make_optimizers(config, net, optimizers)
    schedules = recipe.apply(config, net, optimizers, world,
                             recipe.total_iterations(config, train_iter.n / world.size),
                             root_log)
    updater = MultiHeadUpdater(train_iter, net, optimizers, loss_weights=config.weights,
                               backward=config.backward, frozen=config.freeze, comm=world,
                               grad_sync=config.grad_sync, device=device,
                               accumulate=config.accumulate, lr_schedules=schedules,
                               grad_dtype=config.grad_dtype)            # collective
    trainer = training.Trainer(updater, StopTrigger(config.stop_trigger, updater),
                               out=config.out)
    evaluator = MultiHeadEvaluator(test_iter, net, loss_weights=config.weights,
                                   device=device, comm=world)
    checkpointer = _add_extensions(trainer, evaluator, config, train_iter.n, world,
                                   watchdog_module.current(), run_id)
    trainer.extend(stats)
    user_extensions.register(trainer, extra_extensions, world.is_root)

    lineage = run_id
    if config.resume:
        lineage = _resume(trainer, updater, train_iter, config, world, root_log) or run_id
    checkpointer.manifest['lineage'] = lineage
    _on_root(world, lambda: outdir.set_aside(                           # collective
        config.out, updater.iteration if config.resume else None, log), None)
    return Run(trainer, updater, evaluator, checkpointer, lineage, loader, train_iter, stats)


def _finish(config: TrainConfig, net: MultiHeadNet, world, run_id: str, network: str,
            run: Run, start: float, log) -> Dict[str, Any]:
    """After the training loop: a stop, or the final evaluation, model and result."""
    root_log = log if world.is_root else (lambda msg: None)
    updater = run.updater
    if updater.stop_agreed and not _is_last_iteration(config)(updater):
        request = stopping.current()
        why = (f'on {stopping.signal_name(request.signum)}' if request and request.signum
               else 'on another rank\'s request')
        raise TrainingStopped(
            f'stopped {why} at iteration {updater.iteration}; wrote '
            f'{run.checkpointer.last_written[1]}; continue with --resume auto',
            collective=True)
    # The last report's evaluation when it ran at this iteration (the same on every rank),
    # else one now.
    final = run.evaluator.result_at(updater.iteration)
    if final is None:
        final = run.evaluator.evaluate()                                # collective
    wall = time.perf_counter() - start
    prefix = 'validation/main/'
    global_batch = config.batchsize * config.accumulate * world.size
    result = {
        'test': {key[len(prefix):]: value for key, value in final.items()},
        'iterations': updater.iteration,
        'epoch_detail': updater.epoch_detail,
        'wall_time_s': wall,
        'run_id': run_id,
        'job_id': outdir.job_id(),
        'lineage': run.lineage,
        'network': network,
        'world_size': world.size,
        'global_batchsize': global_batch,
        'train_samples_seen': run.train_iter.samples_seen,
        'resources': run.stats.summary(world, global_batch, run.loader,
                                       run.train_iter.wait_s),          # collective
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
        check_embedded_size(config.heads, config.train_size + config.test_size)
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
    checkpoint.load_npz(path, trainer)
    written_by = updater.checkpoint_world_size
    if train_iter.legacy_checkpoint:  # no stream position saved: continue after the samples
        train_iter.seek(updater.iteration * updater.accumulate * config.batchsize * written_by)
    ranks = (f'; same number of ranks ({world.size})' if written_by == world.size else
             f'; it was written by {written_by} rank(s) and continues on {world.size} from '
             f'the same sample ({train_iter.samples_seen} seen, epoch '
             f'{train_iter.epoch_detail:.3f})')
    log(f'resumed from {path} at iteration {updater.iteration}{ranks}')
    if manifest is None and path.endswith('.npz'):
        manifest = world.allgather_obj(checkpoint.read_manifest(
            os.path.dirname(path) or '.', updater.iteration) if world.is_root else None)[0]
    return (manifest or {}).get('lineage')


class ReportTrigger:
    """Fires every ``interval`` (a Chainer trigger spec) and at the run's last iteration, so
    that the evaluation, the log, the plots and TensorBoard end where training ends: with
    ``--iterations 1000 --eval-interval 300`` the last report is at 1000, not 900, and the
    final evaluation is that report's.

    Its state is the interval trigger's, under the same keys, so checkpoints written before
    it existed resume unchanged.
    """

    def __init__(self, interval, is_last: Callable[[Any], bool]):
        self._every = training.triggers.IntervalTrigger(*interval)
        self._is_last = is_last

    def __call__(self, trainer) -> bool:
        every = self._every(trainer)  # called every iteration: it tracks the previous one
        return every or self._is_last(trainer.updater)

    def serialize(self, serializer) -> None:
        self._every.serialize(serializer)


def _is_last_iteration(config: TrainConfig):
    length, unit = config.stop_trigger
    if unit == 'iteration':
        return lambda updater: updater.iteration >= length
    return lambda updater: updater.is_new_epoch and updater.epoch >= length


def _add_extensions(trainer, evaluator, config: TrainConfig, n_train: int, world,
                    watchdog, run_id: str) -> checkpoint.Checkpointer:
    """Every extension of a run; returns the checkpointer (its manifest gets the lineage)."""
    per_epoch = max(1, -(-n_train // (config.batchsize * config.accumulate * world.size)))
    if config.eval_interval is not None:
        report_trigger = (config.eval_interval, 'iteration')
    elif config.iterations is not None:
        report_trigger = (min(config.iterations, per_epoch), 'iteration')
    else:
        report_trigger = (1, 'epoch')
    is_last = _is_last_iteration(config)

    def report():  # one trigger per extension: interval triggers keep state
        return ReportTrigger(report_trigger, is_last)

    if watchdog is not None:
        trainer.extend(WatchdogExtension(watchdog))
    # Both on every rank: they are collective.
    trainer.extend(evaluator, trigger=report())
    checkpointer = checkpoint.Checkpointer(
        world, config.out, config.checkpoint_interval, config.keep_checkpoints,
        is_last,
        {'config_hash': checkpoint.config_hash(config.to_dict()), 'config': config.to_dict(),
         'version': __version__, 'run_id': run_id})
    trainer.extend(checkpointer)
    net = evaluator.get_target('main')
    if config.tensorboard:
        from distmulti import tensorboard
        _on_root(world, tensorboard.check_available, None)              # collective
    if not world.is_root:
        return checkpointer
    log_report = extensions.LogReport(trigger=report())
    trainer.extend(log_report)
    for extension, name in IterationTimer(config.batchsize * config.accumulate * world.size,
                                          report()).extensions():
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
    trainer.extend(rates, trigger=report())
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
                                      log=_stderr_log), trigger=report())
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
