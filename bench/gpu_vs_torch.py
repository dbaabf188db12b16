"""Times one training iteration of distmulti's first default network (BaseCNN with MLPHead
classifiers; the default is now BatchNormCNN with linear heads) in distmulti (Chainer on
CuPy, or NumPy) and in plain PyTorch on the same device; prints one table.

Both sides run the same model: BaseCNN (3x3 conv 1->16, 3x3 conv 16->32, 2x2 max-pool, fully
connected ->128, ReLUs) feeding K MLPHead classifiers (128->64->10), softmax cross-entropy per
head normalised by its labelled samples, summed, one backward, one Adam (lr 1e-3) per part.
An iteration is what each training loop does: the batch goes from host memory to the device,
forward, backward, update. distmulti's updater also fetches its per-head sums to the host once
per iteration (metrics, NaN check); PyTorch's loop here fetches nothing. Before timing, the
PyTorch model is given distmulti's initial weights and both losses are compared on one batch,
so the table compares the same computation. FP32 everywhere: TF32 is turned off in PyTorch
(CuPy does not use it unless CUPY_TF32=1); PyTorch uses cuDNN, Chainer on CuPy 14 cannot.

Timing: warm-up iterations first, then ``--rounds`` rounds of ``--iters`` iterations per
framework, interleaved; the device is synchronised before and after each round; the table
shows medians over rounds.

    python bench/gpu_vs_torch.py --device cuda            # GPU 0 (CuPy and torch.cuda)
    python bench/gpu_vs_torch.py --device cpu --quick     # smoke test on the CPU
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import distmulti  # noqa: E402  first: applies distmulti._compat before chainer loads
import chainer  # noqa: E402
from chainer import optimizers as O  # noqa: E402
from chainer.datasets import TupleDataset  # noqa: E402
from chainer.iterators import SerialIterator  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as TF  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', choices=['cuda', 'cpu'], default='cuda')
    p.add_argument('--batches', default='64,1024', help='comma-separated batch sizes')
    p.add_argument('--heads', type=int, default=3)
    p.add_argument('--warmup', type=int, default=20)
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--iters', type=int, default=20)
    p.add_argument('--quick', action='store_true', help='3 rounds of 3 iterations, 2 warm-up')
    return p.parse_args(argv)


class TorchBase(nn.Module):
    def __init__(self, width, channels=16, features=128):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.fc = nn.Linear(2 * channels * 4 * (width // 2), features)

    def forward(self, x):
        h = TF.relu(self.conv1(x))
        h = TF.max_pool2d(TF.relu(self.conv2(h)), 2)
        return TF.relu(self.fc(h.flatten(1)))


class TorchHead(nn.Module):
    def __init__(self, features=128, hidden=64, classes=10):
        super().__init__()
        self.l1 = nn.Linear(features, hidden)
        self.l2 = nn.Linear(hidden, classes)

    def forward(self, h):
        return self.l2(TF.relu(self.l1(h)))


def torch_loss(base, heads, x, t):
    h = base(x)
    total = 0
    for i, head in enumerate(heads):
        col = t[:, i]
        n = (col != -1).sum().clamp(min=1)
        total = total + TF.cross_entropy(head(h), col, ignore_index=-1, reduction='sum') / n
    return total


def copy_weights(chainer_net, base, heads):
    """Gives the PyTorch model distmulti's parameters (same layouts: (out, in[, kh, kw]))."""
    pairs = [(chainer_net.base.conv1, base.conv1), (chainer_net.base.conv2, base.conv2),
             (chainer_net.base.fc, base.fc)]
    for ch, th in zip(chainer_net.heads, heads):
        pairs += [(ch.l1, th.l1), (ch.l2, th.l2)]
    with torch.no_grad():
        for src, dst in pairs:
            dst.weight.copy_(torch.from_numpy(np.asarray(chainer.backend.CpuDevice().send(
                src.W.array))))
            dst.bias.copy_(torch.from_numpy(np.asarray(chainer.backend.CpuDevice().send(
                src.b.array))))


def make_data(batch, heads, seed=0):
    rs = np.random.RandomState(seed)
    n = 4 * batch
    x = rs.rand(n, 1, 8, 8 * heads).astype(np.float32)
    y = rs.randint(0, 10, (n, heads)).astype(np.int32)
    y[::7, 0] = -1  # some unlabelled samples, as distmulti allows
    return x, y


