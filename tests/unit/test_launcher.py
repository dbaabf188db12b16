"""`distmulti launch`: the mpiexec argv, built by pure functions and compared whole. Nothing
here starts a job: --dry-run only runs `mpiexec --version`, under a 30 s timeout."""
import os
import sys

import pytest

from distmulti.cli import main
from distmulti.errors import ConfigError
from distmulti.launcher import (build_mpiexec_argv, forwarded_env, launch_env, mpi_flavor)

TRAIN = ['--epoch', '2', '--out', 'o']


def test_open_mpi_as_root_with_more_ranks_than_cores():
    argv = build_mpiexec_argv(mpiexec='/v/bin/mpiexec', flavor='openmpi', nprocs=4,
                              train_args=TRAIN, python='/v/bin/python', as_root=True,
                              cpu_count=2, env_names=['OMP_NUM_THREADS', 'PATH'])
    assert argv == ['/v/bin/mpiexec', '-n', '4', '--allow-run-as-root', '--oversubscribe',
                    '-x', 'OMP_NUM_THREADS', '-x', 'PATH', '/v/bin/python', '-m', 'mpi4py',
                    '-m', 'distmulti', 'train', '--epoch', '2', '--out', 'o']


def test_open_mpi_with_a_hostfile_as_a_user():
    argv = build_mpiexec_argv(mpiexec='mpiexec', flavor='openmpi', nprocs=8, train_args=[],
                              python='python3', hostfile='hosts', cpu_count=2,
                              mpi_args=['--bind-to', 'none'])
    assert argv == ['mpiexec', '-n', '8', '--hostfile', 'hosts', '--bind-to', 'none',
                    'python3', '-m', 'mpi4py', '-m', 'distmulti', 'train']


def test_mpich_uses_its_own_flags_and_needs_no_root_or_oversubscribe_flag():
    argv = build_mpiexec_argv(mpiexec='mpiexec', flavor='mpich', nprocs=4, train_args=TRAIN,
                              python='python3', hostfile='hosts', as_root=True, cpu_count=1,
                              env_names=['PATH', 'NCCL_DEBUG'])
    assert argv == ['mpiexec', '-n', '4', '-f', 'hosts', '-envlist', 'PATH,NCCL_DEBUG',
                    'python3', '-m', 'mpi4py', '-m', 'distmulti', 'train'] + TRAIN


@pytest.mark.parametrize('text,flavor', [
    ('mpiexec (Open MPI) 5.0.11\n\nReport bugs to https://www.open-mpi.org/', 'openmpi'),
    ('prterun (Open MPI) 5.0.3', 'openmpi'),
    ('HYDRA build details:\n    Version:  4.2.0', 'mpich'),
    ('Intel(R) MPI Library for Linux* OS, Version 2021.10', 'mpich')])
def test_flavor_detection(text, flavor):
    assert mpi_flavor(text) == flavor


def test_unknown_mpi_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown MPI implementation \\('SuperMPI 1.0'\\)"):
        mpi_flavor('SuperMPI 1.0\n')


def test_environment_forwarding_and_thread_share():
    env = {'PATH': '/bin', 'HOME': '/root', 'NCCL_DEBUG': 'INFO', 'SECRET_TOKEN': 'x'}
    assert forwarded_env(env) == ['NCCL_DEBUG', 'PATH']
    assert launch_env(env, nprocs=2, hostfile=None, cpu_count=8)['OMP_NUM_THREADS'] == '4'
    assert 'OMP_NUM_THREADS' not in launch_env(env, nprocs=2, hostfile='h', cpu_count=8)
    assert launch_env(dict(env, OMP_NUM_THREADS='3'), 2, None, 8)['OMP_NUM_THREADS'] == '3'


def test_dry_run_prints_the_command_for_this_machine(capsys):
    mpiexec = os.path.join(os.path.dirname(sys.executable), 'mpiexec')
    if not os.access(mpiexec, os.X_OK):
        pytest.skip('no mpiexec beside this Python')
    assert main(['launch', '-n', '2', '--dry-run', '--', '--epoch', '1']) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f'{mpiexec} -n 2 ')
    assert line.endswith(f'{sys.executable} -m mpi4py -m distmulti train --epoch 1')


@pytest.mark.parametrize('word', [[], ['train']])
def test_the_train_word_after_the_separator_is_optional(word, capsys):
    mpiexec = os.path.join(os.path.dirname(sys.executable), 'mpiexec')
    if not os.access(mpiexec, os.X_OK):
        pytest.skip('no mpiexec beside this Python')
    assert main(['launch', '-n', '2', '--dry-run', '--', *word, '--epoch', '3']) == 0
    line = capsys.readouterr().out.strip()
    assert line.endswith(' -m mpi4py -m distmulti train --epoch 3'), line


@pytest.mark.parametrize('args,message', [
    (['-n', '0', '--'], '-n must be at least 1, got 0'),
    (['-n', '2', '--hostfile', 'nope.txt', '--'], "hostfile 'nope.txt' does not exist"),
    (['-n', '2', '--', '--batchsize', '0'], 'batchsize must be an integer >= 1, got 0'),
])
def test_launch_checks_its_input_before_starting_anything(args, message, capsys):
    assert main(['launch'] + args) == 2
    assert message in capsys.readouterr().err
