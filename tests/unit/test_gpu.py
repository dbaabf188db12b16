"""The single-GPU path through Chainer's device API (skipped without a GPU)."""
import numpy as np
import pytest

import chainer
from chainer import optimizers as O

from tests.helpers import params, run_cli, small_batch, small_net
from tests.unit.test_updater import make_updater

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize('backward', ['fused', 'per_loss'])
def test_updater_on_cupy_matches_the_cpu(backward):
    x, y = small_batch(3, 48)
    results = []
    for spec in ('@numpy', '@cupy:0'):
        device = chainer.get_device(spec)
        net = small_net(3)
        opts = {'base': O.Adam(alpha=1e-2), 'head0': O.MomentumSGD(lr=0.1),
                'head1': O.SGD(lr=0.1), 'head2': O.Adam()}
        upd = make_updater(net, x, y, optimizers=opts, backward=backward, device=device)
        with chainer.Reporter().scope({}):
            for _ in range(5):
                upd.update()
        net.to_device('@numpy')
        results.append(params(net))
    for name, value in results[0].items():
        np.testing.assert_allclose(results[1][name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_train_on_one_gpu_end_to_end(tmp_path):
    proc = run_cli(['train', '--device', '@cupy:0', '--out', tmp_path, '--iterations', '60',
                    '--no-progress', '--no-plot', '--train-size', '960', '--test-size', '200'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / 'result.json').exists() and (tmp_path / 'model.npz').exists()
