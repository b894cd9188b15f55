"""kill -9 at random moments while a run saves a checkpoint every iteration, then resume; repeat.

    python tests/stress_kill.py --kills 30              # one process
    python tests/stress_kill.py --kills 30 --nproc 2    # torchrun, 2 processes (gloo on CPU)
    python tests/stress_kill.py --kills 30 --recipe lora   # LoRA adapters on a short text run, saved every 2
    python tests/stress_kill.py --kills 30 --recipe chat   # a chat set (data/reverse's), saved every 2

Counts corrupt checkpoints (one that does not load after a kill) and failed resumes (a run that
exits on its own, or prints no "resumed from iter"), both of which must be 0, and ends with a run
that finishes normally. Not a pytest test: it takes minutes. Tiny model, Tiny Shakespeare from
../shared (or --data_dir).
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from checkpoint import CKPT_NAME, CheckpointError, load_checkpoint, model_from_checkpoint  # noqa: E402

TINY = (
    "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=1",
    "--gradient_accumulation_steps=2", "--eval_interval=1", "--always_save_checkpoint=True",
    "--log_interval=1", "--eval_full=False", "--dropout=0.1",
)  # fmt: skip


def command(args: argparse.Namespace, out_dir: Path, *flags: str) -> list[str]:
    launcher = [sys.executable]
    if args.nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    return [
        *launcher,
        str(REPO / "train.py"),
        f"--out_dir={out_dir}",
        f"--data_dir={args.data_dir}",
        *TINY,
        *flags,
    ]


def prepared_data(work: Path) -> Path:
    """Tiny Shakespeare from ../shared, prepared at character level into work/data."""
    source = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
    prepare = [
        sys.executable,
        str(REPO / "data/shakespeare_char/prepare.py"),
        "--out_dir",
        str(work / "data"),
    ]
    subprocess.run([*prepare, "--input", str(source)], check=True, capture_output=True)
    return work / "data"


def recipe_flags(recipe: str, work: Path, args: argparse.Namespace) -> list[str]:
    """The flags of a recipe's runs, after what it needs is made: lora, a base run (40 iterations of
    text) to adapt; chat, data/reverse's conversations prepared as a chat set (its --data_dir)."""
    if recipe == "lora":
        base = work / "base"
        subprocess.run(
            command(args, base, "--max_iters=40", "--eval_interval=40"), check=True, capture_output=True
        )
        return [f"--init_from={base}", "--lora_rank=4", "--optimizer=adamw", "--eval_interval=2"]
    if recipe == "chat":
        source = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
        reverse, chat = work / "reverse", work / "chat"
        script = [sys.executable, str(REPO / "data/reverse/prepare.py"), "--input", str(source)]
        subprocess.run([*script, "--out_dir", str(reverse)], check=True, capture_output=True)
        script = [sys.executable, str(REPO / "data/chat/prepare.py"), "--input", str(reverse / "train.jsonl")]
        script += ["--tokenizer", str(reverse / "tokenizer"), "--out_dir", str(chat)]
        subprocess.run(script, check=True, capture_output=True)
        return [f"--data_dir={chat}", "--block_size=64", "--eval_interval=2"]
    return []


def logged_iterations(out_dir: Path) -> int:
    path = out_dir / "metrics.jsonl"
    return path.read_text().count('"loss"') if path.is_file() else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--data_dir", type=Path, default=None, help="a prepared character-level data set")
    parser.add_argument("--recipe", choices=("text", "lora", "chat"), default="text")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    work = Path(tempfile.mkdtemp(prefix="stress_kill_"))
    args.data_dir = args.data_dir or prepared_data(work)
    recipe = recipe_flags(args.recipe, work, args)
    out_dir = work / "out"
    corrupt = failed_resumes = 0
    for kill in range(args.kills):
        resume = (out_dir / CKPT_NAME).exists()
        flags = [*recipe, "--max_iters=1000000"] + (["--init_from=resume"] if resume else [])
        log = (work / f"run{kill}.log").open("w")
        proc = subprocess.Popen(command(args, out_dir, *flags), stdout=log, stderr=subprocess.STDOUT, env=env)
        before = logged_iterations(out_dir)
        while logged_iterations(out_dir) <= before and proc.poll() is None:  # until it trains
            time.sleep(0.05)
        time.sleep(random.uniform(0, 1.0))  # then a random moment: mostly inside a save or an evaluation
        if proc.poll() is not None or (
            resume and "resumed from iter" not in (work / f"run{kill}.log").read_text()
        ):
            failed_resumes += 1
            print(f"kill {kill}: the run ended on its own (exit {proc.returncode}); see {log.name}")
        for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            process.kill()  # SIGKILL to torchrun and each worker: they run in sessions of their own
        proc.wait()
        try:
            checkpoint = load_checkpoint(out_dir / CKPT_NAME)
            model_from_checkpoint(checkpoint)
            print(f"kill {kill}: checkpoint at iter {checkpoint['iter_num']} loads", flush=True)
        except CheckpointError as e:
            corrupt += 1
            print(f"kill {kill}: CORRUPT: {e}", flush=True)
    final = load_checkpoint(out_dir / CKPT_NAME)["iter_num"] + 3
    finished = subprocess.run(
        command(args, out_dir, *recipe, f"--max_iters={final}", "--init_from=resume"),
        capture_output=True,
        env=env,
    )
    print(
        f"{args.recipe}: {args.kills} kills, {args.nproc} process(es): {corrupt} corrupt checkpoints, "
        f"{failed_resumes} failed resumes; final run to iter {final} exited {finished.returncode}; "
        f"stale temp files after it: {len(list(out_dir.glob('*.tmp')))}"
    )
    sys.exit(1 if corrupt or failed_resumes or finished.returncode else 0)


if __name__ == "__main__":
    main()