def build(batch, heads, on_gpu):
    x, y = make_data(batch, heads)
    device = chainer.get_device('@cupy:0' if on_gpu else '@numpy')
    np.random.seed(0)
    net = distmulti.MultiHeadNet(distmulti.BaseCNN(),
                                 [distmulti.MLPHead(10) for _ in range(heads)])
    net.to_device(device)
    net.initialize(device.send(x[:1]))
    opts = {name: O.Adam(alpha=1e-3) for name in ['base'] + net.head_names}
    for name, opt in opts.items():
        opt.setup(getattr(net, name))
    it = SerialIterator(TupleDataset(x, y), batch, shuffle=False)
    updater = distmulti.MultiHeadUpdater(it, net, opts, device=device)

    tdev = torch.device('cuda:0' if on_gpu else 'cpu')
    base = TorchBase(8 * heads).to(tdev)
    theads = nn.ModuleList(TorchHead() for _ in range(heads)).to(tdev)
    copy_weights(net, base, theads)
    topts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in [base, *theads]]

    # The same computation: equal losses on the first batch before any update.
    xb, yb = x[:batch], y[:batch]
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        outs = net.head_outputs(device.send(xb), device.send(yb))
        ch_loss = sum(float(o.loss_sum.array) / max(int((yb[:, i] != -1).sum()), 1)
                      for i, o in enumerate(outs))
    with torch.no_grad():
        th_loss = float(torch_loss(base, theads, torch.from_numpy(xb).to(tdev),
                                   torch.from_numpy(yb).long().to(tdev)))
    if not np.isclose(ch_loss, th_loss, rtol=1e-4):
        raise SystemExit(f'gpu_vs_torch: the two models disagree: loss {ch_loss} (distmulti) '
                         f'vs {th_loss} (PyTorch) on the same weights and batch')

    def chainer_step():
        with chainer.Reporter().scope({}):
            updater.update()

    state = {'i': 0}

    def torch_step():
        i = state['i'] % 4
        state['i'] += 1
        xt = torch.from_numpy(x[i * batch:(i + 1) * batch]).to(tdev)
        yt = torch.from_numpy(y[i * batch:(i + 1) * batch]).long().to(tdev)
        for opt in topts:
            opt.zero_grad(set_to_none=True)
        torch_loss(base, theads, xt, yt).backward()
        for opt in topts:
            opt.step()

    return chainer_step, torch_step, ch_loss


def synchronizers(on_gpu):
    if not on_gpu:
        return (lambda: None), (lambda: None)
    import cupy
    return cupy.cuda.runtime.deviceSynchronize, torch.cuda.synchronize


def time_rounds(steps, syncs, warmup, rounds, iters):
    """Median seconds per iteration of each step function, rounds interleaved."""
    for step, sync in zip(steps, syncs):
        for _ in range(warmup):
            step()
        sync()
    per_round = [[] for _ in steps]
    for _ in range(rounds):
        for k, (step, sync) in enumerate(zip(steps, syncs)):
            sync()
            start = time.perf_counter()
            for _ in range(iters):
                step()
            sync()
            per_round[k].append((time.perf_counter() - start) / iters)
    return [statistics.median(times) for times in per_round]


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.warmup, args.rounds, args.iters = 2, 3, 3
    on_gpu = args.device == 'cuda'
    if on_gpu:
        import cupy
        if not torch.cuda.is_available() or cupy.cuda.runtime.getDeviceCount() < 1:
            raise SystemExit('gpu_vs_torch: --device cuda needs a CUDA GPU visible to both '
                             'CuPy and PyTorch')
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        name = torch.cuda.get_device_name(0)
        cupy_version = cupy.__version__
    else:
        name, cupy_version = 'CPU', '-'
        torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    batches = [int(b) for b in args.batches.split(',')]
    rows = []
    for batch in batches:
        chainer_step, torch_step, loss = build(batch, args.heads, on_gpu)
        ch, th = time_rounds([chainer_step, torch_step], synchronizers(on_gpu), args.warmup,
                             args.rounds, args.iters)
        rows.append((batch, ch * 1e3, th * 1e3, batch / ch, batch / th, loss))
    from chainer.backends import cuda
    print(f'\ndistmulti {distmulti.__version__} (chainer {chainer.__version__}, numpy '
          f'{np.__version__}, CuPy {cupy_version}, cuDNN in chainer: '
          f'{"yes" if cuda.cudnn_enabled else "no"}) vs PyTorch {torch.__version__} on {name}; '
          f'K = {args.heads} heads, Adam, FP32; medians of {args.rounds} rounds of '
          f'{args.iters} iterations after {args.warmup} warm-up')
    print()
    print('| batch | distmulti ms/it | PyTorch ms/it | distmulti / PyTorch | distmulti samples/s '
          '| PyTorch samples/s |')
    print('|---:|---:|---:|---:|---:|---:|')
    for batch, ch, th, ch_rate, th_rate, _ in rows:
        print(f'| {batch} | {ch:.2f} | {th:.2f} | {ch / th:.2f}x | {ch_rate:,.0f} | '
              f'{th_rate:,.0f} |')


if __name__ == '__main__':
    main()
