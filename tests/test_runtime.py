"""runtime.py: device and dtype choice, atomic writes, the peak table, the exit-code policy."""

import errno

import pytest
import torch

import runtime
from runtime import (
    ConfigError,
    UserError,
    atomic_write,
    datasheet_peak_flops,
    exit_on_error,
    pick_device,
    pick_dtype,
)


def test_auto_dtype_is_float32_off_cuda_and_names_are_checked():
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype='half'"):
        pick_dtype("half", cpu)


def test_unknown_or_absent_devices_are_config_errors():
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="unknown device 'tpu9'"):
        pick_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="not available"):
            pick_device("cuda")


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835.5e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835.5e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40", 181e12),  # not the L4
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA A10G", None),  # not the A10: no datasheet, no guess
        ("NVIDIA GH200 480GB", None),  # not the H200
        ("Some Future GPU", None),
    ],
)
def test_peak_flops_match_whole_words_of_the_gpu_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    assert datasheet_peak_flops(torch.device("cuda", 0)) == (None if peak is None else (name, peak))


def test_no_peak_off_cuda():
    assert datasheet_peak_flops(torch.device("cpu")) is None  # no invented number for a CPU


def test_atomic_write_replaces_whole_or_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def fail_midway(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left on device") as error:
        atomic_write(path, fail_midway)
    assert error.value.filename == str(path)  # the file the user knows, not the temporary one
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


@pytest.mark.parametrize(
    "error, code", [(UserError("no such file"), 1), (ConfigError("bad flag"), 2), (KeyboardInterrupt(), 130)]
)
def test_exit_codes_follow_the_policy(error, code, capsys):
    def run():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(run)
    assert exit_info.value.code == code
    if isinstance(error, UserError):
        assert capsys.readouterr().err == f"error: {error}\n"


def test_print0_prints_on_rank_0_only(monkeypatch, capsys):
    runtime.print0("shown")
    monkeypatch.setattr(runtime, "world", lambda: (1, 2))
    runtime.print0("hidden")
    assert capsys.readouterr().out == "shown\n"
