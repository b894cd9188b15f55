"""tests/gpu_check.py, the GPU command, run at its CPU sizes: its own code, every part of it, runs here
first, so that a GPU's short loan is spent on the GPU's answers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_every_check_at_cpu_sizes_and_prints_its_table(tmp_path):
    results = tmp_path / "gpu_check.json"
    command = [sys.executable, str(REPO / "tests" / "gpu_check.py"), "--device=cpu", f"--json={results}"]
    done = subprocess.run(
        [*command, f"--work_dir={tmp_path / 'runs'}"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checks = json.loads(results.read_text())["checks"]
    names = [check["name"] for check in checks]
    assert len(names) == 10 and not [c for c in checks if c["ok"] is False]
    for part in (
        "float16 + gradient scaler",
        "resume",
        "sample.py",
        "generation batch 8",
        "training speed",
        "fsdp",
    ):
        assert any(name.startswith(part) for name in names), part
    table = done.stdout[done.stdout.index("\ncheck ") :]
    assert all(name in table for name in names) and "10 checks, 0 failed" in table
