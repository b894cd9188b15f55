"""train.py on the CPU with tiny models: end to end, exact resume, faults, DDP, config and bad input.

Most runs call train.main in this process (no interpreter start-up per run); the signal, DDP and
end-to-end tests start real processes. Tiny models gain nothing from threads and a shared CPU makes
thread pools spin, so everything runs single-threaded.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TORCHRUN

import train
from checkpoint import CKPT_NAME, load_checkpoint, model_from_checkpoint, save_checkpoint
from configurator import parse_config
from generate import generate
from loss_eval import full_val_loss
from model import GPT, GPTConfig
from optim import Muon, make_optimizers, newton_schulz
from tokenizer import get_tokenizer
from train_config import TrainConfig, fit_to_processes

REPO = Path(__file__).resolve().parents[1]
TINY = (
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=32",
    "--block_size=32",
    "--batch_size=4",
    "--gradient_accumulation_steps=2",
    "--eval_iters=2",
    "--eval_interval=1000",
    "--log_interval=1",
    "--warmup_iters=2",
    "--learning_rate=3e-3",
    "--min_lr=3e-4",
    "--eval_full=False",
    "--seed=7",
)
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


pytestmark = pytest.mark.usefixtures("single_thread")


def run_train(out_dir: Path, data_dir: Path, *flags: str) -> int:
    """train.py's CLI in this process, tiny settings first so that flags override them; the exit code."""
    with pytest.raises(SystemExit) as exit_info:
        train.main([f"--out_dir={out_dir}", f"--data_dir={data_dir}", *TINY, *flags])
    return exit_info.value.code


def train_cmd(out_dir: Path, data_dir: Path, *flags: str) -> list[str]:
    return [str(REPO / "train.py"), f"--out_dir={out_dir}", f"--data_dir={data_dir}", *TINY, *flags]


