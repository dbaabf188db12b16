"""TrainConfig: the one place where training options, their defaults and their checks live.

A config comes from defaults, then a YAML file, then command-line flags (later wins).
YAML keys are the long flag names with ``_`` or ``-`` (``batchsize``, ``checkpoint_interval``).
"""
import argparse
import dataclasses
import difflib
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from distmulti.errors import ConfigError

DEFAULT_EPOCHS = 4
MAX_SEED = 2 ** 32 - 1
BACKWARD_MODES = ('fused', 'per_loss')
GRAD_SYNC_MODES = ('net', 'optimizers')
COMMUNICATORS = ('auto', 'naive', 'pure_nccl', 'flat', 'non_cuda_aware')
# Keys of one part's entry under `optimizers:`; all but type and lr default to the flag of
# the same name (see TrainConfig.optimizer_spec).
OPTIMIZER_KEYS = ('type', 'lr', 'warmup', 'lr_decay', 'lr_step', 'lr_gamma', 'lr_floor',
                  'weight_decay', 'grad_clip')
_DEVICE_RE = re.compile(r'^@cupy:(\d+)$')
_MODEL_RE = re.compile(r'^[A-Za-z_][\w.]*:[A-Za-z_]\w*$')
DATASET_KINDS = ('npz', 'npy', 'csv')
# Learning-rate schedules (distmulti.schedule), scaling rules, gradient-exchange dtypes.
DECAYS = ('constant', 'step', 'exponential', 'cosine')
LR_SCALINGS = ('none', 'linear')
GRAD_DTYPES = ('float32', 'float16')
DEFAULT_WARMUP = 50
DEFAULT_DECAY = 'cosine'


def option(default: Any = None, help: str = '', *, factory: Optional[Callable[[], Any]] = None,
           flag: bool = True, short: Optional[str] = None, metavar: Optional[str] = None,
           choices: Optional[Sequence[str]] = None, parse: Optional[Callable[[str], Any]] = None,
           group: Optional[str] = None, resume_free: bool = False,
           show_default: bool = True) -> Any:
    """A TrainConfig field with everything the command line and resume need to know about it.

    Args:
        default, factory: the default value (or a factory for mutable ones).
        help: one line for ``--help``; ``(default: X)`` is appended unless ``show_default``
            is False (then the help says what the default is).
        flag: False for keys that exist only in the config file (``optimizers``).
        short, metavar, choices, parse: as for ``argparse.add_argument`` (``parse`` is its
            ``type``; by default the field's own type).
        group: flags of the same group are mutually exclusive (``epoch``/``iterations``).
        resume_free: the key may change between a run and its resumption without changing
            what is trained (it is left out of the checkpoint's config hash).
    """
    metadata = {'help': help, 'flag': flag, 'short': short, 'metavar': metavar,
                'choices': tuple(choices) if choices is not None else None, 'parse': parse,
                'group': group, 'resume_free': resume_free, 'show_default': show_default}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _int_list(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(',') if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}')


