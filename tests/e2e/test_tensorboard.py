"""`--tensorboard`: the event files, read back with TensorBoard's own reader, hold the log."""
import json

import numpy as np
import pytest

import chainer

from distmulti import TrainConfig, train
from distmulti.tensorboard import tag_for

pytest.importorskip('tensorboardX', reason='the tensorboard extra is not installed '
                                           '(pip install ".[tensorboard]")')
event_accumulator = pytest.importorskip(
    'tensorboard.backend.event_processing.event_accumulator',
    reason='the tensorboard extra is not installed (pip install ".[tensorboard]")')


def read_runs(logdir):
    runs = {}
    for run in ('train', 'validation'):
        acc = event_accumulator.EventAccumulator(str(logdir / run),
                                                 size_guidance={event_accumulator.SCALARS: 0})
        acc.Reload()
        runs[run] = {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
                     for tag in acc.Tags()['scalars']}
    return runs


@chainer.training.make_extension(trigger=(1, 'iteration'),
                                 priority=chainer.training.PRIORITY_WRITER)
def report_user_value(trainer):
    chainer.report({'user/iteration_squared': float(trainer.updater.iteration ** 2)})


def test_every_number_of_the_log_is_a_scalar_tagged_metric_first(tmp_path):
    out = tmp_path / 'run'
    config = TrainConfig(out=str(out), iterations=30, eval_interval=10, train_size=160,
                         test_size=40, batchsize=16, progress=False, plot=False,
                         tensorboard=True)
    train(config, extensions=[report_user_value])
    log = json.loads((out / 'log').read_text())
    runs = read_runs(out / 'tensorboard')
    assert len(log) == 3

    # Every number of every log entry, at its iteration, in float32 as TensorBoard keeps it.
    expected = {'train': {}, 'validation': {}}
    for entry in log:
        for key, value in entry.items():
            where = tag_for(key, ['head0', 'head1', 'head2'])
            if where is not None:
                expected[where[0]].setdefault(where[1], []).append(
                    (entry['iteration'], float(np.float32(value))))
    assert runs == expected

    heads = [f'{metric}/head{i}' for metric in ('loss', 'accuracy') for i in range(3)]
    assert set(runs['validation']) == set(heads) | {'loss/total', 'accuracy/all_heads',
                                                    'samples/evaluated',
                                                    'samples/accuracy_all'}
    assert set(runs['train']) == set(heads) | {
        'loss/total', 'accuracy/all_heads', 'time/iteration_s', 'time/samples_per_s',
        'time/elapsed_s', 'progress/epoch', 'user/iteration_squared',
        'lr/base', 'lr/head0', 'lr/head1', 'lr/head2'}
    assert [step for step, _ in runs['train']['loss/head0']] == [10, 20, 30]
    # the user's value is the mean over each interval of ten iterations
    assert runs['train']['user/iteration_squared'][0][1] == pytest.approx(
        np.mean(np.arange(1, 11) ** 2))
    assert runs['validation']['samples/evaluated'] == [(10, 40.0), (20, 40.0), (30, 40.0)]
    throughput = runs['train']['time/samples_per_s'][0][1]
    assert throughput == pytest.approx(16 / runs['train']['time/iteration_s'][0][1], rel=1e-6)
