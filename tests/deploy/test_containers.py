"""launch/containers.sh: one MPI job across several containers of the project's CPU image
on one host (podman bridge network, sshd in the workers, `distmulti launch --hostfile` in
the launcher), and a worker container killed mid-run failing the job."""
import json
import os
import re
import shlex
import signal
import time

import pytest

from tests.deploy import images
from tests.helpers import finish, start

pytestmark = pytest.mark.deploy
SCRIPT = os.path.join(images.REPO, 'launch', 'containers.sh')
QUICK = ['--train-size', '480', '--test-size', '100', '--batchsize', '8', '--no-progress',
         '--no-plot']


def start_script(image, results, n, *train_args, mpi_args=()):
    env = {'CONTAINER_ENGINE': shlex.join(images.podman_argv()),
           'CONTAINER_RUN_FLAGS': ' '.join([*images.ULIMITS, '--no-healthcheck'])}
    argv = [SCRIPT, '-n', n, '--image', image, '--results', results]
    argv += [f'--mpi-arg={a}' for a in mpi_args] + ['--', *train_args]
    return start(argv, env=env)


def leftovers(pid):
    names = images.podman('ps', '-a', '--format', '{{.Names}}').stdout.decode().split()
    return [n for n in names if n.startswith(f'distmulti-{pid}-')]


def test_one_job_across_three_containers_each_rank_on_its_own(cpu_image, tmp_path):
    proc = start_script(cpu_image, tmp_path, 3, '--iterations', 20, *QUICK,
                 mpi_args=['--display', 'map'])
    code, out = finish(proc, 600)
    assert code == 0, out[-4000:]
    result = json.loads((tmp_path / 'run' / 'result.json').read_text())
    assert result['world_size'] == 3 and result['iterations'] == 20
    # Open MPI's process map: one rank on each container host.
    placed = dict(re.findall(r'Data for node: (\S+)\s.*?App rank: (\d+)', out, re.S))
    assert placed == {'launcher': '0', 'w1': '1', 'w2': '2'}, out[-4000:]
    assert leftovers(proc.pid) == []


def test_a_worker_container_killed_mid_run_fails_the_job(cpu_image, tmp_path):
    proc = start_script(cpu_image, tmp_path, 2, '--iterations', 100000, '--eval-interval', 5, *QUICK)
    deadline = time.monotonic() + 300
    while not (tmp_path / 'run' / 'log').exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail('training never got under way')
        time.sleep(0.2)
    images.podman('kill', f'distmulti-{proc.pid}-w1')
    killed_at = time.monotonic()
    code, out = finish(proc, 120)
    assert code != 0, out[-3000:]
    assert time.monotonic() - killed_at < 60
    assert not (tmp_path / 'run' / 'result.json').exists()
    assert leftovers(proc.pid) == []
