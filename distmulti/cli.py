"""The ``distmulti`` command: ``parse_args`` -> ``config_from_args`` -> ``run`` -> ``main``.

Each step is a plain function, so tests call ``main([...])`` in-process.
"""
import argparse
import dataclasses
import os
import shlex
import sys
import traceback
import typing
from typing import List, Optional

import numpy as np

from distmulti._version import __version__
from distmulti.config import TrainConfig
from distmulti.errors import (ConfigError, DistmultiError, NonFiniteLossError, OutputError,
                              TrainingStopped)
from distmulti.runfiles import (EXIT_FAILED, EXIT_OK, EXIT_SIGINT, EXIT_STOPPED, EXIT_USAGE,
                                MODEL_FILE)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, built from the field's definition (help, default,
    type, choices, mutual exclusion). Every flag defaults to None, so that only the flags
    given on the command line override the --config file."""
    groups = {}
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        if not meta.get('flag', False):
            continue
        names = [f'--{field.name.replace("_", "-")}'] + ([meta['short']] if meta['short'] else [])
        default = getattr(defaults, field.name)
        help_text = meta['help']
        if meta['show_default']:
            help_text += f' (default: {default})'
        kwargs = {'dest': field.name, 'default': None, 'help': help_text}
        if _value_type(field) is bool:
            kwargs['action'] = argparse.BooleanOptionalAction
        else:
            kwargs['type'] = meta['parse'] or _value_type(field)
            if meta['metavar']:
                kwargs['metavar'] = meta['metavar']
            if meta['choices']:
                kwargs['choices'] = meta['choices']
        target = parser
        if meta['group']:
            if meta['group'] not in groups:
                groups[meta['group']] = parser.add_mutually_exclusive_group()
            target = groups[meta['group']]
        target.add_argument(*names, **kwargs)


def _value_type(field: dataclasses.Field):
    """int, float, str or bool from a field's annotation (Optional[...] unwrapped)."""
    kind = field.type
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is typing.Union and len(args) == 1:
        kind = args[0]
    return kind if kind in (int, float, str, bool) else str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='distmulti', description='Train shared-base, multi-head Chainer networks.')
    parser.add_argument('--version', action='version', version=f'distmulti {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True

    t = sub.add_parser('train', help='train a multi-head network',
                       description='Train a multi-head network (default: the embedded '
                                   'multi-digit strips). Flags override --config.')
    t.add_argument('--config', '-c', metavar='FILE', help='YAML file of config keys')
    add_config_flags(t)
    t.set_defaults(func=run_train)

    ev = sub.add_parser('evaluate', help='per-head accuracy and confusion matrices of a run',
                        description='Evaluates RUN/model.npz on the run\'s test data (or '
                                    '--dataset): per-head accuracy and confusion matrices, '
                                    'printed and saved as PNG and JSON.')
    ev.add_argument('run', metavar='RUN', help='the --out folder of a completed training')
    ev.add_argument('--dataset', metavar='npz:PATH|npy:DIR|csv:PATH', help='data to evaluate on')
    ev.add_argument('--model-file', help='parameters to use (default RUN/model.npz)')
    ev.add_argument('--out', help='where PNGs and evaluation.json go (default RUN/evaluation)')
    ev.add_argument('--device', '-d', default='@numpy', help='as for train (default CPU)')
    ev.set_defaults(func=run_evaluate)

    pr = sub.add_parser('predict', help='per-head predictions of a run for given inputs',
                        description='Prints one CSV row per input: its name, then the '
                                    'predicted class of every head.')
    pr.add_argument('run', metavar='RUN', help='the --out folder of a completed training')
    pr.add_argument('inputs', nargs='+', metavar='INPUT',
                    help='npz:PATH (its array x), npy:DIR (its x.npy) or image files')
    pr.add_argument('--model-file', help='parameters to use (default RUN/model.npz)')
    pr.add_argument('--output', '-o', help='write the CSV here instead of stdout')
    pr.add_argument('--device', '-d', default='@numpy', help='as for train (default CPU)')
    pr.set_defaults(func=run_predict)

    st = sub.add_parser('status', help='did the run in OUT complete? (exit 0 if so, else 1)',
                        description='Says in one line whether the training in OUT completed: '
                                    'its result.json is there and, when given, was written '
                                    'by RUN_ID on N ranks. Exit status 0 when it did, 1 when '
                                    'not (the line says why: missing, another run, a newest '
                                    'checkpoint to resume from). Launch scripts use it.')
    st.add_argument('out', metavar='OUT', help='the --out folder of a training')
    st.add_argument('--run-id', help='the run id that must have written result.json '
                                     '(DISTMULTI_RUN_ID of the training)')
    st.add_argument('--world-size', type=int, metavar='N', help='the number of ranks the '
                                                               'run must have had')
    st.set_defaults(func=run_status)

    ex = sub.add_parser('export', help='write a run\'s trained network as ONNX',
                        description='Writes RUN/model.npz as one ONNX graph (opset 13): input '
                                    'x with a dynamic batch size, one output of logits per '
                                    'head, named as the head; loss-only heads are left out. '
                                    'Needs the onnx extra.')
    ex.add_argument('run', metavar='RUN', help='the --out folder of a completed training')
    ex.add_argument('--onnx', required=True, metavar='FILE', help='the .onnx file to write')
    ex.add_argument('--model-file', help='parameters to use (default RUN/model.npz)')
    ex.set_defaults(func=run_export)

    dr = sub.add_parser('doctor', help='check this machine or image: versions, MPI, CUDA '
                                       'libraries, GPUs, kernel compilation',
                        description='Reports what training needs here and whether it works: '
                                    'Python, numpy, chainer, CuPy and the compatibility '
                                    'patches, the MPI library (CUDA-aware or not), each CUDA '
                                    'library (file and version), the GPUs, and whether NVRTC '
                                    'compiles CuPy kernels (no GPU needed for that). Exit '
                                    'status 1 names the first thing to fix.')
    dr.add_argument('--json', action='store_true', help='one JSON object instead of words')
    dr.add_argument('--arch', action='append', metavar='sm_XY',
                    help='compile the kernels for this GPU architecture (repeatable; default: '
                         'every visible GPU\'s, else sm_80 and sm_90)')
    dr.add_argument('--device', choices=('auto', 'cpu', 'gpu'), default='auto',
                    help='what must work: cpu; gpu (a GPU must be visible); auto (default: the '
                         'GPU stack when CuPy is installed, GPUs optional)')
    dr.set_defaults(func=run_doctor)

    la = sub.add_parser('launch', help='run `distmulti train` on N ranks through mpiexec',
                        description='Builds and runs the mpiexec command for N ranks. '
                                    'Arguments after -- go to `distmulti train` (the word '
                                    'train itself may come first or be left out).')
    la.add_argument('-n', '--nprocs', type=int, required=True, help='number of ranks')
    la.add_argument('--hostfile', help='MPI hostfile (Open MPI or MPICH format)')
    la.add_argument('--mpiexec', help='mpiexec to use (default: beside this Python, else PATH)')
    la.add_argument('--mpi-arg', action='append', default=[], metavar='ARG',
                    help='extra argument for mpiexec (repeatable), e.g. --mpi-arg=--bind-to '
                         '--mpi-arg=none')
    la.add_argument('--max-restarts', type=int, default=0, metavar='R',
                    help='restart the whole job from the newest checkpoint up to R times when '
                         'it fails (default 0)')
    la.add_argument('--restart-delay', type=float, default=5.0, metavar='SECONDS',
                    help='wait this long before each restart (default 5)')
    la.add_argument('--dry-run', action='store_true', help='print the command, run nothing')
    la.add_argument('train_args', nargs=argparse.REMAINDER,
                    help='-- then arguments for distmulti train')
    la.set_defaults(func=run_launch)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the --config file, then the flags that were given."""
    config = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    given = {key: value for key, value in vars(args).items()
             if value is not None and key not in ('command', 'func', 'config')}
    return config.updated(given, source='command line').validate()


def run_train(args: argparse.Namespace) -> int:
    from distmulti.training import train
    train(config_from_args(args))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    import json
    from distmulti import devices, inference
    from distmulti.config import normalize_device
    from distmulti import outdir
    out = args.out or os.path.join(args.run, 'evaluation')
    outdir.prepare(out)  # before any work: a bad --out is said at once
    device = devices.select(normalize_device(args.device))  # current before any CUDA work
    config, net = inference.load_run(args.run)
    if args.dataset:
        from distmulti.csvdata import parse_image_size
        from distmulti.datasets import load_dataset
        data = load_dataset(args.dataset, parse_image_size(config.image_size))
    else:
        data = inference.run_data(config)[1]
    sample = data[0][0]
    inference.load_parameters(net, args.model_file or os.path.join(args.run, MODEL_FILE),
                              sample)
    net.to_device(device)
    workers = (config.loader_workers if config.loader_workers is not None
               else inference.default_workers())
    report = inference.evaluate_model(net, data, inference.eval_batchsize(config, sample),
                                      device=device, loss_weights=config.weights,
                                      workers=workers, name=args.dataset or 'test data')
    metrics = report['metrics']
    source = args.dataset or "the run's test data"
    print(f'evaluated {int(metrics["samples"])} samples ({source})')
    for name in net.head_names:
        acc = metrics.get(f'{name}/accuracy')
        print(f'{name}: accuracy {acc:.4f}' if acc is not None else f'{name}: no accuracy',
              f' loss {metrics[f"{name}/loss"]:.4f}')
    if 'accuracy_all' in metrics:
        print(f'all heads: accuracy {metrics["accuracy_all"]:.4f}')
    for name, matrix in report['confusion'].items():
        print(inference.format_confusion(name, matrix))
        inference.plot_confusion(matrix, f'{name} ({args.run})',
                                 os.path.join(out, f'confusion_{name}.png'))
    from distmulti.checkpoint import atomic_file
    with atomic_file(os.path.join(out, 'evaluation.json')) as f:
        json.dump({'metrics': metrics, 'dataset': source,
                   'confusion': {k: v.tolist() for k, v in report['confusion'].items()}},
                  f, indent=2, sort_keys=True)
    print(f'wrote {out}/evaluation.json and confusion_<head>.png')
    return 0


def run_predict(args: argparse.Namespace) -> int:
    import csv
    from distmulti import devices, inference
    from distmulti.config import normalize_device
    if args.output:
        _check_output_file(args.output)
    device = devices.select(normalize_device(args.device))  # current before any CUDA work
    config, net = inference.load_run(args.run)
    sample = inference.run_data(config)[1][0][0]
    inference.load_parameters(net, args.model_file or os.path.join(args.run, MODEL_FILE),
                              sample)
    net.to_device(device)
    x, names = inference.read_inputs(args.inputs, like=np.asarray(sample))
    predictions = inference.predict(net, x, device=device)
    heads = list(predictions)
    rows = [['input'] + heads] + [[name] + [int(predictions[h][i]) for h in heads]
                                  for i, name in enumerate(names)]
    if not args.output:
        csv.writer(sys.stdout).writerows(rows)
        return 0
    from distmulti.checkpoint import atomic_file
    with atomic_file(args.output) as f:
        csv.writer(f).writerows(rows)
    return 0


def _check_output_file(path: str) -> None:
    """OutputError unless ``path`` can be a new or replaced file (its folder exists)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise OutputError(f'--output {path} is a folder; give a file path for the CSV')
    if not os.path.isdir(folder):
        raise OutputError(f'--output {path}: the folder {folder} does not exist; create it '
                          f'or write the CSV elsewhere')
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f'--output {path}: the folder {folder} is not writable')