def metric(out_dir: Path, key: str) -> dict[int, float]:
    """{iter: value} of every metrics.jsonl line that has key."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["iter"]: r[key] for r in map(json.loads, lines) if key in r}


@pytest.mark.slow
def test_training_end_to_end_lowers_loss_and_writes_a_sampleable_checkpoint(char_data, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            *train_cmd(
                out,
                char_data,
                "--max_iters=60",
                "--eval_interval=30",
                "--log_interval=10",
                "--learning_rate=1e-2",
                "--eval_full=True",
                "--batch_size=16",
            ),
        ],
        capture_output=True,
        text=True,
        env=SUBPROCESS_ENV,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "full val loss" in result.stdout
    val = metric(out, "val_loss")
    assert sorted(val) == [0, 30, 60]
    assert val[60] < val[0] - 1.0  # from ~ln(65) = 4.17 to well below
    assert metric(out, "loss")[60] < metric(out, "loss")[10]
    assert set(metric(out, "val_loss_full")) == {60}
    assert json.loads((out / "config.json").read_text())["max_iters"] == 60

    checkpoint = load_checkpoint(out / CKPT_NAME)
    assert checkpoint["iter_num"] == 60 and checkpoint["config"]["n_layer"] == 2
    model = model_from_checkpoint(checkpoint).eval()
    tokenizer = get_tokenizer(checkpoint["tokenizer"])
    prompt = torch.tensor([tokenizer.encode("ROMEO:")])
    text = tokenizer.decode(generate(model, prompt, max_new_tokens=20)[0].tolist())
    assert text.startswith("ROMEO:") and len(text) == 26


@pytest.mark.slow
@pytest.mark.parametrize(
    "dropout, recipe",
    [(0.0, ()), (0.2, ()), (0.2, ("--optimizer=muon", "--lr_schedule=wsd", "--decay_frac=0.5"))],
)
def test_resume_reproduces_the_uninterrupted_run_bitwise(char_data, tmp_path, dropout, recipe):
    common = (
        "--eval_interval=4",
        "--always_save_checkpoint=True",
        "--lr_decay_iters=8",
        f"--dropout={dropout}",
    )
    common += recipe
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_train(straight, char_data, "--max_iters=8", *common) == 0
    assert run_train(split, char_data, "--max_iters=4", *common) == 0
    assert run_train(split, char_data, "--max_iters=8", "--init_from=resume", *common) == 0

    assert list(metric(split, "loss").items()) == list(metric(straight, "loss").items())
    a, b = load_checkpoint(straight / CKPT_NAME), load_checkpoint(split / CKPT_NAME)
    assert a["iter_num"] == b["iter_num"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
OPTIONS = {  # model.py's options, set by train.py flags; the window is shorter than block_size 32
    "qk_norm": {"qk_norm": True},
    "attn_bias": {"attn_bias": True},
    "rope_scaling": {"rope_scaling": LLAMA3},
    "sliding_window": {"sliding_window": 8},
    "head_dim": {"head_dim": 8},
    "every-option": {"qk_norm": True, "attn_bias": True, "rope_scaling": LLAMA3, "sliding_window": 8},
}


@pytest.mark.slow
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_each_model_option_trains_from_scratch_and_resumes_exactly(char_data, tmp_path, options):
    flags = [f"--{key}={value!r}" for key, value in options.items()]
    common = ("--eval_interval=4", "--always_save_checkpoint=True", "--lr_decay_iters=8", *flags)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_train(straight, char_data, "--max_iters=8", *common) == 0
    assert run_train(split, char_data, "--max_iters=4", *common) == 0
    assert run_train(split, char_data, "--max_iters=8", "--init_from=resume", *common) == 0

    losses = metric(straight, "loss")
    assert losses[8] < losses[1] - 0.3  # it learns
    assert list(metric(split, "loss").items()) == list(losses.items())
    a, b = load_checkpoint(straight / CKPT_NAME), load_checkpoint(split / CKPT_NAME)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert {key: a["model_args"][key] for key in options} == options


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_run_resumes(char_data, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, *train_cmd(out, char_data, "--max_iters=100000")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=SUBPROCESS_ENV,
    )
    for line in proc.stdout:
        if line.startswith("iter 1: loss"):
            proc.send_signal(signal.SIGTERM)
            break
    output = proc.stdout.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM" in output and "Traceback" not in output
    stopped_at = load_checkpoint(out / CKPT_NAME)["iter_num"]
    assert 1 <= stopped_at < 100

    assert run_train(out, char_data, f"--max_iters={stopped_at + 3}", "--init_from=resume") == 0
    # The final evaluation improved, so it saved.
    assert load_checkpoint(out / CKPT_NAME)["iter_num"] == stopped_at + 3
    assert max(metric(out, "loss")) == stopped_at + 3


def test_crash_during_a_save_leaves_the_previous_checkpoint_loadable(
    char_data, tmp_path, monkeypatch, capsys
):
    real_save = torch.save
    saves = []

    def save_then_crash(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 1:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"half a checkpoint")  # the process dies mid-write
        raise OSError("simulated crash inside torch.save")

    monkeypatch.setattr(torch, "save", save_then_crash)
    out = tmp_path / "out"
    flags = ("--max_iters=4", "--eval_interval=2", "--always_save_checkpoint=True")
    assert run_train(out, char_data, *flags) == 1
    assert capsys.readouterr().err == "error: simulated crash inside torch.save\n"
    assert not list(out.glob("*.tmp"))  # the failed save removed its temporary file
    monkeypatch.undo()
    checkpoint = load_checkpoint(out / CKPT_NAME)
    assert checkpoint["iter_num"] == 2
    model_from_checkpoint(checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_ddp_processes_match_one_process(char_data, tmp_path, optimizer):
    """Same global batches and dropout masks: only the order of float sums differs, so losses agree
    to 1e-5 relative (not bitwise), with either optimizer."""
    flags = ("--max_iters=6", "--gradient_accumulation_steps=4", "--dropout=0.1", f"--optimizer={optimizer}")
    result = subprocess.run(
        [*TORCHRUN, *train_cmd(tmp_path / "ddp", char_data, *flags)],
        capture_output=True,
        text=True,
        env=SUBPROCESS_ENV,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_train(tmp_path / "single", char_data, *flags) == 0
    ddp_loss, single_loss = metric(tmp_path / "ddp", "loss"), metric(tmp_path / "single", "loss")
    assert sorted(ddp_loss) == sorted(single_loss) == [1, 2, 3, 4, 5, 6]
    for it, loss in single_loss.items():
        assert ddp_loss[it] == pytest.approx(loss, rel=1e-5), it


def test_gradient_accumulation_rounds_up_to_a_multiple_of_the_processes_and_says_so(capsys):
    cfg = TrainConfig(gradient_accumulation_steps=5)
    assert fit_to_processes(cfg, 1) == cfg
    assert fit_to_processes(cfg, 5) == cfg and capsys.readouterr().out == ""
    assert fit_to_processes(cfg, 2).gradient_accumulation_steps == 6
    assert "gradient_accumulation_steps 5 -> 6" in capsys.readouterr().out


@pytest.mark.slow
def test_the_main_config_runs_under_torchrun_on_two_processes_as_it_is(char_data, tmp_path):
    command = [*TORCHRUN, str(REPO / "train.py"), str(REPO / "configs/shakespeare_char.py")]
    command += [f"--out_dir={tmp_path / 'out'}", f"--data_dir={char_data}", "--max_iters=4", "--eval_iters=2"]
    result = subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("gradient_accumulation_steps 1 -> 2") == 1  # said once, by rank 0
    assert result.stdout.count("done: iter 4") == 1
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["gradient_accumulation_steps"] == 2  # what a resume in any number of processes continues


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(char_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_train(out, char_data, "--max_iters=2", "--always_save_checkpoint=True") == 0
    good = (out / CKPT_NAME).read_bytes()
    assert run_train(out, char_data, "--max_iters=6", "--init_from=resume", "--learning_rate=1e30") == 1
    assert "training diverged" in capsys.readouterr().err
    assert (out / CKPT_NAME).read_bytes() == good


def test_init_from_a_converted_checkpoint_starts_a_new_run_with_its_shape(char_data, tmp_path, capsys):
    source = tmp_path / "converted"
    source.mkdir()
    shape = GPTConfig(
        vocab_size=65,
        block_size=16,
        n_layer=1,
        n_head=2,
        n_embd=16,
        tie_embeddings=False,
        intermediate_size=24,
    )
    save_checkpoint(
        {
            "model": GPT(shape).state_dict(),
            "model_args": vars(shape),
            "iter_num": 0,
            "config": {},
            "tokenizer": {"tokenizer": "char"},
        },
        source / CKPT_NAME,
    )
    out = tmp_path / "out"
    assert (
        run_train(out, char_data, f"--init_from={source}", "--max_iters=2", "--always_save_checkpoint=True")
        == 0
    )
    assert "shape comes from" in capsys.readouterr().out
    checkpoint = load_checkpoint(out / CKPT_NAME)
    assert checkpoint["model_args"] == vars(shape)
    assert checkpoint["config"]["block_size"] == 16 and checkpoint["iter_num"] == 2
    assert checkpoint["tokenizer"]["vocab_size"] == 65  # the data set's tokenizer, not the source's
    # The fine-tune resumes from its out_dir alone, though TrainConfig cannot state an untied head.
    with pytest.raises(SystemExit) as exit_info:
        train.main([f"--out_dir={out}", "--init_from=resume", "--max_iters=4"])
    assert exit_info.value.code == 0 and load_checkpoint(out / CKPT_NAME)["iter_num"] == 4


def test_eval_only_reports_the_full_val_loss_of_a_checkpoint(char_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_train(out, char_data, "--max_iters=2", "--always_save_checkpoint=True") == 0
    before = (out / CKPT_NAME).read_bytes()
    (out / "config.json").unlink()  # deliberately without the run's config: the checkpoint gives the shape
    flags = ["--eval_only", "--init_from=resume", "--eval_iters=2", "--batch_size=64"]
    with pytest.raises(SystemExit) as exit_info:
        train.main([f"--out_dir={out}", f"--data_dir={char_data}", *flags])
    assert exit_info.value.code == 0
    assert "full val loss" in capsys.readouterr().out
    assert set(metric(out, "val_loss_full")) == {2}
    assert (out / CKPT_NAME).read_bytes() == before


def test_full_val_loss_predicts_every_token_exactly_once():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    tokens = (
        np.random.default_rng(0).integers(0, 11, size=103).astype(np.uint16)
    )  # 102 targets: 12 windows + 6
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, 8):
            chunk = torch.from_numpy(tokens[start : start + 9].astype(np.int64))[None]
            logits, _ = model(chunk[:, :-1], chunk[:, 1:])
            total += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
    expected = total / (len(tokens) - 1)
    assert full_val_loss(model, tokens, 8, 5, torch.device("cpu")) == pytest.approx(expected, rel=1e-6)


def test_bfloat16_autocast_on_cpu_trains_with_finite_loss(char_data, tmp_path):
    assert run_train(tmp_path / "out", char_data, "--max_iters=3", "--dtype=bfloat16") == 0
    assert all(math.isfinite(loss) for loss in metric(tmp_path / "out", "loss").values())


@pytest.mark.slow
def test_wandb_offline_run_completes(char_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert run_train(tmp_path / "out", char_data, "--max_iters=2", "--wandb_log=True") == 0
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*"))


def test_wandb_without_a_login_or_not_installed_stops_in_one_line_naming_the_fix(
    char_data, tmp_path, monkeypatch, capsys
):
    env = {k: v for k, v in SUBPROCESS_ENV.items() if not k.startswith("WANDB_")}
    result = subprocess.run(
        [sys.executable, *train_cmd(tmp_path / "out", char_data, "--max_iters=1", "--wandb_log=True")],
        capture_output=True, text=True, timeout=120, env={**env, "HOME": str(tmp_path)},
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "wandb login" in result.stderr and "WANDB_MODE=offline" in result.stderr
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets when it is not installed
    assert run_train(tmp_path / "out2", char_data, "--max_iters=1", "--wandb_log=True") == 1
    assert "pip install wandb" in capsys.readouterr().err


def test_vocab_is_padded_to_a_multiple_of_64_only_when_large():
    assert train.padded_vocab_size(65) == 65
    assert train.padded_vocab_size(50257) == 50304
    assert train.padded_vocab_size(50304) == 50304


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("config_file", sorted((REPO / "configs").glob("*.py")), ids=lambda p: p.name)
def test_shipped_configs_parse(config_file):
    cfg = parse_config(TrainConfig(), [str(config_file)])
    assert cfg.out_dir != TrainConfig().out_dir  # each config writes to its own out_dir


def test_config_files_then_flags_apply_left_to_right(tmp_path):
    first, second = tmp_path / "first.py", tmp_path / "second.py"
    first.write_text("n_layer = 3\nbatch_size = 5\nlearning_rate = 1  # an int for a float key\n")
    second.write_text("batch_size = 6\n")
    cfg = parse_config(TrainConfig(), [str(first), "--batch_size=7", str(second), "--n_kv_head=None"])
    assert (cfg.n_layer, cfg.batch_size, cfg.learning_rate, cfg.n_kv_head) == (3, 6, 1.0, None)


def test_unknown_key_exits_2_and_suggests_the_closest(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--n_layers=4"])
    assert exit_info.value.code == 2
    assert "did you mean 'n_layer'" in capsys.readouterr().err


def test_wrong_type_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--batch_size=big"])
    assert exit_info.value.code == 2
    assert "batch_size" in capsys.readouterr().err


def test_help_lists_every_key_and_exits_0():
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True, env=SUBPROCESS_ENV
    )
    assert result.returncode == 0
    for key in vars(TrainConfig()):
        assert f"--{key}=" in result.stdout


# --- bad input: one line on stderr, exit 1 (bad files or data) or 2 (bad config values) ----------


def expect_error(
    out_dir: Path, data_dir: Path, flags: list[str], message: str, capsys, code: int = 1
) -> None:
    assert run_train(out_dir, data_dir, *flags) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_missing_data_set_names_the_prepare_command(tmp_path, capsys):
    missing = tmp_path / "shakespeare_char"
    expect_error(tmp_path / "out", missing, [], "python data/shakespeare_char/prepare.py", capsys)


def test_block_size_larger_than_the_data_is_refused(char_data, tmp_path, capsys):
    expect_error(tmp_path / "out", char_data, ["--block_size=200000"], "does not fit the val split", capsys)


def test_resume_with_another_model_shape_is_refused(char_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_train(out, char_data, "--max_iters=1", "--always_save_checkpoint=True") == 0
    expect_error(
        out, char_data, ["--init_from=resume", "--n_layer=3"], "n_layer=2 (config: 3)", capsys, code=2
    )


def test_resume_from_an_empty_or_mistyped_out_dir_says_it_holds_no_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for out_dir in (tmp_path / "empty", tmp_path / "out-resum2"):  # no --data_dir: the default set is absent
        with pytest.raises(SystemExit) as exit_info:
            train.main([f"--out_dir={out_dir}", "--init_from=resume"])
        assert exit_info.value.code == 1
        assert capsys.readouterr().err == (
            f"error: no checkpoint in {out_dir} to resume (no config.json, ckpt.pt or sharded checkpoint): "
            "check --out_dir, or start a run without --init_from=resume\n"
        )
    assert not (tmp_path / "out-resum2").exists()  # a mistyped name does not become a folder


def test_init_from_gpt2_explains_the_architecture_and_names_a_model_to_import(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main([f"--out_dir={tmp_path}", "--init_from=gpt2-medium"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "learned positions, LayerNorm, GELU" in err and "SmolLM2-135M" in err


def test_training_says_when_it_saves_and_ends_with_a_summary(char_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        run_train(out, char_data, "--max_iters=4", "--eval_interval=2", "--always_save_checkpoint=True") == 0
    )
    lines = capsys.readouterr().out.splitlines()
    saves = [line for line in lines if line.startswith("saving checkpoint")]
    assert saves == [f"saving checkpoint to {out} (iter {it})" for it in (2, 4)]
    assert lines[-1].startswith("done: iter 4 in ")
    assert lines[-1].endswith(
        f"checkpoint in {out / CKPT_NAME}; sample with: python sample.py --out_dir={out}"
    )


def test_the_main_job_prints_a_few_lines_before_training_and_saves_the_whole_config(
    char_data, tmp_path, capsys
):
    out = tmp_path / "out"
    argv = [str(REPO / "configs/shakespeare_char.py"), f"--out_dir={out}", f"--data_dir={char_data}"]
    with pytest.raises(SystemExit, match="0"):
        train.main([*argv, "--max_iters=1", "--eval_iters=1", "--eval_full=False"])
    lines = capsys.readouterr().out.splitlines()
    startup = lines[: next(i for i, line in enumerate(lines) if line.startswith("iter 0:"))]
    assert len(startup) <= 15, startup
    assert "mfu" not in "\n".join(lines) and "dataset=" not in "\n".join(startup)  # data_dir is set
    assert json.loads((out / "config.json").read_text()).keys() == asdict(TrainConfig()).keys()


def test_elapsed_s_continues_across_a_resume(char_data, tmp_path):
    out = tmp_path / "out"
    assert (
        run_train(out, char_data, "--max_iters=2", "--always_save_checkpoint=True", "--eval_interval=2") == 0
    )
    assert run_train(out, char_data, "--max_iters=4", "--init_from=resume") == 0
    elapsed = [json.loads(line)["elapsed_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert elapsed == sorted(elapsed) and len(elapsed) > 4


def test_eval_only_adds_no_duplicate_rows_to_metrics(char_data, tmp_path):
    out = tmp_path / "out"
    flags = ("--max_iters=2", "--always_save_checkpoint=True", "--eval_interval=2", "--eval_full=True")
    assert run_train(out, char_data, *flags) == 0
    for _ in range(2):
        assert run_train(out, char_data, "--eval_only=True", "--init_from=resume") == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["iter"], key) for r in records for key in r if key not in ("iter", "elapsed_s")]
    assert len(keys) == len(set(keys)) and (2, "val_loss_full") in keys


def test_out_dir_that_is_a_file_is_refused(char_data, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    expect_error(tmp_path / "file", char_data, [], "is not a directory", capsys, code=2)


# --- one run per out_dir, double signals, resuming from out_dir alone ----------------------------


def start_train(out_dir: Path, data_dir: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *train_cmd(out_dir, data_dir, *flags)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=SUBPROCESS_ENV,
    )


def wait_for_line(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    pytest.fail(f"the run ended before printing {prefix!r}")


@pytest.mark.slow
def test_a_second_run_on_the_same_out_dir_refuses_and_the_first_is_untouched(char_data, tmp_path):
    out = tmp_path / "out"
    first = start_train(
        out, char_data, "--max_iters=100000", "--eval_interval=1", "--always_save_checkpoint=True"
    )
    wait_for_line(first, "iter 2: loss")
    second = subprocess.Popen(
        [sys.executable, *train_cmd(out, char_data, "--max_iters=5")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=SUBPROCESS_ENV,
    )
    reads = 0
    while second.poll() is None or reads < 20:  # the checkpoint is read whole while both run
        assert load_checkpoint(out / CKPT_NAME)["iter_num"] >= 1
        reads += 1
    assert second.returncode == 1
    assert f"in use by another run (process {first.pid})" in second.stderr.read()
    assert first.poll() is None  # the first run went on
    first.send_signal(signal.SIGTERM)
    output = first.stdout.read()
    assert first.wait(timeout=60) == 128 + signal.SIGTERM, output
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    iters = [r["iter"] for r in losses if "loss" in r]
    assert iters == list(range(1, len(iters) + 1))  # nothing emptied or torn by the second run
    assert load_checkpoint(out / CKPT_NAME)["iter_num"] == iters[-1]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_exits_at_once_and_leaves_a_loadable_checkpoint(char_data, tmp_path, sig):
    out = tmp_path / "out"
    proc = start_train(
        out, char_data, "--max_iters=100000", "--eval_interval=1", "--always_save_checkpoint=True"
    )
    wait_for_line(proc, "iter 3: loss")
    proc.send_signal(sig)
    proc.send_signal(sig)  # while the first one's save is under way, or before it
    output = proc.stdout.read()
    assert proc.wait(timeout=60) == 128 + sig, output
    assert "Traceback" not in output
    assert not list(out.glob("*.tmp"))
    model_from_checkpoint(load_checkpoint(out / CKPT_NAME))


@pytest.mark.slow
def test_resume_from_out_dir_alone_continues_the_run_exactly_after_kill_9(char_data, tmp_path):
    config = tmp_path / "run.py"
    config.write_text("max_iters = 8\neval_interval = 2\nalways_save_checkpoint = True\ndropout = 0.1\n")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_train(straight, char_data, str(config)) == 0

    proc = start_train(split, char_data, str(config))
    wait_for_line(proc, "iter 5: loss")
    proc.kill()  # SIGKILL: no chance to save; the checkpoint of iter 4 (or later) stays
    proc.wait(timeout=60)
    assert load_checkpoint(split / CKPT_NAME)["iter_num"] < 8
    with pytest.raises(SystemExit) as exit_info:
        train.main([f"--out_dir={split}", "--init_from=resume"])  # no config file, no data_dir: restored
    assert exit_info.value.code == 0

    records = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == list(range(1, 9))  # each iteration once
    assert [r["iter"] for r in records if "val_loss" in r] == [0, 2, 4, 6, 8]
    assert list(metric(split, "loss").items()) == list(metric(straight, "loss").items())


@pytest.mark.slow
def test_a_signal_during_the_final_evaluation_cuts_it_short_and_saves(char_data, tmp_path):
    out = tmp_path / "out"
    # batch 1 of 8 tokens: the whole-split evaluation takes ~14,000 forward passes, many seconds
    proc = start_train(
        out, char_data, "--max_iters=3", "--eval_full=True", "--batch_size=1", "--block_size=8"
    )
    wait_for_line(proc, "iter 3: train loss")  # the last periodic evaluation; the full one starts now
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    signalled = time.time()
    output = proc.stdout.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, output
    assert time.time() - signalled < 3, "the evaluation went on after the signal"
    assert "stopped by SIGTERM at iter 3" in output and "full val loss" not in output
    assert load_checkpoint(out / CKPT_NAME)["iter_num"] == 3


# --- optimizers and schedules -------------------------------------------------------------------


def test_muon_takes_exactly_the_2d_matrices_inside_the_blocks():
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=16, tie_embeddings=False,
                          qk_norm=True, attn_bias=True))  # fmt: skip
    muon, adamw = make_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu", muon_lr=0.02)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): name for name, p in model.named_parameters()}
    muon_names = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    kinds = ("attn.wqkv.weight", "attn.wo.weight", "mlp.gate_up.weight", "mlp.down.weight")
    assert muon_names == {f"layers.{i}.{kind}" for i in range(2) for kind in kinds}
    adamw_names = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert adamw_names == set(names.values()) - muon_names  # embedding, head, norms, biases, q/k norms
    assert muon.param_groups[0]["lr_scale"] == pytest.approx(20.0)


def muon_steps(groups: list[dict], grads: list[list[torch.Tensor]], optimizer=Muon) -> None:
    muon = optimizer(groups, lr=0.02, weight_decay=0.1, momentum=0.95)
    params = [p for group in groups for p in group["params"]]
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad
        muon.step()


def test_muon_orthogonalises_each_part_of_a_fused_matrix_as_a_matrix_of_its_own():
    torch.manual_seed(0)
    parts = (32, 8, 8)  # q, k, v of a GQA layer: 4 query heads, 1 key/value head of size 8
    fused = torch.randn(48, 16, requires_grad=True)
    apart = [w.detach().clone().requires_grad_() for w in fused.detach().split(parts)]
    grads = [torch.randn(48, 16) for _ in range(3)]
    muon_steps([{"params": [fused], "parts": parts}], [[g] for g in grads])
    muon_steps([{"params": apart}], [list(g.split(parts)) for g in grads])
    torch.testing.assert_close(fused.detach(), torch.cat([w.detach() for w in apart]), rtol=0, atol=1e-6)


def test_muon_matches_torch_muon_up_to_its_bfloat16_newton_schulz():
    torch.manual_seed(0)
    start = [torch.randn(48, 16), torch.randn(16, 48), torch.randn(16, 16)]
    grads = [[torch.randn_like(w) for w in start] for _ in range(3)]
    ours, theirs = ([w.clone().requires_grad_() for w in start] for _ in range(2))
    muon_steps([{"params": ours}], grads)
    muon_steps([{"params": theirs}], grads, optimizer=torch.optim.Muon)
    for w0, a, b in zip(start, ours, theirs):
        ours_moved, theirs_moved = a.detach() - w0, b.detach() - w0
        assert (ours_moved - theirs_moved).norm() < 0.02 * theirs_moved.norm()  # bf16 keeps 8 bits
        assert (ours_moved - theirs_moved).norm() > 1e-4 * theirs_moved.norm()  # ours is float32 on CPU


def test_newton_schulz_brings_every_singular_value_near_one():
    torch.manual_seed(0)
    G = torch.randn(3, 64, 16) * torch.logspace(-1, 1, 16)  # column scales 0.1 to 10
    for matrices in (G, G.mT):  # tall and wide
        orthogonal = newton_schulz(matrices, (3.4445, -4.7750, 2.0315), steps=5, eps=1e-7)  # torch's
        singular_values = torch.linalg.svdvals(orthogonal)
        assert singular_values.min() > 0.5 and singular_values.max() < 1.5, singular_values


def test_zero_init_out_proj_zeroes_the_output_projections_and_keeps_every_other_weight():
    config = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=16, tie_embeddings=False)
    torch.manual_seed(0)
    default = GPT(config).state_dict()
    torch.manual_seed(0)
    zeroed = GPT(config, zero_init_out_proj=True).state_dict()
    for name, tensor in zeroed.items():
        is_out_proj = name.endswith(("attn.wo.weight", "mlp.down.weight"))
        assert torch.equal(tensor, torch.zeros_like(tensor) if is_out_proj else default[name]), name


def test_wsd_schedule_warms_up_holds_then_decays_linearly_to_min_lr():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=100, lr_schedule="wsd")
    lrs = [train.get_lr(it, cfg) for it in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)  # warmup as cosine's
    assert all(lr == 1.0 for lr in lrs[10:80])  # constant until the last decay_frac = 0.2 of 100
    assert lrs[90] == pytest.approx(0.55) and lrs[99] == pytest.approx(0.145)  # linear from 80 to 100
    assert all(lr == 0.1 for lr in lrs[100:])
    cosine = replace(cfg, lr_schedule="cosine")
    assert train.get_lr(55, cosine) == pytest.approx(0.55) and train.get_lr(100, cosine) == 0.1


def test_resuming_with_the_other_optimizer_is_refused(char_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_train(out, char_data, "--max_iters=2", "--always_save_checkpoint=True") == 0
    assert run_train(out, char_data, "--max_iters=4", "--init_from=resume", "--optimizer=muon") == 2
    assert "trained with optimizer='adamw'" in capsys.readouterr().err
