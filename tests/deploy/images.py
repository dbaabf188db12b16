"""Builds and runs the distmulti container images with podman, for the deploy tests.

There is no Docker daemon and no registry here. A Debian bookworm root filesystem made with
``debootstrap`` (plus python3 and venv) stands in for every base image the Dockerfiles name:
it is imported once and tagged as ``python:3.11-slim-bookworm`` and as the CUDA image, and
builds run with ``--pull=never``. Podman keeps its images and build cache in one fixed folder
(``$DISTMULTI_PODMAN_STORAGE``, default ``/var/tmp/distmulti-podman``), so a second test
session reuses the stand-in base and every unchanged layer. A file lock there serialises
builds from concurrent test processes.

Other tests use it as::

    from tests.deploy import images
    reason = images.missing_reason()          # None when images can be built here
    image = images.build_cpu_image()          # 'localhost/distmulti-test:cpu'
    subprocess.run(images.podman_argv('run', *images.RUN_FLAGS, image, 'distmulti', '--version'))
"""
import contextlib
import fcntl
import functools
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKER_DIR = os.path.join(REPO, 'docker')
CPU_DOCKERFILE = os.path.join(DOCKER_DIR, 'Dockerfile.cpu')
GPU_DOCKERFILE = os.path.join(DOCKER_DIR, 'Dockerfile.gpu')

STORAGE = os.environ.get('DISTMULTI_PODMAN_STORAGE', '/var/tmp/distmulti-podman')
STANDIN_IMAGE = 'localhost/distmulti-standin:bookworm'
CPU_IMAGE = 'localhost/distmulti-test:cpu'
# One GPU image per CuPy line (Dockerfile.gpu's GPU_LINE), on the same Debian stand-in.
GPU_LINES = ('cupy13', 'cupy14')
GPU_IMAGES = {'cupy13': 'localhost/distmulti-test:gpu', 'cupy14': 'localhost/distmulti-test:gpu-cupy14'}

# Packages added to debootstrap's minbase so that the stand-in offers what the real bases
# offer the Dockerfiles: `python3 -m venv` (Python 3.11 with ensurepip) and CA certificates.
STANDIN_PACKAGES = ('python3', 'python3-venv', 'ca-certificates', 'netbase')

# Needed for `podman run` and `podman build` on machines like the CI ones: crun
# fails on the cgroups here, and the default open-files limit is too low for runc.
ULIMITS = ('--ulimit', 'nofile=20000:20000', '--ulimit', 'nproc=32768:32768')
# `podman run` flags for the tests: no network unless asked, no systemd healthcheck timer.
RUN_FLAGS = ('--rm', '--no-healthcheck', *ULIMITS)

DEBOOTSTRAP_TIMEOUT = 600
BUILD_TIMEOUT = 1200
GPU_BUILD_TIMEOUT = 2400  # about 4 GB of CUDA wheels to download and write on a busy disk
PODMAN_TIMEOUT = 120


def missing_reason() -> Optional[str]:
    """Why images cannot be built and run on this machine, or None when they can."""
    if os.geteuid() != 0:
        return 'building images needs root (rootful podman, debootstrap)'
    missing = [tool for tool in ('podman', 'runc', 'debootstrap') if not shutil.which(tool)]
    if missing:
        return (f'{", ".join(missing)} not installed '
                '(apt-get install -y podman buildah debootstrap runc)')
    return None


def podman_argv(*args: str) -> List[str]:
    """``podman`` with this suite's storage, runtime and cgroup settings, then ``args``."""
    return ['podman', '--root', os.path.join(STORAGE, 'root'),
            '--runroot', os.path.join(STORAGE, 'runroot'), '--runtime', 'runc',
            '--cgroup-manager', 'cgroupfs', '--events-backend', 'file', *args]


def podman(*args: str, timeout: float = PODMAN_TIMEOUT, check: bool = True,
           input: Optional[bytes] = None) -> subprocess.CompletedProcess:
    """Runs podman under a timeout; with ``check``, a non-zero exit raises with its output."""
    proc = subprocess.run(podman_argv(*args), capture_output=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f'podman {" ".join(args)} exited {proc.returncode}:\n'
                           f'{_tail(proc.stdout)}\n{_tail(proc.stderr)}')
    return proc


def image_exists(name: str) -> bool:
    return podman('image', 'exists', name, check=False).returncode == 0


def base_images(dockerfile: str) -> List[str]:
    """Fully qualified names of the external images a Dockerfile's FROM lines use (a
    ``${ARG}`` in FROM taken at the default of the ARG line before it)."""
    stages, bases, args = set(), [], {}
    with open(dockerfile) as f:
        for line in f:
            arg = re.match(r'\s*ARG\s+(\w+)=(\S+)', line, re.I)
            if arg:
                args[arg.group(1)] = arg.group(2).strip('"')
            m = re.match(r'\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?', line, re.I)
            if not m:
                continue
            ref = re.sub(r'\$\{?(\w+)\}?', lambda v: args.get(v.group(1), v.group(0)),
                         m.group(1))
            stage = m.group(2)
            if ref not in stages and ref not in bases:
                bases.append(ref)
            if stage:
                stages.add(stage)
    return [_qualify(ref) for ref in bases]


def ensure_standin_bases(dockerfiles: Sequence[str] = (CPU_DOCKERFILE, GPU_DOCKERFILE)) -> None:
    """Makes the debootstrap stand-in once and tags it as every base the Dockerfiles name."""
    with _storage_lock():
        if not image_exists(STANDIN_IMAGE):
            _import_standin()
        for name in {b for df in dockerfiles for b in base_images(df)}:
            if not image_exists(name):
                podman('tag', STANDIN_IMAGE, name)


