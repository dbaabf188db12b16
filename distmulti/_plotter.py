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
            draw(setup, entries, Figure, FigureCanvasAgg)
            pending = False
    return 0


def draw(setup, entries, Figure, FigureCanvasAgg) -> None:
    x_key = setup['x_key']
    for filename, keys in setup['plots'].items():
        figure = Figure(figsize=(6.4, 4.0))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot(111)
        axes.set_xlabel(x_key)
        axes.grid()
        for key in keys:
            points = [(e[x_key], e[key]) for e in entries if key in e and x_key in e]
            if points:
                xs, ys = zip(*points)
                axes.plot(xs, ys, marker='x', label=key)
        if not axes.has_data():
            continue
        axes.legend(loc='best', fontsize='small')
        figure.tight_layout()
        path = os.path.join(setup['out'], filename)
        tmp = os.path.join(setup['out'], f'{setup["tmp_prefix"]}{filename}')
        figure.savefig(tmp, format='png')
        os.replace(tmp, path)


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group
        sys.exit(130)