def _float_list(text: str) -> List[float]:
    try:
        return [float(v) for v in text.split(',') if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated numbers, got {text!r}')


@dataclasses.dataclass
class TrainConfig:
    """Everything one training run needs. ``validate()`` checks it all at once.

    Each field's definition (``option``) is also its command-line flag (``--name-with-dashes``),
    its help text and default in ``distmulti train --help``, and whether it may change on
    resume; ``distmulti.cli`` builds the parser from these definitions alone.
    """

    heads: int = option(3, 'number of classifier heads of the built-in network')
    batchsize: int = option(64, 'minibatch size per rank (N ranks train on N x batchsize)',
                            short='-b')
    epoch: Optional[int] = option(None, f'epochs to train (default {DEFAULT_EPOCHS} when '
                                        f'neither this nor --iterations is given)',
                                  short='-e', group='length', resume_free=True,
                                  show_default=False)
    iterations: Optional[int] = option(None, 'iterations to train', short='-i', group='length',
                                       resume_free=True, show_default=False)
    lr: float = option(2e-3, 'learning rate of every optimizer (per-part rates go under '
                             '`optimizers:` in --config)')
    optimizer: str = option('adam', 'optimizer type of every part: adam, sgd, momentum_sgd, '
                                    'nesterov, rmsprop, adagrad, or adadelta (which has no '
                                    'learning rate); per-part types go under `optimizers:` in '
                                    '--config')
    optimizers: Dict[str, Dict[str, Any]] = option(
        help='per part (base, head0, ...): {type, lr, warmup, lr_decay, lr_step, lr_gamma, '
             'lr_floor, weight_decay, grad_clip}', factory=dict, flag=False)
    loss_weights: Optional[List[float]] = option(
        None, 'weight of each head in the summed loss (default: all 1)', metavar='W0,W1,..',
        parse=_float_list, show_default=False)
    freeze: List[int] = option(help='heads whose parameters stay fixed (default: none)',
                               factory=list, metavar='I,J,..', parse=_int_list,
                               show_default=False)
    backward: str = option('fused', 'fused: one backward of the weighted sum; per_loss: one '
                                    'backward per head, as hand-written updaters do (same '
                                    'gradients)', choices=BACKWARD_MODES)
    grad_sync: str = option('optimizers', 'with several ranks: optimizers = a ChainerMN '
                                          'multi-node optimizer per part; net = one packed '
                                          'all-reduce of all gradients',
                            choices=GRAD_SYNC_MODES)
    communicator: str = option('auto', 'ChainerMN communicator (auto: pure_nccl on GPUs, naive '
                                       'on the CPU)', choices=COMMUNICATORS)
    device: str = option('@numpy', '-1 or @numpy (CPU), N or @cupy:N (GPU N)', short='-d')
    seed: int = option(0, 'random seed of data, initialisation and shuffling')
    out: str = option('result', 'output directory', short='-o', resume_free=True)
    resume: Optional[str] = option(None, 'checkpoint file to resume from, or auto: the newest '
                                         'valid one in --out (none: start fresh)',
                                   short='-r', metavar='CHECKPOINT', resume_free=True,
                                   show_default=False)
    checkpoint_interval: int = option(200, 'write a checkpoint every N iterations and at the '
                                           'end', metavar='N', resume_free=True)
    keep_checkpoints: int = option(3, 'checkpoints kept', metavar='K', resume_free=True)
    hang_timeout: Optional[float] = option(None, 'end the job when a rank stops (or no rank '
                                                 'makes progress) for this long (default: no '
                                                 'watchdog)', metavar='SECONDS',
                                           resume_free=True, show_default=False)
    stop_grace: Optional[float] = option(60.0, 'after SIGTERM/SIGINT/SIGHUP/SIGUSR1, seconds to '
                                               'finish the iteration and write the checkpoint '
                                               'before exiting at once (0: no limit)',
                                         metavar='SECONDS', resume_free=True)
    eval_interval: Optional[int] = option(None, 'evaluate and log every N iterations and at '
                                                'the last (default: every epoch)', metavar='N',
                                          resume_free=True, show_default=False)
    model: Optional[str] = option(None, 'your network: a factory returning (base, heads) or a '
                                        'MultiHeadNet', metavar='PACKAGE.MODULE:FACTORY',
                                  show_default=False)
    dataset: Optional[str] = option(None, 'your data (default: the embedded digit strips)',
                                    metavar='npz:PATH|npy:DIR|csv:PATH', show_default=False)
    test_dataset: Optional[str] = option(None, 'test data (default: a seeded --test-fraction '
                                               'of --dataset)',
                                         metavar='npz:PATH|npy:DIR|csv:PATH',
                                         show_default=False)
    test_fraction: float = option(0.2, 'share of --dataset held out for testing')
    train_size: int = option(6000, 'embedded training strips')
    test_size: int = option(1000, 'embedded test strips')
    progress: bool = option(True, 'progress bar', resume_free=True)
    plot: bool = option(True, 'PNG plots of the log', resume_free=True)

    # -- ecosystem: TensorBoard
    tensorboard: bool = option(False, 'write every number of the log as TensorBoard scalars '
                                      'under OUT/tensorboard/ (rank 0; needs the tensorboard '
                                      'extra)', resume_free=True)

    # -- GPUs
    cuda_aware_mpi: bool = option(False, 'the MPI is CUDA-aware (takes GPU memory): allows the '
                                         'naive and flat communicators on GPUs',
                                  resume_free=True)

    # -- large-batch recipe: rate schedules and scaling, regularisation, accumulation,
    #    gradient-exchange precision, synchronised BatchNorm (per-part overrides of the
    #    schedule and regularisation keys go under `optimizers:` in --config)
    warmup: int = option(DEFAULT_WARMUP, 'raise every rate linearly over the first N '
                                         'iterations', metavar='N')
    lr_decay: str = option(DEFAULT_DECAY, 'after the warm-up: constant, step (x --lr-gamma '
                                          'every --lr-step iterations), exponential (the same, '
                                          'smoothly) or cosine (to --lr-floor at the end)',
                           choices=DECAYS)
    lr_step: Optional[int] = option(None, 'iterations per factor --lr-gamma (step and '
                                          'exponential decay)', metavar='N', show_default=False)
    lr_gamma: float = option(0.1, 'decay factor per --lr-step iterations', metavar='G')
    lr_floor: float = option(0.0, 'lowest rate of a decay, as a fraction of the peak rate',
                             metavar='F')
    lr_scaling: str = option('none', 'linear: every rate is given for --lr-reference-batch and '
                                     'is multiplied by the global batch (ranks x --accumulate '
                                     'x --batchsize) over it', choices=LR_SCALINGS)
    lr_reference_batch: Optional[int] = option(
        None, 'the batch the rates are given for, with --lr-scaling linear (default: '
              '--batchsize, i.e. one rank and one micro-batch)', metavar='N', show_default=False)
    weight_decay: float = option(0.0, 'L2 weight decay of every part (Chainer\'s WeightDecay '
                                      'hook)', metavar='RATE')
    grad_clip: Optional[float] = option(None, 'clip the L2 norm of each part\'s gradient to '
                                              'this (Chainer\'s GradientClipping hook; default: '
                                              'no clipping)', metavar='NORM', show_default=False)
    accumulate: int = option(1, 'forward/backward passes of --batchsize per optimizer step '
                                '(gradient accumulation: one exchange and one step per N '
                                'batches)', metavar='N')
    grad_dtype: str = option('float32', 'dtype of the gradient exchange between ranks; float16 '
                                        'needs GPUs and the pure_nccl communicator',
                             choices=GRAD_DTYPES)
    sync_bn: bool = option(False, 'replace every BatchNormalization link of the network by '
                                  'ChainerMN\'s multi-node one: statistics over the global '
                                  'batch instead of each rank\'s')

    # -- data loading (sharded, lazy)
    loader_workers: Optional[int] = option(
        None, 'processes per rank that read and decode lazy (npy:, csv:) samples ahead of '
              'training; 0 reads them in the training process (default: from the cores per '
              'rank, 1 to 8; in-memory data is always read in the training process)',
        metavar='N', resume_free=True, show_default=False)
    eval_batchsize: Optional[int] = option(
        None, 'evaluation batch per rank (default: the training batch, or more while one '
              'batch of inputs stays under 4 MiB; at most 500)', metavar='N',
        resume_free=True, show_default=False)
    image_size: Optional[str] = option(
        None, 'csv: datasets: resize every image to WIDTHxHEIGHT (default: every image must '
              'have the size of the first)', metavar='WxH', show_default=False)

    # -- construction -------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = 'config') -> 'TrainConfig':
        """Builds a config from a mapping (e.g. parsed YAML); unknown keys are an error."""
        return cls().updated(values, source)

    def updated(self, values: Mapping[str, Any], source: str = 'config') -> 'TrainConfig':
        """Returns a copy with ``values`` applied; ``epoch`` and ``iterations`` replace each other."""
        if not isinstance(values, Mapping):
            raise ConfigError(f'{source} must be a mapping of option names to values, '
                              f'got {type(values).__name__}')
        known = {f.name for f in dataclasses.fields(self)}
        clean = {}
        for key, value in values.items():
            name = str(key).replace('-', '_')
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f' (did you mean {close[0]!r}?)' if close else ''
                raise ConfigError(f'unknown config key {key!r} in {source}{hint}; allowed keys: '
                                  f'{", ".join(sorted(known))}')
            clean[name] = value
        if clean.get('epoch') is not None:
            clean.setdefault('iterations', None)
        if clean.get('iterations') is not None:
            clean.setdefault('epoch', None)
        return dataclasses.replace(self, **clean)

    @classmethod
    def from_yaml(cls, path: str) -> 'TrainConfig':
        """Reads a YAML file of config keys."""
        import yaml
        try:
            with open(path, encoding='utf-8') as f:
                values = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(f'cannot read config file {path!r}: {e.strerror}') from None
        except yaml.YAMLError as e:
            raise ConfigError(f'config file {path!r} is not valid YAML: {e}') from None
        return cls.from_mapping(values or {}, source=f'config file {path!r}')

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def resume_free_keys(cls) -> frozenset:
        """Keys that may change between a run and its resumption (see ``option``)."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata['resume_free'])

    # -- derived values -----------------------------------------------------
    @property
    def head_names(self) -> List[str]:
        return [f'head{i}' for i in range(self.heads)]

    @property
    def optimizer_names(self) -> List[str]:
        return ['base'] + self.head_names

    @property
    def stop_trigger(self):
        if self.iterations is not None:
            return (self.iterations, 'iteration')
        return (self.epoch if self.epoch is not None else DEFAULT_EPOCHS, 'epoch')

    @property
    def weights(self) -> List[float]:
        return list(self.loss_weights) if self.loss_weights is not None else [1.0] * self.heads

    def optimizer_spec(self, name: str) -> Dict[str, Any]:
        """Everything about the optimizer of ``base`` or ``head{i}`` (the keys of
        OPTIMIZER_KEYS): the flags' values, overridden by its entry under ``optimizers``."""
        spec = self._flag_spec()
        spec.update(self.optimizers.get(name, {}))
        return spec

    def _flag_spec(self) -> Dict[str, Any]:
        return {key: getattr(self, 'optimizer' if key == 'type' else key)
                for key in OPTIMIZER_KEYS}

    # -- checks -------------------------------------------------------------
    def validate(self, head_names: Optional[List[str]] = None,
                 check_parts: bool = True) -> 'TrainConfig':
        """Raises ConfigError naming the first bad value; returns self (normalised).

        ``head_names``: the network's head names when they are not ``head0``, ``head1``, ...
        ``check_parts=False`` skips checking ``optimizers`` names (net not built yet).
        """
        parts = ['base'] + list(head_names if head_names is not None else self.head_names)
        _check_int('heads', self.heads, minimum=1)
        _check_int('batchsize', self.batchsize, minimum=1)
        if self.epoch is not None and self.iterations is not None:
            raise ConfigError(f'give either epoch ({self.epoch}) or iterations '
                              f'({self.iterations}), not both')
        if self.epoch is not None:
            _check_int('epoch', self.epoch, minimum=1)
        if self.iterations is not None:
            _check_int('iterations', self.iterations, minimum=1)
        _check_number('lr', self.lr, positive=True)
        from distmulti.optim import check_optimizer_type
        check_optimizer_type(self.optimizer, 'optimizer')
        if not isinstance(self.optimizers, Mapping):
            raise ConfigError(f'optimizers must map names ({", ".join(parts)}) '
                              f'to {{type, lr}}, got {self.optimizers!r}')
        for name, spec in self.optimizers.items():
            if check_parts and name not in parts:
                raise ConfigError(f'optimizers has an entry for {name!r}, but with heads='
                                  f'{self.heads} the parts are {", ".join(parts)}')
            if not isinstance(spec, Mapping) or set(spec) - set(OPTIMIZER_KEYS):
                raise ConfigError(f'optimizers[{name!r}] must be a mapping with keys '
                                  f'{" and/or ".join(OPTIMIZER_KEYS)}, got {spec!r}')
            if 'type' in spec:
                check_optimizer_type(spec['type'], f'optimizers[{name!r}].type')
            if 'lr' in spec:
                _check_number(f'optimizers[{name!r}].lr', spec['lr'], positive=True)
            _check_part(self.optimizer_spec(name), f'optimizers[{name!r}].',
                        [key for key in OPTIMIZER_KEYS[2:] if key in spec])
        if self.loss_weights is not None:
            if not isinstance(self.loss_weights, (list, tuple)) or len(self.loss_weights) != self.heads:
                raise ConfigError(f'loss_weights must hold one number per head ({self.heads}), '
                                  f'got {self.loss_weights!r}')
            for i, w in enumerate(self.loss_weights):
                _check_number(f'loss_weights[{i}]', w, positive=False)
                if w < 0:
                    raise ConfigError(f'loss_weights[{i}] must be >= 0, got {w!r}')
        if not isinstance(self.freeze, (list, tuple)):
            raise ConfigError(f'freeze must be a list of head indices, got {self.freeze!r}')
        for i in self.freeze:
            if not _is_int(i) or not 0 <= i < self.heads:
                raise ConfigError(f'freeze lists head {i!r}, but heads are numbered '
                                  f'0..{self.heads - 1}')
        if self.backward not in BACKWARD_MODES:
            raise ConfigError(f'backward must be one of {", ".join(BACKWARD_MODES)}, '
                              f'got {self.backward!r}')
        if self.grad_sync not in GRAD_SYNC_MODES:
            raise ConfigError(f'grad_sync must be one of {", ".join(GRAD_SYNC_MODES)}, '
                              f'got {self.grad_sync!r}')
        if self.communicator not in COMMUNICATORS:
            raise ConfigError(f'communicator must be one of {", ".join(COMMUNICATORS)}, '
                              f'got {self.communicator!r}')
        self.device = normalize_device(self.device)
        _check_int('seed', self.seed, minimum=0)
        if self.seed > MAX_SEED:
            raise ConfigError(f'seed must be an integer from 0 to {MAX_SEED} (numpy\'s seed '
                              f'range), got {self.seed}')
        if not isinstance(self.out, str) or not self.out:
            raise ConfigError(f'out must be a directory path, got {self.out!r}')
        if self.resume is not None and not isinstance(self.resume, str):
            raise ConfigError(f'resume must be a checkpoint file path or auto, got {self.resume!r}')
        _check_int('checkpoint_interval', self.checkpoint_interval, minimum=1)
        _check_int('keep_checkpoints', self.keep_checkpoints, minimum=1)
        if self.hang_timeout is not None:
            _check_number('hang_timeout', self.hang_timeout, positive=True)
        if self.stop_grace is not None:
            _check_number('stop_grace', self.stop_grace, positive=False)
            if self.stop_grace < 0:
                raise ConfigError(f'stop_grace must be >= 0 seconds (0: no limit), got '
                                  f'{self.stop_grace!r}')
        if self.eval_interval is not None:
            _check_int('eval_interval', self.eval_interval, minimum=1)
        if self.model is not None and (not isinstance(self.model, str)
                                       or not _MODEL_RE.match(self.model)):
            raise ConfigError(f'model must be package.module:factory, got {self.model!r}')
        for key in ('dataset', 'test_dataset'):
            spec = getattr(self, key)
            if spec is not None and (not isinstance(spec, str)
                                     or spec.split(':', 1)[0] not in DATASET_KINDS
                                     or ':' not in spec):
                raise ConfigError(f'{key} must be npz:PATH, npy:DIR or csv:PATH, got {spec!r}')
        if self.test_dataset is not None and self.dataset is None:
            raise ConfigError('test_dataset needs dataset (the training data) too')
        if (not isinstance(self.test_fraction, (int, float)) or isinstance(self.test_fraction, bool)
                or not 0 < self.test_fraction < 1):
            raise ConfigError(f'test_fraction must be between 0 and 1 (exclusive), got '
                              f'{self.test_fraction!r}')
        _check_int('train_size', self.train_size, minimum=1)
        _check_int('test_size', self.test_size, minimum=1)
        for flag in ('progress', 'plot'):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f'{flag} must be true or false, got {getattr(self, flag)!r}')
        if not isinstance(self.tensorboard, bool):
            raise ConfigError(f'tensorboard must be true or false, got {self.tensorboard!r}')
        if not isinstance(self.cuda_aware_mpi, bool):
            raise ConfigError(f'cuda_aware_mpi must be true or false, got '
                              f'{self.cuda_aware_mpi!r}')
        if self.device.startswith('@cupy'):
            from distmulti.comm import choose_communicator
            choose_communicator(self.communicator, True, self.cuda_aware_mpi)
        # -- large-batch recipe
        _check_part(self._flag_spec(), '', OPTIMIZER_KEYS[2:])
        if self.lr_scaling not in LR_SCALINGS:
            raise ConfigError(f'lr_scaling must be one of {", ".join(LR_SCALINGS)}, '
                              f'got {self.lr_scaling!r}')
        if self.lr_reference_batch is not None:
            _check_int('lr_reference_batch', self.lr_reference_batch, minimum=1)
        _check_int('accumulate', self.accumulate, minimum=1)
        if self.grad_dtype not in GRAD_DTYPES:
            raise ConfigError(f'grad_dtype must be one of {", ".join(GRAD_DTYPES)}, '
                              f'got {self.grad_dtype!r}')
        if self.grad_dtype == 'float16':
            if not self.device.startswith('@cupy'):
                raise ConfigError(f'grad_dtype float16 needs GPUs: only ChainerMN\'s pure_nccl '
                                  f'communicator exchanges float16, and on the CPU its naive '
                                  f'communicator exchanges float32 only; this run is on the '
                                  f'CPU (device {self.device}); use grad_dtype float32 or a GPU '
                                  f'device (@cupy:0)')
            if self.communicator not in ('auto', 'pure_nccl'):
                raise ConfigError(f'grad_dtype float16 needs the pure_nccl communicator '
                                  f'(ChainerMN\'s {self.communicator} exchanges float32 only); '
                                  f'use communicator auto or pure_nccl')
        if not isinstance(self.sync_bn, bool):
            raise ConfigError(f'sync_bn must be true or false, got {self.sync_bn!r}')
        # -- data loading (sharded, lazy)
        if self.loader_workers is not None:
            _check_int('loader_workers', self.loader_workers, minimum=0)
        if self.eval_batchsize is not None:
            _check_int('eval_batchsize', self.eval_batchsize, minimum=1)
        if self.image_size is not None:
            from distmulti.csvdata import parse_image_size
            try:
                parse_image_size(self.image_size)
            except ValueError as e:
                raise ConfigError(f'image_size: {e}') from None
        return self


