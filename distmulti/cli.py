"""The ``distmulti`` command: ``parse_args`` -> ``config_from_args`` -> ``run`` -> ``main``.

Each step is a plain function, so tests call ``main([...])`` in-process.
"""
import argparse
import os
import shlex
import sys
import traceback
from typing import List, Optional

import numpy as np

from distmulti._version import __version__
from distmulti.config import BACKWARD_MODES, COMMUNICATORS, GRAD_SYNC_MODES, TrainConfig
from distmulti.errors import ConfigError, DistmultiError, NonFiniteLossError


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
    t.add_argument('--device', '-d', help='-1 or @numpy (CPU, default), N or @cupy:N (GPU N)')
    t.add_argument('--batchsize', '-b', type=int, help='minibatch size (default 64)')
    length = t.add_mutually_exclusive_group()
    length.add_argument('--epoch', '-e', type=int, help='epochs to train (default 8)')
    length.add_argument('--iterations', '-i', type=int, help='iterations to train')
    t.add_argument('--heads', type=int, help='number of classifier heads (default 3)')
    t.add_argument('--lr', type=float, help='learning rate of every optimizer (default 1e-3)')
    t.add_argument('--optimizer', help='optimizer type of every part (default adam); per-part '
                                       'types and rates go under `optimizers:` in --config')
    t.add_argument('--loss-weights', type=_float_list, metavar='W0,W1,..',
                   help='weight of each head in the summed loss (default all 1)')
    t.add_argument('--freeze', type=_int_list, metavar='I,J,..',
                   help='heads whose parameters stay fixed')
    t.add_argument('--backward', choices=BACKWARD_MODES,
                   help='fused: one backward of the weighted sum (default); per_loss: one '
                        'backward per head, as hand-written updaters do (same gradients)')
    t.add_argument('--grad-sync', choices=GRAD_SYNC_MODES,
                   help='with several ranks: optimizers = a ChainerMN multi-node optimizer per '
                        'part (default); net = one packed all-reduce of all gradients')
    t.add_argument('--communicator', choices=COMMUNICATORS,
                   help='ChainerMN communicator (default auto: pure_nccl on GPUs, naive on CPU)')
    t.add_argument('--seed', type=int, help='random seed of data, init and shuffling (default 0)')
    t.add_argument('--out', '-o', help='output directory (default result)')
    t.add_argument('--resume', '-r', metavar='CHECKPOINT',
                   help='checkpoint file to resume from, or auto: the newest valid one in --out '
                        '(none: start fresh)')
    t.add_argument('--checkpoint-interval', type=int, metavar='N',
                   help='write a checkpoint every N iterations and at the end (default 200)')
    t.add_argument('--keep-checkpoints', type=int, metavar='K',
                   help='checkpoints kept (default 3)')
    t.add_argument('--hang-timeout', type=float, metavar='SECONDS',
                   help='abort the job when no iteration completes on a rank for this long '
                        '(default: no watchdog)')
    t.add_argument('--eval-interval', type=int, metavar='N',
                   help='evaluate and log every N iterations (default: every epoch)')
    t.add_argument('--train-size', type=int, help='embedded training strips (default 6000)')
    t.add_argument('--test-size', type=int, help='embedded test strips (default 1000)')
    t.add_argument('--no-progress', dest='progress', action='store_false', default=None,
                   help='no progress bar')
    t.add_argument('--no-plot', dest='plot', action='store_false', default=None,
                   help='no PNG plots')
    t.set_defaults(func=run_train)

    t.add_argument('--model', metavar='PACKAGE.MODULE:FACTORY',
                   help='your network: a factory returning (base, heads) or a MultiHeadNet')
    t.add_argument('--dataset', metavar='npz:PATH|csv:PATH',
                   help='your data (default: the embedded digit strips); see README')
    t.add_argument('--test-dataset', metavar='npz:PATH|csv:PATH',
                   help='test data (default: a seeded --test-fraction of --dataset)')
    t.add_argument('--test-fraction', type=float,
                   help='share of --dataset held out for testing (default 0.2)')

    ev = sub.add_parser('evaluate', help='per-head accuracy and confusion matrices of a run',
                        description='Evaluates RUN/model.npz on the run\'s test data (or '
                                    '--dataset): per-head accuracy and confusion matrices, '
                                    'printed and saved as PNG and JSON.')
    ev.add_argument('run', metavar='RUN', help='the --out folder of a completed training')
    ev.add_argument('--dataset', metavar='npz:PATH|csv:PATH', help='data to evaluate on')
    ev.add_argument('--model-file', help='parameters to use (default RUN/model.npz)')
    ev.add_argument('--out', help='where PNGs and evaluation.json go (default RUN/evaluation)')
    ev.add_argument('--device', '-d', default='@numpy', help='as for train (default CPU)')
    ev.set_defaults(func=run_evaluate)

    pr = sub.add_parser('predict', help='per-head predictions of a run for given inputs',
                        description='Prints one CSV row per input: its name, then the '
                                    'predicted class of every head.')
    pr.add_argument('run', metavar='RUN', help='the --out folder of a completed training')
    pr.add_argument('inputs', nargs='+', metavar='INPUT',
                    help='npz:PATH (its array x) or image files')
    pr.add_argument('--model-file', help='parameters to use (default RUN/model.npz)')
    pr.add_argument('--output', '-o', help='write the CSV here instead of stdout')
    pr.add_argument('--device', '-d', default='@numpy', help='as for train (default CPU)')
    pr.set_defaults(func=run_predict)

    la = sub.add_parser('launch', help='run `distmulti train` on N ranks through mpiexec',
                        description='Builds and runs the mpiexec command for N ranks. '
                                    'Arguments after -- go to `distmulti train`.')
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
    from distmulti import inference
    from distmulti.comm import resolve_device
    from distmulti.config import normalize_device
    device = resolve_device(normalize_device(args.device))
    config, net = inference.load_run(args.run)
    if args.dataset:
        from distmulti.datasets import load_dataset
        data = load_dataset(args.dataset)
    else:
        data = inference.run_data(config)[1]
    inference.load_parameters(net, args.model_file or os.path.join(args.run, 'model.npz'),
                              data[0][0])
    net.to_device(device)
    report = inference.evaluate_model(net, data, device=device)
    out = args.out or os.path.join(args.run, 'evaluation')
    os.makedirs(out, exist_ok=True)
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
    with open(os.path.join(out, 'evaluation.json'), 'w', encoding='utf-8') as f:
        json.dump({'metrics': metrics, 'dataset': source,
                   'confusion': {k: v.tolist() for k, v in report['confusion'].items()}},
                  f, indent=2, sort_keys=True)
    print(f'wrote {out}/evaluation.json and confusion_<head>.png')
    return 0


