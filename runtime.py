"""What the command-line programs share at run time: errors and exit codes, device and dtype choice,
atomic file writes, the GPU peak table for MFU, and printing on rank 0 only.

Exit codes, the same for every CLI (docs/errors.md): 0 done; 1 bad input or a fault of the environment
found at run time; 2 a bad flag or config value; 130 / 143 stopped by Ctrl-C / SIGTERM. Anything else is
a bug: one line that says so ("internal error"), exit code 1.

torch is imported inside the functions that need it: the data preparation scripts use this module
too, and they start in a fifth of a second without torch, in over a second with it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NoReturn

if TYPE_CHECKING:
    import torch

PathLike = str | Path
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # torch dtypes a CLI may be asked for, by name


class UserError(Exception):
    """A problem the person at the terminal can fix; the message says what is wrong and what to do."""

    exit_code = 1


class ConfigError(UserError):
    """A bad flag or config value."""

    exit_code = 2


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or inconsistent; the message says which and why."""


DEBUG_ENV = "LLM_TRAIN_DEBUG"  # set to 1 to see the traceback behind an error message
TORCHRUN_REPORT_DELAY_S = 3.0  # torchrun polls its workers every 0.1 s; a process exits within a second
OS_ERROR_HINTS = {
    errno.ENOSPC: "free some disk space or write somewhere else",
    errno.EDQUOT: "free some of your disk quota or write somewhere else",
    errno.EACCES: "check the permissions, or write somewhere else",
    errno.EPERM: "check the permissions, or write somewhere else",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.EEXIST: "a file stands where a folder is needed: choose another path",
    errno.ENOTDIR: "a file stands where a folder is needed: choose another path",
    errno.EFBIG: "the file outgrew the size this process may write (ulimit -f) or the file system allows",
}


def os_error_behind(e: BaseException) -> OSError | None:
    """The OSError that caused e, if any. torch's and safetensors' writers turn a full disk into their
    own RuntimeError while handling the OSError, which then survives only as the error's context."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def describe_os_error(e: OSError) -> str:
    """'<what failed>: <file>; <what to do>', e.g. for a full disk during a save."""
    text = e.strerror or str(e)
    if e.filename:
        text += f": {e.filename}"
    hint = OS_ERROR_HINTS.get(e.errno)
    return f"{text}; {hint}" if hint else text


def debug_mode() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def exit_on_error(run: Callable[[], int | None]) -> NoReturn:
    """Run a CLI's work and exit with its code. A UserError or an OSError becomes one line on stderr
    and its exit code; Ctrl-C exits 130. Any other exception is a bug, reported as one: the last
    resort, which no known bad input may reach."""
    try:
        code = run() or 0
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else the exit-time flush fails again
        code = 1
    except Exception as e:
        os_error = os_error_behind(e)
        if isinstance(e, UserError):
            message, code = str(e), e.exit_code
        elif os_error is not None:
            message, code = describe_os_error(os_error), 1
        else:
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            message = f"internal error: {reason}; {DEBUG_ENV}=1 shows the traceback; please report it"
            code = 1
        if debug_mode():
            traceback.print_exc()
        report_error(f"error: {message}")
    sys.exit(code)


def report_error(line: str) -> None:
    """line on stderr; under torchrun, in its error file instead: torchrun's failure report then shows
    it, once, as the root cause. A process other than rank 0 waits first, so that when every process
    fails alike, torchrun has seen rank 0 fail and stops the others before they write theirs."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")  # set by torchrun for each of its workers
    if error_file:
        if os.environ.get("RANK", "0") != "0":
            time.sleep(TORCHRUN_REPORT_DELAY_S)
        with contextlib.suppress(OSError), open(error_file, "w") as f:
            record = {"py_callstack": line, "timestamp": str(int(time.time()))}  # the report shows the first
            json.dump({"message": {"message": line, "extraInfo": record}}, f)
            return
    print(line, file=sys.stderr)


# --- device and precision -------------------------------------------------------------------------