def run_status(args: argparse.Namespace) -> int:
    from distmulti import outdir
    state = outdir.status(args.out, run_id=args.run_id, world_size=args.world_size)
    print(f'distmulti: {state.message}', file=sys.stdout if state.completed else sys.stderr,
          flush=True)
    return EXIT_OK if state.completed else EXIT_FAILED

def run_export(args: argparse.Namespace) -> int:
    from distmulti import export, inference
    config, net = inference.load_run(args.run)
    sample = np.asarray(inference.run_data(config)[1][0][0])
    inference.load_parameters(net, args.model_file or os.path.join(args.run, MODEL_FILE), sample)
    model = export.export_onnx(net, sample[None], args.onnx)
    graph = model.graph

    def shape(value):
        return '(' + ', '.join(d.dim_param or str(d.dim_value)
                               for d in value.type.tensor_type.shape.dim) + ')'
    outputs = ', '.join(f'{o.name} {shape(o)}' for o in graph.output)
    left_out = [name for name, ok in zip(net.head_names, net.has_logits) if not ok]
    print(f'wrote {args.onnx}: ONNX opset {export.OPSET}, input {graph.input[0].name} '
          f'{shape(graph.input[0])}; outputs (logits) {outputs}'
          + (f'; loss-only heads left out: {", ".join(left_out)}' if left_out else ''))
    return 0


