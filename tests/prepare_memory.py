"""Throughput and peak memory of data/openwebtext/prepare.py on generated corpora of two sizes.

    python tests/prepare_memory.py [--sizes_mb 100 300] [--num_proc N]

Each corpus is a .jsonl file of synthetic web-like documents written to a temporary folder (deleted
afterwards): GPT-2 vocabulary words plus made-up ones, as rare words and names need several tokens.
It comes out at about 0.29 tokens per character (tiny Shakespeare: 0.30); tokenising speed depends
on that density, so it is printed. Peak RSS is that of the largest single process (the main one or a
worker); the total is at most about that times (num_proc + 1). It should stay flat as the corpus grows.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, from any working dir
from dataset import META_NAME
from tokenizer import load_tiktoken

PREPARE = Path(__file__).resolve().parents[1] / "data" / "openwebtext" / "prepare.py"


def word_list() -> list[str]:
    """Whole words from GPT-2's vocabulary, roughly most frequent first (BPE merges frequent pairs first)."""
    enc = load_tiktoken("gpt2")
    words = (enc.decode([i]) for i in range(256, enc.n_vocab - 1))
    return [w for w in words if w.startswith(" ") and w[1:].isalpha()]


def write_corpus(path: Path, size_bytes: int, seed: int = 0) -> tuple[int, int]:
    """Write documents of ~5 KB each (OpenWebText's mean) until the file holds size_bytes; returns the
    number of documents and of characters in them."""
    rng = np.random.default_rng(seed)
    words = np.array(word_list() + [" ,", ".", ".\n\n", " 2024", " (see"], dtype=object)
    zipf = 1.0 / (np.arange(len(words)) + 10.0)
    cumulative = np.cumsum(zipf / zipf.sum())
    letters = list("etaoinshrdlcumwfgypbvk")
    made_up_words = np.array(
        [" " + "".join(rng.choice(letters, size=rng.integers(4, 11))) for _ in range(20_000)], dtype=object
    )
    n_docs, n_chars, written = 0, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_bytes:
            n_words = int(rng.lognormal(mean=6.45, sigma=0.8))
            chosen = words[
                np.searchsorted(cumulative, rng.random(n_words), side="right").clip(max=len(words) - 1)
            ]
            # one word in five made up, as names and rare words are: these split into several tokens
            made_up = rng.random(n_words) < 0.2
            chosen[made_up] = made_up_words[rng.integers(len(made_up_words), size=made_up.sum())]
            text = "".join(chosen).strip()
            written += f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            n_docs, n_chars = n_docs + 1, n_chars + len(text)
    return n_docs, n_chars


def run_prepare(corpus: Path, out_dir: Path, num_proc: int) -> tuple[float, int]:
    """Seconds taken, and the peak RSS in bytes of the largest process in prepare's process tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(PREPARE),
            "--input",
            str(corpus),
            "--out_dir",
            str(out_dir),
            "--num_proc",
            str(num_proc),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    with proc.stderr:
        stderr = (
            proc.stderr.read()
        )  # the progress bar and any error; read before waiting so the pipe cannot fill
    # wait4, not getrusage(RUSAGE_CHILDREN): the latter keeps the maximum over every earlier run as well
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"prepare.py failed on {corpus}:\n{stderr.decode(errors='replace')}")
    return seconds, usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes_mb", type=float, nargs="+", default=[100, 300], help="corpus sizes (default: %(default)s)"
    )
    parser.add_argument(
        "--num_proc",
        type=int,
        default=os.cpu_count() or 1,
        help="passed to prepare.py (default: %(default)s)",
    )
    args = parser.parse_args()

    print(
        f"{'corpus MB':>9} {'documents':>10} {'tokens':>12} {'tok/char':>8} {'seconds':>8} "
        f"{'tokens/s':>11} {'MB/s':>6} {'peak RSS MiB':>12}   (num_proc {args.num_proc})"
    )
    for size_mb in args.sizes_mb:
        with tempfile.TemporaryDirectory(prefix="owt_bench_") as tmp:
            corpus = Path(tmp) / "corpus.jsonl"
            n_docs, n_chars = write_corpus(corpus, int(size_mb * 1e6))
            seconds, peak_rss = run_prepare(corpus, Path(tmp) / "out", args.num_proc)
            meta = json.loads((Path(tmp) / "out" / META_NAME).read_text())
            n_tokens = meta["train_tokens"] + meta["val_tokens"]
            print(
                f"{size_mb:>9.0f} {n_docs:>10,} {n_tokens:>12,} {n_tokens / n_chars:>8.3f} {seconds:>8.1f} "
                f"{n_tokens / seconds:>11,.0f} {corpus.stat().st_size / 1e6 / seconds:>6.1f} "
                f"{peak_rss / 2**20:>12.0f}"
            )


if __name__ == "__main__":
    main()
