"""Saving and loading parameters and checkpoints: atomic, reproducible, checked, pickle-free.

``save_npz`` writes a standard ``.npz`` (readable by ``numpy.load`` and Chainer's ``load_npz``)
with fixed zip timestamps, so the same parameters always give the same bytes. ``load_npz``
reads with ``allow_pickle=False``: a file that carries pickled objects is refused instead of
executed (Chainer's own ``load_npz`` allows pickles).

Training checkpoints are ``checkpoint_iter_N.npz`` plus a manifest ``checkpoint_iter_N.json``
(checksum, size, config hash, world size, lineage), written in that order; the newest K of
the run's own lineage are kept. Every file is created readable as the umask allows (a project
group sharing the folder can read it), and a full disk is one clear error that names the file
and the space, leaving the previous file of that name as it was.
"""
import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile

import numpy as np

import chainer
from chainer.serializers import DictionarySerializer, NpzDeserializer

from distmulti import devices, errors, watchdog
from distmulti.errors import CheckpointError, DistmultiError, OutputError
from distmulti.runfiles import CHECKPOINT_PREFIX, TMP_PREFIX

_EPOCH = (1980, 1, 1, 0, 0, 0)


def save_npz(path: str, obj) -> None:
    """Serializes ``obj`` (a link, optimizer, updater or trainer, or a dict of arrays that
    Chainer's ``serialize`` made from one) to ``path``, atomically.

    The file is written to a temporary name in the same directory, flushed, then renamed, so a
    crash never leaves a half-written file under ``path``.
    """
    if isinstance(obj, dict):
        target = obj
    else:
        serializer = DictionarySerializer()
        serializer.save(obj)
        target = serializer.target
    arrays = {key: np.asarray(chainer.backend.CpuDevice().send(value))
              for key, value in target.items()}
    size = sum(a.nbytes for a in arrays.values())
    with watchdog.busy(f'writing {path}'), atomic_file(path, 'wb', expected_bytes=size) as f:
        with zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED) as zf:
            for key in sorted(arrays):
                info = zipfile.ZipInfo(key + '.npy', date_time=_EPOCH)
                with zf.open(info, 'w', force_zip64=True) as member:
                    np.lib.format.write_array(member, arrays[key], allow_pickle=False)


def file_mode() -> int:
    """The mode ``open()`` would give a new file here: 0o666 less the process umask."""
    try:
        with open('/proc/self/status', encoding='ascii') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read the umask by setting it (and put it back)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_file(path: str, mode: str = 'w', expected_bytes: int = 0):
    """A file object whose content appears at ``path`` only once complete: it is written to a
    temporary file in the same folder, flushed to disk, then renamed over ``path``.

    The file gets the mode a plain ``open()`` would give it (group-readable under the usual
    umasks). When the filesystem is full (or the folder cannot be written), the temporary
    file is removed, ``path`` keeps its previous content, and OutputError says which file and
    how much space there is; ``expected_bytes`` (about the file's size) goes in that message.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path), dir=directory)
    except OSError as e:
        raise _output_error(path, e, expected_bytes) from None
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, mode, **({} if 'b' in mode else {'encoding': 'utf-8'})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _output_error(path, e, expected_bytes) from None
        raise


def _output_error(path: str, error: OSError, expected_bytes: int) -> OutputError:
    """One sentence for a failed write: which file, why, and for a full disk the space."""
    directory = os.path.dirname(os.path.abspath(path))
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f'{shutil.disk_usage(directory).free / 1e6:.1f} MB'
        except OSError:
            free = 'an unknown amount'
        need = f'about {expected_bytes / 1e6:.1f} MB' if expected_bytes else 'more room'
        return OutputError(f'no space left to write {path}: it needs {need} and {free} are '
                           f'free on that filesystem; the file written before it is kept as '
                           f'it was; free some space or choose another --out')
    return OutputError(f'cannot write {path}: {error.strerror or error}; the file written '
                       f'before it is kept as it was; check that the folder exists and is '
                       f'writable, or choose another --out')


def load_npz(path: str, obj, strict: bool = True, ignore_names=None) -> None:
    """Loads ``path`` into ``obj`` without ever unpickling; raises CheckpointError on bad files.

    ``ignore_names``: keys (or predicates on keys) to leave as they are in ``obj``.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            _refuse_object_arrays(path, npz)
            NpzDeserializer(npz, strict=strict, ignore_names=ignore_names).load(obj)
    except FileNotFoundError:
        raise CheckpointError(f'checkpoint {path!r} does not exist', collective=True) from None
    except ValueError as e:
        if 'allow_pickle' in str(e):
            raise CheckpointError(f'{path!r} contains pickled Python objects; distmulti never '
                                  f'loads pickles (they can run code), so it is refused',
                                  collective=True) from None
        raise CheckpointError(f'{path!r} does not fit this model/run: {e}',
                              collective=True) from None
    except KeyError as e:
        raise CheckpointError(f'{path!r} does not fit this model/run: missing entry {e}',
                              collective=True) from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f'{path!r} is not a readable .npz checkpoint '
                              f'(truncated or corrupted?): {e}', collective=True) from None


