"""Faults as they really happen, and the inputs an adversarial user tries, across every CLI: each case
ends in its own one-line message (never the last resort's "internal error"), the policy's exit code,
no traceback, no temporary file, and a good checkpoint present before the case still loads after it.

Most cases run in-process through the CLIs' main(argv), as tests/test_errors.py's table does. The
real faults run as processes: a full disk (a small tmpfs in a user namespace where one can be mounted,
else RLIMIT_FSIZE), a read-only file system, a truncated shard, a stopped rank.
"""

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import REPO_ROOT, TINY, TORCHRUN
from test_errors import Env, set_meta

import bench
import convert
import eval as eval_cli
import plot
import race
import sample
import train
from checkpoint import CKPT_NAME, LATEST_SHARDED, SHARDED_META, load_checkpoint
from metrics import METRICS_NAME
from model import GPT, GPTConfig


class FaultEnv(Env):
    """Env, plus a copy of the finished run that a case may damage: its ckpt.pt must survive."""

    def good(self, pointer: str | None = None) -> Path:
        copy = self.tmp / "good"
        if not copy.exists():
            shutil.copytree(self.run, copy)
        if pointer is not None:
            (copy / LATEST_SHARDED).write_text(pointer)
        return copy

    def resume(self, *flags: str, pointer: str | None = None) -> list[str]:
        return [f"--out_dir={self.good(pointer)}", "--init_from=resume", "--max_iters=3", *flags]

    def task_file(self, *lines: str) -> Path:
        return self.file("task.jsonl", "".join(line + "\n" for line in lines))

    def hf(self, **changes) -> Path:
        """A Llama config.json (no weights: the cases fail before reading any), fields changed."""
        llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 8}
        llama |= dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
        return self.hf_dir(config={**llama, "max_position_embeddings": 8, **changes})

    def sharded(self, damage: Callable[[Path], None]) -> Path:
        """A copy of the run with a real sharded checkpoint (torch.distributed.checkpoint) beside its
        older ckpt.pt, named by ckpt.latest, then damaged by damage(folder)."""
        out = self.good()
        checkpoint = load_checkpoint(out / CKPT_NAME)
        folder = out / "ckpt-00000009-abcdef"
        dcp.save({"model": checkpoint.pop("model")}, checkpoint_id=folder, no_dist=True)
        torch.save({k: v for k, v in checkpoint.items() if k != "optimizer"}, folder / SHARDED_META)
        (out / LATEST_SHARDED).write_text(folder.name)
        damage(folder)
        return out


def nan_checkpoint(env: FaultEnv) -> Path:
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=16)).state_dict()
    model["layers.0.attn.wqkv.weight"][0, 0] = float("nan")
    return env.checkpoint(model=model)


def truncate_shard(folder: Path) -> None:
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])


def data_with(edit: Callable[[Path], None]) -> Callable[[FaultEnv], str]:
    return lambda e: f"--data_dir={e.data_copy(edit)}"


