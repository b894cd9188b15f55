"""Loss curves of training runs: python plot.py OUT_DIR [OUT_DIR ...] [--x iter|time] [--out PNG]

Reads each OUT_DIR/metrics.jsonl as train.py writes it. One run: the training loss of each logged
iteration, the train/val estimates of each evaluation and, if present, the final whole-val-split loss.
Several runs: each run's val loss (and whole-split loss) in its own colour, so recipes compare at a
glance, against iterations or, with --x time, against the wall time since each run started.
Needs matplotlib (pip install matplotlib).
"""

import sys
from argparse import ArgumentParser, Namespace, RawDescriptionHelpFormatter
from pathlib import Path

from metrics import metrics_path, read_records
from runtime import ConfigError, UserError, exit_on_error

Point = tuple[int, float | None, float]  # (iteration, seconds since the run started, value)


def read_series(path: Path) -> dict[str, list[Point]]:
    """Every metric's points in file order. A resumed run drops the records it replays, so an
    iteration appears once; a line cut short by a run still writing is skipped."""
    records, skipped = read_records(path)
    series: dict[str, list[Point]] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("iter", "elapsed_s") and isinstance(value, (int, float)):
                series.setdefault(key, []).append((record["iter"], record.get("elapsed_s"), value))
    if skipped:
        print(f"warning: skipped {skipped} unreadable line(s) of {path}", file=sys.stderr)
    return series


SINGLE_RUN_STYLES = [
    ("loss", "train loss (batch)", dict(alpha=0.4, linewidth=1)),
    ("train_loss", "train loss (eval)", dict(marker="o")),
    ("val_loss", "val loss (eval)", dict(marker="o")),
    ("val_loss_full", "val loss (whole split)", dict(marker="*", markersize=14, linestyle="")),
]


def parse_args(argv: list[str] | None) -> Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="training runs' out_dirs")
    parser.add_argument("--x", choices=["iter", "time"], default="iter", help="iterations or wall time")
    parser.add_argument("--out", default=None, help="the PNG to write (default: FIRST_OUT_DIR/loss.png)")
    return parser.parse_args(argv)


def plot(argv: list[str] | None) -> None:
    args, runs = parse_args(argv), {}
    for out_dir in args.out_dirs:
        path = metrics_path(out_dir)
        if not path.is_file():
            raise UserError(f"no {path}; train first (python train.py ... --out_dir={out_dir})")
        runs[out_dir] = read_series(path)
        if not {"loss", "train_loss", "val_loss"} & runs[out_dir].keys():
            raise UserError(f"{path} holds no loss values yet")
    try:
        import matplotlib
    except ImportError:
        raise UserError("plot.py needs matplotlib, an optional dependency: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    def xy(points: list[Point]) -> tuple[list[float], list[float]]:
        kept = [p for p in points if args.x == "iter" or p[1] is not None]  # older logs have no times
        return [p[0] if args.x == "iter" else p[1] for p in kept], [p[2] for p in kept]

    fig, ax = plt.subplots(figsize=(8, 5))
    out = Path(args.out) if args.out else Path(args.out_dirs[0]) / "loss.png"
    formats = fig.canvas.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        raise ConfigError(f"--out={out}: name an image file ending in one of .{', .'.join(sorted(formats))}")
    if not out.parent.is_dir():
        raise UserError(f"--out={out}: folder {out.parent} does not exist; create it or choose another")
    if len(runs) == 1:
        (series,) = runs.values()
        for key, label, style in SINGLE_RUN_STYLES:
            if key in series:
                ax.plot(*xy(series[key]), label=label, **style)
    else:
        for (name, series), color in zip(runs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 9):
            ax.plot(*xy(series.get("loss", [])), color=color, alpha=0.25, linewidth=1)
            ax.plot(*xy(series.get("val_loss", [])), color=color, marker="o", label=f"{name}: val loss")
            if "val_loss_full" in series:
                x, y = xy(series["val_loss_full"])
                ax.plot(
                    x, y, color=color, marker="*", markersize=14, linestyle="", label=f"{name}: whole split"
                )
    xlabel = "iteration" if args.x == "iter" else "wall time since the run started (s)"
    ax.set(xlabel=xlabel, ylabel="cross-entropy loss (nats per token)", title=", ".join(runs))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out, dpi=120, bbox_inches="tight")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    exit_on_error(lambda: plot(argv))


if __name__ == "__main__":
    main()