def _refuse_object_arrays(path: str, npz) -> None:
    """Refuses a file with any pickled member, even one the loader would not read."""
    for name in npz.zip.namelist():
        with npz.zip.open(name) as member:
            version = np.lib.format.read_magic(member)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            _, _, dtype = read_header(member)
        if dtype.hasobject:
            raise CheckpointError(f'{path!r} contains pickled Python objects (in {name!r}); '
                                  f'distmulti never loads pickles (they can run code), so it '
                                  f'is refused', collective=True)


# -- training checkpoints: file + manifest, rotation, integrity -------------------------------

MANIFEST_VERSION = 1


def checkpoint_paths(out: str, iteration: int):
    """(checkpoint file, manifest file) of the checkpoint at ``iteration`` in ``out``."""
    base = os.path.join(out, f'{CHECKPOINT_PREFIX}{iteration}')
    return base + '.npz', base + '.json'


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def config_hash(config_dict: dict) -> str:
    """Hash of the options that define what is trained (not where or for how long)."""
    from distmulti.config import TrainConfig
    free = TrainConfig.resume_free_keys()
    relevant = {k: v for k, v in config_dict.items() if k not in free}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def write_checkpoint(out: str, iteration: int, target, manifest: dict, keep: int) -> str:
    """Writes checkpoint file then manifest (each atomically) and keeps the newest ``keep``
    checkpoints of the same lineage (``manifest['lineage']``): checkpoints of other runs are
    never deleted here.

    A checkpoint counts only once its manifest exists, so a crash between the two leaves the
    previous checkpoint as the newest valid one.
    """
    path, manifest_path = checkpoint_paths(out, iteration)
    started = time.monotonic()
    save_npz(path, target)
    with watchdog.busy(f'checksumming {path}'):
        digest = file_sha256(path)
    record = dict(manifest, version=MANIFEST_VERSION, iteration=iteration,
                  file=os.path.basename(path), sha256=digest,
                  bytes=os.path.getsize(path), written_at=time.time(),
                  write_seconds=round(time.monotonic() - started, 3))
    with atomic_file(manifest_path) as f:
        f.write(json.dumps(record, indent=2, sort_keys=True))
    for old in rotation(out, manifest.get('lineage'), keep):
        for stale in checkpoint_paths(out, old):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
    return path


def read_manifest(out: str, iteration: int):
    """The manifest of the checkpoint at ``iteration``, or None when missing or unreadable."""
    try:
        with open(checkpoint_paths(out, iteration)[1], encoding='utf-8') as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def rotation(out: str, lineage, keep: int):
    """Iterations of the checkpoints to delete so that ``lineage`` keeps its newest ``keep``.

    Only checkpoints whose manifest names ``lineage`` are considered, so a run never deletes
    another run's checkpoints (those of an abandoned branch are set aside at start instead).
    """
    if lineage is None:
        return []
    own = [it for it in list_checkpoints(out)
           if (read_manifest(out, it) or {}).get('lineage') == lineage]
    return own[keep:]


def list_checkpoints(out: str):
    """Iterations that have a checkpoint file or manifest in ``out``, newest first."""
    found = set()
    if os.path.isdir(out):
        for name in os.listdir(out):
            stem, ext = os.path.splitext(name)
            if name.startswith(CHECKPOINT_PREFIX) and ext in ('.npz', '.json'):
                suffix = stem[len(CHECKPOINT_PREFIX):]
                if suffix.isdigit():
                    found.add(int(suffix))
    return sorted(found, reverse=True)


def verify_checkpoint(out: str, iteration: int) -> dict:
    """Returns the manifest of a checkpoint whose file matches it; raises CheckpointError."""
    path, manifest_path = checkpoint_paths(out, iteration)
    try:
        with open(manifest_path, encoding='utf-8') as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f'{path} has no manifest (its write did not finish)') from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f'manifest {manifest_path} is unreadable: {e}') from None
    if not os.path.exists(path):
        raise CheckpointError(f'{path} is missing')
    size = os.path.getsize(path)
    if size != manifest.get('bytes'):
        raise CheckpointError(f'{path} has {size} bytes, its manifest says '
                              f'{manifest.get("bytes")} (truncated?)')
    if file_sha256(path) != manifest.get('sha256'):
        raise CheckpointError(f'{path} does not match the checksum in its manifest (corrupted)')
    return manifest


