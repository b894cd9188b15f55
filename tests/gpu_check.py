"""What only a GPU can show, in one command: the CLIs (train.py, sample.py, bench.py, torchrun) run as
they are run, on the GPU config, and checked against each other. Prints one table, writes a JSON.

    python tests/gpu_check.py                          # one 80-141 GB GPU: under 5 minutes
    python tests/gpu_check.py --device=cpu             # tiny sizes, seconds: what CI runs
    python tests/gpu_check.py --data_dir=data/shakespeare_char --json=gpu_check.json

Checks, each a row of the table:
- configs/shakespeare_char_gpu.py trained in bf16, compiled, against float32 eager (val loss close),
  the bf16 run stopped half-way and resumed (it carries on: its losses stay close to the float32 run's);
- float16 with the gradient scaler, trained as far as the others (val loss close);
- sample.py on the trained checkpoint, the decode step compiled (CUDA graphs) against eager: the same
  greedy text; bench.py --generation: batch 1 and 8 against transformers' generate, same tokens, and
  the fraction of the memory-bandwidth bound reached;
- training tokens/s, MFU against the datasheet peak and peak memory at three shapes: bench.py's small
  preset, GPT-2 small (124M) and a ~1B Llama;
- DDP and FSDP (AdamW) under torchrun on every GPU present (one GPU: FSDP in a group of one) against
  one process.
The data: --data_dir (a prepared character-level set), else synthetic text made here (words of a
random vocabulary drawn by Zipf's law, so the loss has something to learn), and random tokens for
the speed runs. Nothing here needs ../shared or files git ignores.
"""

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.common import TokenSetWriter, dtype_for_vocab  # noqa: E402

GPU_CONFIG = REPO / "configs" / "shakespeare_char_gpu.py"
THROUGHPUT_SHAPES = {  # (vocabulary, train.py flags): bench.py's small preset, GPT-2 small, Llama 3.2 1B
    "bench small": (8192, dict(n_layer=6, n_head=6, n_kv_head=2, n_embd=384, block_size=512, batch_size=32)),
    "GPT-2 124M": (50257, dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16)),
    # Llama 3.2 1B's shape but for its MLP, Llama-derived here (5504 wide, not 8192): 0.97B parameters
    "Llama ~1B": (
        128256,
        dict(n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, block_size=2048, batch_size=4),
    ),
}
LOSS_TOLERANCE = 0.03  # relative: bf16 or float16 against float32 after a few hundred iterations


@dataclass
class Sizes:
    iters: int  # GPU config runs: iterations (the resumed run stops at half)
    log_interval: int
    eval_iters: int
    compile: bool
    model: dict = field(default_factory=dict)  # overrides of the GPU config's shape (CPU: tiny)
    throughput_iters: int = 30  # logged every third: the last third's speed, compile long done
    throughput_model: dict | None = None  # None: THROUGHPUT_SHAPES as they are
    throughput_shapes: int = len(THROUGHPUT_SHAPES)  # the first N of them
    throughput_vocab: int | None = None  # None: each shape's own
    throughput_tokens: int = 2_000_000  # random tokens in the speed runs' data set
    sample_tokens: int = 500
    bench_preset: str = "small"
    text_chars: int = 3_000_000  # synthetic text, when no --data_dir
    timeout_s: int = 240  # per command


GPU = Sizes(iters=300, log_interval=25, eval_iters=20, compile=True)
CPU = Sizes(
    iters=4,
    log_interval=1,
    eval_iters=1,
    compile=False,  # a compile takes longer than all the rest on a CPU; tests/test_gpu_paths.py compiles
    model=dict(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, dropout=0.0),
    throughput_iters=3,
    throughput_model=dict(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=2),
    throughput_shapes=1,  # the others would be the same tiny shape
    throughput_vocab=256,
    throughput_tokens=20_000,
    sample_tokens=8,
    bench_preset="tiny",
    text_chars=100_000,
    timeout_s=120,
)


