"""out_dir/metrics.jsonl: one JSON record per line, each with the iteration it belongs to ("iter") and
the seconds the run has been running ("elapsed_s": since this process started, plus, in a resumed
run, the last elapsed_s kept from the run it continues, so time never goes backwards). Written by
train.py (MetricsLog, and start_wandb if asked), read by train.py (resume), plot.py and race.py
(read_records)."""

import errno
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from runtime import UserError, atomic_write

METRICS_NAME = "metrics.jsonl"
STARTED = time.time()  # records carry the wall time since this process started


def metrics_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / METRICS_NAME


def read_records(path: Path) -> tuple[list[dict], int]:
    """(the records of a metrics.jsonl, how many non-empty lines were unreadable); none if the file does
    not exist. A line cut short by a crash, or by a run still writing, is such a line."""
    records, skipped = [], 0
    for line in path.read_bytes().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        iteration = record.get("iter") if isinstance(record, dict) else None
        if isinstance(iteration, int) and not isinstance(iteration, bool):
            records.append(record)
        else:  # also valid JSON that is not a record (42, [1], {} without "iter"): damage, not a record
            skipped += line.strip() != b""
    return records, skipped


class MetricsLog:
    """Appends records to out_dir/metrics.jsonl, and to a wandb run when given one.

    keep=None starts a new log; otherwise the records for which keep(record) is true stay (a resumed
    run drops what the interrupted one logged past its checkpoint, so no iteration appears twice) and
    a line cut short by a crash goes. A record is written whole or not at all, even on a full disk. out_dir
    None: a log that writes nothing, for the processes other than rank 0."""

    def __init__(self, out_dir: str | None, keep: Callable[[dict], bool] | None, wandb_run=None):
        self.path, self.wandb_run = None if out_dir is None else metrics_path(out_dir), wandb_run
        self.elapsed_before = 0.0  # seconds the run had been running before this process
        if self.path is None:
            return
        records = read_records(self.path)[0] if keep is not None else []
        kept = [record for record in records if keep(record)]
        self.elapsed_before = max((record.get("elapsed_s", 0.0) for record in kept), default=0.0)
        lines = "".join(json.dumps(record) + "\n" for record in kept)
        atomic_write(self.path, lambda f: f.write(lines.encode()))

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        record = {**record, "elapsed_s": round(self.elapsed_before + time.time() - STARTED, 3)}
        line = (json.dumps(record) + "\n").encode()
        with self.path.open("ab", buffering=0) as f:  # unbuffered: one write call, or an error
            end = f.seek(0, os.SEEK_END)
            try:
                if f.write(line) != len(line):
                    raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
            except OSError as e:
                f.truncate(end)  # no torn line that would swallow the next record
                raise OSError(e.errno, e.strerror, str(self.path)) from e
        if self.wandb_run is not None:
            logged = {k: v for k, v in record.items() if k not in ("iter", "elapsed_s") and v is not None}
            self.wandb_run.log(logged, step=record["iter"])


def start_wandb(**init_arguments):
    """A wandb run, or one line that says how to get one: log in, or log locally with WANDB_MODE=offline."""
    try:
        import wandb  # only when asked for: it is slow to import
    except ImportError:
        raise UserError("wandb_log=True needs wandb: pip install wandb, or leave wandb_log off") from None
    try:
        return wandb.init(**init_arguments)
    except Exception as e:  # wandb's own kinds: not logged in, no network, a bad project name
        reason = " ".join(str(e).split())[:200]
        raise UserError(
            f"wandb did not start ({type(e).__name__}: {reason}); log in with `wandb login`, or log "
            "locally with WANDB_MODE=offline (wandb sync uploads it later), or leave wandb_log off"
        ) from None