def run_predict(args: argparse.Namespace) -> int:
    import csv
    from distmulti import inference
    from distmulti.comm import resolve_device
    from distmulti.config import normalize_device
    device = resolve_device(normalize_device(args.device))
    config, net = inference.load_run(args.run)
    sample = inference.run_data(config)[1][0][0]
    inference.load_parameters(net, args.model_file or os.path.join(args.run, 'model.npz'),
                              sample)
    net.to_device(device)
    x, names = inference.read_inputs(args.inputs, like=np.asarray(sample))
    predictions = inference.predict(net, x, device=device)
    heads = list(predictions)
    stream = open(args.output, 'w', newline='') if args.output else sys.stdout
    try:
        writer = csv.writer(stream)
        writer.writerow(['input'] + heads)
        for i, name in enumerate(names):
            writer.writerow([name] + [int(predictions[h][i]) for h in heads])
    finally:
        if args.output:
            stream.close()
    return 0


def run_launch(args: argparse.Namespace) -> int:
    from distmulti import launcher
    train_args = list(args.train_args)
    if train_args[:1] == ['--']:
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
    return launcher.supervise(command, train_args, env, config.out, args.nprocs,
                              args.max_restarts, log=_stderr_log,
                              hang_timeout=config.hang_timeout,
                              restart_delay=args.restart_delay)


def _stderr_log(message: str) -> None:
    print(f'distmulti: {message}', file=sys.stderr, flush=True)


def _fail(message: str, code: int, collective: bool) -> int:
    """Prints one error line; in a multi-rank run, ends the job consistently.

    An error that every rank raised at the same point (``collective``) lets all ranks print
    it, meet at a barrier and exit; an error on some ranks only aborts the MPI job, so that
    no rank waits forever in a collective.
    """
    from distmulti.comm import current_world
    world = current_world()
    several = world is not None and world.size > 1
    where = f' (rank {world.rank})' if several else ''
    print(f'distmulti: error{where}: {message}', file=sys.stderr, flush=True)
    if several:
        if collective:
            world.mpi.Barrier()
        else:
            world.abort(code)
    return code


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except DistmultiError as e:
        return _fail(str(e), 1 if isinstance(e, NonFiniteLossError) else 2, e.collective)
    except KeyboardInterrupt:
        return 130
    except Exception:
        from distmulti.comm import current_world
        world = current_world()
        if world is not None and world.size > 1:
            traceback.print_exc()
            world.abort(1)
        raise


if __name__ == '__main__':
    sys.exit(main())
