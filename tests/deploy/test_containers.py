"""launch/containers.sh: one MPI job across several containers of the project's CPU image
on one host (a bridge network with fixed addresses and /etc/hosts entries, so no engine DNS;
sshd in the workers, `distmulti launch --hostfile` in the launcher), a worker container
killed mid-run failing the job, and a taken subnet.

The first tests need no engine: they read the commands `--dry-run` prints, or run the script
against a stand-in engine (a shell script that records its arguments and refuses) to show
what the script decides on its own. The real engine (podman, as the suite runs it) is used
from `test_one_job_across_three_containers_each_rank_on_its_own` on.
"""
import ipaddress
import json
import os
import re
import shlex
import signal
import subprocess
import time

import pytest

from tests.deploy import images
from tests.helpers import finish, start

pytestmark = pytest.mark.deploy
SCRIPT = os.path.join(images.REPO, 'launch', 'containers.sh')
QUICK = ['--train-size', '480', '--test-size', '100', '--batchsize', '8', '--no-progress',
         '--no-plot']
DEFAULT_SUBNETS = [f'10.213.{i}.0/24' for i in range(16)]   # as launch/README.md says


def start_script(image, results, n, *train_args, mpi_args=(), script_args=()):
    env = {'CONTAINER_ENGINE': shlex.join(images.podman_argv()),
           'CONTAINER_RUN_FLAGS': ' '.join([*images.ULIMITS, '--no-healthcheck'])}
    argv = [SCRIPT, '-n', n, '--image', image, '--results', results, *script_args]
    argv += [f'--mpi-arg={a}' for a in mpi_args] + ['--', *train_args]
    return start(argv, env=env)


def leftovers(pid):
    """This run's containers, networks and volumes still there."""
    names = []
    for kind in (['ps', '-a'], ['network', 'ls'], ['volume', 'ls']):
        names += images.podman(*kind, '--format', '{{.Name}}' if kind[0] != 'ps'
                               else '{{.Names}}').stdout.decode().split()
    return [n for n in names if n.startswith(f'distmulti-{pid}-')]


def run_script(*argv, engine, run_flags=''):
    return subprocess.run([SCRIPT, *argv], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, CONTAINER_ENGINE=engine,
                                   CONTAINER_RUN_FLAGS=run_flags))


