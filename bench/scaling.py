"""Data-parallel scaling on this machine: 1 rank against 2 ranks, both gradient-sync modes
(BaseCNN with MLP heads, the default network when docs/benchmarks.md's table was measured).

    python bench/scaling.py [--batchsize 64] [--rounds 9] [--iters 10]

Starts itself under the mpiexec beside this Python (one thread per rank) and prints:
1. samples/s per configuration at the same per-rank batch, and scaling efficiency
   thr(2) / (2 * thr(1));
2. per mode, the time per iteration spent averaging gradients, the collectives issued per
   iteration, and the bandwidth floor: gradient bytes / measured large-message Allreduce
   bandwidth.
Medians over rounds; all configurations of a table run in the same invocation.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(args):
    mode = args.grad_sync
    import numpy as np
    import chainer
    from chainer import optimizers as O
    from distmulti.comm import create_world
    from distmulti.data import digit_strips
    from distmulti.iterators import TrainIterator
    from distmulti.loader import Loader, Source
    from distmulti.models import BaseCNN, MLPHead, MultiHeadNet
    from distmulti.updater import MultiHeadUpdater

    from distmulti.comm import LocalComm
    world = LocalComm() if args.grad_sync == 'independent' else create_world('naive')
    barrier = world.mpi.Barrier if world.size > 1 else (lambda: None)
    if args.grad_sync == 'independent':
        args.grad_sync = 'net'  # a no-op in a world of one: compute only
    train, _ = digit_strips(args.heads, 4096, 1, seed=0)
    np.random.seed(0)
    net = MultiHeadNet(BaseCNN(), [MLPHead(10) for _ in range(args.heads)])
    net.initialize(train.x[:1])
    opts = {}
    for name in ['base'] + net.head_names:
        opts[name] = O.MomentumSGD(lr=0.01)
        opts[name].setup(getattr(net, name))
    data = train.dataset()
    it = TrainIterator(Loader({'train': Source(data, 'train')}), 'train', len(data),
                       args.batchsize, world_size=world.size, rank=world.rank)
    upd = MultiHeadUpdater(it, net, opts, comm=world, grad_sync=args.grad_sync)
    reporter = chainer.Reporter()
    per_iter = []
    with reporter.scope({}):
        for _ in range(3):
            upd.update()
        for _ in range(args.rounds):
            barrier()
            start = time.perf_counter()
            for _ in range(args.iters):
                upd.update()
            per_iter.append((time.perf_counter() - start) / args.iters)
    out = {'ranks': world.size, 'grad_sync': mode,
           'iter_s': statistics.median(per_iter)}
    if world.size > 1:
        out.update(sync_costs(world, net, args))
    if world.is_root:
        print('RESULT ' + json.dumps(out), flush=True)


def sync_costs(world, net, args):
    """Averaging time per mode on real gradients, collectives per iteration, and the floor."""
    import numpy as np
    from mpi4py import MPI
    params = list(net.params())
    n_bytes = sum(p.size for p in params) * 4
    parts = [net.base] + net.heads

    def time_it(fn, reps=30):
        times = []
        for _ in range(reps):
            world.mpi.Barrier()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    modes = {
        'net': (lambda: world.mean_grads(net), 1),
        'optimizers': (lambda: [world.mn.multi_node_mean_grad(p, True) for p in parts],
                       len(params)),
    }
    big = np.ones(4 * 1024 * 1024, dtype=np.float32)  # 16 MiB
    bw = big.nbytes / time_it(lambda: world.mpi.Allreduce(MPI.IN_PLACE, big, op=MPI.SUM), 10)
    fn, count = modes[args.grad_sync]
    return {'sync_s': time_it(fn), 'collectives': count + 1, 'grad_bytes': n_bytes,
            'allreduce_Bps': bw, 'floor_s': n_bytes / bw}


def launch(ranks, grad_sync, args):
    python = sys.executable
    mpiexec = os.path.join(os.path.dirname(python), 'mpiexec')
    cmd = [python, '-m', 'mpi4py', os.path.abspath(__file__), '--worker',
           '--grad-sync', grad_sync, '--batchsize', str(args.batchsize),
           '--rounds', str(args.rounds), '--iters', str(args.iters), '--heads', str(args.heads)]
    if ranks > 1:
        root = ['--allow-run-as-root'] if os.geteuid() == 0 else []
        cmd = [mpiexec, '-n', str(ranks)] + root + ['--bind-to', 'core'] + cmd
    env = dict(os.environ, OMP_NUM_THREADS='1', OPENBLAS_NUM_THREADS='1')
    env['PYTHONPATH'] = os.path.dirname(HERE) + os.pathsep + env.get('PYTHONPATH', '')
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith('RESULT '):
            return json.loads(line[7:])
    raise RuntimeError(f'{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--grad-sync', default='net')
    parser.add_argument('--batchsize', type=int, default=64)
    parser.add_argument('--heads', type=int, default=3)
    parser.add_argument('--rounds', type=int, default=9)
    parser.add_argument('--iters', type=int, default=10)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    runs = []
    for _ in range(2):  # two passes, interleaved, so drift hits every configuration
        for ranks, mode in ((1, 'net'), (2, 'independent'), (2, 'net'), (2, 'optimizers')):
            result = launch(ranks, mode, args)
            result['ranks'] = ranks
            runs.append(result)
    merged = {}
    for r in runs:
        merged.setdefault((r['ranks'], r['grad_sync']), []).append(r)
    med = {key: {k: statistics.median(v[k] for v in rs) for k in rs[0] if k not in
                 ('ranks', 'grad_sync')} for key, rs in merged.items()}
    thr1 = args.batchsize / med[(1, 'net')]['iter_s']
    print(f'K={args.heads} heads, per-rank batch {args.batchsize}, one thread per rank, '
          f'{os.cpu_count()} cores; medians of {args.rounds} rounds x {args.iters} iterations, '
          f'2 passes')
    print('| ranks | grad sync | ms / iteration | samples/s | efficiency |')
    print('|---:|---|---:|---:|---:|')
    labels = {'independent': '(none: 2 independent processes, no communication)'}
    for (ranks, mode), m in med.items():
        thr = ranks * args.batchsize / m['iter_s']
        eff = thr / (ranks * thr1)
        label = labels.get(mode, mode) if ranks > 1 else '(none: 1 process)'
        print(f'| {ranks} | {label} | {m["iter_s"] * 1e3:.1f} | {thr:.0f} | {eff:.2f} |')
    print()
    print('| grad sync (2 ranks) | averaging ms / iteration | collectives / iteration | '
          'gradient MB | bandwidth floor ms |')
    print('|---|---:|---:|---:|---:|')
    for (ranks, mode), m in med.items():
        if ranks > 1 and mode != 'independent':
            print(f'| {mode} | {m["sync_s"] * 1e3:.2f} | {int(m["collectives"])} | '
                  f'{m["grad_bytes"] / 1e6:.2f} | {m["floor_s"] * 1e3:.2f} '
                  f'({m["allreduce_Bps"] / 1e9:.1f} GB/s) |')


if __name__ == '__main__':
    main()
