"""Each rank makes its own GPU current before anything touches CUDA, with real mpiexec.

No GPU here: the CUDA runtime boundary is the stand-in in tests/standin_cuda (it imports as
`cupy`, records every call that would reach a device with the device current at the time,
and stops at the first array allocation). Everything else is real: distmulti's start-up,
chainer's device objects, ChainerMN's pure_nccl communicator and its NCCL set-up code, Open
MPI with two ranks on one node. A rank that touched CUDA before choosing its GPU, never made
it current, seeded another device's generator or would start NCCL on another GPU fails here.
"""
import json
import os
import sys

import pytest

from tests.helpers import ROOT, mpiexec, run, run_cli

STANDIN = os.path.join(ROOT, 'tests', 'standin_cuda')
SCRIPT = os.path.join(ROOT, 'tests', 'e2e', 'scripts', 'standin_train.py')
SMALL = ['--train-size', '64', '--test-size', '16', '--batchsize', '8', '--no-progress',
         '--no-plot', '--iterations', '2']


def standin_env(log_dir, gpus):
    log_dir.mkdir(exist_ok=True)
    return {'PYTHONPATH': STANDIN + os.pathsep + ROOT, 'STANDIN_CUDA_GPUS': str(gpus),
            'STANDIN_CUDA_LOG': str(log_dir)}


def events_by_rank(log_dir):
    """{rank: [event, ...]} from the stand-in's per-process logs."""
    found = {}
    for name in os.listdir(log_dir):
        with open(log_dir / name) as f:
            events = [json.loads(line) for line in f]
        found[events[0]['rank']] = events
    return found


def check_rank(events, gpu):
    """The order every rank must follow, with ``gpu`` its GPU."""
    kinds = [e['event'] for e in events]
    assert 'use' in kinds, f'the GPU was never made current: {events}'
    first_use = kinds.index('use')
    assert set(kinds[:first_use]) <= {'count'}, f'CUDA touched before choosing: {events}'
    assert events[first_use]['index'] == gpu, events
    elsewhere = [e for e in events[first_use + 1:] if e['device'] != gpu]
    assert not elsewhere, f'work on a device other than GPU {gpu}: {elsewhere}'


@pytest.mark.parametrize('gpus', [2, 4])
def test_two_ranks_each_make_their_own_gpu_current_first(tmp_path, gpus):
    logs = tmp_path / 'logs'
    code, out, _ = run(mpiexec('-n', 2, '--bind-to', 'none', sys.executable, '-m', 'mpi4py', SCRIPT,
                               '--device', '@cupy:0', '--seed', '7', '--out', tmp_path / 'run',
                               *SMALL),
                       timeout=240, env=standin_env(logs, gpus))
    assert code == 0, out[-4000:]
    assert out.count('stopped: stand-in CUDA: array allocation') == 2, out[-4000:]
    ranks = events_by_rank(logs)
    assert sorted(ranks) == [0, 1]
    for rank, events in ranks.items():
        gpu = rank % gpus  # the rank on this node, modulo the GPUs it sees
        check_rank(events, gpu)
        seeds = [e for e in events if e['event'] == 'seed']
        assert seeds and seeds[0]['value'] == 7, events  # the config's seed, on its GPU
        kinds = [e['event'] for e in events]
        # Parameters go to the GPU after seeding; NCCL starts on the rank's GPU.
        assert kinds.index('seed') < kinds.index('alloc') < kinds.index('nccl'), kinds
        nccl = [e for e in events if e['event'] == 'nccl']
        assert nccl == [dict(event='nccl', device=gpu, rank=rank, ndev=2, nccl_rank=rank)]


def test_two_ranks_on_one_visible_gpu_are_refused_before_nccl(tmp_path):
    logs = tmp_path / 'logs'
    code, out, _ = run(mpiexec('-n', 2, '--bind-to', 'none', sys.executable, '-m', 'mpi4py', SCRIPT,
                               '--device', '@cupy:0', '--out', tmp_path / 'run', *SMALL),
                       timeout=240, env=standin_env(logs, 1))
    assert code != 0
    assert 'ranks 0, 1 all use GPU' in out and 'needs one GPU per rank' in out, out[-4000:]
    assert not any(e['event'] in ('nccl', 'alloc') for events in events_by_rank(logs).values()
                   for e in events)


def test_one_process_uses_the_gpu_it_was_given(tmp_path):
    logs = tmp_path / 'logs'
    code, out, _ = run([sys.executable, SCRIPT, '--device', '@cupy:1', '--seed', '3',
                        '--out', tmp_path / 'run', *SMALL],
                       timeout=240, env=standin_env(logs, 2))
    assert code == 0, out[-4000:]
    (events,) = events_by_rank(logs).values()
    check_rank(events, 1)
    assert [e['value'] for e in events if e['event'] == 'seed'][:1] == [3]


@pytest.fixture(scope='module')
def cpu_run(tmp_path_factory):
    """A completed (CPU) run for evaluate and predict."""
    out = tmp_path_factory.mktemp('run')
    proc = run_cli(['train', '--out', out, *SMALL])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize('command', ['evaluate', 'predict'])
def test_evaluate_and_predict_make_their_gpu_current_first(cpu_run, tmp_path, command):
    logs = tmp_path / 'logs'
    extra = ['npz:' + str(tmp_path / 'x.npz')] if command == 'predict' else []
    if extra:
        import numpy as np
        np.savez(tmp_path / 'x.npz', x=np.zeros((2, 1, 8, 24), np.float32))
    code, out, _ = run([sys.executable, '-m', 'distmulti', command, cpu_run, *extra,
                        '--device', '@cupy:1'], timeout=240, env=standin_env(logs, 2))
    # The stand-in stops at the parameters' first copy to the GPU.
    assert code != 0 and 'StandInStop' in out, out[-4000:]
    (events,) = events_by_rank(logs).values()
    check_rank(events, 1)
    assert events[-1]['event'] == 'alloc'
