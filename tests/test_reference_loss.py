"""A reference loss curve, as torchtitan keeps one: a tiny deterministic CPU run whose per-iteration
losses must equal the committed tests/reference_loss.json within REL_TOL. Silent numerical drift (a
changed norm epsilon, initialisation, schedule or data order) fails here: changing the RMSNorm epsilon
from 1e-5 to 1e-6 moves these losses by far more than REL_TOL, while other CPU kernels or thread
counts move them by about 1e-6 relative.

Regenerate the file only after a deliberate change to the numerics, and say why in the commit:

    UPDATE_REFERENCE=1 python -m pytest tests/test_reference_loss.py
"""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

import train

REFERENCE = Path(__file__).with_name("reference_loss.json")
REL_TOL = 1e-4
FLAGS = (
    "--n_layer=2", "--n_head=4", "--n_kv_head=2", "--n_embd=64", "--block_size=64", "--batch_size=8",
    "--gradient_accumulation_steps=2", "--max_iters=40", "--warmup_iters=5", "--learning_rate=3e-3",
    "--min_lr=3e-4", "--eval_interval=20", "--eval_iters=2", "--log_interval=1", "--eval_full=False",
    "--seed=3",
)  # fmt: skip


def training_losses(out_dir: Path, data_dir: Path) -> dict[str, float]:
    """{iteration: loss} of the reference run, single-threaded as CI runs it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as exit_info:
            train.main([f"--out_dir={out_dir}", f"--data_dir={data_dir}", *FLAGS])
    finally:
        torch.set_num_threads(threads)
    assert exit_info.value.code == 0
    records = map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
    return {str(r["iter"]): r["loss"] for r in records if "loss" in r}


def max_relative_difference(losses: dict[str, float], reference: dict[str, float]) -> float:
    assert losses.keys() == reference.keys()
    return max(abs(losses[k] - reference[k]) / abs(reference[k]) for k in reference)


def test_losses_match_the_committed_reference_curve(char_data, tmp_path):
    losses = training_losses(tmp_path, char_data)
    if os.environ.get("UPDATE_REFERENCE"):
        command = "UPDATE_REFERENCE=1 python -m pytest tests/test_reference_loss.py"
        REFERENCE.write_text(
            json.dumps({"regenerate_with": command, "flags": FLAGS, "loss": losses}, indent=1) + "\n"
        )
    reference = json.loads(REFERENCE.read_text())
    assert tuple(reference["flags"]) == FLAGS, "the run's flags changed: regenerate the reference (see above)"
    assert max_relative_difference(losses, reference["loss"]) < REL_TOL


def test_a_changed_norm_epsilon_moves_the_curve_beyond_the_tolerance(char_data, tmp_path, monkeypatch):
    """The tolerance is tight enough to catch a small numerical change."""
    model_config = train.model_config
    monkeypatch.setattr(
        train, "model_config", lambda *a: dataclasses.replace(model_config(*a), norm_eps=1e-6)
    )
    losses = training_losses(tmp_path, char_data)
    assert max_relative_difference(losses, json.loads(REFERENCE.read_text())["loss"]) > 10 * REL_TOL
