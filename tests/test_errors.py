"""Bad input and faults of the environment, across every CLI: each ends in one line on stderr that
names the problem, the exit code of the policy (1 bad input found at run time, 2 a bad flag or config
value), and no traceback. Disk-full and permission faults are injected: CI cannot fill a disk, and
runs as root, whom permissions do not stop.

Each case is (name, cli, make_argv, code, message, fault): make_argv builds the case's files in a
temporary folder and returns the command line; fault, if any, patches the environment first.
"""

import errno
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, TINY

import convert
import dataset
import generate
import metrics
import sample
import train
from checkpoint import CKPT_NAME, save_checkpoint
from model import GPT, GPTConfig


@dataclass
class Env:
    """What a case may build on: the folder of the case, prepared data, a finished run's out_dir."""

    tmp: Path
    data: Path
    run: Path

    def train(self, *flags: str) -> list[str]:
        return [f"--out_dir={self.tmp / 'out'}", f"--data_dir={self.data}", *TINY, *flags]

    def data_copy(self, edit: Callable[[Path], None]) -> Path:
        """A copy of the prepared data set, changed by edit(folder)."""
        copy = self.tmp / "data"
        copy.mkdir()
        for name in ("train.bin", "val.bin", "meta.json"):
            (copy / name).write_bytes((self.data / name).read_bytes())
        edit(copy)
        return copy

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def checkpoint(self, **changes) -> Path:
        """A tiny character-level checkpoint folder, its entries changed."""
        config = GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=16)
        entries = {"model": GPT(config).state_dict(), "model_args": vars(config), "iter_num": 0, "config": {}}
        entries["tokenizer"] = {
            "tokenizer": "char",
            "chars": [chr(32 + i) for i in range(65)],
            "vocab_size": 65,
        }
        save_checkpoint({**entries, **changes}, self.file(f"ckpt/{CKPT_NAME}", b""))
        return self.tmp / "ckpt"

    def hf_dir(self, config: object = None, weights: bytes | None = None, index: object = None) -> Path:
        """A Hugging Face model folder with this config.json, model.safetensors and index."""
        llama = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 8,
            "hidden_size": 8,
        }
        llama.update(
            num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, max_position_embeddings=8
        )
        self.file("hf/config.json", json.dumps(llama if config is None else config))
        if weights is not None:
            self.file("hf/model.safetensors", weights)
        if index is not None:
            self.file("hf/model.safetensors.index.json", json.dumps(index))
        return self.tmp / "hf"


