"""Where a step's peak device memory sits: the allocations live at the peak, grouped by the line
that made them, from the CUDA caching allocator's own trace.

    python bench/sweep.py --model bart-large --tokens 2097152,4194304 --methods cached --memory_trace

A point's peak memory says *how much*; the growth between two lengths says *that* something grows
with the document ([decoder-memory]: nothing may, beside the fused states and their gradient).
The sites say *what*: per site, the growth between two traced lengths in bytes per token
(``report.py``), so whatever grows beyond those two has a file and a line.

Only the step's own allocations are counted (those made while the trace records): parameters,
optimizer states and anything else made before it are the baseline the peak sits on.
"""

from __future__ import annotations

from collections.abc import Callable

GIB = 2**30
MAX_ENTRIES = 2_000_000  # a BART-large step at 4M tokens: a few hundred thousand, by a rough count
OURS = ("cached_ds/", "bench/")


def traced_step(run: Callable[[], object]) -> dict:
    """Run one step (``run()``) with the allocator's history recorded (Python stacks only: about
    2 µs per allocation, by torch's docs; C++ stacks cost more to record and to symbolise) and
    return ``peak_sites`` of its trace. CUDA only."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=MAX_ENTRIES)
    try:
        run()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    entries = snapshot["device_traces"][torch.cuda.current_device()]
    # a full ring buffer has dropped the step's first entries: its peak would be wrong, so say so
    return {**peak_sites(entries), "entries": len(entries), "truncated": len(entries) >= MAX_ENTRIES}


def peak_sites(entries: list[dict]) -> dict:
    """The trace's peak of live bytes, relative to where the trace began, and the blocks live at
    that moment summed by ``site``, largest first. An ``alloc`` adds its block and its
    ``free_requested`` removes it: that is when the allocator's ``allocated_bytes`` drops, even
    while another stream still holds the block until ``free_completed``. A free of a block from
    before the trace lowers the total too. Sizes are the requested bytes (``memory_stats``'
    ``requested_bytes``): ``max_memory_allocated`` counts the rounded blocks, a little more."""
    peak, peak_at = _replay(entries)
    live: dict[int, dict] = {}
    _replay(entries[: peak_at + 1], live)
    by_site: dict[str, list] = {}
    for entry in live.values():
        total = by_site.setdefault(site(entry.get("frames") or []), [0, 0])
        total[0] += entry["size"]
        total[1] += 1
    ranked = sorted(by_site.items(), key=lambda item: -item[1][0])
    return {"traced_peak_gib": peak / GIB, "sites": [{"site": name, "gib": size / GIB, "allocations": count} for name, (size, count) in ranked]}


def _replay(entries: list[dict], live: dict[int, dict] | None = None) -> tuple[int, int]:
    """(peak live bytes, index of the entry that reached it); ``live`` is left holding the
    blocks allocated in ``entries`` and live after the last one."""
    live = {} if live is None else live
    total = peak = 0
    peak_at = -1
    for index, entry in enumerate(entries):
        if entry["action"] == "alloc":
            live[entry["addr"]] = entry
            total += entry["size"]
            if total > peak:
                peak, peak_at = total, index
        elif entry["action"] == "free_requested":
            known = live.pop(entry["addr"], None)
            total -= known["size"] if known is not None else entry["size"]
    return peak, peak_at


def site(frames: list[dict]) -> str:
    """Where an allocation was made: the innermost frame outside torch's own package (an HF or
    DeepSpeed line, or ours), and, when that is not ours, the innermost line of ours that led to
    it (``modeling_bart.py:123 forward <- cached_encoder.py:110 encode_group``). Frames come
    innermost first, as the allocator records them. None at all: the allocation came from a
    thread with no Python on its stack, which for CUDA memory is autograd's device thread
    running a C++ backward (Python autograd Functions, ours included, do have frames there)."""
    outside_torch = next((f for f in frames if "/torch/" not in f["filename"]), None)
    ours = next((f for f in frames if any(root in f["filename"] for root in OURS)), None)
    if outside_torch is None:
        return _frame(frames[0]) if frames else "<C++ backward: no Python frame>"
    if ours is None or ours is outside_torch:
        return _frame(outside_torch)
    return f"{_frame(outside_torch)} <- {_frame(ours)}"


def _frame(frame: dict) -> str:
    parts = frame["filename"].split("/")
    return f"{'/'.join(parts[-2:])}:{frame['line']} {frame['name']}"


def site_growth(shorter: dict, longer: dict, tokens: tuple[int, int], min_bytes_per_token: float = 1.0) -> list[tuple[str, float]]:
    """Bytes per document token each site added between two traced points (``peak_sites`` of
    ``tokens[0]`` and ``tokens[1]`` tokens), largest first, those of at least ``min_bytes_per_token``
    either way; a site live at only one of the two peaks counts 0 at the other."""
    before = {s["site"]: s["gib"] for s in shorter["sites"]}
    after = {s["site"]: s["gib"] for s in longer["sites"]}
    span = tokens[1] - tokens[0]
    growth = [(name, (after.get(name, 0.0) - before.get(name, 0.0)) * GIB / span) for name in before.keys() | after.keys()]
    return sorted(((n, g) for n, g in growth if abs(g) >= min_bytes_per_token), key=lambda item: (-abs(item[1]), item[0]))
