"""The large-batch recipe through `distmulti train`: rates in the log and across a resume,
accumulation's epochs, the float16 refusal on the CPU, and the BatchNorm lines under
`mpiexec -n 2`."""
import json
import os
import sys

import pytest

from distmulti.schedule import LRSchedule
from tests.helpers import MPIEXEC, mpiexec, run, run_cli, sha256

PYTHON = sys.executable
QUICK = ['--no-progress', '--train-size', '480', '--test-size', '100', '--batchsize', '16']
SCHEDULED = ['--iterations', '40', '--eval-interval', '10', '--checkpoint-interval', '20',
             '--warmup', '10', '--lr-decay', 'step', '--lr-step', '10', '--lr-gamma', '0.5',
             '--optimizer', 'momentum_sgd', '--lr', '0.05']
PARTS = 'optimizers:\n  base: {lr: 0.01}\n  head1: {lr_decay: cosine, warmup: 0}\n'


def read_json(path):
    with open(path) as f:
        return json.load(f)


def expected_rates(iteration):
    """The rate of each part at the update that ends ``iteration`` (1-based)."""
    step = dict(total=40, warmup=10, decay='step', step=10, gamma=0.5)
    return {'lr/base': LRSchedule(peak=0.01, **step).rate(iteration - 1),
            'lr/head0': LRSchedule(peak=0.05, **step).rate(iteration - 1),
            'lr/head1': LRSchedule(peak=0.05, total=40, decay='cosine').rate(iteration - 1),
            'lr/head2': LRSchedule(peak=0.05, **step).rate(iteration - 1)}


def test_each_parts_rate_is_in_the_log_and_the_plots_and_continues_after_resume(tmp_path):
    config = tmp_path / 'parts.yaml'
    config.write_text(PARTS)
    common = ['-c', config] + SCHEDULED + QUICK
    full = run_cli(['train', '--out', tmp_path / 'full'] + common)
    assert full.returncode == 0, full.stderr[-3000:]
    log = read_json(tmp_path / 'full' / 'log')
    assert [e['iteration'] for e in log] == [10, 20, 30, 40]
    for entry in log:
        rates = {k: v for k, v in entry.items() if k.startswith('lr/')}
        assert rates == pytest.approx(expected_rates(entry['iteration'])), entry['iteration']
    assert {'lr.png', 'loss.png', 'head0_accuracy.png'} <= set(os.listdir(tmp_path / 'full'))

    resumed = run_cli(['train', '--out', tmp_path / 'resumed', '--resume',
                       tmp_path / 'full' / 'checkpoint_iter_20.npz'] + common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = read_json(tmp_path / 'resumed' / 'log')
    assert [e['iteration'] for e in after] == [10, 20, 30, 40]  # 10 and 20 from the checkpoint
    for mine, theirs in zip(after, log):
        assert {k: v for k, v in mine.items() if k.startswith('lr/')} == \
            {k: v for k, v in theirs.items() if k.startswith('lr/')}, mine['iteration']
    assert sha256(tmp_path / 'resumed' / 'model.npz') == sha256(tmp_path / 'full' / 'model.npz')


def test_accumulation_counts_epochs_in_steps_of_n_batches(tmp_path):
    proc = run_cli(['train', '--out', tmp_path, '--epoch', '2', '--accumulate', '3',
                    '--no-plot'] + QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_json(tmp_path / 'result.json')
    # 480 strips, batches of 16, 3 per step: 10 steps per epoch.
    assert result['iterations'] == 20 and result['global_batchsize'] == 48
    assert [e['epoch'] for e in read_json(tmp_path / 'log')] == [1, 2]


def test_float16_gradient_exchange_is_refused_on_the_cpu(tmp_path):
    proc = run_cli(['train', '--grad-dtype', 'float16', '--out', tmp_path] + QUICK)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert ("distmulti: error: grad_dtype float16 needs GPUs: only ChainerMN's pure_nccl "
            "communicator exchanges float16, and on the CPU its naive communicator exchanges "
            "float32 only; this run is on the CPU (device @numpy); use grad_dtype float32 or "
            "a GPU device (@cupy:0)") in proc.stderr


@pytest.mark.skipif(not os.access(MPIEXEC, os.X_OK), reason=f'no mpiexec beside {PYTHON}')
@pytest.mark.parametrize('sync', [False, True], ids=['per-rank', 'sync-bn'])
def test_two_ranks_say_once_how_batch_norm_statistics_are_computed(tmp_path, sync):
    args = ['--out', tmp_path, '--iterations', 6, '--no-plot'] + QUICK
    code, out, _ = run(mpiexec('-n', 2, PYTHON, '-m', 'mpi4py', '-m', 'distmulti', 'train',
                               *args, *(['--sync-bn'] if sync else [])), timeout=300)
    assert code == 0, out[-3000:]
    per_rank = ('note: the network has 2 BatchNormalization link(s); each of the 2 ranks '
                'normalises with the statistics of its own batch of 16 (--sync-bn: the '
                "global batch's)")
    synced = 'sync_bn: 2 BatchNormalization link(s) normalise over the global batch of 2 ranks'
    assert out.count(synced if sync else per_rank) == 1, out[-3000:]
    assert (per_rank if sync else synced) not in out
    assert read_json(tmp_path / 'result.json')['world_size'] == 2
