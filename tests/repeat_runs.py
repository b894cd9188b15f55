"""Run a short multi-process training N times in a row and count the runs that did not exit 0.

    python tests/repeat_runs.py --runs 20 --nproc 2 --parallelism fsdp

A run that finished its work must exit 0 every time; process-group teardown used to abort now and
then ("terminate called without an active exception") after a correct run. Tiny model, Tiny
Shakespeare from ../shared (or --data_dir). Not a pytest test: it takes minutes (test_fsdp.py runs a few).
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from stress_kill import REPO, prepared_data  # the script beside this one

TINY = ("--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2")
TINY += ("--gradient_accumulation_steps=2", "--max_iters=3", "--eval_interval=2", "--eval_full=True")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--parallelism", choices=["ddp", "fsdp"], default="fsdp")
    parser.add_argument("--data_dir", type=Path, default=None, help="a prepared character-level data set")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="repeat_runs_"))
    args.data_dir = args.data_dir or prepared_data(work)
    failures = 0
    for i in range(args.runs):
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
        ]
        train = [str(REPO / "train.py"), f"--out_dir={work / f'out{i}'}", f"--data_dir={args.data_dir}"]
        command = [*launcher, *train, f"--parallelism={args.parallelism}", *TINY]
        result = subprocess.run(command, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1"})
        failures += result.returncode != 0
        aborted = "terminate called" in result.stderr
        print(f"run {i}: exit {result.returncode}{' (teardown abort)' if aborted else ''}", flush=True)
    print(f"{args.runs} runs of {args.nproc} processes ({args.parallelism}): {failures} did not exit 0")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