def run_doctor(args: argparse.Namespace) -> int:
    from distmulti import doctor
    return doctor.run(args.arch, args.device, args.json)


def run_launch(args: argparse.Namespace) -> int:
    from distmulti import launcher
    train_args = list(args.train_args)
    if train_args[:1] == ['--']:
        train_args = train_args[1:]
    if train_args[:1] == ['train']:  # `launch -n 2 -- train --epoch 3`: the word is optional
        train_args = train_args[1:]
    if args.nprocs < 1:
        raise ConfigError(f'-n must be at least 1, got {args.nprocs}')
    if args.max_restarts < 0:
        raise ConfigError(f'--max-restarts must be >= 0, got {args.max_restarts}')
    if not args.restart_delay >= 0:
        raise ConfigError(f'--restart-delay must be >= 0 seconds, got {args.restart_delay}')
    if args.hostfile and not os.path.isfile(args.hostfile):
        raise ConfigError(f'hostfile {args.hostfile!r} does not exist')
    config = config_from_args(parse_args(['train'] + train_args))  # fail here, not on N ranks
    mpiexec = launcher.find_mpiexec(args.mpiexec)
    cpu_count = os.cpu_count() or 1
    env = launcher.launch_env(os.environ, args.nprocs, args.hostfile, cpu_count)
    flavor = launcher.detect_flavor(mpiexec)

    def command(train_args):
        return launcher.build_mpiexec_argv(
            mpiexec=mpiexec, flavor=flavor, nprocs=args.nprocs, train_args=train_args,
            python=sys.executable, hostfile=args.hostfile,
            as_root=hasattr(os, 'geteuid') and os.geteuid() == 0, cpu_count=cpu_count,
            env_names=launcher.forwarded_env(dict(env, DISTMULTI_RUN_ID='')),
            mpi_args=args.mpi_arg)

    if args.dry_run:
        print(shlex.join(command(train_args)))
        return 0
    from distmulti import outdir
    busy = outdir.in_use_by_other(config.out, env.get('DISTMULTI_JOB_ID'))
    if busy:  # before anything is started or touched in --out
        raise OutputError(busy)
    return launcher.supervise(command, train_args, env, config.out, args.nprocs,
                              args.max_restarts, log=_stderr_log,
                              hang_timeout=config.hang_timeout,
                              restart_delay=args.restart_delay, stop_grace=config.stop_grace)


