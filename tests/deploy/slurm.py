"""A throwaway one-node Slurm cluster for tests: config in a temp folder, daemons by PID.

``SlurmCluster(folder).start()`` writes ``slurm.conf`` (auth/none, no accounting, state and
spool under ``folder``), starts ``slurmctld -D`` and ``slurmd -D`` in the background and waits
until the node is idle; ``stop()`` ends exactly those two processes. Clients (``sbatch``,
``scontrol``) find the cluster through ``SLURM_CONF`` in ``cluster.env``. Needs root (slurmd
runs jobs as their users) and Debian's ``slurmctld slurmd slurm-client`` (plus ``libpmix2
libpmix-dev`` for ``srun --mpi=pmix``). Ports 6817/6818: one cluster per machine.
"""
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from typing import Dict, List, Mapping, Optional, Sequence

DAEMONS = ('slurmctld', 'slurmd')
CLIENTS = ('sbatch', 'scontrol', 'sinfo', 'srun')
FINAL_STATES = {'COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'NODE_FAIL', 'OUT_OF_MEMORY',
                'PREEMPTED', 'BOOT_FAIL', 'DEADLINE'}
CMD_TIMEOUT = 30


def missing_reason() -> Optional[str]:
    """Why a local cluster cannot start here, or None when it can."""
    if os.geteuid() != 0:
        return 'needs root to run slurmd (it starts jobs as their users)'
    missing = [tool for tool in DAEMONS + CLIENTS if shutil.which(tool) is None
               and not os.access(os.path.join('/usr/sbin', tool), os.X_OK)]
    if missing:
        return (f'Slurm is not installed (missing {", ".join(missing)}); apt-get install -y '
                f'--no-install-recommends slurmctld slurmd slurm-client munge libpmix2 '
                f'libpmix-dev')
    for port in (6817, 6818):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(('', port))
            except OSError:
                return f'port {port} is taken (another Slurm cluster runs on this machine)'
    return None


def _which(tool: str) -> str:
    return shutil.which(tool) or os.path.join('/usr/sbin', tool)


def node_line() -> str:
    """This machine's NodeName line as ``slurmd -C`` reports it (without UpTime)."""
    out = subprocess.run([_which('slurmd'), '-C'], capture_output=True, text=True,
                         timeout=CMD_TIMEOUT, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith('NodeName='))
    return re.sub(r'\s*UpTime=\S+', '', line).strip()


def parse_record(line: str) -> Dict[str, str]:
    """``scontrol show ... -o`` output (``Key=Value Key=Value ...``) as a dict."""
    fields = {}
    for match in re.finditer(r'(\w[\w:/]*)=(\S*)', line):
        fields.setdefault(match.group(1), match.group(2))
    return fields


