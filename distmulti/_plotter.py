"""The plot-drawing process behind ``distmulti.plots.LogPlots`` (run as a script by path, so
it imports only the standard library and matplotlib, not chainer or distmulti).

stdin carries JSON lines: first the setup ``{"out", "x_key", "plots": {file: [keys]},
"tmp_prefix"}``, then batches of new log entries (lists of dicts). After reading everything
that has arrived it draws every plot once from all entries so far, so a slow drawing skips
intermediate states but never the last one; at end of input it draws what is pending and
exits. Each PNG is written to a temporary file and renamed, so a reader never sees half a
file.
"""
import json
import os
import select
import sys


def main() -> int:
    try:
        os.nice(5)  # training comes first
    except OSError:
        pass
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stream = sys.stdin
    setup = json.loads(stream.readline())
    plots = Plots(setup, Figure, FigureCanvasAgg)
    entries, pending, done = [], False, False
    while not done:
        # Block for the next line, then take whatever else is already there.
        while True:
            line = stream.readline()
            if not line:
                done = True
                break
            entries.extend(json.loads(line))
            pending = True
            if not select.select([stream], [], [], 0)[0]:
                break
        if pending:
            plots.draw(entries)
            pending = False
    return 0


class Plots:
    """One figure per file, made once; each drawing only replaces the lines' data (three
    times cheaper than a new figure each time), with fixed margins and fast PNG compression."""

    def __init__(self, setup, Figure, FigureCanvasAgg):
        self.setup = setup
        self.figures = {}
        for filename in setup['plots']:
            figure = Figure(figsize=(6.4, 4.0))
            FigureCanvasAgg(figure)
            axes = figure.add_subplot(111)
            axes.set_xlabel(setup['x_key'])
            axes.grid()
            figure.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.96)
            self.figures[filename] = (figure, axes, {})

    def draw(self, entries) -> None:
        x_key, out = self.setup['x_key'], self.setup['out']
        for filename, keys in self.setup['plots'].items():
            figure, axes, lines = self.figures[filename]
            for key in keys:
                points = [(e[x_key], e[key]) for e in entries if key in e and x_key in e]
                if not points:
                    continue
                if key not in lines:
                    lines[key], = axes.plot([], [], marker='x', label=key)
                lines[key].set_data(*zip(*points))
            if not lines:
                continue
            axes.relim()
            axes.autoscale_view()
            axes.legend(loc='best', fontsize='small')
            tmp = os.path.join(out, f'{self.setup["tmp_prefix"]}{filename}')
            figure.savefig(tmp, format='png', pil_kwargs={'compress_level': 1})
            os.replace(tmp, os.path.join(out, filename))


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group
        sys.exit(130)
