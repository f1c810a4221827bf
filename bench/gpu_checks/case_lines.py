"""The GPU checks' output: one JSON line per case, printed (and flushed) as the case ends.

A check stopped at its time limit (``device_sweep.sh`` runs each under ``timeout``) still leaves
the cases it finished in ``checks.jsonl``, for ``fallbacks.py`` and the session's notes; one
line printed at the end would lose them all.

    emit({"device": "NVIDIA H200", "torch": "2.11.0"})   # the run's facts first
    emit({"bart-bf16": {"ok": True, ...}})               # then each case
    merged(text.splitlines())                            # every JSON line's keys, later lines winning
"""

from __future__ import annotations

import json
from collections.abc import Iterable


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)  # flushed: a killed process keeps what it printed


def merged(lines: Iterable[str]) -> dict:
    """The keys of every line that holds a JSON object (other lines, e.g. a log, are skipped)."""
    report = {}
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            report.update(record)
    return report
