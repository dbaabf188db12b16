"""LogPlots: the log's plots, drawn by a separate process."""
import os
import types

import pytest
from PIL import Image

from chainer.training import extensions

from distmulti import plots

pytestmark = pytest.mark.skipif(not plots.available(), reason='matplotlib is not installed')


def entries(n, start=1):
    return [{'epoch': i, 'iteration': 10 * i, 'main/loss': 1.0 / i, 'validation/main/loss': 1.2 / i,
             'lr/base': 0.1 * i} for i in range(start, start + n)]


def test_plots_of_the_whole_log_appear_and_the_drawing_process_ends(tmp_path):
    log_report = extensions.LogReport()
    extension = plots.LogPlots(log_report, {'loss.png': ['main/loss', 'validation/main/loss'],
                                            'lr.png': ['lr/base'], 'never.png': ['absent']},
                               x_key='epoch')
    trainer = types.SimpleNamespace(out=str(tmp_path))  # LogPlots reads only the folder
    extension(trainer)                    # an empty log: nothing to draw, nothing started
    assert extension._proc is None
    log_report.log.extend(entries(2))
    extension(trainer)
    proc = extension._proc
    assert proc is not None and proc.poll() is None  # drawing happens in its own process
    log_report.log.extend(entries(3, start=3))
    extension(trainer)
    extension.finalize()
    assert proc.returncode == 0
    assert sorted(os.listdir(tmp_path)) == ['loss.png', 'lr.png']  # no key: no file, no temp
    for name in ('loss.png', 'lr.png'):
        with Image.open(tmp_path / name) as image:
            assert image.format == 'PNG' and image.size[0] > 100


def test_a_drawing_process_that_died_stops_the_plots_without_stopping_training(tmp_path):
    log_report = extensions.LogReport()
    said = []
    extension = plots.LogPlots(log_report, {'loss.png': ['main/loss']}, x_key='epoch',
                               log=said.append)
    trainer = types.SimpleNamespace(out=str(tmp_path))
    log_report.log.extend(entries(1))
    extension(trainer)
    extension._proc.kill()
    extension._proc.wait()
    for i in range(2, 40):  # enough to fill and break the pipe
        log_report.log.extend(entries(1, start=i))
        extension(trainer)
    extension.finalize()
    assert said == ['plots: the drawing process ended early; no more PNGs in this run']
