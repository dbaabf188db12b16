"""Does a rank's cost grow with the dataset? npy:, csv: and npz: data under `launch -n 2`.

    python bench/data_scaling.py [--small-gb 0.5] [--large-gb 4] [--pngs 3000]
                                 [--iterations 40] [--batchsize 32] [--rounds 3] [--tmp /tmp]
                                 [--network light|default] [--ranks 2] [--only LABEL]

Generates, in a temporary folder under --tmp (its free space is checked first; everything is
deleted at the end): npy: folders of about --small-gb and --large-gb of 3 x 64 x 64 float32
images; folders of --pngs and 4 x --pngs 64 x 64 RGB PNGs with a label CSV, each with an npy:
twin holding the same pixels; an npz: archive of the small set (the in-memory form, for
contrast); and a small npy: test set used by every run. Then, --rounds times, every
configuration in turn (side by side), runs

    distmulti launch -n 2 -- train --dataset SPEC --test-dataset npy:TEST --iterations I ...

and reads what the ranks reported in result.json: seconds from process start to the end of
the first iteration (the slower rank), each rank's peak resident memory (VmHWM) and its
loader workers' peak, and training samples/s (from the median iteration time, which a busy
machine disturbs less than the mean). Odd rounds run the configurations in order, even ones
in reverse, so that each pair compared is measured side by side both ways. Prints medians,
and the ratios the goals are about, each taken within a round. ``--only csv`` runs just the
configurations whose label contains "csv" (and generates only their data). Last, the loader
alone (no training) on the small PNG folder and its npy: twin, with 0, 1 and 2 workers:
the samples/s a rank can consume before reading becomes its bottleneck.

The network is by default a light one (two strided 3x3 convolutions, see ``light_net``), so
that an iteration is short and reading and decoding the data weigh as much as they can;
``--network default`` trains the built-in CNN instead.
"""
import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = (3, 64, 64)
HEADS = 3
SAMPLE_BYTES = int(np.prod(SHAPE)) * 4


def light_net():
    """A small multi-head CNN for 3 x 64 x 64 inputs (``--model data_scaling:light_net``)."""
    import chainer
    import chainer.functions as F
    import chainer.links as L
    from distmulti import MultiHeadNet

    class Base(chainer.Chain):
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.c1 = L.Convolution2D(3, 8, 3, stride=2, pad=1)
                self.c2 = L.Convolution2D(8, 16, 3, stride=2, pad=1)
                self.fc = L.Linear(None, 64)

        def forward(self, x):
            return F.relu(self.fc(F.relu(self.c2(F.relu(self.c1(x))))))

    return MultiHeadNet(Base(), [L.Linear(64, 10) for _ in range(HEADS)])


def free_bytes(path):
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def pixels(rng, n):
    """``n`` uint8 64 x 64 RGB images: smooth gradients, a few rectangles, mild noise (so PNG
    compresses them about as much as photos of simple scenes)."""
    yy, xx = np.mgrid[0:64, 0:64]
    out = np.empty((n, 64, 64, 3), np.uint8)
    for i in range(n):
        a, b, c = rng.rand(3) * 2 - 1
        image = (128 + 60 * (a * xx / 64 + b * yy / 64)[..., None] + 40 * c).repeat(3, 2)
        for _ in range(3):
            x0, y0 = rng.randint(0, 48, size=2)
            image[y0:y0 + 16, x0:x0 + 16] = rng.randint(0, 256, size=3)
        image += rng.normal(0, 6, size=image.shape)
        out[i] = np.clip(image, 0, 255).astype(np.uint8)
    return out


def write_npy(folder, n, rng, source=None):
    """x.npy (n x 3 x 64 x 64 float32) written in chunks, never whole in memory; from the
    ``source`` uint8 images if given, else from 512 generated ones repeated."""
    os.makedirs(folder)
    x = np.lib.format.open_memmap(os.path.join(folder, 'x.npy'), mode='w+', dtype=np.float32,
                                  shape=(n,) + SHAPE)
    pool = source if source is not None else pixels(rng, 512)
    for start in range(0, n, 1024):
        stop = min(n, start + 1024)
        rows = pool[np.arange(start, stop) % len(pool)] if source is None else pool[start:stop]
        x[start:stop] = rows.transpose(0, 3, 1, 2) / np.float32(255.0)
    x.flush()
    del x
    np.save(os.path.join(folder, 'y.npy'), rng.randint(0, 10, size=(n, HEADS)).astype(np.int32))
    return folder