@dataclass
class Check:
    name: str
    result: str  # what was measured, in words and numbers
    ok: bool | None  # None: a figure, nothing to pass or fail
    seconds: float
    figures: dict = field(default_factory=dict)


# --- data -----------------------------------------------------------------------------------------


def write_text_set(out_dir: Path, chars: int, seed: int = 0) -> Path:
    """A character-level set of synthetic text: 2,000 random words drawn by Zipf's law, in lines."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(alphabet, size=rng.integers(2, 9))) for _ in range(2000)]
    drawn = np.minimum(rng.zipf(1.3, size=chars // 5), len(words)) - 1
    text = " ".join(words[i] for i in drawn)
    text = re.sub(r"((?:\S+ ){12})", lambda m: m.group(1)[:-1] + "\n", text)[:chars]
    vocab = sorted(set(text))
    ids = np.searchsorted(np.array(vocab), np.array(list(text)))
    with TokenSetWriter(out_dir, "uint16") as writer:
        split = len(ids) * 9 // 10
        writer.write("train", ids[:split])
        writer.write("val", ids[split:])
        writer.commit({"tokenizer": "char", "chars": vocab, "vocab_size": len(vocab)})
    return out_dir


def write_random_set(out_dir: Path, vocab_size: int, tokens: int, seed: int = 0) -> Path:
    """Uniformly random tokens: speed does not depend on what the tokens say."""
    rng = np.random.default_rng(seed)
    with TokenSetWriter(out_dir, dtype_for_vocab(vocab_size)) as writer:
        writer.write("train", rng.integers(0, vocab_size, size=tokens))
        writer.write("val", rng.integers(0, vocab_size, size=tokens // 10))
        writer.commit({"vocab_size": vocab_size})
    return out_dir


# --- running the CLIs -----------------------------------------------------------------------------


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def error(self) -> str:
        lines = (self.stderr or self.stdout).strip().splitlines()
        return f"exit {self.returncode}: {lines[-1] if lines else 'no output'}"


def run_cli(args: list[str], timeout_s: int) -> Ran:
    started = time.perf_counter()
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        text = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        return Ran(124, "", f"{text}\ntimed out after {timeout_s} s", time.perf_counter() - started)
    return Ran(done.returncode, done.stdout, done.stderr, time.perf_counter() - started)


def flags(values: dict) -> list[str]:
    return [f"--{key}={value}" for key, value in values.items()]


def metrics(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def logged(records: list[dict], key: str) -> dict[int, float]:
    return {r["iter"]: r[key] for r in records if r.get(key) is not None}


def memory(records: list[dict]) -> str:
    """The most memory torch held on the GPU in a run, as its log lines recorded it (CUDA only)."""
    values = [r["max_memory_mib"] for r in records if r.get("max_memory_mib") is not None]
    return f"max memory {max(values):,.0f} MiB" if values else "max memory n/a"


def relative_gap(a: dict[int, float], b: dict[int, float]) -> float:
    """The largest relative difference between a and b at the iterations both logged."""
    common = sorted(set(a) & set(b))
    return max((abs(a[i] - b[i]) / abs(b[i]) for i in common), default=math.inf)


class Checker:
    """Runs the checks in order, keeping each one's row; a failed command fails its row, not the rest."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, work: Path):
        self.args, self.sizes, self.work = args, sizes, work
        self.checks: list[Check] = []
        self.machine: dict = {}  # the GPU's name and the library versions, as bench.py reports them

    def train(self, name: str, data_dir: Path, *extra: str, launcher: list[str] | None = None) -> Ran:
        """train.py on the GPU config, in work/name, with the sizes' overrides and extra flags last."""
        out = self.work / name
        args = [*(launcher or [sys.executable]), "train.py", str(GPU_CONFIG), f"--out_dir={out}"]
        args += [f"--data_dir={data_dir}", f"--device={self.args.device}", "--eval_full=False"]
        args += flags(self.sizes.model) + list(extra)
        return run_cli(args, self.sizes.timeout_s)

    def add(self, check: Check) -> None:
        self.checks.append(check)
        mark = {True: "ok", False: "FAIL", None: ""}[check.ok]
        print(f"{check.name:<40} {mark:<5} {check.result} ({check.seconds:.0f} s)", flush=True)
        self.save()

    def failed(self, name: str, ran: Ran) -> None:
        self.add(Check(name, ran.error(), False, ran.seconds))

    def save(self) -> None:
        """The JSON after every check: a run cut short keeps what it measured."""
        if self.args.json:
            checks = [asdict(c) for c in self.checks]
            payload = {"device": self.args.device, **self.machine, "checks": checks}
            Path(self.args.json).write_text(json.dumps(payload, indent=2) + "\n")


