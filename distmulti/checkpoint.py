"""Saving and loading parameters and checkpoints: atomic, reproducible, checked, pickle-free.

``save_npz`` writes a standard ``.npz`` (readable by ``numpy.load`` and Chainer's ``load_npz``)
with fixed zip timestamps, so the same parameters always give the same bytes. ``load_npz``
reads with ``allow_pickle=False``: a file that carries pickled objects is refused instead of
executed (Chainer's own ``load_npz`` allows pickles).

Training checkpoints are ``checkpoint_iter_N.npz`` plus a manifest ``checkpoint_iter_N.json``
(checksum, size, config hash, world size), written in that order; the newest K are kept.
"""
import contextlib
import hashlib
import json
import os
import tempfile
import time
import zipfile

import numpy as np

import chainer
from chainer.serializers import DictionarySerializer, NpzDeserializer

from distmulti.errors import CheckpointError
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
    with atomic_file(path, 'wb') as f:
        with zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED) as zf:
            for key in sorted(target):
                value = np.asarray(chainer.backend.CpuDevice().send(target[key]))
                info = zipfile.ZipInfo(key + '.npy', date_time=_EPOCH)
                with zf.open(info, 'w', force_zip64=True) as member:
                    np.lib.format.write_array(member, value, allow_pickle=False)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = 'w'):
    """A file object whose content appears at ``path`` only once complete: it is written to a
    temporary file in the same folder, flushed to disk, then renamed over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, mode, **({} if 'b' in mode else {'encoding': 'utf-8'})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    """Writes checkpoint file then manifest (each atomically) and keeps the newest ``keep``.

    A checkpoint counts only once its manifest exists, so a crash between the two leaves the
    previous checkpoint as the newest valid one.
    """
    path, manifest_path = checkpoint_paths(out, iteration)
    save_npz(path, target)
    record = dict(manifest, version=MANIFEST_VERSION, iteration=iteration,
                  file=os.path.basename(path), sha256=file_sha256(path),
                  bytes=os.path.getsize(path), written_at=time.time())
    with atomic_file(manifest_path) as f:
        f.write(json.dumps(record, indent=2, sort_keys=True))
    for old in list_checkpoints(out)[keep:]:
        for stale in checkpoint_paths(out, old):
            if os.path.exists(stale):
                os.unlink(stale)
    return path


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
    """Trainer extension: a checkpoint every ``interval`` iterations and at the last one.

    Collective: every rank's numpy random state is gathered, then rank 0 writes the whole
    trainer (parameters, every optimizer's state, iteration and epoch, stop trigger, the
    extensions' state, the random states) with a manifest. On resume each rank gets its own
    random state back when the world size is unchanged.
    """

    name = 'Checkpointer'
    trigger = (1, 'iteration')
    # After every other extension of its iteration (the log included), so that a resumed run
    # has that iteration's log entry and the extensions' triggers as an uninterrupted one.
    priority = chainer.training.PRIORITY_READER - 1

    def __init__(self, world, out: str, interval: int, keep: int, is_last, manifest: dict,
                 pause=None):
        self.world, self.out, self.interval, self.keep = world, out, interval, keep
        self.is_last = is_last
        self.manifest = manifest
        self.pause = pause or contextlib.nullcontext
        self._rng_states = None

    def __call__(self, trainer):
        updater = trainer.updater
        if updater.iteration % self.interval == 0 or self.is_last(updater):
            self.write(trainer)

    def write(self, trainer) -> None:
        states = self.world.allgather_obj(np.random.get_state())
        if not self.world.is_root:
            return
        self._rng_states = states
        try:
            with self.pause():
                write_checkpoint(self.out, trainer.updater.iteration, trainer,
                                 dict(self.manifest, world_size=self.world.size,
                                      epoch_detail=trainer.updater.epoch_detail), self.keep)
        finally:
            self._rng_states = None

    def serialize(self, serializer):
        if isinstance(serializer, chainer.serializer.Serializer):
            for rank, (_, keys, pos, has_gauss, cached) in enumerate(self._rng_states or ()):
                serializer(f'rng/{rank}/keys', np.asarray(keys, dtype=np.uint32))
                serializer(f'rng/{rank}/state', np.array([pos, has_gauss, cached], np.float64))
            return
        try:
            keys = serializer(f'rng/{self.world.rank}/keys', None)
            state = serializer(f'rng/{self.world.rank}/state', None)
        except KeyError:  # written by fewer ranks: this rank keeps its seeded state
            return
        np.random.set_state(('MT19937', np.asarray(keys, dtype=np.uint32), int(state[0]),
                             int(state[1]), float(state[2])))
