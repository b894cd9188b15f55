"""Sharded training (parallelism=fsdp, FSDP2's fully_shard) on 2 gloo processes against DDP and one
process, and sharded checkpoints (torch.distributed.checkpoint) that resume on any number of processes,
sharded or not, and that sample.py and convert.py read directly.

Tolerance: the processes see the same global batches and dropout masks, so only the order of float
sums differs; losses agree to 1e-5 relative (observed ~1e-7), as DDP against one process does.
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from conftest import TORCHRUN

import train
from checkpoint import CKPT_NAME, LATEST_SHARDED, find_checkpoint, load_checkpoint, model_from_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = (
    "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=3",
    "--gradient_accumulation_steps=4", "--eval_interval=2", "--always_save_checkpoint=True",
    "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3", "--lr_decay_iters=10", "--dropout=0.1",
    "--eval_full=False",
)  # fmt: skip
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"}


def run(out_dir: Path, data_dir: Path, *flags: str, nproc: int = 1, timeout: float = 300) -> str:
    """train.py as its own process(es); its output. Every run, one or two processes, must exit 0. Past
    timeout the run's processes are killed (a hung collective ignores SIGTERM), and the test fails."""
    launcher = {1: [sys.executable], 2: TORCHRUN}[nproc]
    proc = subprocess.Popen(
        [*launcher, str(REPO / "train.py"), f"--out_dir={out_dir}", f"--data_dir={data_dir}",
         *TINY, *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out_dir.parent,
        env={**ENV, "TIKTOKEN_CACHE_DIR": str(REPO.parent / "shared" / "tiktoken_cache")},
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for worker in psutil.Process(proc.pid).children(recursive=True):  # torchrun's: sessions of their own
            worker.kill()
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"train.py did not finish in {timeout} s:\n{stdout[-2000:]}{stderr[-2000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


def losses(out_dir: Path) -> dict[int, float]:
    records = map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
    return {r["iter"]: r["loss"] for r in records if "loss" in r}


def assert_close(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(a) == sorted(b)
    for it in a:
        assert a[it] == pytest.approx(b[it], rel=1e-5), it


def parameter_mib(output: str) -> float:
    return float(re.search(r"memory per process \(.*?\): parameters ([\d.e+-]+) MiB", output).group(1))


@pytest.fixture(scope="module")
def one_process(char_data, tmp_path_factory) -> tuple[Path, str]:
    """The reference: 10 iterations in one process."""
    out = tmp_path_factory.mktemp("one") / "out"
    return out, run(out, char_data, "--max_iters=10")


@pytest.mark.slow
def test_fsdp_matches_ddp_and_one_process_and_halves_the_memory(char_data, one_process, tmp_path):
    reference, one_output = one_process
    fsdp_output = run(tmp_path / "fsdp", char_data, "--max_iters=10", "--parallelism=fsdp", nproc=2)
    run(tmp_path / "ddp", char_data, "--max_iters=10", "--parallelism=ddp", nproc=2)
    assert_close(losses(tmp_path / "fsdp"), losses(reference))
    assert_close(losses(tmp_path / "ddp"), losses(reference))
    # parameters, gradients and AdamW state per process: about half at 2 processes (uneven shards pad)
    assert parameter_mib(fsdp_output) == pytest.approx(parameter_mib(one_output) / 2, rel=0.1)


@pytest.mark.slow
def test_fsdp_with_muon_matches_ddp_with_muon(char_data, tmp_path):
    """Muon orthogonalises whole matrices under fsdp too: each process gathers the sharded updates."""
    for parallelism in ("fsdp", "ddp"):
        flags = ("--max_iters=6", "--optimizer=muon", f"--parallelism={parallelism}")
        run(tmp_path / parallelism, char_data, *flags, nproc=2)
    assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "ddp"))


@pytest.mark.slow
def test_an_fsdp_run_resumes_in_one_process_with_no_extra_flag(char_data, one_process, tmp_path):
    """parallelism, like device and compile, follows the machine at hand, not the saved config."""
    reference, _ = one_process
    out = tmp_path / "out"
    run(out, char_data, "--max_iters=2", "--parallelism=fsdp", nproc=2)
    output = run(out, char_data, "--max_iters=4", "--init_from=resume")
    assert "device, parallelism, compile follow this machine" in output and "resumed from iter 2" in output
    assert json.loads((out / "config.json").read_text())["parallelism"] == "ddp"
    assert_close(losses(out), {it: loss for it, loss in losses(reference).items() if it <= 4})


@pytest.mark.slow
def test_checkpoints_resume_across_process_counts_and_sharding(char_data, one_process, tmp_path):
    """1 process -> fsdp on 2 -> 1 process -> fsdp on 2 -> ddp on 2 with activation checkpointing,
    2 iterations each: the same losses as 10 iterations in one process."""
    reference, _ = one_process
    out = tmp_path / "out"
    run(out, char_data, "--max_iters=2")
    legs = [("fsdp", 2, 4), ("ddp", 1, 6), ("fsdp", 2, 8), ("ddp", 2, 10)]
    for parallelism, nproc, max_iters in legs:
        flags = [f"--max_iters={max_iters}", "--init_from=resume", f"--parallelism={parallelism}"]
        if max_iters == 10:
            flags.append("--activation_checkpointing=True")
        output = run(out, char_data, *flags, nproc=nproc)
        assert f"resumed from iter {max_iters - 2}" in output
        sharded = (out / LATEST_SHARDED).is_file()
        assert sharded == (parallelism == "fsdp") and (out / CKPT_NAME).is_file() == (not sharded)
        assert len(list(out.glob("ckpt-*"))) == int(sharded)  # the replaced checkpoints are gone
    assert_close(losses(out), losses(reference))


@pytest.mark.slow
def test_a_sharded_checkpoint_samples_exports_and_survives_a_killed_save(char_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    run(out, char_data, "--max_iters=2", "--parallelism=fsdp", nproc=2)
    good = find_checkpoint(out)
    assert good.is_dir() and load_checkpoint(out)["iter_num"] == 2
    # A save killed half-way: its folder exists, but ckpt.latest still names the complete one.
    (out / "ckpt-00000003-dead00").mkdir()
    (out / "ckpt-00000003-dead00" / "__0_0.distcp").write_bytes(b"half")
    assert find_checkpoint(out) == good
    run(out, char_data, "--max_iters=4", "--init_from=resume", "--parallelism=fsdp", nproc=2)
    assert not (out / "ckpt-00000003-dead00").exists()  # the resumed run removed the broken folder

    checkpoint = load_checkpoint(out)
    model = model_from_checkpoint(checkpoint).eval()
    sample = subprocess.run(
        [sys.executable, str(REPO / "sample.py"), f"--out_dir={out}", "--start=ROMEO:", "--max_new_tokens=8",
         "--temperature=0"], capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    assert sample.returncode == 0 and sample.stdout.startswith("ROMEO:"), sample.stderr
    export = subprocess.run(
        [sys.executable, str(REPO / "convert.py"), "export", str(out), str(tmp_path / "hf")],
        capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 65, (2, 16))
    with torch.no_grad():
        ours = model(idx, torch.zeros_like(idx))[0]
        assert (hf(idx).logits - ours).abs().max() < 1e-4


def test_fsdp_in_one_process_takes_the_sharded_path_with_the_same_losses(char_data, one_process, tmp_path):
    """python train.py --parallelism=fsdp, no torchrun: a process group of one, so that one GPU can run
    the sharded code path (it saves no memory, and says so)."""
    reference, _ = one_process
    output = run(tmp_path / "fsdp", char_data, "--max_iters=10", "--parallelism=fsdp")
    assert "fsdp in one process, the sharded code path: it saves no memory" in output
    assert (tmp_path / "fsdp" / LATEST_SHARDED).is_file()
    assert_close(losses(tmp_path / "fsdp"), losses(reference))


@pytest.mark.slow
def test_fsdp_in_bf16_scores_tasks_split_unevenly_over_the_processes(char_data, tmp_path):
    """FSDP's bf16 mixed-precision policy on gloo, scoring multiple-choice tasks at each evaluation
    with one choice per forward pass: a sharded forward is a collective, so each process must make as
    many. tiny_task's first 4 examples give the processes 2 each, of 6 and 4 choices; three.jsonl's 3
    give one process 2 and the other 1. Unequal forward passes would hang until the timeout."""
    task = REPO / "tests" / "tiny_task.jsonl"
    three = tmp_path / "three.jsonl"
    three.write_text("".join(task.read_text().splitlines(keepends=True)[:3]))
    out = tmp_path / "out"
    flags = ("--max_iters=2", "--parallelism=fsdp", "--dtype=bfloat16", f"--eval_tasks={task},{three}")
    run(out, char_data, *flags, "--eval_task_examples=4", "--batch_size=1", nproc=2, timeout=60)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "three/acc" in r and "tiny_task/acc" in r]
    assert [r["iter"] for r in scored] == [0, 2]
    assert all(0 <= r[k] <= 1 for r in scored for k in ("three/acc", "tiny_task/acc_norm"))
    assert all(math.isfinite(loss) for loss in losses(out).values())


def test_an_unknown_parallelism_is_a_config_error(char_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main([f"--out_dir={tmp_path}", f"--data_dir={char_data}", "--parallelism=tp"])
    assert exit_info.value.code == 2 and "'ddp' or" in capsys.readouterr().err


def test_activation_checkpointing_gives_the_same_losses(char_data, tmp_path):
    outputs = {}
    for checkpointing in (False, True):
        out = tmp_path / str(checkpointing)
        with pytest.raises(SystemExit, match="0"):
            train.main([f"--out_dir={out}", f"--data_dir={char_data}", *TINY, "--max_iters=4",
                        f"--activation_checkpointing={checkpointing}"])  # fmt: skip
        outputs[checkpointing] = losses(out)
    assert outputs[True] == pytest.approx(outputs[False], rel=1e-6)


@pytest.mark.slow
def test_kill_9_of_one_worker_during_sharded_saves_leaves_a_resumable_checkpoint(char_data, tmp_path):
    out = tmp_path / "out"
    command = [*TORCHRUN, str(REPO / "train.py"), f"--out_dir={out}", f"--data_dir={char_data}", *TINY,
               "--eval_interval=1", "--max_iters=100000", "--parallelism=fsdp"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    for line in proc.stdout:
        if line.startswith("iter 4: loss"):  # saving every iteration from here on
            break
    workers = [
        p for p in psutil.Process(proc.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())
    ]
    workers[-1].kill()  # one worker dies mid-run, most likely inside a save
    proc.stdout.read()
    assert proc.wait(timeout=120) != 0  # torchrun ends the other worker and reports the failure
    iter_num = load_checkpoint(out)["iter_num"]
    assert iter_num >= 3  # the save of iter 4 may have been the one cut short
    run(out, char_data, f"--max_iters={iter_num + 2}", "--init_from=resume", "--parallelism=fsdp", nproc=2)
    assert load_checkpoint(out)["iter_num"] == iter_num + 2