def newest_valid_checkpoint(out: str, log):
    """(path, manifest) of the newest checkpoint that passes its integrity check, or None.

    Each newer one that fails is reported through ``log`` in one line and skipped.
    """
    for iteration in list_checkpoints(out):
        try:
            manifest = verify_checkpoint(out, iteration)
        except CheckpointError as e:
            log(f'skipping checkpoint at iteration {iteration}: {e}')
            continue
        return checkpoint_paths(out, iteration)[0], manifest
    return None


class Checkpointer(chainer.training.Extension):
    """Trainer extension: a checkpoint every ``interval`` iterations, at the last one, and at
    the iteration where the ranks agreed to stop (``updater.stop_agreed``).

    Collective: every rank's numpy random state (and the seed its GPU generator goes on from,
    see distmulti.devices) is gathered, then rank 0 writes the whole trainer (parameters,
    every optimizer's state, iteration and epoch, stop trigger, the extensions' state, the
    random states) with a manifest, then every rank learns whether the write succeeded (so a
    full disk is the same error on every rank, and no rank leaves before the checkpoint is
    complete). On resume each rank gets its own random state back when the world size is
    unchanged. It runs after every other extension of its iteration, so the checkpoint holds
    that iteration's log entry too.
    """

    name = 'Checkpointer'
    trigger = (1, 'iteration')
    # After every other extension of its iteration (the log included), so that a resumed run
    # has that iteration's log entry and the extensions' triggers as an uninterrupted one.
    priority = chainer.training.PRIORITY_READER - 1

    def __init__(self, world, out: str, interval: int, keep: int, is_last, manifest: dict):
        self.world, self.out, self.interval, self.keep = world, out, interval, keep
        self.is_last = is_last
        self.manifest = manifest
        self._rng_states = None
        self._gpu_seeds = None
        self.last_written = None  # (iteration, path) of the newest checkpoint this run wrote

    def __call__(self, trainer):
        updater = trainer.updater
        if (updater.iteration % self.interval == 0 or self.is_last(updater)
                or getattr(updater, 'stop_agreed', False)):
            self.write(trainer)

    def write(self, trainer) -> None:
        gathered = self.world.allgather_obj((np.random.get_state(),
                                             devices.checkpoint_gpu_seed()))
        error = None
        if self.world.is_root:
            self._rng_states = [state for state, _ in gathered]
            self._gpu_seeds = [gpu_seed for _, gpu_seed in gathered]
            try:
                write_checkpoint(self.out, trainer.updater.iteration, trainer,
                                 dict(self.manifest, world_size=self.world.size,
                                      epoch_detail=trainer.updater.epoch_detail), self.keep)
            except DistmultiError as e:
                error = (type(e).__name__, str(e))
            finally:
                self._rng_states = self._gpu_seeds = None
        # Every rank waits for the write and learns its outcome: one collective.
        error = self.world.allgather_obj(error)[0]
        if error is not None:
            raise getattr(errors, error[0])(error[1], collective=True)
        self.last_written = (trainer.updater.iteration,
                             checkpoint_paths(self.out, trainer.updater.iteration)[0])

    def serialize(self, serializer):
        if isinstance(serializer, chainer.serializer.Serializer):
            for rank, (_, keys, pos, has_gauss, cached) in enumerate(self._rng_states or ()):
                serializer(f'rng/{rank}/keys', np.asarray(keys, dtype=np.uint32))
                serializer(f'rng/{rank}/state', np.array([pos, has_gauss, cached], np.float64))
            for rank, gpu_seed in enumerate(self._gpu_seeds or ()):
                if gpu_seed is not None:  # the rank's CuPy generator (distmulti.devices)
                    serializer(f'rng/{rank}/gpu_seed', np.asarray(gpu_seed, np.int64))
            return
        try:
            keys = serializer(f'rng/{self.world.rank}/keys', None)
            state = serializer(f'rng/{self.world.rank}/state', None)
        except KeyError:  # written by fewer ranks: this rank keeps its seeded state
            return
        np.random.set_state(('MT19937', np.asarray(keys, dtype=np.uint32), int(state[0]),
                             int(state[1]), float(state[2])))
        try:
            devices.restore_gpu_seed(int(serializer(f'rng/{self.world.rank}/gpu_seed', None)))
        except KeyError:  # written on the CPU, or before GPU generators were checkpointed
            pass