def option_values(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


# -- without an engine ------------------------------------------------------------------------

@pytest.mark.parametrize('n, subnet, engine', [
    (2, None, 'docker'),
    (4, '192.168.77.0/24', 'podman --root /srv/podman'),
    (3, '172.30.8.0/29', 'docker'),
])
def test_dry_run_gives_every_container_a_fixed_address_and_every_other_name(n, subnet, engine):
    argv = ['-n', str(n), '--image', 'img:1', '--results', '/data/runs', '--dry-run']
    argv += ['--subnet', subnet] if subnet else []
    proc = run_script(*argv, '--mpi-arg=--display', '--', '--epoch', '2', engine=engine,
                      run_flags='--ulimit nofile=20000:20000')
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    commands = [shlex.split(line) for line in lines if not line.startswith('#')]
    hostfile = [line[4:] for line in lines if line.startswith('#   ')]
    prefix = shlex.split(engine)
    assert all(c[:len(prefix)] == prefix for c in commands), commands
    commands = [c[len(prefix):] for c in commands]

    network = next(c for c in commands if c[:2] == ['network', 'create'])
    net_name, net = network[-1], ipaddress.ip_network(option_values(network, '--subnet')[0])
    assert str(net) == (subnet or DEFAULT_SUBNETS[0])
    named = [c for c in commands if c[0] == 'run' and '--name' in c]
    hosts = {option_values(c, '--hostname')[0]: option_values(c, '--ip')[0] for c in named}
    names = ['launcher'] + [f'w{i}' for i in range(1, n)]
    assert sorted(hosts) == sorted(names)
    addresses = [ipaddress.ip_address(a) for a in hosts.values()]
    assert len(set(addresses)) == n
    usable = set(net.hosts()) - {net.network_address + 1}          # .1: the engine's gateway
    assert set(addresses) <= usable, (net, addresses)
    for c in named:
        assert option_values(c, '--network') == [net_name]
        assert option_values(c, '--ulimit') == ['nofile=20000:20000']
        # Every container knows every name: no DNS needed.
        assert dict(h.split(':') for h in option_values(c, '--add-host')) == hosts, c
    launcher = next(c for c in named if option_values(c, '--hostname') == ['launcher'])
    assert f'HOSTS={" ".join(names)}' in option_values(launcher, '-e')
    assert hostfile == [f'{name} slots=1' for name in names]
    tail = launcher[launcher.index('distmulti'):]
    assert tail == ['distmulti', 'launch', '-n', str(n), '--hostfile', '/tmp/hostfile',
                    '--mpi-arg=--display', '--', '--epoch', '2', '--out', '/results/run']
    assert f'{net_name}' in proc.stderr and str(net) in proc.stderr


@pytest.fixture
def refusing_engine(tmp_path):
    """A stand-in engine: records each call's arguments, refuses `network create` with the
    message in ./refusal (podman's "already used" by default), fails every other call."""
    log, refusal = tmp_path / 'calls', tmp_path / 'refusal'
    refusal.write_text('Error: subnet is already used on the host or by another config\n')
    engine = tmp_path / 'engine'
    engine.write_text(f'#!/bin/sh\necho "$*" >> {log}\n'
                      f'if [ "$1 $2" = "network create" ]; then cat {refusal} >&2; exit 125; fi\n'
                      'exit 1\n')
    engine.chmod(0o755)
    return engine, log, refusal


@pytest.mark.parametrize('argv, message', [
    (['--subnet', 'ten/8'], "CIDR form such as 10.213.0.0/24, got 'ten/8'"),
    (['--subnet', '10.0.0.0/33'], "prefix length 8-30, got '10.0.0.0/33'"),
    (['--subnet', '10.0.300.0/24'], "four numbers 0-255"),
    (['--subnet', '10.0.0.5/24'], "has host bits set; its network is 10.0.0.0/24"),
    (['-n', '6', '--subnet=192.168.1.0/29'], "has room for 5 containers, -n 6 needs 6"),
    (['-n', '1'], "-n must be >= 2"),
    (['--subnetz', '10.0.0.0/24'], "unknown option '--subnetz'"),
])
def test_bad_arguments_are_refused_before_the_engine_runs(refusing_engine, argv, message):
    engine, log, _ = refusing_engine
    proc = run_script(*argv, '--', '--epoch', '1', engine=str(engine))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not log.exists()


def test_the_default_subnets_are_tried_in_turn_while_the_engine_says_taken(refusing_engine):
    engine, log, refusal = refusing_engine
    proc = run_script('--', '--epoch', '1', engine=str(engine))
    assert proc.returncode == 1, proc.stderr
    assert 'none of the default subnets 10.213.0.0/24 .. 10.213.15.0/24' in proc.stderr
    assert '--subnet CIDR' in proc.stderr and len(proc.stderr.splitlines()) == 1
    tried = [line.split()[3] for line in log.read_text().splitlines()
             if line.startswith('network create')]
    assert tried == DEFAULT_SUBNETS
    # A refusal for another reason is reported at once; a given subnet is the only one tried.
    refusal.write_text('Error: permission denied\n')
    for argv in ([], ['--subnet', '10.9.0.0/16']):
        log.unlink()
        proc = run_script(*argv, '--', '--epoch', '1', engine=str(engine))
        assert proc.returncode == 1 and 'permission denied' in proc.stderr, proc.stderr
        assert [line.split()[3] for line in log.read_text().splitlines()
                if line.startswith('network create')] == (argv[-1:] or DEFAULT_SUBNETS[:1])


# -- with podman ------------------------------------------------------------------------------

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


def test_a_taken_default_subnet_is_passed_over_and_a_taken_given_one_refused(cpu_image,
                                                                             tmp_path):
    blocker = f'distmulti-test-blocker-{os.getpid()}'
    made = images.podman('network', 'create', '--subnet', DEFAULT_SUBNETS[0], blocker,
                         check=False)
    # Ours, or another network's already: either way the first default subnet is taken.
    assert made.returncode == 0 or b'already used' in made.stderr, made.stderr
    try:
        proc = start_script(cpu_image, tmp_path, 2, '--iterations', 5, *QUICK)
        code, out = finish(proc, 300)
        assert code == 0, out[-3000:]
        chosen = re.search(r'ranks on network \S+ \((\S+)\)', out).group(1)
        assert chosen in DEFAULT_SUBNETS[1:], out[-3000:]
        assert json.loads((tmp_path / 'run' / 'result.json').read_text())['world_size'] == 2
        assert leftovers(proc.pid) == []

        proc = start_script(cpu_image, tmp_path / 'b', 2, '--iterations', 5, *QUICK,
                            script_args=['--subnet', DEFAULT_SUBNETS[0]])
        code, out = finish(proc, 120)
        assert code == 1, out[-3000:]
        assert f'refused a network with --subnet {DEFAULT_SUBNETS[0]}' in out, out[-3000:]
        assert leftovers(proc.pid) == []
    finally:
        if made.returncode == 0:
            images.podman('network', 'rm', blocker, check=False)