def write_ids(split: str, value: int) -> Callable[[Path], None]:
    """Put token id value into every position of split.bin (the size stays right)."""

    def edit(folder: Path) -> None:
        path = folder / f"{split}.bin"
        path.write_bytes(value.to_bytes(2, "little") * (path.stat().st_size // 2))

    return edit


@dataclass
class Case:
    name: str
    cli: str  # train, sample, eval, convert, bench, race, plot, or a data/<name>/prepare.py script
    make_argv: Callable[[FaultEnv], list[str]]
    code: int
    message: str


POINTERS = {  # a damaged or dangling ckpt.latest beside a good ckpt.pt: never trusted, never pruned by
    "empty": "",
    "dot": ".",
    "dot-dot": "..",
    "absolute path": "/tmp",
    "dangling name": "ckpt-00000042-gone00",
    "a file's name": METRICS_NAME,
    "a newer folder": "data",
}
NOT_A_CHECKPOINT = "not a complete checkpoint folder in"
CASES = [
    Case(
        f"train: resume, ckpt.latest {kind}", "train", lambda e, p=p: e.resume(pointer=p), 1, NOT_A_CHECKPOINT
    )
    for kind, p in POINTERS.items()
]
CASES += [
    Case(
        "train: eval_only, ckpt.latest '.'",
        "train",
        lambda e: e.resume("--eval_only=True", pointer="."),
        1,
        NOT_A_CHECKPOINT,
    ),
    Case(
        "train: eval_only, ckpt.latest empty",
        "train",
        lambda e: e.resume("--eval_only=True", pointer=""),
        1,
        NOT_A_CHECKPOINT,
    ),
    Case(
        "train: init_from a run whose ckpt.latest is '..'",
        "train",
        lambda e: e.train(f"--init_from={e.good('..')}"),
        1,
        NOT_A_CHECKPOINT,
    ),
    Case("sample: ckpt.latest '..'", "sample", lambda e: [f"--out_dir={e.good('..')}"], 1, NOT_A_CHECKPOINT),
    Case(
        "eval: ckpt.latest dangling",
        "eval",
        lambda e: [f"--out_dir={e.good('ckpt-1-x')}"],
        1,
        NOT_A_CHECKPOINT,
    ),
    Case(
        "convert: export, ckpt.latest '/'",
        "convert",
        lambda e: ["export", str(e.good("/")), f"{e.tmp}/h"],
        1,
        NOT_A_CHECKPOINT,
    ),
    # a damaged sharded checkpoint (real DCP files): one line, the older ckpt.pt beside it intact
    Case(
        "train: resume a truncated .distcp",
        "train",
        lambda e: e.resume() + [f"--out_dir={e.sharded(truncate_shard)}"],
        1,
        "cannot read sharded checkpoint",
    ),
    Case(
        "sample: a truncated .distcp",
        "sample",
        lambda e: [f"--out_dir={e.sharded(truncate_shard)}"],
        1,
        "is truncated or damaged",
    ),
    Case(
        "sample: a shard missing",
        "sample",
        lambda e: [f"--out_dir={e.sharded(lambda f: next(f.glob('*.distcp')).unlink())}"],
        1,
        "cannot read sharded checkpoint",
    ),
    Case(
        "eval: .metadata missing",
        "eval",
        lambda e: [f"--out_dir={e.sharded(lambda f: (f / '.metadata').unlink())}"],
        1,
        "cannot read sharded checkpoint",
    ),
    Case(
        "convert: export a truncated .distcp",
        "convert",
        lambda e: ["export", str(e.sharded(truncate_shard)), f"{e.tmp}/h"],
        1,
        "is truncated or damaged",
    ),
    # token ids against the vocabulary
    Case(
        "train: train.bin id above the vocabulary",
        "train",
        lambda e: e.train(data_with(write_ids("train", 300))(e)),
        1,
        "train.bin holds token id 300, but meta.json says vocab_size 65",
    ),
    Case(
        "train: meta.json vocab_size below the ids",
        "train",
        lambda e: e.train(data_with(lambda d: set_meta(d, vocab_size=10))(e)),
        1,
        "but meta.json says vocab_size 10",
    ),
    Case(
        "train: val.bin id above the vocabulary, whole split",
        "train",
        lambda e: e.train("--eval_full=True", "--max_iters=0", data_with(write_ids("val", 65))(e)),
        1,
        "val.bin holds token id 65",
    ),
    Case(
        "train: id 65535 in train.bin",
        "train",
        lambda e: e.train(data_with(write_ids("train", 65535))(e)),
        1,
        "holds token id 65535",
    ),
    Case(
        "eval: val.bin id above the vocabulary",
        "eval",
        lambda e: [f"--out_dir={e.run}", data_with(write_ids("val", 999))(e)],
        1,
        "val.bin holds token id 999",
    ),
    Case(
        "train: meta.json vocab_size beyond its dtype",
        "train",
        lambda e: e.train(data_with(lambda d: set_meta(d, vocab_size=2**64))(e)),
        1,
        "vocab_size must be between 1 and what uint16 token ids hold",
    ),
    # sizes checked before allocating
    Case(
        "train: a model larger than memory",
        "train",
        lambda e: e.train("--n_embd=32768", "--n_head=16", "--n_layer=8"),
        2,
        "the model needs at least",
    ),
    Case(
        "train: a huge block_size", "train", lambda e: e.train("--block_size=1000000000"), 1, "does not fit"
    ),
    Case(
        "train: many layers",
        "train",
        lambda e: e.train("--n_layer=100000", "--n_embd=1024", "--n_head=8"),
        2,
        "GiB is free",
    ),
    # devices torch knows that these programs (or this machine) lack
    *(
        Case(f"{cli}: device {name}", cli, argv, 2, message)
        for name, message in (
            ("xpu", "'xpu' is not supported"),
            ("meta", "'meta' is not supported"),
            ("cuda:1", "not available on this machine"),
        )
        for cli, argv in (
            ("train", lambda e, n=name: e.train(f"--device={n}")),
            ("sample", lambda e, n=name: [f"--out_dir={e.run}", f"--device={n}"]),
            ("eval", lambda e, n=name: [f"--out_dir={e.run}", f"--device={n}"]),
            ("bench", lambda e, n=name: [f"--device={n}"]),
        )
    ),
    # collective timeout and seeds
    Case(
        "train: collective_timeout_s 0",
        "train",
        lambda e: e.train("--collective_timeout_s=0"),
        2,
        "collective_timeout_s must be positive, in seconds",
    ),
    Case(
        "train: collective_timeout_s negative",
        "train",
        lambda e: e.train("--collective_timeout_s=-5"),
        2,
        "collective_timeout_s must be positive, in seconds",
    ),
    Case(
        "train: collective_timeout_s infinite",
        "train",
        lambda e: e.train("--collective_timeout_s=1e309"),
        2,
        "collective_timeout_s must be positive, in seconds",
    ),
    Case(
        "eval: collective_timeout_s 0",
        "eval",
        lambda e: [f"--out_dir={e.run}", "--collective_timeout_s=0"],
        2,
        "collective_timeout_s must be positive, in seconds",
    ),
    Case(
        "sample: seed above 2**63",
        "sample",
        lambda e: [f"--out_dir={e.run}", "--seed=99999999999999999999"],
        2,
        "seed must be in [0, 2**63)",
    ),
    Case(
        "sample: negative seed", "sample", lambda e: [f"--out_dir={e.run}", "--seed=-1"], 2, "seed must be in"
    ),
    Case(
        "sample: negative temperature",
        "sample",
        lambda e: [f"--out_dir={e.run}", "--temperature=-1.0"],
        2,
        "temperature must be 0",
    ),
    Case("sample: top_p 0", "sample", lambda e: [f"--out_dir={e.run}", "--top_p=0.0"], 2, "top_p must be in"),
    # convert.py: the types of config.json's fields
    *(
        Case(
            f"convert: {key}={value!r}",
            "convert",
            lambda e, c={key: value}: ["import", str(e.hf(**c)), f"{e.tmp}/o"],
            1,
            f"config.json: {key} must be",
        )
        for key, value in (
            ("architectures", "LlamaForCausalLM"),
            ("architectures", [1]),
            ("rope_scaling", "llama3"),
            ("rope_parameters", [1]),
            ("layer_types", "full_attention"),
            ("rms_norm_eps", "1e-6"),
            ("rms_norm_eps", 0),
            ("rms_norm_eps", -1.0),
            ("tie_word_embeddings", "yes"),
            ("rope_theta", "big"),
            ("model_type", 3),
            ("hidden_act", ["silu"]),
            ("sliding_window", "4096"),
            ("use_sliding_window", 1),
            ("max_window_layers", 2.5),
            ("partial_rotary_factor", "1"),
            ("mlp_bias", "no"),
        )
    ),
    Case(
        "convert: export a foreign checkpoint",
        "convert",
        lambda e: ["export", str(e.checkpoint(model_args={"width": 3})), f"{e.tmp}/h"],
        1,
        "does not describe a valid model",
    ),
    Case(
        "convert: export a checkpoint without weights",
        "convert",
        lambda e: ["export", str(e.checkpoint(model={"x": torch.zeros(1)})), f"{e.tmp}/h"],
        1,
        "does not describe a valid model",
    ),
    Case(
        "convert: export into the run's own folder, --force",
        "convert",
        lambda e: ["export", str(e.good()), str(e.good()), "--force"],
        1,
        "holds a training run: export into a folder of its own",
    ),
    Case(
        "sample: a weight that is NaN",
        "sample",
        lambda e: [f"--out_dir={nan_checkpoint(e)}"],
        1,
        "layers.0.attn.wqkv.weight holds NaN or inf: the run diverged, or the checkpoint is damaged",
    ),
    *(
        Case(
            f"{cli}: a lora entry {entry!r}",
            cli,
            lambda e, cli=cli, entry=entry: [
                *(["export"] if cli == "convert" else []),
                f"{'' if cli == 'convert' else '--out_dir='}{e.checkpoint(lora=entry)}",
                *([f"{e.tmp}/h"] if cli == "convert" else []),
            ],
            1,
            "the checkpoint's lora entry is damaged",
        )
        for cli, entry in [
            ("sample", "x"),
            ("convert", {"rank": 4, "alpha": 8.0, "targets": ("q",), "base_fingerprint": "0"}),  # no dropout
            (
                "sample",
                {"rank": 4, "alpha": math.nan, "dropout": 0.0, "targets": ("q",), "base_fingerprint": "0"},
            ),
        ]
    ),
    Case(
        "convert: export into a non-empty folder",
        "convert",
        lambda e: ["export", str(e.run), str(e.file("h/tokenizer.json", "{}").parent)],
        1,
        "is not empty: choose a new folder, or pass --force",
    ),
    Case(
        "convert: export into a file",
        "convert",
        lambda e: ["export", str(e.run), str(e.file("h", ""))],
        1,
        "is a file",
    ),
    # eval.py
    Case(
        "eval: whitespace-only context",
        "eval",
        lambda e: [
            f"--out_dir={e.run}",
            f"--tasks={e.task_file(json.dumps({'context': '   ', 'choices': ['a', 'b'], 'label': 0}))}",
        ],
        1,
        "context must be a string with some text in it",
    ),
    Case(
        "eval: newline-only context",
        "eval",
        lambda e: [
            f"--out_dir={e.run}",
            f"--tasks={e.task_file(json.dumps({'context': chr(10), 'choices': ['a', 'b'], 'label': 0}))}",
        ],
        1,
        "context must be a string with some text in it",
    ),
    Case(
        "eval: task file missing",
        "eval",
        lambda e: [f"--out_dir={e.run}", f"--tasks={e.tmp}/none.jsonl"],
        1,
        "none.jsonl",
    ),
    Case(
        "eval: batch_size 0",
        "eval",
        lambda e: [f"--out_dir={e.run}", "--batch_size=0"],
        2,
        "batch_size must be between 1 and 2**20",
    ),
    Case(
        "eval: --json names a folder",
        "eval",
        lambda e: [f"--out_dir={e.run}", "--json=/"],
        2,
        "must name a file in an existing folder",
    ),
    # race.py
    Case(
        "race: an unclosed quote",
        "race",
        lambda e: ["--max_iters=1 'x", f"--out={e.tmp}/r"],
        2,
        "No closing quotation",
    ),
    Case(
        "race: duplicate names",
        "race",
        lambda e: ["a", "b", "--names", "x", "x", f"--out={e.tmp}/r"],
        2,
        "each recipe needs a name of its own",
    ),
    Case(
        "race: a name with a slash",
        "race",
        lambda e: ["a", "--names", "a/b", f"--out={e.tmp}/r"],
        2,
        "'a/b' is not a plain folder name",
    ),
    Case(
        "race: a name of '..'",
        "race",
        lambda e: ["a", "--names", "..", f"--out={e.tmp}/r"],
        2,
        "'..' is not a plain folder name",
    ),
    Case(
        "race: repeats 0",
        "race",
        lambda e: ["a", "--repeats", "0", f"--out={e.tmp}/r"],
        2,
        "--repeats must be at least 1",
    ),
    Case("race: --out exists", "race", lambda e: ["a", f"--out={e.tmp}"], 2, "exists: name a new folder"),
    # plot.py
    Case("plot: no metrics.jsonl", "plot", lambda e: [str(e.tmp)], 1, "no "),
    Case(
        "plot: only lines that are not records",
        "plot",
        lambda e: [str(e.file(f"r/{METRICS_NAME}", '42\n[1]\n{}\n{"iter": "x", "loss": 1}\n').parent)],
        1,
        "holds no loss values yet",
    ),
    Case(
        "plot: non-UTF-8 metrics",
        "plot",
        lambda e: [str(e.file(f"r/{METRICS_NAME}", b"\xff\xfe\n").parent)],
        1,
        "holds no loss values yet",
    ),
    Case(
        "plot: --out in a missing folder",
        "plot",
        lambda e: [str(e.run), f"--out={e.tmp}/no/x.png"],
        1,
        "does not exist",
    ),
    Case(
        "plot: unknown image extension",
        "plot",
        lambda e: [str(e.run), f"--out={e.tmp}/x.bmpx"],
        2,
        "name an image file ending in one of",
    ),
    Case(
        "bench: --json in a missing folder",
        "bench",
        lambda e: [f"--json={e.tmp}/no/b.json"],
        1,
        "its folder does not exist",
    ),
    Case(
        "bench: --out_dir without a checkpoint",
        "bench",
        lambda e: [f"--out_dir={e.tmp}"],
        1,
        "no checkpoint at",
    ),
    # prepare scripts (processes)
    Case(
        "prepare: a JSON line that is not an object",
        "data/openwebtext/prepare.py",
        lambda e: ["--input", str(e.file("c.jsonl", "[1, 2]\n")), "--out_dir", f"{e.tmp}/o"],
        1,
        "c.jsonl:1: not a JSON object",
    ),
    Case(
        "prepare: a line that is not JSON",
        "data/openwebtext/prepare.py",
        lambda e: ["--input", str(e.file("c.jsonl", "{oops\n")), "--out_dir", f"{e.tmp}/o"],
        1,
        "not a JSON object",
    ),
    Case(
        "prepare: input is a folder of nothing",
        "data/shakespeare_char/prepare.py",
        lambda e: ["--input", str(e.tmp)],
        1,
        "does not exist or is not a file",
    ),
    Case(
        "prepare: an unknown flag",
        "data/openwebtext/prepare.py",
        lambda e: ["--num_procs", "2"],
        2,
        "unrecognized arguments",
    ),
]


def run_in_process(case: Case, env: FaultEnv, capsys) -> tuple[int, str]:
    argv = case.make_argv(env)
    if case.cli.endswith(".py"):
        command = [sys.executable, str(REPO_ROOT / case.cli), *argv]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        return result.returncode, result.stderr
    capsys.readouterr()
    mains = {"train": train.main, "sample": sample.main, "eval": eval_cli.main, "convert": convert.main}
    mains |= {"bench": bench.main, "race": race.main, "plot": plot.main}
    with pytest.raises(SystemExit) as exit_info:
        mains[case.cli](argv)
    return exit_info.value.code, capsys.readouterr().err


def check_outcome(code: int, err: str, expected_code: int, message: str, env: FaultEnv) -> None:
    """The promises every case keeps, whatever it did."""
    last_line = err.strip().splitlines()[-1] if err.strip() else ""
    assert "Traceback" not in err and "internal error" not in err, err
    assert (code, message in last_line) == (expected_code, True), err
    assert last_line.startswith(("error: ", "usage:")) or "error:" in last_line, err
    assert not list(env.tmp.rglob("*.tmp")), "a failed write left its temporary file"
    for run in (env.run, env.tmp / "good"):  # the good checkpoints are still there and load
        if run.exists():
            assert load_checkpoint(run / CKPT_NAME)["iter_num"] == 2


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_faults_and_bad_input_end_in_their_own_line(
    case, char_data, finished_run, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(REPO_ROOT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    env = FaultEnv(tmp_path, char_data, finished_run)
    try:
        code, err = run_in_process(case, env, capsys)
    finally:
        torch.set_num_threads(threads)
    check_outcome(code, err, case.code, case.message, env)


def test_the_fault_table_covers_every_cli_with_at_least_80_cases():
    assert len(CASES) >= 80
    clis = {c.cli.split("/")[0] for c in CASES}
    assert clis == {"train", "sample", "eval", "convert", "bench", "race", "plot", "data"}


@pytest.mark.parametrize("line", ["42", "[1]", "{}", '{"iter": "x"}', '{"iter": true}'])
def test_a_metrics_line_that_is_not_a_record_does_not_block_resume(line, finished_run, tmp_path, char_data):
    out = shutil.copytree(finished_run, tmp_path / "run")
    with open(out / METRICS_NAME, "ab") as f:
        f.write(line.encode() + b"\n\xff\xfe\n")
    with pytest.raises(SystemExit, match="0"):
        train.main([f"--out_dir={out}", "--init_from=resume", "--max_iters=3", f"--data_dir={char_data}"])
    assert load_checkpoint(out)["iter_num"] == 3


@pytest.mark.parametrize("flags", [["--temperature=1e-30"], ["--temperature=1e-300"], ["--top_p=1e-300"],
                                   ["--temperature=1e-30", "--top_p=1e-10", "--top_k=1"]])  # fmt: skip
def test_extreme_sampling_settings_sample(flags, finished_run, capsys):
    with pytest.raises(SystemExit, match="0"):
        sample.main([f"--out_dir={finished_run}", "--max_new_tokens=4", *flags])


def test_a_scratch_run_warns_which_checkpoint_it_replaces(finished_run, tmp_path, char_data, capsys):
    out = shutil.copytree(finished_run, tmp_path / "run")
    with pytest.raises(SystemExit, match="0"):
        train.main([f"--out_dir={out}", f"--data_dir={char_data}", *TINY, "--max_iters=0"])
    assert f"warning: {out} holds the checkpoint of an earlier run (ckpt.pt)" in capsys.readouterr().out
    assert load_checkpoint(out)["iter_num"] == 2  # it saved nothing, so nothing was replaced


def test_debug_mode_keeps_the_exit_code_and_0_means_off(finished_run, tmp_path):
    def run(debug: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "sample.py", f"--out_dir={tmp_path}"]
        env = {**os.environ, "LLM_TRAIN_DEBUG": debug}
        return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=60)

    off, on = run("0"), run("1")
    assert (off.returncode, on.returncode) == (1, 1)
    assert "Traceback" not in off.stderr and "Traceback" in on.stderr
    assert on.stderr.strip().splitlines()[-1] == off.stderr.strip().splitlines()[-1]


def test_an_unforeseen_exception_says_it_is_a_bug(monkeypatch, capsys):
    from runtime import exit_on_error

    with pytest.raises(SystemExit, match="1"):
        exit_on_error(lambda: {}["x"])
    assert (
        "error: internal error: KeyError: 'x'; LLM_TRAIN_DEBUG=1 shows the traceback"
        in capsys.readouterr().err
    )


def test_a_seeded_sample_of_the_fuzz_pass_finds_no_traceback_hang_or_loss():
    command = [sys.executable, "tests/fuzz_cli.py", "--sample=6", "--seed=1", "--timeout=60"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "last-resort" not in result.stdout, result.stdout


def test_exported_files_have_the_usual_file_modes(finished_run, tmp_path):
    convert.export_hf(finished_run, tmp_path / "hf")
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "hf").iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path  # save_file alone gives 0600


def test_export_into_a_non_empty_folder_needs_force_and_keeps_it_untouched(finished_run, tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer.json").write_text("another tokenizer")
    with pytest.raises(SystemExit, match="1"):
        convert.main(["export", str(finished_run), str(hf)])
    assert [p.name for p in hf.iterdir()] == ["tokenizer.json"]
    with pytest.raises(SystemExit, match="0"):
        convert.main(["export", str(finished_run), str(hf), "--force"])
    assert (hf / "model.safetensors").is_file()


# --- real faults, in processes ---------------------------------------------------------------------


@cache
def can_mount_tmpfs() -> bool:
    """A user namespace lets an unprivileged process mount a tmpfs; some kernels and containers refuse.
    NO_TMPFS=1 tries the RLIMIT_FSIZE fallback here."""
    if os.environ.get("NO_TMPFS"):
        return False
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs tmpfs /mnt"]
    try:
        return subprocess.run(command, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_on_small_disk(
    command: list[str], good: Path, disk_bytes: int, file_bytes: int = 0, read_only: bool = False
):
    """Run command with {run} replaced by a copy of the run good on a tmpfs of disk_bytes (read-only
    after the copy, if asked); the run's files are copied back to good afterwards. Without tmpfs,
    command runs on good itself under RLIMIT_FSIZE=file_bytes: a file written past it fails (EFBIG)."""
    if not can_mount_tmpfs():
        if read_only:
            pytest.skip("a read-only file system needs a tmpfs mount, which this machine refuses")
        limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))  # noqa: E731
        argv = [part.replace("{run}", str(good)) for part in command]
        return subprocess.run(
            argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, preexec_fn=limit
        )
    mount = good.parent / "disk"
    mount.mkdir(exist_ok=True)  # empty: a mount ends with its namespace
    script = (
        f'mount -t tmpfs -o size={disk_bytes} tmpfs "$0" && cp -r "$1" "$0/run" || exit 99; '
        + ('mount -o remount,ro "$0"; ' if read_only else "")
        + 'shift; "$@"; code=$?; rm -rf "$GOOD" && cp -r "$MOUNT/run" "$GOOD"; exit $code'
    )
    argv = [part.replace("{run}", f"{mount}/run") for part in command]
    env = {**os.environ, "GOOD": str(good), "MOUNT": str(mount)}
    unshare = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(mount), str(good)]
    return subprocess.run(
        [*unshare, *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env
    )


def disk_case_env(tmp_path: Path, finished_run: Path, char_data: Path) -> FaultEnv:
    env = FaultEnv(tmp_path, char_data, finished_run)
    env.good()
    return env


def run_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_checkpoint(tmp_path, finished_run, char_data):
    env = disk_case_env(tmp_path, finished_run, char_data)
    ckpt_bytes = (env.good() / CKPT_NAME).stat().st_size
    command = [sys.executable, "train.py", "--out_dir={run}", "--init_from=resume", "--max_iters=4"]
    command += ["--always_save_checkpoint=True"]
    # Room for the run and its new log lines, not for a second ckpt.pt beside the first.
    result = run_on_small_disk(command, env.good(), run_size(env.good()) + ckpt_bytes // 2, ckpt_bytes // 2)
    message = "No space left on device" if can_mount_tmpfs() else "File too large"
    check_outcome(result.returncode, result.stderr, 1, message, env)
    assert f"{CKPT_NAME}; " in result.stderr.strip().splitlines()[-1]  # it names the file


@pytest.mark.slow
def test_a_full_disk_during_import_and_export_is_one_line(tmp_path, finished_run, char_data):
    env = disk_case_env(tmp_path, finished_run, char_data)
    hf = tmp_path / "hf"
    convert.export_hf(finished_run, hf)
    weights = (hf / "model.safetensors").stat().st_size
    for command in (
        [sys.executable, "convert.py", "export", str(finished_run), "{run}/hf"],
        [sys.executable, "convert.py", "import", str(hf), "{run}/imported"],
    ):
        result = run_on_small_disk(command, env.good(), run_size(env.good()) + weights // 2, weights // 2)
        message = "No space left on device" if can_mount_tmpfs() else "File too large"
        check_outcome(result.returncode, result.stderr, 1, message, env)


@pytest.mark.slow
def test_a_read_only_file_system_is_one_line(tmp_path, finished_run, char_data):
    env = disk_case_env(tmp_path, finished_run, char_data)
    command = [sys.executable, "train.py", "--out_dir={run}", "--init_from=resume", "--max_iters=4"]
    result = run_on_small_disk(command, env.good(), 16 * 2**20, read_only=True)
    check_outcome(result.returncode, result.stderr, 1, "Read-only file system", env)
    assert "the file system is read-only: write somewhere else" in result.stderr


@pytest.mark.slow
def test_a_stopped_rank_ends_the_run_with_a_line_naming_it(tmp_path, finished_run, char_data):
    env = FaultEnv(tmp_path, char_data, finished_run)
    out = tmp_path / "ddp"
    flags = [f"--out_dir={out}", f"--data_dir={char_data}", *TINY, "--gradient_accumulation_steps=2"]
    flags += ["--max_iters=100000", "--log_interval=1000000", "--eval_interval=1000000"]
    flags += ["--collective_timeout_s=3"]
    marker = f"LLM_TRAIN_TEST_RUN={tmp_path.name}"
    process_env = {**os.environ, "LLM_TRAIN_TEST_RUN": tmp_path.name}
    run = subprocess.Popen([*TORCHRUN, "train.py", *flags], cwd=REPO_ROOT, env=process_env, text=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        stopped = None
        deadline = time.time() + 60
        while stopped is None and time.time() < deadline:
            time.sleep(0.5)
            if (out / "config.json").exists():  # both ranks are past setup, training
                stopped = worker_pid(1, marker)
        assert stopped is not None, "rank 1 never started"
        time.sleep(1)
        error_file = Path(psutil.Process(worker_pid(0, marker)).environ()["TORCHELASTIC_ERROR_FILE"])
        os.kill(stopped, signal.SIGSTOP)
        while not error_file.exists() and time.time() < deadline:
            time.sleep(0.2)  # until rank 0 has seen the stopped rank and reported it
        os.kill(stopped, signal.SIGCONT)  # torchrun ends it now, instead of 30 s later
        report = run.communicate(timeout=60)[1]
    finally:
        run.kill()
    ours = [line for line in report.splitlines() if "error: rank 0: a collective waited" in line]
    assert len(ours) == 1 and "over collective_timeout_s=3 s for rank 1" in ours[0], report
    assert run.returncode == 1
    assert report.index(ours[0]) > report.index("Root Cause (first observed failure)")  # torchrun's report
    check_outcome(1, ours[0], 1, "that process is stopped", env)


@pytest.mark.slow
@pytest.mark.parametrize(
    "flag, ours, line",
    [("--data_dir=absent", 1, "absent/meta.json not found"), ("--batch_size=0", 2, "batch_size must be")],
)
def test_under_torchrun_a_failure_is_our_line_once_as_the_root_cause_of_its_report(
    tmp_path, flag, ours, line
):
    alone = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), flag], cwd=tmp_path, capture_output=True, text=True
    )
    command = [*TORCHRUN, str(REPO_ROOT / "train.py"), flag]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert alone.returncode == ours and line in alone.stderr
    assert result.returncode == 1  # torchrun's own, whatever ours (it raises ChildFailedError)
    ours_in_report = [text for text in result.stderr.splitlines() if line in text]
    assert len(ours_in_report) == 1 and line not in result.stdout, result.stderr
    root_cause = result.stderr.split("Root Cause (first observed failure):")[1]
    assert "rank      : 0" in root_cause and "traceback : error: " in root_cause and line in root_cause
    assert "Signal 15 (SIGTERM)" in result.stderr  # rank 1, stopped by torchrun before it reported


def worker_pid(rank: int, marker: str) -> int | None:
    """The pid of the torchrun worker of this rank whose environment holds marker."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            variables = environ.read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in variables and f"RANK={rank}".encode() in variables:
            return int(environ.parent.name)
    return None
