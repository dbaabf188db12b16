"""save_npz / load_npz: reproducible bytes, atomic writes, no pickles, clear errors."""
import os

import numpy as np
import pytest

import chainer

from distmulti.checkpoint import load_npz, save_npz
from distmulti.errors import CheckpointError
from tests.helpers import Payload, params, sha256, small_net


def test_same_parameters_give_the_same_bytes_and_chainer_can_read_them(tmp_path):
    a, b = str(tmp_path / 'a.npz'), str(tmp_path / 'b.npz')
    save_npz(a, small_net(2, seed=1))
    save_npz(b, small_net(2, seed=1))
    assert sha256(a) == sha256(b)
    with np.load(a) as npz:
        assert 'base/conv1/W' in npz.files and 'head1/l2/b' in npz.files
    loaded = small_net(2, seed=9)
    chainer.serializers.load_npz(a, loaded)  # interoperable with Chainer's reader
    for name, value in params(small_net(2, seed=1)).items():
        np.testing.assert_array_equal(params(loaded)[name], value)


def test_save_leaves_no_temporary_file_and_replaces_atomically(tmp_path):
    path = str(tmp_path / 'm.npz')
    save_npz(path, small_net(1, seed=1))
    save_npz(path, small_net(1, seed=2))
    assert os.listdir(tmp_path) == ['m.npz']


def test_a_file_carrying_a_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    marker = str(tmp_path / 'payload-ran')
    path = str(tmp_path / 'evil.npz')
    net = small_net(1)
    arrays = {k.lstrip('/'): v for k, v in params(net).items()}
    arrays['base/conv1/W'] = np.array([Payload(marker)], dtype=object)
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match='contains pickled Python objects'):
        load_npz(path, small_net(1))
    assert not os.path.exists(marker)
    # Sanity: the file really carries a working payload.
    with np.load(path, allow_pickle=True) as npz:
        npz['base/conv1/W']
    assert os.path.exists(marker)


def test_a_pickle_in_a_member_the_loader_would_not_read_is_refused_too(tmp_path):
    marker = str(tmp_path / 'payload-ran')
    path = str(tmp_path / 'extra.npz')
    arrays = {k.lstrip('/'): v for k, v in params(small_net(1)).items()}
    arrays['unused/extra'] = np.array([Payload(marker)], dtype=object)
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match="pickled Python objects \\(in 'unused/extra.npy'\\)"):
        load_npz(path, small_net(1))
    assert not os.path.exists(marker)


def test_truncated_and_missing_files_get_clear_errors(tmp_path):
    path = str(tmp_path / 'm.npz')
    save_npz(path, small_net(1))
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupted'):
        load_npz(path, small_net(1))
    with pytest.raises(CheckpointError, match='does not exist'):
        load_npz(str(tmp_path / 'nope.npz'), small_net(1))


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    path = str(tmp_path / 'm.npz')
    save_npz(path, small_net(2))
    with pytest.raises(CheckpointError, match='does not fit this model'):
        load_npz(path, small_net(3))
