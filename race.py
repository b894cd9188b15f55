"""Time to quality: train.py commands run one after another, alternately (A B A B ...), each timed as a
user runs it (start-up, evaluations and checkpoints included), then compared by their final loss on
the whole val split and their wall time, as medians over the repeats.

    python race.py "configs/shakespeare_char.py --max_iters=650 --optimizer=adamw --lr_schedule=cosine" \\
                   "configs/shakespeare_char.py" --names today new --repeats 2

Each argument is one recipe: train.py's arguments as on its command line. Run i of a recipe writes to
OUT/<name>-<i> (--out, default race/), so `python plot.py race/today-0 race/new-0 --x time` draws
them. Alternating spreads a drift in the machine's speed over every recipe alike; nothing else should
run meanwhile.
"""

import shlex
import statistics
import subprocess
import sys
import time
from argparse import ArgumentParser, RawDescriptionHelpFormatter
from pathlib import Path

from metrics import metrics_path, read_records
from runtime import ConfigError, UserError, exit_on_error

TRAIN = Path(__file__).parent / "train.py"


def run_recipe(args: list[str], out_dir: Path) -> tuple[float, float]:
    """Run train.py with args into a fresh out_dir: (wall seconds, final whole-val-split loss)."""
    out_dir.mkdir(parents=True)
    command = [sys.executable, str(TRAIN), *args, f"--out_dir={out_dir}"]
    with open(out_dir / "train.log", "w") as log:
        start = time.perf_counter()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - start
    if code != 0:
        raise UserError(f"train.py exited with code {code}: see {out_dir / 'train.log'}")
    records, _ = read_records(metrics_path(out_dir))
    full_val = [r["val_loss_full"] for r in records if "val_loss_full" in r]
    if not full_val:
        raise ConfigError(f"{shlex.join(args)} logged no whole-split val loss: keep eval_full on")
    return wall, full_val[-1]


def race(argv: list[str] | None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", help="train.py's arguments for one recipe, quoted")
    parser.add_argument("--names", nargs="+", help="one short name per recipe (default r0, r1, ...)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each recipe, alternated")
    parser.add_argument("--out", default="race", help="folder of the runs' out_dirs; must not exist")
    args = parser.parse_args(argv)
    names = args.names or [f"r{i}" for i in range(len(args.recipes))]
    if len(names) != len(args.recipes):
        raise ConfigError(f"{len(names)} names for {len(args.recipes)} recipes: give one name per recipe")
    if len(set(names)) != len(names):
        raise ConfigError(f"--names {' '.join(names)}: each recipe needs a name of its own")
    if bad := [name for name in names if not name or Path(name).name != name or name in (".", "..")]:
        raise ConfigError(f"--names: {bad[0]!r} is not a plain folder name (no '/'): it names OUT/<name>-<i>")
    recipes = []
    for recipe in args.recipes:
        try:
            recipes.append(shlex.split(recipe))
        except ValueError as e:  # an unclosed quote
            raise ConfigError(f"recipe {recipe!r}: {e}; quote it as on a shell's command line") from None
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {args.repeats}")
    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"{out} exists: name a new folder with --out, or remove it")

    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for i in range(args.repeats):
        for name, recipe in zip(names, recipes):
            wall, loss = run_recipe(recipe, out / f"{name}-{i}")
            results[name].append((wall, loss))
            print(f"{name}-{i}: {wall:6.1f} s, whole-val loss {loss:.4f}", flush=True)
    print(f"\n{'recipe':<10} {'median s':>9} {'median val':>11}  runs (s / loss)")
    for name, recipe in zip(names, args.recipes):
        runs = results[name]
        walls, losses = [w for w, _ in runs], [v for _, v in runs]
        each = ", ".join(f"{w:.1f} / {v:.4f}" for w, v in runs)
        print(f"{name:<10} {statistics.median(walls):9.1f} {statistics.median(losses):11.4f}  {each}")
        print(f"{'':<10} train.py {recipe}")


def main(argv: list[str] | None = None) -> None:
    exit_on_error(lambda: race(argv))


if __name__ == "__main__":
    main()