class SlurmCluster:
    """One slurmctld and one slurmd on this machine, all files under ``folder``."""

    def __init__(self, folder: str, partition: str = 'debug'):
        self.folder = os.path.abspath(folder)
        self.partition = partition
        self.conf = os.path.join(self.folder, 'slurm.conf')
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.procs: List[subprocess.Popen] = []
        self.start_seconds: Optional[float] = None

    def write_config(self) -> None:
        for sub in ('state', 'spool', 'log'):
            os.makedirs(os.path.join(self.folder, sub), exist_ok=True)
        f = self.folder
        node = node_line()
        host = node.split()[0].split('=', 1)[1]
        lines = [
            'ClusterName=distmulti-test',
            f'SlurmctldHost={host}(127.0.0.1)',
            'SlurmUser=root',
            'AuthType=auth/none',
            'CredType=cred/none',
            'ProctrackType=proctrack/linuxproc',
            'TaskPlugin=task/none',
            'SelectType=select/cons_tres',
            'SelectTypeParameters=CR_Core',
            'AccountingStorageType=accounting_storage/none',
            'JobAcctGatherType=jobacct_gather/none',
            'JobCompType=jobcomp/filetxt',
            f'JobCompLoc={f}/log/jobcomp.txt',
            'MpiDefault=none',
            'ReturnToService=2',
            'KillWait=5',
            # A requeued job may start again after cred_expire seconds (default 120; 5 is the
            # least Slurm accepts) and is started by the next scheduling pass (every second).
            'AuthInfo=cred_expire=5',
            'SchedulerParameters=sched_interval=1,bf_interval=1',
            'InactiveLimit=0',
            'MinJobAge=600',
            f'StateSaveLocation={f}/state',
            f'SlurmdSpoolDir={f}/spool',
            f'SlurmctldPidFile={f}/slurmctld.pid',
            f'SlurmdPidFile={f}/slurmd.pid',
            f'SlurmctldLogFile={f}/log/slurmctld.log',
            f'SlurmdLogFile={f}/log/slurmd.log',
            'SlurmctldPort=6817',
            'SlurmdPort=6818',
            f'{node} State=UNKNOWN',
            f'PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP',
        ]
        with open(self.conf, 'w') as out:
            out.write('\n'.join(lines) + '\n')

    def run(self, argv: Sequence[str], timeout: float = CMD_TIMEOUT,
            env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
        """Runs a Slurm client against this cluster under a timeout."""
        return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                              timeout=timeout, env=dict(env or self.env, SLURM_CONF=self.conf))

    def start(self, timeout: float = 60) -> 'SlurmCluster':
        """Writes the config, starts both daemons and waits for the node to be idle."""
        begin = time.monotonic()
        self.write_config()
        for daemon in DAEMONS:
            log = open(os.path.join(self.folder, 'log', f'{daemon}.stderr'), 'w')
            argv = [_which(daemon), '-D', '-f', self.conf]
            if daemon == 'slurmctld':
                argv.append('-i')  # ignore any old state in the (fresh) state folder
            self.procs.append(subprocess.Popen(argv, env=self.env, stdout=log,
                                               stderr=subprocess.STDOUT,
                                               start_new_session=True))
            log.close()
        while True:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f'{proc.args[0]} exited with {proc.returncode} while '
                                       f'starting:\n{self.logs()}')
            out = self.run(['sinfo', '-h', '-o', '%T'], timeout=10)
            states = out.stdout.split()
            if out.returncode == 0 and states and all(s == 'idle' for s in states):
                break
            if time.monotonic() - begin > timeout:
                raise RuntimeError(f'the node was not idle within {timeout} s (sinfo: '
                                   f'{out.stdout.strip()!r} {out.stderr.strip()!r}):\n'
                                   f'{self.logs()}')
            time.sleep(0.2)
        self.start_seconds = time.monotonic() - begin
        return self

    def stop(self, timeout: float = 15) -> None:
        """Ends the daemons this object started (SIGTERM, then SIGKILL), by PID."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs = []

    def pmix_missing_reason(self) -> Optional[str]:
        """Why ``srun --mpi=pmix`` cannot work here, or None when it should."""
        out = self.run(['srun', '--mpi=list'])
        if 'pmix' not in out.stdout + out.stderr:
            return 'Slurm has no PMIx plugin (srun --mpi=list); apt-get install libpmix2'
        # Debian's plugin dlopens the unversioned libpmix.so, which only libpmix-dev ships.
        plugins = glob.glob('/usr/lib/*/slurm-wlm/mpi_pmix*.so') + \
            glob.glob('/usr/lib*/slurm/mpi_pmix*.so')
        for plugin in plugins:
            with open(plugin, 'rb') as f:
                dirs = {d.decode() for d in re.findall(rb'(/[\w./-]*pmix[\w./-]*/lib)\0', f.read())}
            if dirs and not any(os.path.exists(os.path.join(d, 'libpmix.so')) for d in dirs):
                return (f'the Slurm PMIx plugin needs libpmix.so in {sorted(dirs)[0]} '
                        f'(apt-get install libpmix-dev)')
        return None

    def logs(self, tail: int = 3000) -> str:
        parts = []
        log_dir = os.path.join(self.folder, 'log')
        for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
            with open(os.path.join(log_dir, name), errors='replace') as f:
                parts.append(f'--- {name}\n{f.read()[-tail:]}')
        return '\n'.join(parts)

    def sbatch(self, script: str, args: Sequence[str] = (), options: Sequence[str] = (),
               env: Optional[Mapping[str, str]] = None) -> str:
        """Submits ``script args`` with sbatch ``options``; returns the job id."""
        out = self.run(['sbatch', '--parsable'] + list(options) + [script] + list(args),
                       env=env)
        if out.returncode != 0:
            raise RuntimeError(f'sbatch failed ({out.returncode}): {out.stderr.strip()}')
        return out.stdout.strip().split(';')[0]

    def job(self, job_id: str) -> Dict[str, str]:
        """The job's fields from ``scontrol show job -o``."""
        out = self.run(['scontrol', 'show', 'job', '-o', job_id])
        if out.returncode != 0:
            raise RuntimeError(f'scontrol show job {job_id} failed: {out.stderr.strip()}')
        return parse_record(out.stdout)

    def wait(self, job_id: str, timeout: float, poll: float = 0.2) -> Dict[str, str]:
        """Polls the job until it reaches a final state; cancels it and raises on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            if fields.get('JobState') in FINAL_STATES:
                return fields
            if time.monotonic() > deadline:
                self.run(['scancel', job_id])
                raise TimeoutError(f'job {job_id} still {fields.get("JobState")} after '
                                   f'{timeout} s')
            time.sleep(poll)

    def wait_running(self, job_id: str, timeout: float) -> Dict[str, str]:
        """Polls until the job runs (or has already ended)."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            if fields.get('JobState') == 'RUNNING' or fields.get('JobState') in FINAL_STATES:
                return fields
            if time.monotonic() > deadline:
                raise TimeoutError(f'job {job_id} still {fields.get("JobState")} after '
                                   f'{timeout} s')
            time.sleep(0.2)