def pick_device(requested: str = "auto", local_rank: int | None = None) -> torch.device:
    """'auto' is cuda, then mps, then cpu. Under torchrun each process takes the GPU of its local rank."""
    import torch

    if requested == "auto":
        requested = (
            "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        )
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):  # torch knows xpu, meta, ...; these programs do not
        raise ConfigError(f"device={requested!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, True):
        raise ConfigError(f"device={requested!r} is not available on this machine; use --device=auto or cpu")
    if device.type == "cuda":
        device = cuda_device(requested, device.index if local_rank is None else local_rank)
    return device


def cuda_device(requested: str, index: int | None) -> torch.device:
    """GPU index (None: the first), made this process's current GPU; one the machine lacks is a
    ConfigError. Under torchrun index is the local rank: one GPU per process."""
    import torch

    index = index or 0  # torch.cuda.set_device refuses a device without an index
    count = torch.cuda.device_count()
    if index >= count:
        if "LOCAL_RANK" in os.environ:
            hint = f"start at most {count} processes per machine: torchrun --nproc_per_node={count}"
        else:
            hint = f"use cuda:0 to cuda:{count - 1}"
        raise ConfigError(f"device={requested!r}: GPU {index} asked for, this machine has {count}; {hint}")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on CUDA, float16 on a GPU without bf16 (training adds a gradient scaler),
    float32 elsewhere: most CPUs have no fast bf16 matmuls."""
    import torch

    if requested == "auto":
        if device.type != "cuda":
            return torch.float32
        # Emulated bf16 (a T4, a V100) is several times slower than float16 and has no flash attention.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if requested not in DTYPE_NAMES:
        raise ConfigError(f"dtype={requested!r}: use auto, {', '.join(DTYPE_NAMES)}")
    if requested == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        gpu = torch.cuda.get_device_name(device)
        raise ConfigError(f"{gpu} cannot compute in bfloat16; use --dtype=auto")
    return getattr(torch, requested)


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Mixed precision in dtype (bf16, fp16) on device, or a no-op for float32: how every CLI computes."""
    import torch

    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets (half their "with sparsity"
# figures). A key matches whole words of the device name, in order, most words first: "NVIDIA H100
# PCIe" is the PCIe card, "NVIDIA H100 80GB HBM3" the SXM one, and an L40 is not an L4. A GPU not
# listed has no MFU rather than a guessed one (an A10G, AWS's A10 variant, has no datasheet).
GPU_BF16_PEAK_FLOPS = {
    "B200": 2250e12,
    "H200 NVL": 835.5e12,
    "H200": 989e12,  # SXM
    "H100 NVL": 835.5e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,  # SXM and PCIe alike
    "L40S": 362e12,
    "L40": 181e12,
    "A10": 125e12,
    "L4": 121e12,
}


def name_words(name: str) -> list[str]:
    """'NVIDIA A100-SXM4-80GB' -> ['nvidia', 'a100', 'sxm4', '80gb']."""
    return re.split(r"[\s\-_]+", name.strip().lower())


def peak_for_name(name: str) -> float | None:
    """The datasheet peak whose key's words appear together in name's words; the longest key wins."""
    words = name_words(name)
    for key in sorted(GPU_BF16_PEAK_FLOPS, key=lambda k: -len(name_words(k))):
        key_words = name_words(key)
        n = len(key_words)
        if any(words[i : i + n] == key_words for i in range(len(words) - n + 1)):
            return GPU_BF16_PEAK_FLOPS[key]
    return None


def datasheet_peak_flops(device: torch.device) -> tuple[str, float] | None:
    """(name, bf16 datasheet peak FLOP/s) of a known CUDA device; None on CPU, MPS or an unlisted GPU."""
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    peak = peak_for_name(name)
    return None if peak is None else (name, peak)


# --- files ----------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Make the renames inside folder path durable (POSIX; Windows cannot open a folder)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write path through write(file): into a uniquely named temporary file beside it, fsync, then
    rename over path. A crash at any moment leaves the old file or the new one, never a torn one; a
    failed write removes its temporary file."""

    def write_new(tmp_path: Path) -> None:
        with open(tmp_path, "xb") as f:
            write(f)

    atomic_write_by_name(path, write_new)


def atomic_write_by_name(path: PathLike, write: Callable[[Path], None]) -> None:
    """atomic_write for writers that take a file name (safetensors' save_file): write(name) creates
    the temporary file, and what it wrote (whatever inode and mode it gave the file) is fsynced and
    given a new file's usual mode before the rename."""
    path = Path(path)
    tmp_path = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp_path)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # save_file creates its files 0600
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        os_error = os_error_behind(e)
        if os_error is not None and os_error.errno:  # name the file the user knows, not the temporary one
            raise OSError(os_error.errno, os_error.strerror, str(path)) from e
        raise
    fsync_dir(path.parent)


def world() -> tuple[int, int]:
    """(rank, world_size) of this process: (0, 1) when not started by torchrun."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def print0(message: str) -> None:
    """Print on rank 0 only, above a progress bar, flushed so that a piped log shows it at once."""
    from tqdm import tqdm

    if world()[0] == 0:
        tqdm.write(message)
        sys.stdout.flush()
