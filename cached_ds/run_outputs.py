"""What a run logs beside its checkpoints (``metrics.jsonl``, DeepSpeed's csv and tensorboard
monitors), kept consistent with the checkpoint a run continues from. Rank 0 only.

    clear_earlier_outputs(out)                    # a fresh start: a crashed run's logs go
    forget_metrics_after(out, step, samples, csv) # a resume: rows past the checkpoint go

Each file is rewritten aside and swapped in, so a crash leaves the old file or the new one.
Tensorboard event files cannot be cut: on resume, a crashed run's points after its checkpoint
stay beside the new ones.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from pathlib import Path

from .checkpoints import fsync

logger = logging.getLogger("cached_ds")
RUN_COMPLETE = "run_complete.json"  # the step and checkpoint a run exported and evaluated at its end
LOGS = ("metrics.jsonl", "csv", "tensorboard", RUN_COMPLETE)


def clear_earlier_outputs(out: Path) -> None:
    """A fresh start in a folder where an earlier run of this launcher (its ``ds_config.json``
    is there) left logs but no checkpoint (it crashed before its first): those logs belong to a
    run nothing continues. A folder this launcher never wrote to keeps what it holds."""
    if not (out / "ds_config.json").is_file():
        return
    cleared = []
    for name in LOGS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        cleared.append(name)
    if cleared:
        logger.warning("starting fresh: removed %s of an earlier run that left no checkpoint", ", ".join(cleared))


def forget_metrics_after(out: Path, step: int, global_samples: int, csv_monitor=None) -> None:
    """``metrics.jsonl`` and the csv monitor's files lose their rows past ``step`` (DeepSpeed's
    own ``Train_Samples_*`` files count samples: past ``global_samples``). ``csv_monitor``, the
    engine's, is told each trimmed file has its header already, so it does not add another."""
    path = out / "metrics.jsonl"
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if _at_most(_metrics_step(line), step)]
        write_atomic(path, "".join(line + "\n" for line in kept))
    for table in sorted((out / "csv").rglob("*.csv")):
        limit = global_samples if table.name.startswith("Train_Samples_") else step
        rows = list(csv.reader(io.StringIO(table.read_text(), newline="")))
        kept = rows[:1] + [row for row in rows[1:] if row and _at_most(_number(row[0]), limit)]
        text = io.StringIO(newline="")
        csv.writer(text).writerows(kept)
        write_atomic(table, text.getvalue())
        if csv_monitor is not None and table.stem not in csv_monitor.filenames:
            csv_monitor.filenames.append(table.stem)


def _at_most(value: float | None, limit: float) -> bool:
    return value is not None and value <= limit


def _metrics_step(line: str) -> int | None:
    """A metrics.jsonl line's step; None for a line a crash cut short."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # a header DeepSpeed repeated


def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` aside, flush it, and swap it in: never half a file."""
    aside = path.with_name(path.name + ".tmp")
    with aside.open("w", newline="", encoding="utf-8") as handle:  # text of any script, whatever the locale
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(aside, path)
    fsync(path.parent)