def _check_part(spec: Mapping[str, Any], prefix: str, keys: Sequence[str]) -> None:
    """Checks the schedule and regularisation values ``keys`` of one part's merged ``spec``
    (``prefix`` names where they came from), and that a step or exponential decay has a step."""
    for key in keys:
        value, name = spec[key], prefix + key
        if key == 'warmup':
            _check_int(name, value, minimum=0)
        elif key == 'lr_decay':
            if value not in DECAYS:
                raise ConfigError(f'{name} must be one of {", ".join(DECAYS)}, got {value!r}')
        elif key == 'lr_step':
            if value is not None:
                _check_int(name, value, minimum=1)
        elif key == 'lr_gamma':
            _check_number(name, value, positive=True)
        elif key == 'lr_floor':
            _check_number(name, value, positive=False)
            if not 0 <= value <= 1:
                raise ConfigError(f'{name} is a fraction of the peak rate and must be between '
                                  f'0 and 1, got {value!r}')
        elif key == 'weight_decay':
            _check_number(name, value, positive=False)
            if value < 0:
                raise ConfigError(f'{name} must be >= 0, got {value!r}')
        elif key == 'grad_clip':
            if value is not None:
                _check_number(name, value, positive=True)
    if spec['lr_decay'] in ('step', 'exponential') and spec['lr_step'] is None:
        raise ConfigError(f'{prefix}lr_decay {spec["lr_decay"]} needs lr_step (iterations per '
                          f'factor lr_gamma), which is not set')


def normalize_device(spec: Any) -> str:
    """Maps ``-1``/``@numpy`` to ``@numpy`` and ``N``/``@cupy:N`` to ``@cupy:N``."""
    text = str(spec).strip() if isinstance(spec, (str, int)) and not isinstance(spec, bool) else None
    if text is not None:
        if text in ('-1', '@numpy', 'numpy', 'cpu'):
            return '@numpy'
        if text.isdigit():
            return f'@cupy:{int(text)}'
        if _DEVICE_RE.match(text):
            return f'@cupy:{int(_DEVICE_RE.match(text).group(1))}'
        if text == '@intel64':
            return text
    raise ConfigError(f'unknown device {spec!r}; allowed: -1 or @numpy (CPU), '
                      f'N or @cupy:N (GPU N), @intel64')


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ConfigError(f'{name} must be an integer >= {minimum}, got {value!r}')


def _check_number(name: str, value: Any, positive: bool) -> None:
    import math
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise ConfigError(f'{name} must be a finite number{" > 0" if positive else ""}, '
                          f'got {value!r}')
