"""distmulti.devices and the GPU communicator rules: rank arithmetic, the refusal of
communicators that need a CUDA-aware MPI, and the GPU generator in checkpoints.

The checkpoint test runs on the CUDA-runtime stand-in (tests/standin_cuda: no GPU here); it
models cuRAND as CuPy uses it (a seed restarts the stream, draws advance it)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from distmulti.cli import main
from distmulti.comm import choose_communicator
from distmulti.config import TrainConfig
from distmulti.devices import duplicate_gpus, gpu_index
from distmulti.errors import ConfigError, DeviceError
from tests.helpers import ROOT

STANDIN = os.path.join(ROOT, 'tests', 'standin_cuda')


def test_each_rank_takes_the_gpu_of_its_node_rank_modulo_the_visible_ones():
    assert gpu_index(0, world_size=4, local_rank=3, visible=4) == 3
    assert gpu_index(0, world_size=4, local_rank=3, visible=1) == 0  # a GPU bound per task
    assert gpu_index(0, world_size=4, local_rank=3, visible=2) == 1
    assert gpu_index(2, world_size=1, local_rank=0, visible=4) == 2  # one process: as asked
    with pytest.raises(DeviceError, match='sees no CUDA GPU'):
        gpu_index(0, world_size=2, local_rank=1, visible=0)


def test_duplicate_gpus_names_the_gpu_and_its_ranks():
    ids = ['a/0000:01:00.0', 'a/0000:02:00.0', 'a/0000:01:00.0', 'b/0000:01:00.0']
    assert duplicate_gpus(ids) == {'a/0000:01:00.0': [0, 2]}
    assert duplicate_gpus([None, None]) == {}


@pytest.mark.parametrize('name', ['naive', 'flat'])
def test_communicators_that_give_mpi_gpu_memory_are_refused_on_gpus(name):
    with pytest.raises(ConfigError) as e:
        choose_communicator(name, on_gpu=True)
    message = str(e.value)
    assert f"communicator {name!r} on GPUs hands GPU memory to MPI" in message
    assert 'CUDA-aware MPI' in message and 'pure_nccl' in message
    assert '--cuda-aware-mpi' in message
    assert choose_communicator(name, on_gpu=True, cuda_aware_mpi=True) == name


@pytest.mark.parametrize('name, on_gpu, chosen', [('auto', True, 'pure_nccl'),
                                                  ('pure_nccl', True, 'pure_nccl'),
                                                  ('non_cuda_aware', True, 'non_cuda_aware'),
                                                  ('naive', False, 'naive'),
                                                  ('auto', False, 'naive')])
def test_communicators_that_work_without_a_cuda_aware_mpi_are_kept(name, on_gpu, chosen):
    assert choose_communicator(name, on_gpu) == chosen


def test_the_config_refuses_naive_on_a_gpu_unless_the_mpi_is_cuda_aware():
    with pytest.raises(ConfigError, match='CUDA-aware'):
        TrainConfig(device='@cupy:0', communicator='naive').validate()
    TrainConfig(device='@cupy:0', communicator='naive', cuda_aware_mpi=True).validate()
    TrainConfig(device='@numpy', communicator='naive').validate()
    with pytest.raises(ConfigError, match='cuda_aware_mpi must be true or false'):
        TrainConfig(cuda_aware_mpi='yes').validate()


def test_train_and_launch_refuse_flat_on_gpus_before_starting(capsys):
    assert main(['train', '--device', '0', '--communicator', 'flat']) == 2
    assert "communicator 'flat' on GPUs hands GPU memory to MPI" in capsys.readouterr().err
    assert main(['launch', '-n', '2', '--dry-run', '--', '--device', '0',
                 '--communicator', 'naive']) == 2
    assert 'needs a CUDA-aware MPI' in capsys.readouterr().err
    assert main(['launch', '-n', '2', '--dry-run', '--', '--device', '0',
                 '--communicator', 'naive', '--cuda-aware-mpi']) == 0


CHECKPOINT_ROUND_TRIP = '''
import json, os, sys
import numpy as np
import distmulti, cupy
from distmulti import checkpoint, devices
from distmulti.comm import LocalComm

class Updater:
    iteration, epoch_detail = 10, 1.0

class Trainer:
    """What Checkpointer.write needs of a trainer: its updater and serialize()."""
    updater = Updater()
    def __init__(self, extension):
        self.extension = extension
    def serialize(self, serializer):
        self.extension.serialize(serializer['extensions/Checkpointer'])

out = sys.argv[1]
device = devices.select('@cupy:1')
devices.seed(5, device)
generator = lambda: cupy.random.get_random_state()
[generator().randint(0, 10 ** 6) for _ in range(3)]  # what training draws before it
ck = checkpoint.Checkpointer(LocalComm(), out, 10, 2, lambda u: False, {})
ck.write(Trainer(ck))
uninterrupted = [int(generator().randint(0, 10 ** 6)) for _ in range(5)]

devices.seed(5, device)  # a new process: seeded as at the start...
fresh = [int(generator().randint(0, 10 ** 6)) for _ in range(5)]
devices.seed(5, device)  # ...then resumed
checkpoint.load_npz(os.path.join(out, 'checkpoint_iter_10.npz'), Trainer(ck))
resumed = [int(generator().randint(0, 10 ** 6)) for _ in range(5)]
keys = sorted(np.load(os.path.join(out, 'checkpoint_iter_10.npz')).files)
print(json.dumps({'uninterrupted': uninterrupted, 'resumed': resumed, 'keys': keys,
                  'fresh': fresh}))
'''


def test_a_resumed_run_continues_the_gpu_generator_where_the_checkpoint_left_it(tmp_path):
    logs = tmp_path / 'logs'
    logs.mkdir()
    env = dict(os.environ, PYTHONPATH=STANDIN + os.pathsep + ROOT, STANDIN_CUDA_GPUS='2',
               STANDIN_CUDA_LOG=str(logs))
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent(CHECKPOINT_ROUND_TRIP),
                           str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 'extensions/Checkpointer/rng/0/gpu_seed' in result['keys'], result['keys']
    assert result['resumed'] == result['uninterrupted']
    assert result['resumed'] != result['fresh']  # without the checkpoint's seed: other draws
    (log,) = os.listdir(logs)
    events = [json.loads(line) for line in open(logs / log)]
    assert {e['device'] for e in events if e['event'] in ('seed', 'draw')} == {1}