def write_pngs(folder, n, rng):
    """n PNGs and labels.csv; returns (csv path, the uint8 images)."""
    from PIL import Image
    os.makedirs(os.path.join(folder, 'img'))
    images = pixels(rng, n)
    labels = rng.randint(0, 10, size=(n, HEADS))
    with open(os.path.join(folder, 'labels.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['file'] + [f'head{i}' for i in range(HEADS)])
        for i in range(n):
            name = f'img/{i:06d}.png'
            Image.fromarray(images[i]).save(os.path.join(folder, name))
            writer.writerow([name] + labels[i].tolist())
    return os.path.join(folder, 'labels.csv'), images, labels


def folder_bytes(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def run_one(spec, test_spec, out, args, workers=None):
    """One `distmulti launch -n 2` training; what the ranks reported."""
    cmd = [sys.executable, '-m', 'distmulti', 'launch', '-n', str(args.ranks), '--', 'train',
           '--dataset', spec, '--test-dataset', test_spec, '--heads', str(HEADS),
           '--iterations', str(args.iterations), '--batchsize', str(args.batchsize),
           '--eval-interval', '1000000', '--checkpoint-interval', '1000000',
           '--no-progress', '--no-plot', '--out', out]
    if workers is not None:
        cmd += ['--loader-workers', str(workers)]
    if args.network == 'light':
        cmd += ['--model', 'data_scaling:light_net']  # importable from the working directory
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env,
                          cwd=HERE)
    if proc.returncode != 0:
        raise SystemExit(f'failed ({proc.returncode}): {" ".join(cmd)}\n{proc.stderr[-3000:]}')
    with open(os.path.join(out, 'result.json')) as f:
        result = json.load(f)
    shutil.rmtree(out)
    resources = result['resources']
    ranks = resources['ranks']
    return {'startup_s': max(r['startup_s'] for r in ranks),
            'rss_mb': [r['peak_rss_mb'] for r in ranks],
            'worker_mb': max(r['loader_peak_rss_mb'] for r in ranks),
            'workers': ranks[0]['loader_workers'],
            'wait_s': max(r['data_wait_s'] for r in ranks),
            'cpu_s': sum(r['cpu_s'] for r in ranks),
            'loader_cpu_s': sum(r['loader_cpu_s'] for r in ranks),
            'samples_s': result['global_batchsize'] / resources['median_iteration_s'],
            'mean_samples_s': resources['train_samples_per_s']}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--small-gb', type=float, default=0.5)
    parser.add_argument('--large-gb', type=float, default=4.0)
    parser.add_argument('--pngs', type=int, default=3000)
    parser.add_argument('--iterations', type=int, default=40)
    parser.add_argument('--batchsize', type=int, default=32)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--tmp', default=tempfile.gettempdir())
    parser.add_argument('--no-npz', action='store_true', help='skip the in-memory npz: rows')
    parser.add_argument('--network', choices=('light', 'default'), default='light')
    parser.add_argument('--ranks', type=int, default=2,
                        help='ranks per run (1 leaves this machine a core for the workers)')
    parser.add_argument('--only', default='', help='run the configurations whose label '
                                                   'contains this (e.g. csv)')
    args = parser.parse_args()

    n_small = int(args.small_gb * 1e9 // SAMPLE_BYTES)
    n_large = int(args.large_gb * 1e9 // SAMPLE_BYTES)
    n_pngs = [args.pngs, 4 * args.pngs]
    need = (n_small * (1 if args.no_npz else 2) + n_large + 2 * sum(n_pngs)) * SAMPLE_BYTES \
        + sum(n_pngs) * 16_000 + (1 << 30)
    free = free_bytes(args.tmp)
    print(f'free space in {args.tmp}: {free / 1e9:.1f} GB, needed about {need / 1e9:.1f} GB')
    if free < need:
        raise SystemExit('not enough free space; use --tmp or smaller sizes')
    root = tempfile.mkdtemp(prefix='distmulti-data-scaling-', dir=args.tmp)
    # A `timeout` or `kill` still removes the data (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        rng = np.random.RandomState(0)
        started = time.perf_counter()
        test = write_npy(os.path.join(root, 'test'), 256, rng)
        configs = []  # (label, form, spec, samples, bytes, workers)
        for label, n in (('npy small', n_small), ('npy large', n_large)):
            if args.only not in label and not (label == 'npy small' and args.only in 'npz'):
                continue
            path = write_npy(os.path.join(root, label.replace(' ', '_')), n, rng)
            if args.only in label:
                configs.append((label, 'npy', f'npy:{path}', n, folder_bytes(path), None))
        if not args.no_npz and args.only in 'npz small (in memory)':
            x = np.load(os.path.join(root, 'npy_small', 'x.npy'), mmap_mode='r')
            path = os.path.join(root, 'small.npz')
            np.savez(path, x=x, y=np.load(os.path.join(root, 'npy_small', 'y.npy')))
            del x
            configs.append(('npz small (in memory)', 'npz', f'npz:{path}', n_small,
                            folder_bytes(path), None))
        for label, n in zip(('small', 'large'), n_pngs):
            if args.only not in f'csv {label}, no workers, npy twin of csv {label}':
                continue
            folder = os.path.join(root, f'png_{label}')
            labels_csv, images, labels = write_pngs(folder, n, rng)
            twin = write_npy(os.path.join(root, f'png_{label}_npy'), n, rng, source=images)
            np.save(os.path.join(twin, 'y.npy'), labels.astype(np.int32))
            del images
            configs.append((f'csv {label}', 'csv', f'csv:{labels_csv}', n,
                            folder_bytes(folder), None))
            if label == 'small':
                configs.append(('csv small, no workers', 'csv', f'csv:{labels_csv}', n,
                                folder_bytes(folder), 0))
            configs.append((f'npy twin of csv {label}', 'npy', f'npy:{twin}', n,
                            folder_bytes(twin), None))
        print(f'generated {len(configs)} datasets in {time.perf_counter() - started:.0f} s')

        configs = [c for c in configs if args.only in c[0]]
        results = {config[0]: [] for config in configs}
        for r in range(args.rounds):
            for label, _, spec, _, _, workers in (configs if r % 2 == 0 else configs[::-1]):
                out = os.path.join(root, 'run')
                results[label].append(run_one(spec, f'npy:{test}', out, args, workers))
                m = results[label][-1]
                print(f'round {r + 1} {label}: first iteration {m["startup_s"]:.1f} s, '
                      f'rss {m["rss_mb"]} MB, {m["samples_s"]:.1f} samples/s (mean '
                      f'{m["mean_samples_s"]:.1f}), waited {m["wait_s"]:.2f} s for data, '
                      f'CPU s: ranks {m["cpu_s"]:.1f}, workers {m["loader_cpu_s"]:.1f}',
                      flush=True)
        report(configs, results, args)
        loader_alone(configs, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(configs, results, args):
    med = statistics.median
    print(f'\n{args.ranks} ranks (distmulti launch -n {args.ranks}), {args.network} network, '
          f'batch {args.batchsize} per rank, {args.iterations} iterations, 3 x 64 x 64 inputs, '
          f'{HEADS} heads, default loader workers; medians of {args.rounds} rounds\n')
    print('| data | samples | on disk | loader workers per rank | first iteration s '
          '| peak memory per rank MB | loader worker peak MB | samples/s | waited for data s '
          '| CPU s ranks + workers |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
    for label, _, _, n, size, _ in configs:
        rows = results[label]
        rss = med([max(m['rss_mb']) for m in rows])
        print(f'| {label} | {n} | {size / 1e9:.2f} GB | {rows[0]["workers"]} '
              f'| {med([m["startup_s"] for m in rows]):.1f} '
              f'| {rss:.0f} | {med([m["worker_mb"] for m in rows]):.0f} '
              f'| {med([m["samples_s"] for m in rows]):.1f} '
              f'| {med([m["wait_s"] for m in rows]):.2f} '
              f'| {med([m["cpu_s"] for m in rows]):.0f} + '
              f'{med([m["loader_cpu_s"] for m in rows]):.0f} |')

    def per_round(a, b, key, op):
        return med([op(x[key] if key != 'rss_mb' else max(x[key]),
                       y[key] if key != 'rss_mb' else max(y[key]))
                    for x, y in zip(results[a], results[b])])

    print('\nwithin each round (median over rounds):')
    diff, ratio = (lambda x, y: x - y), (lambda x, y: x / y)
    lines = [('npy large', 'npy small', 'rss_mb', diff, 'peak memory per rank', ' MB',
              ' (goal: within 200)'),
             ('npy large', 'npy small', 'startup_s', diff, 'first iteration', ' s', ''),
             ('csv large', 'csv small', 'rss_mb', diff, 'peak memory per rank', ' MB', ''),
             ('csv large', 'csv small', 'startup_s', diff, 'first iteration', ' s', ''),
             ('csv small', 'npy twin of csv small', 'samples_s', ratio, 'samples/s', '',
              ' (goal: at least 0.9)'),
             ('csv large', 'npy twin of csv large', 'samples_s', ratio, 'samples/s', '',
              ' (goal: at least 0.9)'),
             ('csv small, no workers', 'npy twin of csv small', 'samples_s', ratio,
              'samples/s', '', ''),
             ('npz small (in memory)', 'npy small', 'rss_mb', diff, 'peak memory per rank',
              ' MB', '')]
    for a, b, key, op, what, unit, goal in lines:
        if a in results and b in results:
            value = per_round(a, b, key, op)
            shown = f'{value:.3f}' if op is ratio else f'{value:+.1f}{unit}'
            print(f'- {what}, {a} {"/" if op is ratio else "-"} {b}: {shown}{goal}')


def loader_alone(configs, args):
    """How fast the loader alone delivers this rank's batches (no training, one process):
    what a rank can consume before reading becomes the bottleneck, per worker count."""
    from distmulti.datasets import load_dataset
    from distmulti.iterators import TrainIterator
    from distmulti.loader import Loader, SampleSpec, Source
    pairs = [c for c in configs if c[0] in ('csv small', 'npy twin of csv small')]
    if not pairs:
        return
    spec = SampleSpec(SHAPE, [10] * HEADS, [f'head{i}' for i in range(HEADS)])
    runs = [(label, spec_text, workers) for workers in (0, 1, 2)
            for label, _, spec_text, _, _, _ in pairs]
    rates = {(label, workers): [] for label, _, workers in runs}
    batches = 60
    for r in range(args.rounds):
        for label, spec_text, workers in (runs if r % 2 == 0 else runs[::-1]):
            data = load_dataset(spec_text)
            with Loader({'train': Source(data, label, spec)}, workers,
                        max_batch=args.batchsize) as loader:
                it = TrainIterator(loader, 'train', len(data), args.batchsize, seed=r)
                it.next()
                started = time.perf_counter()
                for _ in range(batches):
                    it.next()
                rates[(label, workers)].append(batches * args.batchsize
                                               / (time.perf_counter() - started))
    print(f'\nthe loader alone (no training, one process, batch {args.batchsize}, '
          f'{batches} batches; medians of {args.rounds} rounds): samples/s it delivers\n')
    print('| data | 0 workers (in the process) | 1 worker | 2 workers |')
    print('|---|---:|---:|---:|')
    for label, _, _, _, _, _ in pairs:
        cells = ' | '.join(f'{statistics.median(rates[(label, w)]):.0f}' for w in (0, 1, 2))
        print(f'| {label} | {cells} |')


if __name__ == '__main__':
    main()
