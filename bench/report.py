"""``points.jsonl`` → ``table.md`` and the PNG plots (memory and tokens/s against document length).

    python bench/report.py bench/results/2026-11-27-nvidia-h100-80gb-hbm3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402
from memory_sites import site_growth  # noqa: E402

BASELINE = "hf_ds_gc"


def points_file(folder: Path) -> Path:
    """Where this process appends its points: ``points.jsonl``, or in a SLURM array task
    ``points.task<k>.jsonl``. Appends from tasks on several nodes to one file on a shared
    filesystem (NFS) can interleave or overwrite each other; ``read_points`` reads them all."""
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return folder / ("points.jsonl" if task is None else f"points.task{task}.jsonl")


def read_points(folder: Path) -> list[dict]:
    """Every point of the folder's ``points*.jsonl``; a line a killed sweep cut short is skipped
    with a warning naming it (it would otherwise stop every later sweep into the folder)."""
    points = []
    for path in sorted(folder.glob("points*.jsonl")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                points.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"warning: {path}:{number} is not a JSON object (a cut-short write?); skipped", file=sys.stderr)
    return points


def _tokens(n: int) -> str:
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def label(point: dict) -> str:
    """The method, with the cached kernels, graph budget and window-group size it ran with
    (``cached+cross_attention_block=4096+keep_graphs=40GiB+groups=65536``)."""
    extras = [f"{k}={v}" if v is not True else k for k, v in sorted((point.get("kernels") or {}).items())]
    if point.get("group_tokens_set") and point["method"] != "hf_ds_gc":  # hf_ds_gc encodes every window at once
        extras.append(f"groups={point['group_tokens']}")
    if point.get("keep_graphs_gib"):
        extras.append(f"keep_graphs={point['keep_graphs_gib']:g}GiB")
    if point.get("zero3_decoder_hooks"):
        extras.append("zero3_decoder_hooks")
    if point.get("reduce_bucket_size"):
        extras.append(f"bucket={point['reduce_bucket_size']}")
    if point.get("memory_efficient_linear"):
        extras.append("mem_efficient_linear")
    return "+".join([point["method"], *extras])


def zero_ab(point: dict) -> tuple:
    """The DeepSpeed settings an A/B line changes for every method (``--reduce_bucket_size``,
    ``--memory_efficient_linear``): a row is compared with the ``hf_ds_gc`` row of the same ones."""
    return point.get("reduce_bucket_size"), bool(point.get("memory_efficient_linear"))


def comparable(point: dict) -> tuple:
    """What a row must share with its ``hf_ds_gc`` row to be compared with it: model, length,
    precision, ZeRO stage, summary length, window, the A/B settings (``zero_ab``), and the sweep
    run (``--run_id``; points of older sweeps carry none and compare within the folder)."""
    return (point["model"], point["tokens"], point.get("dtype"), point.get("zero_stage"), point.get("target_tokens"),
            point.get("window"), zero_ab(point), point.get("run_id"))


def _fmt(value, digits=1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _significant(value) -> str:
    """One decimal, or three significant digits below 10 (a CPU run's 0.004 TFLOP/s is not 0.0)."""
    return "–" if value is None else f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"


def setup(point: dict) -> str:
    """Precision, ZeRO stage and window: rows of sweeps with other settings in one folder differ here."""
    parts = [point.get("dtype"), point.get("zero_stage"), point.get("window")]
    if all(part is None for part in parts):
        return "–"
    return " ".join(f"{prefix}{part}" for prefix, part in zip(("", "ZeRO-", "w"), parts) if part is not None)


FIRST_STEP_MARK = "¹"
FIRST_STEP_NOTE = (f"{FIRST_STEP_MARK} No untimed step first (``--warmup 0``): the timing includes the first step's "
                   "allocations (for ``--offload``, pinning the host buffers), so its tokens/s is a lower bound.\n")


def _step(point: dict) -> str:
    """The median step time, and with several timed steps half their range as a share of it
    (``1.885 ±3%``): how far one point's ratio can be trusted; marked where the first step was timed."""
    times, median = point.get("step_times") or [], point.get("step_s")
    mark = FIRST_STEP_MARK if point.get("warmup") == 0 and median is not None else ""
    if median is None or len(times) < 2:
        return _fmt(median, 3) + mark
    return f"{median:.3f} ±{(max(times) - min(times)) / 2 / median:.0%}{mark}"


def timed_out(point: dict) -> bool:
    """The point's process ran past its timeout (``sweep.run_point``'s "exit timeout")."""
    return str(point.get("error", "")).startswith("exit timeout")


def status_of(point: dict) -> str:
    if point.get("not_run"):
        return f"not run ({point['not_run']})"
    if point.get("skipped"):
        return f"{'timeout' if point['skipped'] == 'timeout' else 'OOM'} (shorter length did)"
    if point.get("oom"):
        return "OOM"
    if timed_out(point):
        return "timeout (deadline)" if point.get("deadline_cut") else "timeout"
    if point.get("error"):  # its last line, e.g. "IndexError: index out of range in self" (the log has the rest)
        last = str(point["error"]).replace("|", "/").rstrip().rsplit(" / ", 1)[-1].strip()
        return f"error: {last[-80:]}"
    return "ok"


def table(points: list[dict]) -> str:
    """One row per point; ``vs hf_ds_gc`` is tokens/s over the baseline's at the same length and
    model, with the same DeepSpeed config (``zero_ab``: an A/B line changes it for both)."""
    baselines = [p for p in points if p["method"] == BASELINE and p.get("tokens_per_s")]
    # the baseline a sweep measured itself where it did (a rerun into the same run id measures
    # its own), else the latest of the run id with the same settings (a later call's A/B lines)
    latest = {comparable(p): p["tokens_per_s"] for p in baselines}
    own = {(comparable(p), p.get("invocation")): p["tokens_per_s"] for p in baselines if p.get("invocation")}
    rows = ["| model | method | tokens | setup | attn | peak alloc GiB | peak reserved GiB | step s | tokens/s | vs hf_ds_gc | model TFLOP/s | enc. saved MiB | status |",
            "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in sorted(points, key=lambda p: (p["model"], p["tokens"], label(p))):
        base = own.get((comparable(p), p.get("invocation"))) or latest.get(comparable(p))
        ratio = p["tokens_per_s"] / base if base and p.get("tokens_per_s") else None
        saved = p.get("encoder_saved_peak_bytes")
        rows.append("| " + " | ".join([
            p["model"], label(p), _tokens(p["tokens"]), setup(p), p.get("attn_implementation") or "–",
            _fmt(p.get("peak_allocated_gib")), _fmt(p.get("peak_reserved_gib")), _step(p),
            _fmt(p.get("tokens_per_s"), 0), "–" if ratio is None else f"{ratio:.2f}×", _significant(p.get("model_tflops_per_s")),
            "–" if saved is None else f"{saved / 2**20:.2f}", status_of(p),
        ]) + " |")
    first_step = any(FIRST_STEP_MARK in row for row in rows[2:])
    return "\n".join(rows) + "\n" + ("\n" + FIRST_STEP_NOTE if first_step else "")


def breakdown_table(points: list[dict]) -> str:
    """Each phase of one clocked step (``point.PhaseClock``); for ``cached`` also its recompute's
    window groups: the median of all but the last, and the last, which also runs every ZeRO
    reduction of the encoder's gradients (far above the median: their host time is not hidden)."""
    keys = ["encoder_forward_s", "decoder_forward_s", "decoder_backward_s", "decoder_only_backward_s", "encoder_gather_s", "recompute_backward_s", "backward_s", "epilogue_s", "optimizer_s"]
    rows = ["| model | method | tokens | " + " | ".join(k.removesuffix("_s").replace("_", " ") + " s" for k in keys)
            + " | other groups s (median) | last group s | kept groups |",
            "|---|---|---:|" + "---:|" * (len(keys) + 3)]
    for p in sorted(points, key=lambda p: (p["model"], p["tokens"], label(p))):
        if "breakdown" in p:
            kept = p.get("kept_groups")  # cached: groups whose graph was kept, not recomputed
            groups = p["breakdown"].get("recompute_group_s") or []
            median = statistics.median(groups[:-1]) if len(groups) > 1 else None
            rows.append(f"| {p['model']} | {label(p)} | {_tokens(p['tokens'])} | "
                        + " | ".join(_fmt(p["breakdown"].get(k), 3) for k in keys)
                        + f" | {_fmt(median, 3)} | {_fmt(groups[-1] if groups else None, 3)} | {'–' if kept is None else kept} |")
    return "\n".join(rows) + "\n"


def growth_table(points: list[dict]) -> str:
    """Peak allocated memory added per 2**20 document tokens and per token, between each
    method's two longest points that fit: what grows with the document ([decoder-memory]'s
    target figure; per token it reads against the bytes a method must keep per token). Empty
    without GPU memory figures."""
    rows = []
    for model, method in sorted({(p["model"], label(p)) for p in points}):
        fits = sorted((p["tokens"], p["peak_allocated_gib"]) for p in points if (p["model"], label(p)) == (model, method)
                      and not p.get("oom") and p.get("peak_allocated_gib") is not None)
        if len(fits) >= 2 and fits[-1][0] > fits[-2][0]:
            (t1, m1), (t2, m2) = fits[-2:]
            per_token = (m2 - m1) / (t2 - t1)  # GiB
            rows.append(f"| {model} | {method} | {_tokens(t1)} → {_tokens(t2)} | {per_token * 2**20:.2f} | {per_token * 2**30:.0f} |")
    if not rows:
        return ""
    return "\n".join(["| model | method | between | GiB per 2²⁰ tokens | bytes per token |", "|---|---|---|---:|---:|", *rows]) + "\n"


def memory_site_tables(points: list[dict], top: int = 8) -> str:
    """Per method traced at two or more lengths (``--memory_trace``): what each source line added
    to the step's peak per document token between consecutive traced lengths, and the largest
    sites live at the longest one's peak."""
    parts = []
    for model, method in sorted({(p["model"], label(p)) for p in points if p.get("peak_sites")}):
        traced = sorted((p for p in points if (p["model"], label(p)) == (model, method) and p.get("peak_sites")), key=lambda p: p["tokens"])
        rows = [f"### {model} {method}", ""]
        for shorter, longer in zip(traced, traced[1:]):
            tokens = (shorter["tokens"], longer["tokens"])
            rows += [f"Added per token, {_tokens(tokens[0])} → {_tokens(tokens[1])}:", "", "| site | bytes per token |", "|---|---:|"]
            rows += [f"| `{name}` | {per_token:,.1f} |" for name, per_token in site_growth(shorter["peak_sites"], longer["peak_sites"], tokens)]
            rows.append("")
        last = traced[-1]["peak_sites"]
        rows += [f"Live at the peak of {_tokens(traced[-1]['tokens'])} (traced peak {last['traced_peak_gib']:.2f} GiB"
                 + (", trace truncated: peak unreliable" if last.get("truncated") else "") + "):", "",
                 "| site | GiB | allocations |", "|---|---:|---:|"]
        rows += [f"| `{s['site']}` | {s['gib']:.3f} | {s['allocations']} |" for s in last["sites"][:top]]
        if len(last["sites"]) > top:
            rows.append(f"| {len(last['sites']) - top} other sites | {sum(s['gib'] for s in last['sites'][top:]):.3f} | |")
        parts.append("\n".join(rows) + "\n")
    return "\n".join(parts)


def failure_mark(point: dict) -> str | None:
    """The plot's marker for a point that measured nothing: × out of memory, T timed out (not
    a deadline's cut), E another error; None for a measured point or one never run."""
    if point.get("not_run") or point.get("deadline_cut"):
        return None
    if point.get("oom") or point.get("skipped") == "oom":
        return "x"
    if timed_out(point) or point.get("skipped") == "timeout":
        return "$T$"
    return "$E$" if point.get("error") else None


def figure(points: list[dict], key: str, axis_label: str, gpu: bool):
    """One panel per model, sharing the length axis: BART-large's 140K tokens/s and LongT5's 7K on
    one y-axis would flatten the smaller model's curves into the floor."""
    models = sorted({p["model"] for p in points}) or [None]
    setups = {setup(p) for p in points}

    def line_of(p: dict) -> str:  # one line per method, and per setup where the folder holds several
        return label(p) if len(setups) < 2 else f"{label(p)} ({setup(p)})"

    fig, axes = plt.subplots(len(models), 1, figsize=(10, 1.0 + 3.5 * len(models)), sharex=True, squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        for method in sorted({line_of(p) for p in points if p["model"] == model}):
            row = [p for p in points if (p["model"], line_of(p)) == (model, method)]
            ok = sorted((p["tokens"], p[key]) for p in row if failure_mark(p) is None and p.get(key) is not None)
            failed = {}  # the shortest length of each kind of failure
            for p in sorted(row, key=lambda p: p["tokens"]):
                failed.setdefault(failure_mark(p), p["tokens"])
            failed.pop(None, None)
            if not ok and not failed:
                continue  # nothing of this kind measured for the row (CPU memory without --saved_tensor_meter)
            line, = ax.plot([t for t, _ in ok], [v for _, v in ok], marker="o", label=method)
            for mark, tokens in failed.items():  # drawn at the top of the axes, at its length
                ax.plot([tokens], [1.0], marker=mark, markersize=10, color=line.get_color(),
                        transform=ax.get_xaxis_transform(), clip_on=False, linestyle="none")
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {axis_label} measured" + ("" if gpu else " (on CPU: --saved_tensor_meter)"),
                    ha="center", va="center", transform=ax.transAxes)
        ax.set_title(_short(model or "no points"), fontsize=9, loc="left")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)  # a 0.94× gap looks like 0.94×, not like a cliff
        ax.set_ylabel(axis_label)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: never over a point
    axes[-1, 0].set_xlabel("document tokens (× out of memory, T timed out, E error; each at the shortest such length)")
    fig.suptitle(" · ".join(sorted({f"{p.get('device')} {p.get('dtype')} ZeRO-{p.get('zero_stage')}" for p in points})), fontsize=9)
    fig.tight_layout()
    return fig


def plot(points: list[dict], folder: Path) -> list[Path]:
    gpu = any(p.get("peak_allocated_gib") is not None for p in points)
    memory_key, memory_label = (("peak_allocated_gib", "peak allocated GiB") if gpu
                                else ("encoder_saved_peak_bytes", "encoder saved-tensor peak (bytes)"))
    written = []
    for key, axis_label, name in ((memory_key, memory_label, "memory.png"), ("tokens_per_s", "tokens / s", "throughput.png")):
        fig = figure(points, key, axis_label, gpu)
        staging = folder / f".{name}.{os.getpid()}.tmp"
        fig.savefig(staging, dpi=120, format="png")
        staging.replace(folder / name)  # SLURM array tasks rewrite these side by side: never half-written
        plt.close(fig)
        written.append(folder / name)
    return written


def _short(model: str, width: int = 60) -> str:
    """A panel's model name: a shape with many overrides (``bart-large(d_model=64,...)``) cut to
    ``width`` characters, so the title stays on one line (the table keeps it whole)."""
    return model if len(model) <= width else model[: width - 2] + "…)"


def _write_atomic(path: Path, data: bytes) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_bytes(data)
    staging.replace(path)


def profile_tables(points: list[dict], top: int = 12) -> str:
    """Per profiled point (``--profile``): the device's busy share of the step and its top ops."""
    parts = []
    # a point stopped before its profiled step (OOM, timeout) keeps the spec's flag, True, under this key
    for p in sorted((p for p in points if isinstance(p.get("profile"), dict)), key=lambda p: (p["model"], p["tokens"], label(p))):
        prof = p["profile"]
        busy = prof.get("device_busy_s")
        share = f", device busy {busy:.3f} s ({busy / prof['wall_s']:.0%})" if busy is not None else ""
        phases = "Host time per phase: " + ", ".join(f"{name} {s:.3f} s" for name, s in prof["phase_host_s"].items()) + "."
        if busy is not None and "host_top" not in prof:  # written before bench/point.py counted each kernel once
            share += " (as recorded by a summary that counted every kernel twice: about 2× too high)"
            phases = "Host time per phase: not recorded (that summary read the phases' device copies)."
        rows = [f"### {p['model']} {label(p)} {_tokens(p['tokens'])}: profiled step {prof['wall_s']:.3f} s{share}",
                f"{phases} Ops by {prof['ops_counted_by']}:", "",
                "| op | calls | self ms | host ms |", "|---|---:|---:|---:|"]
        rows += [f"| `{op['name'][:80]}` | {op['calls']} | {op['self_ms']:.1f} | {op['host_ms']:.1f} |" for op in prof["top"][:top]]
        waits = prof.get("host_waits")
        if waits:
            rows += ["", "Host waiting on the device: " + ", ".join(f"`{w['name']}` {w['calls']}× {w['host_ms']:.1f} ms" for w in waits) + "."]
        if prof.get("host_top"):  # where the host's own time goes (launches, Python-heavy ops)
            rows += ["", "| op by self host time | calls | host ms |", "|---|---:|---:|"]
            rows += [f"| `{op['name'][:80]}` | {op['calls']} | {op['host_ms']:.1f} |" for op in prof["host_top"][: top // 2]]
        if prof.get("spans"):  # cached_ds's labelled spans, everything inside them counted
            rows += ["", "| span | calls | host ms | device ms |", "|---|---:|---:|---:|"]
            rows += [f"| `{span['name']}` | {span['calls']} | {span['host_ms']:.1f} | {_fmt(span.get('device_ms'))} |" for span in prof["spans"]]
        parts.append("\n".join(rows) + "\n")
    return "\n".join(parts)


def write_report(folder: Path) -> None:
    points = read_points(folder)
    growth = growth_table(points)
    profiles = profile_tables(points)
    sites = memory_site_tables(points)
    text = (f"# Sweep results: {folder.name}\n\n{table(points)}\n## Time per step\n\n{breakdown_table(points)}\n"
            + (f"## Memory growth\n\n{growth}\n" if growth else "")
            + (f"## Memory at the peak, by source line\n\n{sites}\n" if sites else "")
            + (f"## Profiles\n\n{profiles}\n" if profiles else "")
            + "![memory](memory.png)\n![throughput](throughput.png)\n")
    _write_atomic(folder / "table.md", text.encode())
    plot(points, folder)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="a results folder holding points.jsonl")
    folder = parser.parse_args(argv).folder
    if not any(folder.glob("points*.jsonl")):
        parser.error(f"{folder} holds no points.jsonl; pass a folder bench/sweep.py wrote")
    write_report(folder)


if __name__ == "__main__":
    main()