def set_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    (folder / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


def fail_with(error: int, target: str) -> Callable[[pytest.MonkeyPatch], None]:
    """A fault: target ('torch.save', 'mkdir', 'metrics') raises OSError(error) after writing half."""

    def inject(monkeypatch: pytest.MonkeyPatch) -> None:
        def raise_error(*args, **kwargs):
            raise OSError(error, os.strerror(error))

        def save_half(obj, f, *args, **kwargs):
            f.write(b"half a checkpoint")
            raise_error()

        if target == "torch.save":
            monkeypatch.setattr(torch, "save", save_half)
        elif target == "mkdir":
            monkeypatch.setattr(pathlib.Path, "mkdir", raise_error)
        elif target == "metrics":
            monkeypatch.setattr(metrics.MetricsLog, "write", raise_error)

    return inject


def compile_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault: the compiled decode step fails as torch.compile does without a C++ compiler."""

    def fail(*args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("no C++ compiler")

    monkeypatch.setattr(generate, "compiled_forward", lambda model: fail)


@dataclass
class Case:
    name: str
    cli: str  # train, sample, convert, or a data/<name>/prepare.py script (run as a process)
    make_argv: Callable[[Env], list[str]]
    code: int
    message: str
    fault: Callable[[pytest.MonkeyPatch], None] | None = None


CASES = [
    # train.py: config values (exit 2)
    Case("batch_size 0", "train", lambda e: e.train("--batch_size=0"), 2, "batch_size must be at least 1"),
    Case(
        "negative learning rate", "train", lambda e: e.train("--learning_rate=-1e-3"), 2, "learning_rate must"
    ),
    Case("negative min_lr", "train", lambda e: e.train("--min_lr=-1.0"), 2, "min_lr must not be negative"),
    Case("beta1 of 1", "train", lambda e: e.train("--beta1=1.0"), 2, "beta1 must be in [0, 1)"),
    Case("negative beta2", "train", lambda e: e.train("--beta2=-0.5"), 2, "beta2 must be in [0, 1)"),
    Case("negative seed", "train", lambda e: e.train("--seed=-1"), 2, "seed must be in [0, 2**63)"),
    Case(
        "negative max_iters",
        "train",
        lambda e: e.train("--max_iters=-5"),
        2,
        "max_iters must not be negative",
    ),
    Case("negative warmup", "train", lambda e: e.train("--warmup_iters=-1"), 2, "warmup_iters must not be"),
    Case("negative grad_clip", "train", lambda e: e.train("--grad_clip=-1.0"), 2, "grad_clip must not be"),
    Case("negative weight decay", "train", lambda e: e.train("--weight_decay=-0.1"), 2, "weight_decay must"),
    Case("unknown optimizer", "train", lambda e: e.train("--optimizer=sgd"), 2, "optimizer must be one of"),
    Case(
        "zero muon_lr", "train", lambda e: e.train("--optimizer=muon", "--muon_lr=0.0"), 2, "must be positive"
    ),
    Case(
        "muon momentum of 1",
        "train",
        lambda e: e.train("--muon_momentum=1.0"),
        2,
        "muon_momentum must be in [0, 1)",
    ),
    Case(
        "zero Newton-Schulz steps",
        "train",
        lambda e: e.train("--muon_ns_steps=0"),
        2,
        "muon_ns_steps must be at least 1",
    ),
    Case(
        "decay_frac above 1",
        "train",
        lambda e: e.train("--lr_schedule=wsd", "--decay_frac=1.5"),
        2,
        "decay_frac",
    ),
    Case(
        "unknown schedule", "train", lambda e: e.train("--lr_schedule=step"), 2, "lr_schedule must be one of"
    ),
    Case("dropout of 1.5", "train", lambda e: e.train("--dropout=1.5"), 2, "dropout must be in [0, 1)"),
    Case("eval_iters 0", "train", lambda e: e.train("--eval_iters=0"), 2, "eval_iters must be at least 1"),
    Case("heads do not divide", "train", lambda e: e.train("--n_head=5"), 2, "bad model shape"),
    Case("kv heads do not divide", "train", lambda e: e.train("--n_kv_head=3"), 2, "bad model shape"),
    Case("odd head size", "train", lambda e: e.train("--n_embd=6", "--n_head=2"), 2, "must be even"),
    Case("unknown device", "train", lambda e: e.train("--device=tpu9"), 2, "unknown device 'tpu9'"),
    Case("absent device", "train", lambda e: e.train("--device=cuda"), 2, "not available on this machine"),
    Case("unknown dtype", "train", lambda e: e.train("--dtype=half"), 2, "dtype='half'"),
    Case("unknown key", "train", lambda e: e.train("--n_layers=2"), 2, "did you mean 'n_layer'"),
    Case("wrong type", "train", lambda e: e.train("--batch_size=big"), 2, "expects int"),
    Case("flag without value", "train", lambda e: e.train("--batch_size"), 2, "needs a value"),
    Case("missing config file", "train", lambda e: ["configs/nope.py"], 2, "cannot read config file"),
    Case(
        "config file syntax error",
        "train",
        lambda e: [str(e.file("c.py", "n_layer = 2\nbatch_size = = 3\n"))],
        2,
        "c.py', line 2: SyntaxError",
    ),
    Case(
        "config file raises",
        "train",
        lambda e: [str(e.file("c.py", "n_layer = undefined_name\n"))],
        2,
        "c.py', line 1: NameError",
    ),
    Case("config file unknown key", "train", lambda e: [str(e.file("c.py", "layers = 2\n"))], 2, "'layers'"),
    Case(
        "out_dir is a file",
        "train",
        lambda e: [*e.train(), f"--out_dir={e.file('f', '')}"],
        2,
        "not a directory",
    ),
    Case(
        "resume with another shape",
        "train",
        lambda e: [f"--out_dir={e.run}", "--init_from=resume", "--n_layer=3"],
        2,
        "n_layer=1 (config: 3)",
    ),
    # train.py: files and data (exit 1)
    Case("data set not prepared", "train", lambda e: e.train(f"--data_dir={e.tmp}/x"), 1, "is not prepared"),
    Case(
        "meta.json not JSON",
        "train",
        lambda e: e.train(f"--data_dir={e.data_copy(lambda d: (d / 'meta.json').write_text('{'))}"),
        1,
        "meta.json is malformed",
    ),
    Case(
        "meta.json without a key",
        "train",
        lambda e: e.train(f"--data_dir={e.data_copy(lambda d: set_meta(d, val_tokens=None))}"),
        1,
        "meta.json has no 'val_tokens'",
    ),
    Case(
        "meta.json count not a number",
        "train",
        lambda e: e.train(f"--data_dir={e.data_copy(lambda d: set_meta(d, train_tokens='many'))}"),
        1,
        "meta.json is malformed",
    ),
    Case(
        "train.bin shorter than meta.json",
        "train",
        lambda e: e.train(f"--data_dir={e.data_copy(lambda d: (d / 'train.bin').write_bytes(b'12' * 100))}"),
        1,
        "train.bin holds 100 tokens but meta.json says",
    ),
    Case(
        "empty val.bin",
        "train",
        lambda e: e.train(f"--data_dir={e.data_copy(lambda d: (d / 'val.bin').write_bytes(b''))}"),
        1,
        "val.bin holds 0 tokens",
    ),
    Case(
        "missing train.bin",
        "train",
        lambda e: e.train(f"--data_dir={e.data_copy(lambda d: (d / 'train.bin').unlink())}"),
        1,
        "train.bin is missing",
    ),
    Case("block larger than data", "train", lambda e: e.train("--block_size=200000"), 1, "does not fit"),
    Case(
        "resume without checkpoint", "train", lambda e: e.train("--init_from=resume"), 1, "no checkpoint in"
    ),
    Case(
        "resume a corrupt checkpoint",
        "train",
        lambda e: e.train("--init_from=resume") + [f"--out_dir={e.file(f'c/{CKPT_NAME}', 'x').parent}"],
        1,
        "truncated, corrupt or not a checkpoint",
    ),
    Case(
        "init_from a missing path",
        "train",
        lambda e: e.train(f"--init_from={e.tmp}/none"),
        1,
        "is not 'scratch'",
    ),
    Case("diverging run", "train", lambda e: e.train("--learning_rate=1e30"), 1, "training diverged"),
    # train.py: faults of the environment (exit 1)
    Case(
        "disk full while saving",
        "train",
        lambda e: e.train(),
        1,
        "No space left on device",
        fail_with(errno.ENOSPC, "torch.save"),
    ),
    Case(
        "out_dir not writable",
        "train",
        lambda e: e.train(),
        1,
        "Permission denied",
        fail_with(errno.EACCES, "mkdir"),
    ),
    Case(
        "disk full while logging",
        "train",
        lambda e: e.train(),
        1,
        "No space left on device",
        fail_with(errno.ENOSPC, "metrics"),
    ),
    # sample.py
    Case("sample: no checkpoint", "sample", lambda e: [f"--out_dir={e.tmp}"], 1, "no checkpoint at"),
    Case(
        "sample: num_samples 0",
        "sample",
        lambda e: [f"--out_dir={e.run}", "--num_samples=0"],
        2,
        "num_samples",
    ),
    Case(
        "sample: top_p above 1", "sample", lambda e: [f"--out_dir={e.run}", "--top_p=1.5"], 2, "top_p must be"
    ),
    Case("sample: top_k 0", "sample", lambda e: [f"--out_dir={e.run}", "--top_k=0"], 2, "top_k must be"),
    Case(
        "sample: no new tokens",
        "sample",
        lambda e: [f"--out_dir={e.run}", "--max_new_tokens=0"],
        2,
        "max_new",
    ),
    Case(
        "sample: unknown dtype", "sample", lambda e: [f"--out_dir={e.run}", "--dtype=half"], 2, "dtype='half'"
    ),
    Case(
        "sample: prompt file not UTF-8",
        "sample",
        lambda e: [f"--out_dir={e.run}", f"--start=FILE:{e.file('p.txt', bytes([0xFF, 0xFE]))}"],
        1,
        "not UTF-8",
    ),
    Case(
        "sample: unknown tokenizer kind",
        "sample",
        lambda e: [f"--out_dir={e.checkpoint(tokenizer={'tokenizer': 'morse'})}"],
        1,
        "unusable tokenizer",
    ),
    Case(
        "sample: KV cache larger than memory",
        "sample",
        lambda e: [f"--out_dir={e.run}", "--num_samples=1000000000"],
        2,
        "need a KV cache of",
    ),
    Case(
        "sample: compile fails",
        "sample",
        lambda e: [f"--out_dir={e.run}", "--compile=True", "--max_new_tokens=3"],
        1,
        "compiling the decode step failed (no C++ compiler); run with --compile=False",
        compile_fails,
    ),
    Case(
        "sample: checkpoint missing its weights",
        "sample",
        lambda e: [f"--out_dir={e.checkpoint(model={})}"],
        1,
        "does not describe a valid model",
    ),
    # convert.py
    Case(
        "convert: no such folder",
        "convert",
        lambda e: ["import", f"{e.tmp}/none", f"{e.tmp}/o"],
        1,
        "config.json",
    ),
    Case(
        "convert: config.json not an object",
        "convert",
        lambda e: ["import", str(e.hf_dir(config=[1, 2])), f"{e.tmp}/o"],
        1,
        "must hold a JSON object",
    ),
    Case(
        "convert: zero heads",
        "convert",
        lambda e: [
            "import",
            str(e.hf_dir(config={"model_type": "llama", "num_attention_heads": 0})),
            f"{e.tmp}/o",
        ],
        1,
        "num_attention_heads must be a positive integer, got 0",
    ),
    Case(
        "convert: a string for a size",
        "convert",
        lambda e: ["import", str(e.hf_dir(config={"model_type": "llama", "hidden_size": "8"})), f"{e.tmp}/o"],
        1,
        "hidden_size must be a positive integer, got '8'",
    ),
    Case(
        "convert: corrupt safetensors",
        "convert",
        lambda e: ["import", str(e.hf_dir(weights=b"\x08" + b"\x00" * 20)), f"{e.tmp}/o"],
        1,
        "not a safetensors",
    ),
    Case(
        "convert: index without weight_map",
        "convert",
        lambda e: ["import", str(e.hf_dir(index={"metadata": {}})), f"{e.tmp}/o"],
        1,
        'needs a "weight_map"',
    ),
    Case(
        "convert: shard outside the folder",
        "convert",
        lambda e: ["import", str(e.hf_dir(index={"weight_map": {"w": "../x.safetensors"}})), f"{e.tmp}/o"],
        1,
        "shards outside its folder",
    ),
    Case(
        "convert: OUT_DIR is a file",
        "convert",
        lambda e: ["import", str(e.hf_dir()), str(e.file("o", ""))],
        1,
        "is a file",
    ),
    Case(
        "convert: export without checkpoint",
        "convert",
        lambda e: ["export", str(e.tmp), f"{e.tmp}/h"],
        1,
        "no checkpoint",
    ),
    Case(
        "convert: unknown dtype",
        "convert",
        lambda e: ["export", str(e.run), f"{e.tmp}/h", "--dtype=half"],
        2,
        "invalid choice",
    ),
    # prepare scripts (separate processes)
    Case(
        "prepare: missing input",
        "data/shakespeare_char/prepare.py",
        lambda e: ["--input", f"{e.tmp}/no.txt"],
        1,
        "does not exist",
    ),
    Case(
        "prepare: empty input",
        "data/shakespeare/prepare.py",
        lambda e: ["--input", str(e.file("in.txt", ""))],
        1,
        "is empty",
    ),
    Case(
        "prepare: input not UTF-8",
        "data/shakespeare_char/prepare.py",
        lambda e: ["--input", str(e.file("in.txt", bytes([0xC3, 0x28])))],
        1,
        "not UTF-8",
    ),
    Case(
        "prepare: out_dir is a file",
        "data/shakespeare_char/prepare.py",
        lambda e: ["--input", str(e.file("in.txt", "hello world\n" * 20)), "--out_dir", str(e.file("o", ""))],
        1,
        "File exists",
    ),
    Case(
        "prepare: bad JSON lines",
        "data/openwebtext/prepare.py",
        lambda e: ["--input", str(e.file("c.jsonl", '{"text": 3}\n')), "--out_dir", f"{e.tmp}/o"],
        1,
        "no string field",
    ),
    Case(
        "prepare: unknown flag",
        "data/shakespeare_char/prepare.py",
        lambda e: ["--inptu", "x"],
        2,
        "unrecognized arguments",
    ),
]


def run_case(case: Case, env: Env, monkeypatch: pytest.MonkeyPatch, capsys) -> tuple[int, str]:
    """(exit code, stderr) of the case's command line."""
    argv = case.make_argv(env)
    if case.cli.endswith(".py"):
        result = subprocess.run(
            [sys.executable, str(REPO_ROOT / case.cli), *argv], capture_output=True, text=True, timeout=60
        )
        return result.returncode, result.stderr
    capsys.readouterr()
    if case.fault:
        case.fault(monkeypatch)
    main = {"train": train.main, "sample": sample.main, "convert": convert.main}[case.cli]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    monkeypatch.undo()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_and_faults_end_in_one_clear_line(
    case, char_data, finished_run, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(REPO_ROOT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, err = run_case(case, Env(tmp_path, char_data, finished_run), monkeypatch, capsys)
    finally:
        torch.set_num_threads(threads)
    last_line = err.strip().splitlines()[-1] if err.strip() else ""
    assert "Traceback" not in err, err
    assert (code, case.message in last_line) == (case.code, True), err
    assert last_line.startswith(("error: ", "usage:")) or "error:" in last_line, err
    assert not list(tmp_path.rglob("*.tmp")), "a failed write left its temporary file"


def test_the_table_covers_every_cli_with_at_least_40_cases():
    assert len(CASES) >= 40
    assert {c.cli.split("/")[0] for c in CASES} == {"train", "sample", "convert", "data"}


def test_a_failed_metrics_write_leaves_no_torn_line(tmp_path, monkeypatch):
    log = metrics.MetricsLog(str(tmp_path), keep=None)
    log.write({"iter": 1, "loss": 2.0})
    real_open = Path.open

    class HalfWrites:
        """The file, except that a write stores half its bytes and then finds the disk full."""

        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data: bytes) -> int:
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: HalfWrites(real_open(self, *a, **k)))
    with pytest.raises(OSError, match="No space"):
        log.write({"iter": 2, "loss": 1.0})
    monkeypatch.undo()
    log.write({"iter": 3, "loss": 0.5})
    assert [json.loads(line)["iter"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        1,
        3,
    ]


def test_a_bin_file_of_the_wrong_dtype_size_is_refused(tmp_path):
    (tmp_path / "meta.json").write_text(
        json.dumps({"vocab_size": 5, "dtype": "uint16", "train_tokens": 3, "val_tokens": 1})
    )
    (tmp_path / "train.bin").write_bytes(np.arange(3, dtype=np.uint32).tobytes())  # 12 bytes, not 6
    (tmp_path / "val.bin").write_bytes(np.arange(1, dtype=np.uint16).tobytes())
    with pytest.raises(train.UserError, match="holds 6 tokens but meta.json says 3"):
        dataset.load_meta(tmp_path)