# --- the checks -----------------------------------------------------------------------------------


def check_precisions(c: Checker, data_dir: Path) -> None:
    """bf16 compiled (stopped half-way and resumed) and float16 + scaler, each against float32 eager."""
    s = c.sizes
    common = [f"--max_iters={s.iters}", f"--lr_decay_iters={s.iters}", f"--eval_interval={s.iters // 2}"]
    common += [f"--log_interval={s.log_interval}", f"--eval_iters={s.eval_iters}"]
    reference = c.train("float32", data_dir, *common, "--dtype=float32", "--compile=False")
    if reference.returncode:
        return c.failed("float32 eager (reference)", reference)
    val32 = logged(metrics(c.work / "float32"), "val_loss")
    result = f"val loss {val32[s.iters]:.4f}, {memory(metrics(c.work / 'float32'))}"
    c.add(Check("float32 eager (reference)", result, None, reference.seconds))

    bf16 = ["--dtype=bfloat16", f"--compile={s.compile}"]
    first = c.train("bfloat16", data_dir, *common, *bf16, f"--max_iters={s.iters // 2}")
    second = (
        c.train("bfloat16", data_dir, *common, *bf16, "--init_from=resume") if not first.returncode else first
    )
    if second.returncode:
        return c.failed("bf16 compiled, resumed half-way", second)
    records = metrics(c.work / "bfloat16")
    val16, gap = logged(records, "val_loss"), relative_gap(logged(records, "val_loss"), val32)
    c.add(Check(
        f"bf16 compile={s.compile} vs float32: val loss",
        f"{val16[s.iters]:.4f}, {gap:.2%} apart at most, {memory(records)}",
        gap < LOSS_TOLERANCE, first.seconds + second.seconds, {"val_loss": val16, "gap": gap},
    ))  # fmt: skip
    resumed = f"resumed from iter {s.iters // 2}" in second.stdout
    after = {i: v for i, v in logged(records, "loss").items() if i > s.iters // 2}
    loss_gap = relative_gap(after, logged(metrics(c.work / "float32"), "loss"))
    c.add(Check(
        "resume: carries on the same run", f"{'resumed' if resumed else 'NOT resumed'}, training loss "
        f"{loss_gap:.2%} from float32's at most after it", resumed and loss_gap < 2 * LOSS_TOLERANCE,
        second.seconds, {"loss_after_resume": after, "gap": loss_gap},
    ))  # fmt: skip

    fp16 = c.train("float16", data_dir, *common, "--dtype=float16", "--compile=False")
    if fp16.returncode:
        return c.failed("float16 + gradient scaler", fp16)
    val_fp16 = logged(metrics(c.work / "float16"), "val_loss")
    gap = relative_gap(val_fp16, val32)
    c.add(Check(
        "float16 + gradient scaler vs float32", f"val loss {val_fp16[s.iters]:.4f}, {gap:.2%} apart at most, "
        f"{memory(metrics(c.work / 'float16'))}",
        gap < LOSS_TOLERANCE, fp16.seconds, {"val_loss": val_fp16, "gap": gap},
    ))  # fmt: skip


def tokens_per_s(stderr: str) -> float | None:
    found = re.search(r"([\d.]+) tokens/s", stderr)
    return float(found.group(1)) if found else None


def check_sampling(c: Checker) -> None:
    """sample.py on the bf16 checkpoint, compiled (plainly, and verifying prompt-lookup proposals, a
    second CUDA graph) against eager; bench.py against transformers."""
    s, out = c.sizes, c.work / "bfloat16"
    texts, speeds, seconds = {}, {}, 0.0
    runs = {"compiled": [f"--compile={s.compile}"], "eager": ["--compile=False"]}
    runs["prompt lookup"] = [f"--compile={s.compile}", "--prompt_lookup=3"]
    for name, extra in runs.items():
        args = [sys.executable, "sample.py", f"--out_dir={out}", f"--device={c.args.device}"]
        args += ["--temperature=0", f"--max_new_tokens={s.sample_tokens}", *extra]
        ran = run_cli(args, s.timeout_s)
        if ran.returncode:
            return c.failed("sample.py compiled vs eager", ran)
        texts[name], speeds[name], seconds = ran.stdout, tokens_per_s(ran.stderr), seconds + ran.seconds
    same = texts["compiled"] == texts["eager"] == texts["prompt lookup"]
    c.add(Check(
        f"sample.py compile={s.compile}, and with prompt lookup, vs eager: same text",
        f"{'same' if same else 'DIFFERENT'}; tokens/s {speeds['compiled']:,.0f}, prompt lookup "
        f"{speeds['prompt lookup']:,.0f}, eager {speeds['eager']:,.0f}",
        same, seconds, {"tokens_per_s": speeds},
    ))  # fmt: skip

    json_path = c.work / "bench.json"
    args = [sys.executable, "bench.py", "--generation", f"--preset={s.bench_preset}"]
    ran = run_cli([*args, f"--device={c.args.device}", f"--json={json_path}"], s.timeout_s)
    if ran.returncode:
        return c.failed("bench.py --generation", ran)
    r = json.loads(json_path.read_text())
    c.machine = {key: r[key] for key in ("machine", "torch", "transformers")}
    for batch in (1, 8):
        decode, bound = (
            r[f"decode_tokens_per_s_batch{batch}"],
            r[f"bandwidth_bound_tokens_per_s_batch{batch}"],
        )
        same = r[f"greedy_tokens_identical_batch{batch}"]
        result = (
            f"{'same tokens' if same else 'DIFFERENT tokens'}; tokens/s compiled {decode['ours']:,.0f}, "
            f"eager {decode['ours_eager']:,.0f}, transformers {decode['peer']:,.0f}; "
            f"{decode['ours'] / bound:.0%} of the bandwidth bound"
        )
        c.add(
            Check(f"generation batch {batch} (bench {s.bench_preset})", result, same, ran.seconds / 2, decode)
        )


def check_throughput(c: Checker) -> None:
    """Training speed, MFU against the datasheet peak, and peak memory, at each shape."""
    s = c.sizes
    log_interval = max(1, s.throughput_iters // 3)
    for name, (vocab_size, shape) in list(THROUGHPUT_SHAPES.items())[: s.throughput_shapes]:
        shape = s.throughput_model or shape
        vocab_size = s.throughput_vocab or vocab_size
        data_dir = write_random_set(c.work / f"random-{vocab_size}", vocab_size, s.throughput_tokens)
        run_flags = flags({**shape, "gradient_accumulation_steps": 1, "dropout": 0.0, "eval_iters": 1})
        run_flags += [f"--max_iters={s.throughput_iters}", f"--log_interval={log_interval}"]
        out = c.work / f"speed-{name}"
        ran = c.train(out.name, data_dir, *run_flags, "--dtype=bfloat16", f"--compile={s.compile}")
        records = metrics(out)
        shutil.rmtree(out, ignore_errors=True)  # a 1B model's checkpoint is 13 GB
        if ran.returncode:
            c.failed(f"training speed, {name}", ran)
            continue
        last = [r for r in records if "tokens_per_s" in r][-1]
        params = float(re.search(r"([\d.]+)M parameters", ran.stdout).group(1))
        mfu = "n/a" if last["mfu"] is None else f"{last['mfu']:.1%}"
        result = f"{params:,.2f}M params: {last['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, {memory(records)}"
        figures = {key: last.get(key) for key in ("tokens_per_s", "mfu", "ms_per_iter", "max_memory_mib")}
        c.add(Check(f"training speed, {name}", result, None, ran.seconds, {"params_m": params, **figures}))


def check_parallel(c: Checker, data_dir: Path) -> None:
    """DDP and FSDP under torchrun on every GPU present, against one process, all with AdamW."""
    s = c.sizes
    nproc = c.args.nproc
    iters = max(2, s.iters // 3)
    run_flags = [f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--eval_interval={iters}"]
    run_flags += [f"--log_interval={s.log_interval}", f"--eval_iters={s.eval_iters}", "--optimizer=adamw"]
    run_flags += ["--dtype=bfloat16", f"--compile={s.compile}", f"--gradient_accumulation_steps={nproc}"]
    one = c.train("adamw", data_dir, *run_flags)
    if one.returncode:
        return c.failed("one process, AdamW (reference)", one)
    reference = logged(metrics(c.work / "adamw"), "loss")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    for parallelism in ("ddp", "fsdp"):
        ran = c.train(parallelism, data_dir, *run_flags, f"--parallelism={parallelism}", launcher=torchrun)
        if ran.returncode:
            c.failed(f"{parallelism} on {nproc} process(es)", ran)
            continue
        records = metrics(c.work / parallelism)
        gap = relative_gap(logged(records, "loss"), reference)
        result = f"training loss {gap:.2%} from one process's at most, {memory(records)} (rank 0)"
        c.add(Check(f"{parallelism} on {nproc} process(es)", result, gap < LOSS_TOLERANCE, ran.seconds))


PARTS = {
    "precisions": check_precisions,
    "sampling": lambda c, data_dir: check_sampling(c),
    "throughput": lambda c, data_dir: check_throughput(c),
    "parallel": check_parallel,
}


def print_table(checks: list[Check]) -> None:
    print(f"\n{'check':<44} {'':<5} {'result'}")
    for check in checks:
        mark = {True: "ok", False: "FAIL", None: ""}[check.ok]
        print(f"{check.name:<44} {mark:<5} {check.result}")
    total = sum(check.seconds for check in checks)
    failed = sum(check.ok is False for check in checks)
    print(f"{len(checks)} checks, {failed} failed, {total:.0f} s of commands")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (every size as listed), or cpu (tiny sizes)")
    parser.add_argument("--data_dir", default=None, help="a prepared character-level set; default synthetic")
    parser.add_argument("--json", default="gpu_check.json", help="where to write the results")
    parser.add_argument("--work_dir", default=None, help="a new folder in it holds the runs; default /tmp")
    parser.add_argument(
        "--only", default=",".join(PARTS), help=f"some of {', '.join(PARTS)}, comma-separated (sampling "
        "needs precisions' checkpoint)",
    )  # fmt: skip
    parser.add_argument("--nproc", type=int, default=None, help="torchrun's processes; default every GPU")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = CPU if args.device == "cpu" else GPU
    if args.nproc is None:
        import torch

        args.nproc = torch.cuda.device_count() if args.device != "cpu" else 1
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=args.work_dir))  # fresh: no run resumes an old one
    checker = Checker(args, sizes, work)
    started = time.perf_counter()
    data_dir = Path(args.data_dir) if args.data_dir else write_text_set(work / "text", sizes.text_chars)
    for part in args.only.split(","):
        try:
            PARTS[part](checker, data_dir)
        except Exception as e:  # a fault of this script's own: the other parts still run
            checker.add(Check(part, f"gpu_check.py failed: {type(e).__name__}: {e}", False, 0.0))
    print_table(checker.checks)
    if checker.machine:
        print(", ".join(f"{key} {value}" for key, value in checker.machine.items()))
    print(f"wall time {time.perf_counter() - started:.0f} s; results in {args.json}, the runs in {work}")
    return int(any(check.ok is False for check in checker.checks))


if __name__ == "__main__":
    sys.exit(main())
