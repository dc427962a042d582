"""Training curves from train.py's summary.csv: loss, top-1, lr and images/s against epoch, one PNG. Beside the
copy (README, "What to copy"): logs.py draws the run folder's curves.png with it after each epoch, when this file
and matplotlib are there (matplotlib imported only to draw, with the Agg canvas).

    python curves.py output/train/RUN [RUN2 ...] [--out curves.png]   # redraw / overlay runs
"""

import csv
import os

import distributed
import errors
from checkpoint import atomic_write

CURVE_PANELS = (  # panel title, then (summary.csv column, line style) drawn in it
    ('loss (log scale)', (('train_loss', '-'), ('eval_loss', '--'))),
    ('top-1 (%)', (('eval_top1', '-'), ('ema_top1', '--'))),
    ('learning rate', (('lr', '-'),)),
    ('images/s', (('images_per_sec', '-'),)),
)


def plot_curves(run_dirs, out_path):
    """Draw loss, top-1, lr and images/s against epoch for each run folder's summary.csv into
    out_path (PNG); several folders are overlaid, one colour each. Returns the Figure."""
    from matplotlib.figure import Figure  # ImportError when matplotlib is missing: callers decide
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 7), layout='constrained')
    axes = fig.subplots(2, 2).flatten()
    for ax, (title, _) in zip(axes, CURVE_PANELS):
        ax.set(title=title, xlabel='epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_yscale('log')  # early losses (an eval loss of 30 at epoch 0) would flatten the rest
    for index, run_dir in enumerate(run_dirs):
        summary_path = os.path.join(run_dir, 'summary.csv')
        if not os.path.exists(summary_path):
            raise errors.UsageError(f'{run_dir} has no summary.csv: not a run folder of train.py')
        with open(summary_path, newline='') as f:
            rows = list(csv.DictReader(f))
        name = os.path.basename(os.path.normpath(run_dir))
        for ax, (_, columns) in zip(axes, CURVE_PANELS):
            for column, style in columns:
                points = [(float(row['epoch']), float(row[column])) for row in rows if row.get(column)]
                if not points:
                    continue  # e.g. ema_top1 of a run without --model-ema
                label = column if len(run_dirs) == 1 else f'{name}: {column}'
                ax.plot(
                    *zip(*points),
                    style,
                    color=f'C{index % 10}',
                    label=label,
                    marker='o' if len(points) <= 50 else None,
                    markersize=3,
                )
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize='small')
    fig.suptitle(', '.join(os.path.basename(os.path.normpath(d)) for d in run_dirs))
    atomic_write(out_path, lambda f: fig.savefig(f, dpi=100, format='png'))  # never half a PNG
    return fig


if __name__ == '__main__':
    import argparse

    parser = argparse.ArgumentParser(
        description='Redraw training curves from train.py run folders: loss, '
        'top-1, lr, images/s vs epoch; several runs overlay.'
    )
    parser.add_argument('run_dirs', nargs='+', metavar='DIR', help='folders holding summary.csv')
    parser.add_argument('--out', help='PNG to write; default: DIR/curves.png for one run, curves.png here for several')
    cli = parser.parse_args()
    out = cli.out or (os.path.join(cli.run_dirs[0], 'curves.png') if len(cli.run_dirs) == 1 else 'curves.png')
    with distributed.one_line_errors():
        try:
            plot_curves(cli.run_dirs, out)
        except ImportError:
            raise errors.UsageError('drawing curves needs matplotlib: pip install matplotlib') from None
        except OSError as e:
            raise errors.UsageError(f'cannot write {out}: {e.strerror}') from None
    print(f'wrote {out}')
