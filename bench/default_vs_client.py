"""`distmulti train` (the default run) against the hand-written client, on the same data.

    python bench/default_vs_client.py [--rounds 5] [--extra "--no-plot"] [--json FILE]

Each round runs, one after the other and in alternating order, the client
(``bench/client.py``: the seed's own style, 750 iterations of batch 64) and each distmulti
command (default: ``distmulti train`` as the README runs it, and the same with ``--no-plot``),
every process with one thread (``OMP_NUM_THREADS=1``) on the embedded
``digit_strips(3, 6000, 1000, seed=0)``. Prints medians over rounds: the process's wall time
(start to exit: imports, data, training, evaluation, files), its CPU time, the time of the
training loop alone (the client's loop; distmulti's ``wall_time_s``: training with its
evaluations, checkpoints and log, then the final evaluation) and the test accuracies (the
same in every round: both are seeded). The machine may be shared: the medians and the
alternating order are there so that noise hits every command alike.
"""
import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(argv, env):
    """(wall s, cpu s, stdout) of one process."""
    cpu0, start = child_cpu(), time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    wall, cpu = time.perf_counter() - start, child_cpu() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f'{shlex.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
    return wall, cpu, proc.stdout


def client(env):
    wall, cpu, out = run([sys.executable, os.path.join(HERE, 'client.py'), '--json'], env)
    result = json.loads(out.strip().splitlines()[-1])
    return {'wall': wall, 'cpu': cpu, 'loop': result['train_wall_s'], 'heads': result['heads'],
            'all': result['all'], 'iterations': 750, 'batch': 64}


def distmulti(extra, env, workdir):
    out = tempfile.mkdtemp(prefix='run-', dir=workdir)
    wall, cpu, _ = run([sys.executable, '-m', 'distmulti', 'train', '--out', out,
                        '--no-progress'] + extra, env)
    with open(os.path.join(out, 'result.json')) as f:
        result = json.load(f)
    test = result['test']
    heads = [test[f'head{i}/accuracy'] for i in range(result['config']['heads'])]
    return {'wall': wall, 'cpu': cpu, 'loop': result['wall_time_s'], 'heads': heads,
            'all': test['accuracy_all'], 'iterations': result['iterations'],
            'batch': result['global_batchsize']}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--extra', action='append', default=None, metavar='ARGS',
                        help='a distmulti command to compare: extra `distmulti train` '
                             'arguments (repeatable; default: "" and "--no-plot")')
    parser.add_argument('--json', help='also write every measurement here')
    args = parser.parse_args(argv)
    commands = {'hand-written client (bench/client.py)': None}
    for extra in args.extra if args.extra is not None else ['', '--no-plot']:
        commands[('`distmulti train ' + extra).rstrip() + '`'] = shlex.split(extra)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore',
               PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    runs = {name: [] for name in commands}
    with tempfile.TemporaryDirectory(prefix='distmulti-bench-') as workdir:
        for r in range(args.rounds):
            order = list(commands) if r % 2 == 0 else list(reversed(commands))
            for name in order:
                extra = commands[name]
                runs[name].append(client(env) if extra is None
                                  else distmulti(extra, env, workdir))
                last = runs[name][-1]
                print(f'round {r + 1}: {name}: {last["wall"]:.1f} s wall, '
                      f'all heads {last["all"]:.3f}', file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(runs, f, indent=2)
    med = {name: {key: statistics.median(m[key] for m in ms)
                  for key in ('wall', 'cpu', 'loop')} for name, ms in runs.items()}
    base = med[next(iter(commands))]['wall']
    print(f'medians of {args.rounds} rounds, commands alternating, one thread each, '
          f'digit_strips(3, 6000, 1000, seed=0)')
    print('| | iterations x batch | wall s | vs client | CPU s | training loop s | '
          'head accuracy | all heads |')
    print('|---|---:|---:|---:|---:|---:|---|---:|')
    for name, ms in runs.items():
        m, last = med[name], ms[-1]
        heads = ' / '.join(f'{a:.3f}' for a in last['heads'])
        print(f'| {name} | {last["iterations"]} x {last["batch"]} | {m["wall"]:.1f} | '
              f'{m["wall"] / base:.2f} | {m["cpu"]:.1f} | {m["loop"]:.1f} | {heads} | '
              f'{last["all"]:.3f} |')


if __name__ == '__main__':
    main()