def build_image(dockerfile: str, tag: str, build_args: Optional[Dict[str, str]] = None,
                target: Optional[str] = None, timeout: float = BUILD_TIMEOUT) -> str:
    """Builds ``dockerfile`` from the repository root as ``tag`` on the stand-in bases.

    The host's CA bundle goes to pip as the build secret ``pipcert`` (never into the image).
    The build log is kept in ``STORAGE/logs``; a failed build raises with its end.
    """
    ensure_standin_bases()
    argv = ['build', '--pull=never', '--network', 'host', '--format', 'docker', *ULIMITS,
            '-f', dockerfile, '-t', tag]
    bundle = ca_bundle()
    if bundle:
        argv += ['--secret', f'id=pipcert,src={bundle}']
    for key, value in (build_args or {}).items():
        argv += ['--build-arg', f'{key}={value}']
    if target:
        argv += ['--target', target]
    argv.append(REPO)
    os.makedirs(os.path.join(STORAGE, 'logs'), exist_ok=True)
    log_path = os.path.join(STORAGE, 'logs', re.sub(r'[^\w.-]', '_', tag) + '.log')
    with _storage_lock(), open(log_path, 'wb') as log:
        proc = subprocess.run(podman_argv(*argv), stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout)
    if proc.returncode != 0:
        with open(log_path, 'rb') as f:
            raise RuntimeError(f'building {tag} from {dockerfile} exited {proc.returncode} '
                               f'(log: {log_path}):\n{_tail(f.read(), 6000)}')
    return tag


@functools.lru_cache(maxsize=None)
def build_cpu_image() -> str:
    """Builds docker/Dockerfile.cpu (once per process) and returns the image name."""
    return build_image(CPU_DOCKERFILE, CPU_IMAGE)


@functools.lru_cache(maxsize=None)
def build_gpu_image(line: str = 'cupy13') -> str:
    """Builds docker/Dockerfile.gpu for a CuPy line (``GPU_LINE``) on the Debian stand-in,
    which is the image's real base (Debian 12), and returns its name. Its last step runs
    ``distmulti doctor``: every CUDA library loads and kernels compile, without a GPU.

    mpi4py is compiled with -O0 here (MPI4PY_CFLAGS), 25 s instead of about 4 minutes.
    """
    return build_image(GPU_DOCKERFILE, GPU_IMAGES[line],
                       build_args={'MPI4PY_CFLAGS': '-O0', 'GPU_LINE': line},
                       timeout=GPU_BUILD_TIMEOUT)


def run_container(image: str, command: Sequence[str], *, flags: Sequence[str] = (),
                  network: str = 'none', timeout: float = 300,
                  entrypoint: Optional[str] = None) -> subprocess.CompletedProcess:
    """``podman run --rm`` of ``command`` in a new container, removed if it times out."""
    name = f'distmulti-test-{uuid.uuid4().hex[:12]}'
    argv = ['run', *RUN_FLAGS, '--name', name, '--network', network, *flags]
    if entrypoint is not None:
        argv += ['--entrypoint', entrypoint]
    try:
        return subprocess.run(podman_argv(*argv, image, *command), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        remove_containers([name])
        raise


def remove_containers(names: Sequence[str]) -> None:
    if names:
        podman('rm', '-f', '--ignore', '-t', '0', *names, check=False)


def ca_bundle() -> Optional[str]:
    """The CA bundle pip on this machine trusts, if any (for a TLS-intercepting proxy)."""
    for candidate in (os.environ.get('PIP_CERT'), os.environ.get('REQUESTS_CA_BUNDLE'),
                      os.environ.get('SSL_CERT_FILE'), '/etc/ssl/certs/ca-certificates.crt'):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def _import_standin() -> None:
    os.makedirs(STORAGE, exist_ok=True)
    rootfs = tempfile.mkdtemp(prefix='standin-rootfs-', dir=STORAGE)
    try:
        proc = subprocess.run(
            ['debootstrap', '--variant=minbase', '--include=' + ','.join(STANDIN_PACKAGES),
             'bookworm', rootfs], capture_output=True, timeout=DEBOOTSTRAP_TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f'debootstrap exited {proc.returncode}:\n{_tail(proc.stdout)}'
                               f'\n{_tail(proc.stderr)}')
        # Like the real images: no downloaded .debs, no package lists.
        for folder in ('var/cache/apt/archives', 'var/lib/apt/lists'):
            for entry in os.listdir(os.path.join(rootfs, folder)):
                path = os.path.join(rootfs, folder, entry)
                if os.path.isfile(path):
                    os.remove(path)
        tar = subprocess.run(['tar', '-C', rootfs, '-c', '.'], capture_output=True,
                             timeout=PODMAN_TIMEOUT)
        if tar.returncode != 0:
            raise RuntimeError(f'tar of the stand-in rootfs failed: {_tail(tar.stderr)}')
        podman('import', '--change', 'CMD ["python3"]', '-', STANDIN_IMAGE, input=tar.stdout,
               timeout=PODMAN_TIMEOUT)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


@contextlib.contextmanager
def _storage_lock():
    """An exclusive lock on STORAGE/lock: concurrent test processes build one at a time."""
    os.makedirs(STORAGE, exist_ok=True)
    with open(os.path.join(STORAGE, 'lock'), 'w') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _qualify(ref: str) -> str:
    """``python:3.11`` -> ``docker.io/library/python:3.11``, as podman names pulled images."""
    first, _, rest = ref.partition('/')
    if not rest:
        return f'docker.io/library/{ref}'
    if '.' in first or ':' in first or first == 'localhost':
        return ref
    return f'docker.io/{ref}'


def _tail(data, limit: int = 3000) -> str:
    if isinstance(data, bytes):
        data = data.decode('utf-8', 'replace')
    return (data or '')[-limit:]
