"""IterationTimer in a real Trainer, on an injected clock: only the updates are timed."""
import chainer
import chainer.links as L
import pytest
from chainer import training
from chainer.iterators import SerialIterator
from chainer.training import extensions

from distmulti.timing import IterationTimer


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class SlowUpdater(training.StandardUpdater):
    """Each update takes 0.5 s on the clock (and 0.25 s more on every fourth iteration)."""

    def __init__(self, clock):
        optimizer = chainer.optimizers.SGD()
        optimizer.setup(L.Linear(1, 1))
        super().__init__(SerialIterator(list(range(8)), 2), optimizer)
        self.clock = clock

    def update_core(self):
        self.get_iterator('main').next()
        self.clock.now += 0.5 + (0.25 if (self.iteration + 1) % 4 == 0 else 0.0)


def test_mean_update_time_and_throughput_per_report_leave_extensions_out(tmp_path):
    clock = Clock()
    trainer = training.Trainer(SlowUpdater(clock), (8, 'iteration'), out=str(tmp_path))

    def advance(seconds):
        def extension(trainer):
            clock.now += seconds
        return extension

    # An "evaluation" before the log and a "plot" after it: neither is an update.
    trainer.extend(advance(100.0), trigger=(4, 'iteration'), name='evaluation',
                   priority=training.PRIORITY_WRITER)
    log = extensions.LogReport(trigger=(4, 'iteration'), log_name=None)
    trainer.extend(log)
    trainer.extend(advance(7.0), name='plot', priority=training.PRIORITY_READER)
    for extension, name in IterationTimer(32, (4, 'iteration'), clock=clock).extensions():
        trainer.extend(extension, name=name)
    trainer.run()

    assert [entry['iteration'] for entry in log.log] == [4, 8]
    for entry in log.log:  # four updates: 0.5 + 0.5 + 0.5 + 0.75 seconds
        assert entry['time/iteration_s'] == pytest.approx(2.25 / 4)
        assert entry['time/samples_per_s'] == pytest.approx(32 * 4 / 2.25)
