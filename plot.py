"""Loss curves of a training run: python plot.py OUT_DIR [--out PNG]

Reads OUT_DIR/metrics.jsonl as train.py writes it and draws the training loss of each logged
iteration, the train/val estimates of each evaluation and, if present, the final whole-val-split loss.
Needs matplotlib (pip install matplotlib).
"""

import argparse
import json
import sys
from pathlib import Path


def read_series(path: Path) -> dict[str, dict[int, float]]:
    """Every metric as {iter: value}. A resumed run appends iterations again; the later line wins."""
    series: dict[str, dict[int, float]] = {}
    skipped = 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # e.g. a line cut short by a run that is still writing
            skipped += line.strip() != ""
            continue
        for key, value in record.items():
            if key != "iter" and isinstance(value, (int, float)):
                series.setdefault(key, {})[record["iter"]] = value
    if skipped:
        print(f"warning: skipped {skipped} unreadable line(s) of {path}", file=sys.stderr)
    return series


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", help="a training run's out_dir, holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="the PNG to write (default: OUT_DIR/loss.png)")
    args = parser.parse_args(argv)
    path = Path(args.out_dir) / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"error: no {path}; train first (python train.py ... --out_dir={args.out_dir})")
    try:
        import matplotlib
    except ImportError:
        sys.exit("error: plot.py needs matplotlib, an optional dependency: pip install matplotlib")
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    series = read_series(path)
    if not {"loss", "train_loss", "val_loss"} & series.keys():
        sys.exit(f"error: {path} holds no loss values yet")
    styles = [
        ("loss", "train loss (batch)", dict(alpha=0.4, linewidth=1)),
        ("train_loss", "train loss (eval)", dict(marker="o")),
        ("val_loss", "val loss (eval)", dict(marker="o")),
        ("val_loss_full", "val loss (whole split)", dict(marker="*", markersize=14, linestyle="")),
    ]
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, label, style in styles:
        if key in series:
            iters = sorted(series[key])
            ax.plot(iters, [series[key][i] for i in iters], label=label, **style)
    ax.set(xlabel="iteration", ylabel="cross-entropy loss (nats per token)", title=str(args.out_dir))
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(args.out) if args.out else Path(args.out_dir) / "loss.png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