def _stderr_log(message: str) -> None:
    print(f'distmulti: {message}', file=sys.stderr, flush=True)


def exit_code(error: DistmultiError) -> int:
    """The exit status for an error (see distmulti.runfiles and the operators' guide)."""
    if isinstance(error, TrainingStopped):
        return EXIT_STOPPED
    if isinstance(error, NonFiniteLossError):
        return EXIT_FAILED
    return EXIT_USAGE


def _fail(error: DistmultiError) -> int:
    """Prints one line for the job and ends this rank consistently with the others.

    An error that every rank raised at the same point (``collective``) is printed once, by
    rank 0; the ranks meet at a barrier, finalize MPI and exit with the same status (no
    MPI_Abort, so no abort banner). An error on some ranks only is printed with the rank and
    aborts the MPI job, so that no rank waits forever in a collective.
    """
    from distmulti.comm import current_world
    code = exit_code(error)
    world = current_world()
    several = world is not None and world.size > 1
    kind = 'stopped' if isinstance(error, TrainingStopped) else 'error'
    if not (several and error.collective and world.rank != 0):
        where = f' (rank {world.rank})' if several and not error.collective else ''
        message = str(error) if kind == 'stopped' else f'{kind}{where}: {error}'
        print(f'distmulti: {message}', file=sys.stderr, flush=True)
    if several:
        if error.collective:
            # Every rank leaves with `code` (after a stop the checkpoint is already written).
            # The first rank to exit makes srun -K or mpiexec end the others with SIGTERM,
            # which must not turn their status into 143; SIGKILL still ends a stuck rank.
            _ignore_stop_signals()
            world.mpi.Barrier()
            from mpi4py import MPI
            MPI.Finalize()  # so that mpi4py does not turn this exit status into MPI_Abort
        else:
            world.abort(code)
    return code


def _ignore_stop_signals() -> None:
    import signal
    import threading
    from distmulti.stopping import STOP_SIGNALS
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except DistmultiError as e:
        return _fail(e)
    except KeyboardInterrupt:
        return EXIT_SIGINT
    except Exception:
        from distmulti.comm import current_world
        world = current_world()
        if world is not None and world.size > 1:
            traceback.print_exc()
            world.abort(1)
        raise


if __name__ == '__main__':
    sys.exit(main())
