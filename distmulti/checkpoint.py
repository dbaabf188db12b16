"""Saving and loading parameters and snapshots: atomic, reproducible, and without pickles.

``save_npz`` writes a standard ``.npz`` (readable by ``numpy.load`` and Chainer's ``load_npz``)
with fixed zip timestamps, so the same parameters always give the same bytes. ``load_npz``
reads with ``allow_pickle=False``: a file that carries pickled objects is refused instead of
executed (Chainer's own ``load_npz`` allows pickles).
"""
import os
import tempfile
import zipfile

import numpy as np

import chainer
from chainer.serializers import DictionarySerializer, NpzDeserializer

from distmulti.errors import CheckpointError

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
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.tmp-' + os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            with zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED) as zf:
                for key in sorted(target):
                    value = np.asarray(chainer.backend.CpuDevice().send(target[key]))
                    info = zipfile.ZipInfo(key + '.npy', date_time=_EPOCH)
                    with zf.open(info, 'w', force_zip64=True) as member:
                        np.lib.format.write_array(member, value, allow_pickle=False)
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
            NpzDeserializer(npz, strict=strict, ignore_names=ignore_names).load(obj)
    except FileNotFoundError:
        raise CheckpointError(f'checkpoint {path!r} does not exist', collective=True) from None
    except ValueError as e:
        if 'allow_pickle' in str(e):
            raise CheckpointError(f'{path!r} contains pickled Python objects; distmulti never '
                                  f'loads pickles (they can run code), so it is refused', collective=True) from None
        raise CheckpointError(f'{path!r} does not fit this model/run: {e}',
                              collective=True) from None
    except KeyError as e:
        raise CheckpointError(f'{path!r} does not fit this model/run: missing entry {e}',
                              collective=True) from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f'{path!r} is not a readable .npz checkpoint '
                              f'(truncated or corrupted?): {e}', collective=True) from None
