"""The benchmark's CPU smoke mode, run as users run it: every method at two lengths, each point in
its own process, outputs well-formed, and CachED's encoder memory flat in document length."""

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from launcher_helpers import launcher_env

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"method": str, "model": str, "tokens": int, "zero_stage": int, "dtype": str, "device": str,
            "step_s": float, "tokens_per_s": float, "oom": bool, "attn_implementation": str}
METHODS = {"full", "full_gc", "hf_ds_gc", "cached"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    points = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    return out, points


def test_every_method_and_length_has_a_well_formed_point(smoke):
    out, points = smoke
    assert {(p["method"], p["tokens"]) for p in points} == {(m, t) for m in METHODS for t in (1024, 4096)}
    for p in points:
        assert not p["oom"] and "error" not in p, p
        for field, kind in REQUIRED.items():
            assert isinstance(p[field], kind), (field, p)
        assert p["device"] == "cpu" and p["zero_stage"] == 3 and p["dtype"] == "fp32"
        assert "peak_allocated_gib" in p or p["device"] == "cpu"  # GPU memory only where there is a GPU
        assert p["step_s"] > 0 and abs(p["tokens_per_s"] - p["tokens"] / p["step_s"]) < 1e-6 * p["tokens_per_s"]
        assert len(p["step_times"]) == 2 and all(l == l for l in p["losses"])  # finite, not NaN
        parts = p["breakdown"]
        groups = parts.pop("recompute_group_s", None)
        assert all(v >= 0 for v in parts.values())
        assert ("recompute_backward_s" in parts) == (p["method"] == "cached") == (groups is not None)
        assert 0 < parts["epilogue_s"] < parts["backward_s"]  # 0: the embedding-gradient mark never came
        if groups is not None:  # one clocked share per window group (512 tokens each), which with the
            # decoder's backward and the engine's epilogue make up the whole backward
            assert len(groups) == p["tokens"] // 512 and min(groups) > 0
            assert sum(groups) + parts["decoder_backward_s"] + parts["epilogue_s"] == pytest.approx(parts["backward_s"], rel=1e-9)


def test_table_and_plots_are_written(smoke):
    out, points = smoke
    table = (out / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| tiny-bart |")]
    assert len(rows) == 2 * len(points)  # the results table and the time breakdown
    assert "1.00×" in table  # hf_ds_gc is its own baseline
    for name in ("memory.png", "throughput.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 200


def test_cached_encoder_saved_tensor_peak_does_not_grow_with_length(smoke):
    _, points = smoke
    peak = {(p["method"], p["tokens"]): p["encoder_saved_peak_bytes"] for p in points}
    assert peak[("cached", 1024)] > 0
    assert peak[("cached", 4096)] == peak[("cached", 1024)]
    # The control: full backprop keeps every window's activations, 4x the tokens ~ 4x the bytes.
    assert peak[("full", 4096)] > 3 * peak[("full", 1024)]


def test_a_graph_budget_keeps_groups_and_labels_its_row(smoke, tmp_path):
    """``--keep_graphs_gib``: CachED's kept-graph budget reaches the engine (every window group of
    the 4K document kept, none without a budget) and its row is told apart from plain ``cached``."""
    _, points = smoke
    assert {p["kept_groups"] for p in points if p["method"] == "cached"} == {0}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep.py"), "--smoke", "--methods", "cached", "--tokens", "4096",
                           "--keep_graphs_gib", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    point, = [json.loads(line) for line in (tmp_path / "points.jsonl").read_text().splitlines()]
    assert point["keep_graphs_gib"] == 1 and point["kept_groups"] == 4096 // 512  # the smoke groups are 512 tokens
    assert "| tiny-bart | cached+keep_graphs=1GiB | 4K |" in (tmp_path / "table.md").read_text()


def test_a_profiled_point_records_its_top_ops_and_the_table_shows_them(tmp_path):
    """``--profile``: one more step under torch.profiler. On CPU the ops are ranked by host time;
    the real model's matrix multiplies are among them, and table.md gets the point's section."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep.py"), "--smoke", "--methods", "cached", "--tokens", "1024",
                           "--steps", "1", "--warmup", "0", "--no_breakdown", "--profile", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    point, = [json.loads(line) for line in (tmp_path / "points.jsonl").read_text().splitlines()]
    profile = point["profile"]
    assert profile["ops_counted_by"] == "host time" and "device_busy_s" not in profile  # no GPU here
    assert set(profile["phase_host_s"]) == {"forward", "backward", "optimizer"} and profile["wall_s"] > 0
    assert all(seconds > 0 for seconds in profile["phase_host_s"].values())
    times = [op["self_ms"] for op in profile["top"]]
    assert len(times) == 25 and times == sorted(times, reverse=True) and all(op["calls"] > 0 for op in profile["top"])
    assert any(op["name"] in ("aten::mm", "aten::addmm", "aten::bmm") for op in profile["top"])
    table = (tmp_path / "table.md").read_text()
    assert "## Profiles" in table and "### tiny-bart cached 1K: profiled step" in table


def test_a_cuda_profile_counts_each_kernel_once_and_phases_by_their_host_span():
    """On CUDA the profiler lists a kernel under its op and as a device event, and a
    record_function span on the host and again on the device (no host time). These are real
    profiler events of that shape (torch's own classes, built here: no GPU in CI); the first
    H200 profiles summed both kernel records and read the phases from the device copies (0 s)."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent

    sys.path.insert(0, str(ROOT / "bench"))
    from point import profile_summary

    def event(i, name, start, end, device=DeviceType.CPU):
        return FunctionEvent(id=i, name=name, thread=0, start_us=start, end_us=end, use_device="cuda", device_type=device,
                             is_user_annotation=name.startswith("step:"), stack=[])

    mm = event(2, "aten::mm", 100, 200)
    mm.append_kernel("gemm_kernel", 0, 300)
    flex = event(6, "triton_flex", 350, 400)  # a compiled kernel's host-side record, under a library span
    flex.append_kernel("triton_flex", 0, 50)
    sync = event(8, "cudaStreamSynchronize", 720, 980)  # the host waiting: no device time of its own
    events = EventList([event(1, "step:forward", 0, 1000), mm, event(3, "gemm_kernel", 150, 450, DeviceType.CUDA),
                        event(4, "step:forward", 100, 900, DeviceType.CUDA), event(5, "cached_ds:flex_t5:band", 300, 700),
                        flex, event(7, "triton_flex", 460, 510, DeviceType.CUDA), sync], use_device="cuda")
    events._build_tree()
    summary = profile_summary(events.key_averages(), wall=2.0, cuda=True)
    assert summary["phase_host_s"] == {"forward": 1000e-6}
    assert summary["top"] == [{"name": "aten::mm", "calls": 1, "self_ms": 0.3, "host_ms": 0.1},
                              {"name": "triton_flex", "calls": 1, "self_ms": 0.05, "host_ms": 0.05}]
    assert summary["device_busy_s"] == 350e-6
    assert summary["spans"] == [{"name": "cached_ds:flex_t5:band", "calls": 1, "host_ms": 0.4, "device_ms": 0.05}]
    assert summary["host_waits"] == [{"name": "cudaStreamSynchronize", "calls": 1, "host_ms": 0.26}]
    assert [op["name"] for op in summary["host_top"]] == ["cudaStreamSynchronize", "aten::mm", "triton_flex"]
    from report import profile_tables

    table = profile_tables([{"model": "long-t5-tglobal-large", "method": "cached", "tokens": 16384, "profile": summary}])
    assert "device busy 0.000 s (0%)" in table and "| `cached_ds:flex_t5:band` | 1 | 0.4 | 0.1 |" in table
    assert "Host waiting on the device: `cudaStreamSynchronize` 1× 0.3 ms." in table
    assert "2× too high" not in table and "Host time per phase: forward 0.001 s." in table
    # A record of the first H200 sessions (no host_top: kernels counted twice, phases read as 0 s)
    # keeps its figures and says what they are.
    old = json.loads((ROOT / "bench/results/2026-11-27-nvidia-h200-2/points.jsonl").read_text().splitlines()[0])
    assert "host_top" not in old["profile"] and old["profile"]["device_busy_s"] > old["profile"]["wall_s"]  # the 111%
    table = profile_tables([old])
    assert "device busy 2.436 s (111%) (as recorded by a summary that counted every kernel twice: about 2× too high)" in table
    assert "Host time per phase: not recorded" in table and "forward 0.000 s" not in table


def test_a_profiled_point_that_failed_does_not_break_the_report(tmp_path):
    """A --profile point that ran out of memory keeps the spec's flag (True) under "profile": the
    report took it for a summary and crashed, and with it every later line of the sweep."""
    sys.path.insert(0, str(ROOT / "bench"))
    from report import write_report

    failed = {"method": "hf_ds_gc", "model": "long-t5-tglobal-large", "tokens": 65536, "profile": True, "oom": True,
              "device": "h100", "dtype": "bf16", "zero_stage": 3}
    (tmp_path / "points.jsonl").write_text(json.dumps(failed) + "\n")
    write_report(tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert "| long-t5-tglobal-large | hf_ds_gc | 64K |" in table and "## Profiles" not in table


def test_the_breakdown_splits_cached_recompute_by_window_group():
    """``PhaseClock.split`` on marks as a step writes them (seconds): the groups run from one
    encoder call to the next, the last up to the embedding's gradient; after it, the epilogue.
    Groups whose graph was kept make no encoder call in backward (none of them is clocked), and a
    frozen embedding leaves no mark (no epilogue; the last group runs to the end)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from point import PhaseClock

    def split(*backward):
        clock = PhaseClock(encoder=None)
        clock.marks = [("forward:start", 0.0), ("encoder:start", 0.5), ("encoder:end", 1.5), ("forward:end", 2.0),
                       ("backward:start", 2.0), *backward, ("optimizer:start", 9.0), ("optimizer:end", 9.5)]
        return clock.split()

    parts = split(("encoder:start", 3.0), ("encoder:end", 3.5), ("encoder:start", 4.0), ("encoder:end", 4.5),
                  ("encoder:start", 5.0), ("encoder:end", 5.5), ("embedding_grad", 7.5), ("backward:end", 8.0))
    assert parts == pytest.approx({"encoder_forward_s": 1.0, "decoder_forward_s": 1.0, "backward_s": 6.0, "optimizer_s": 0.5,
                                   "epilogue_s": 0.5, "decoder_backward_s": 1.0, "recompute_backward_s": 5.0,
                                   "recompute_group_s": [1.0, 1.0, 2.5]})
    frozen = split(("encoder:start", 3.0), ("encoder:end", 3.5), ("backward:end", 8.0))
    assert frozen["epilogue_s"] == 0 and frozen["recompute_group_s"] == [5.0]
    hf = split(("embedding_grad", 7.0), ("backward:end", 8.0))  # no encoder call in backward
    assert hf["epilogue_s"] == 1.0 and "recompute_group_s" not in hf and "decoder_backward_s" not in hf


def test_memory_growth_is_taken_between_the_two_longest_points_that_fit():
    sys.path.insert(0, str(ROOT / "bench"))
    from report import growth_table

    def point(method, tokens, gib, oom=False, **extra):
        return {"model": "bart-large", "method": method, "tokens": tokens, "peak_allocated_gib": gib, "oom": oom, **extra}

    points = [point("cached", 2**20, 20.0), point("cached", 2**21, 26.0), point("cached", 2**22, 38.0),
              point("cached", 2**23, 79.0, oom=True),  # out of memory: not a fit
              point("cached", 2**22, 15.0, kernels={"cross_attention_block": 8192}),
              point("cached", 2**24, 16.5, kernels={"cross_attention_block": 8192}),
              point("hf_ds_gc", 2**18, 23.4)]  # one fit: no slope
    rows = growth_table(points).splitlines()[2:]
    assert rows == ["| bart-large | cached | 2M → 4M | 6.00 | 6144 |",
                    "| bart-large | cached+cross_attention_block=8192 | 4M → 16M | 0.12 | 128 |"]
    assert growth_table([point("cached", 2**20, None)]) == ""  # CPU runs have no GPU memory


def test_each_model_gets_its_own_panel_of_the_plots():
    """BART's and LongT5's tokens/s differ 20×: one y-axis for both would flatten LongT5's curves.
    Each model is its own panel (shared length axis) holding only its own methods' lines."""
    sys.path.insert(0, str(ROOT / "bench"))
    import matplotlib.pyplot as plt
    from report import figure

    def point(model, method, tokens, rate, oom=False, **extra):
        return {"model": model, "method": method, "tokens": tokens, "tokens_per_s": rate, "oom": oom,
                "device": "h200", "dtype": "bf16", "zero_stage": 3, **extra}

    points = [point("bart-large", "cached", 2**18, 139e3), point("bart-large", "hf_ds_gc", 2**18, 138e3),
              point("bart-large", "hf_ds_gc", 2**20, None, oom=True), point("bart-large", "hf_ds_gc", 2**21, None, oom=True),
              point("long-t5-tglobal-large", "cached", 2**14, 7e3), point("long-t5-tglobal-large", "cached", 2**16, 12e3),
              point("long-t5-tglobal-large", "cached", 2**17, None, error="exit timeout after 600 s"),
              point("long-t5-tglobal-large", "cached", 2**18, None, skipped="timeout"),
              point("long-t5-tglobal-large", "hf_ds_gc", 2**14, None, error="RuntimeError: CUDA error"),
              point("long-t5-tglobal-large", "hf_ds_gc", 2**15, None, error="exit timeout after 60 s", deadline_cut=True)]
    fig = figure(points, "tokens_per_s", "tokens / s", gpu=True)
    try:
        bart, longt5 = fig.axes[:2]
        assert [ax.get_title(loc="left") for ax in (bart, longt5)] == ["bart-large", "long-t5-tglobal-large"]
        assert [t.get_text() for t in bart.get_legend().get_texts()] == ["cached", "hf_ds_gc"]
        assert [t.get_text() for t in longt5.get_legend().get_texts()] == ["cached", "hf_ds_gc"]
        assert list(longt5.lines[0].get_ydata()) == [7e3, 12e3]
        assert len(bart.lines) == 3  # two methods and hf_ds_gc's out-of-memory mark, at its shortest length
        assert (bart.lines[2].get_marker(), list(bart.lines[2].get_xdata())) == ("x", [2**20])
        # cached's timeout at its length, hf_ds_gc's error; the deadline's cut is no failure of the method
        assert [(line.get_marker(), list(line.get_xdata())) for line in longt5.lines[1:]] == [
            ("$T$", [2**17]), ("o", []), ("$E$", [2**14])]  # hf_ds_gc: no points, a legend entry
        assert bart.get_ylim()[1] > 100e3 and longt5.get_ylim()[1] < 20e3  # each its own scale
    finally:
        plt.close(fig)


def test_list_tokens_prints_the_plan_for_sweep_sbatch(capsys):
    """sweep.sbatch's array takes its lengths from here when SWEEP_TOKENS is unset: the GPU plan,
    or with --smoke the smoke's own two (it used to run tiny-bart at 16K…16M on CPU nodes)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from sweep import DEFAULT_TOKENS, main

    for argv, expected in ((["--list_tokens"], DEFAULT_TOKENS), (["--smoke", "--list_tokens"], [1024, 4096]),
                           (["--smoke", "--tokens", "4096,2048", "--list_tokens"], [2048, 4096])):
        assert main(argv) is None
        assert capsys.readouterr().out.strip() == ",".join(map(str, expected))


def test_a_group_size_other_than_the_default_is_named_in_the_label():
    """Rows of one method at one length that differ only in ``--group_tokens`` must not share a
    label (the 256K plan runs ``cached`` with 16K and 64K groups); the smoke's own default is none."""
    sys.path.insert(0, str(ROOT / "bench"))
    from report import label
    from sweep import parse_args

    assert parse_args(["--group_tokens", "65536"]).group_tokens_set
    assert not parse_args([]).group_tokens_set and not parse_args(["--smoke"]).group_tokens_set
    point = {"method": "cached", "group_tokens": 65536, "group_tokens_set": True, "kernels": {"cross_attention_block": 4096}}
    assert label(point) == "cached+cross_attention_block=4096+groups=65536"
    assert label({**point, "method": "hf_ds_gc", "kernels": {}}) == "hf_ds_gc"  # it encodes every window at once
    assert label({**point, "group_tokens_set": False}) == "cached+cross_attention_block=4096"


def test_zero_config_abs_are_labelled_and_compared_with_their_own_baseline():
    """``--reduce_bucket_size`` and ``--memory_efficient_linear`` change the DeepSpeed config of
    every method in the line: its rows say so, and ``vs hf_ds_gc`` divides by the hf_ds_gc row
    of the same settings, not the default's."""
    sys.path.insert(0, str(ROOT / "bench"))
    from report import label, table
    from sweep import parse_args

    assert parse_args(["--reduce_bucket_size", "1048576"]).reduce_bucket_size == 1_048_576
    assert parse_args(["--memory_efficient_linear"]).memory_efficient_linear and not parse_args([]).memory_efficient_linear
    with pytest.raises(SystemExit):  # a ZeRO-3 setting: other stages would run torch's linear under its label
        parse_args(["--memory_efficient_linear", "--zero_stage", "2"])
    rows = [{"model": "m", "tokens": 16384, "method": method, "tokens_per_s": speed, "reduce_bucket_size": bucket,
             "memory_efficient_linear": wrapper}
            for method, speed, bucket, wrapper in [("hf_ds_gc", 100.0, None, None), ("cached", 150.0, None, None),
                                                   ("hf_ds_gc", 120.0, 1_048_576, None), ("cached", 240.0, 1_048_576, None),
                                                   ("hf_ds_gc", 80.0, None, True), ("cached", 100.0, None, True)]]
    assert label(rows[3]) == "cached+bucket=1048576" and label(rows[2]) == "hf_ds_gc+bucket=1048576"
    assert label(rows[5]) == "cached+mem_efficient_linear"
    text = table(rows)
    assert "| m | cached | 16K | – | – | – | – | – | 150 | 1.50× |" in text
    assert "| m | cached+bucket=1048576 | 16K | – | – | – | – | – | 240 | 2.00× |" in text
    assert "| m | cached+mem_efficient_linear | 16K | – | – | – | – | – | 100 | 1.25× |" in text


def test_zero_config_abs_reach_every_engine(smoke, tmp_path):
    _, points = smoke
    assert {p["zero_reduce_bucket_size"] for p in points} == {50_000_000}  # the shipped zero3.json's
    assert {p["linear_function"] for p in points} == {"linear"}  # torch's: zero3.json turns ZeRO-3's wrapper off
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep.py"), "--smoke", "--methods", "hf_ds_gc,cached", "--tokens", "1024",
                           "--steps", "1", "--warmup", "0", "--no_breakdown", "--reduce_bucket_size", "100000", "--memory_efficient_linear", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    points = [json.loads(line) for line in (tmp_path / "points.jsonl").read_text().splitlines()]
    assert {(p["method"], p["zero_reduce_bucket_size"]) for p in points} == {("hf_ds_gc", 100000), ("cached", 100000)}
    assert {p["linear_function"] for p in points} == {"zero3_linear_wrap"}  # and ZeRO-3's linear wrapper
    assert "| tiny-bart | cached+bucket=100000+mem_efficient_linear | 1K |" in (tmp_path / "table.md").read_text()


def _alloc(addr, size, *files):
    frames = [{"filename": f"/site-packages/{name}", "line": line, "name": fn} for name, line, fn in files]
    return {"action": "alloc", "addr": addr, "size": size, "frames": frames}


BART_LINE = ("transformers/models/bart/modeling_bart.py", 120, "forward")
OUR_LINE = ("cached_ds/cached_encoder.py", 110, "encode_group")
TORCH_LINE = ("torch/nn/functional.py", 2500, "linear")


def test_peak_sites_replays_the_allocator_trace_to_its_peak():
    """A block counts until its ``free_requested``, when the allocator's ``allocated_bytes``
    (the points' peak figure) drops, and a block from before the trace lowers the total when it
    is freed: the peak here is 180 bytes, at block 4, with blocks 2-4 live. Releasing only at
    ``free_completed`` would put it at 230 (block 3); ignoring the old block's free, at 220."""
    sys.path.insert(0, str(ROOT / "bench"))
    from memory_sites import peak_sites

    entries = [_alloc(1, 100, TORCH_LINE, BART_LINE, OUR_LINE),
               {"action": "free_requested", "addr": 999, "size": 40},  # allocated before the trace
               {"action": "free_completed", "addr": 999, "size": 40},
               _alloc(2, 50, TORCH_LINE, OUR_LINE),
               {"action": "free_requested", "addr": 1, "size": 100},
               _alloc(3, 80, TORCH_LINE, BART_LINE, OUR_LINE),
               {"action": "free_completed", "addr": 1, "size": 100},
               _alloc(4, 90, OUR_LINE)]
    result = peak_sites(entries)
    assert result["traced_peak_gib"] * 2**30 == 180
    sites = [(s["site"], round(s["gib"] * 2**30), s["allocations"]) for s in result["sites"]]
    assert sites == [("cached_ds/cached_encoder.py:110 encode_group", 140, 2),
                     ("bart/modeling_bart.py:120 forward <- cached_ds/cached_encoder.py:110 encode_group", 80, 1)]
    assert peak_sites([_alloc(5, 8)])["sites"][0]["site"] == "<C++ backward: no Python frame>"


def test_memory_site_table_names_what_each_line_adds_per_token():
    """Between two traced lengths, a site that holds 2 GiB more per 2**20 tokens added 2048 bytes
    per token; a site that did not grow is not listed."""
    sys.path.insert(0, str(ROOT / "bench"))
    from memory_sites import site_growth
    from report import memory_site_tables

    def traced(tokens, states_gib):
        sites = [{"site": "fused_states.py:37 add", "gib": states_gib, "allocations": 1},
                 {"site": "streaming_cross_attention.py:176 blocks", "gib": 1.5, "allocations": 4}]
        return {"model": "bart-large", "method": "cached", "tokens": tokens,
                "peak_sites": {"traced_peak_gib": states_gib + 1.5, "sites": sites}}

    shorter, longer = traced(2**21, 4.0), traced(2**22, 8.0)
    assert site_growth(shorter["peak_sites"], longer["peak_sites"], (2**21, 2**22)) == [("fused_states.py:37 add", 2048.0)]
    table = memory_site_tables([shorter, longer, {"model": "bart-large", "method": "hf_ds_gc", "tokens": 2**18}])
    assert "| `fused_states.py:37 add` | 2,048.0 |" in table
    assert "2M → 4M" in table and "streaming_cross_attention.py:176 blocks` | 1.500 | 4 |" in table
    assert table.count("### ") == 1  # untraced points get no section


def test_config_overrides_change_the_shape_and_name_it(tmp_path):
    """``--config_overrides`` builds the shipped config with other field values (a deep, narrow
    CPU proxy of a large model); the rows name the changed shape; a key the config lacks fails."""
    sys.path.insert(0, str(ROOT / "bench"))
    from sweep import parse_args

    args = parse_args(["--model", "tiny-bart", "--config_overrides", "encoder_layers=3,activation_function=relu,scale_embedding=false"])
    assert args.config_overrides == {"encoder_layers": 3, "activation_function": "relu", "scale_embedding": False}
    assert args.model_name == "tiny-bart(encoder_layers=3,activation_function=relu,scale_embedding=False)"
    with pytest.raises(SystemExit):
        parse_args(["--model", "tiny-bart", "--config_overrides", "encoder_layer=3"])  # not a BartConfig field
    with pytest.raises(SystemExit):
        parse_args(["--model", "bart-larg"])  # not a shipped config: an error now, not a failed point per length
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep.py"), "--smoke", "--methods", "cached", "--tokens", "1024",
                           "--steps", "1", "--warmup", "0", "--no_breakdown", "--config_overrides", "encoder_layers=3", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (point,) = [json.loads(line) for line in (tmp_path / "points.jsonl").read_text().splitlines()]
    from cached_ds.model_zoo import model_config

    assert model_config("tiny-bart").encoder_layers == 2
    assert point["model"] == "tiny-bart(encoder_layers=3)" and not point["oom"]
    layer = 4 * (64 * 64 + 64) + 2 * 64 * 128 + 128 + 64 + 2 * 2 * 64  # attention, feed-forward, two layer norms
    baseline = sum(p.numel() for p in __import__("transformers").AutoModelForSeq2SeqLM.from_config(model_config("tiny-bart")).parameters())
    assert point["parameters"] == baseline + layer
    assert "| tiny-bart(encoder_layers=3) | cached | 1K |" in (tmp_path / "table.md").read_text()


def test_bad_sweep_arguments_fail_before_any_point():
    """Each used to start the sweep and fail inside every point (or, for an empty --tokens, run
    the whole 16K-16M plan): tiny-bart's default summary length now fits its 256 positions."""
    sys.path.insert(0, str(ROOT / "bench"))
    from sweep import parse_args

    assert parse_args(["--model", "tiny-bart"]).target_tokens == 256
    assert parse_args(["--model", "bart-large"]).target_tokens == 1024
    assert parse_args(["--model", "long-t5-tglobal-large", "--target_tokens", "4096"]).target_tokens == 4096  # relative positions
    for bad in (["--model", "tiny-bart", "--target_tokens", "1024"], ["--model", "tiny-bart", "--window", "512"],
                ["--steps", "0"], ["--tokens", ""]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_rows_compare_only_with_the_baseline_of_their_own_run_and_settings(tmp_path, capsys):
    """A second sweep into the same folder, or another ZeRO stage or dtype, is not divided by
    another run's hf_ds_gc; a line a killed sweep cut short is skipped with a warning; an error
    row shows its cause."""
    sys.path.insert(0, str(ROOT / "bench"))
    from point import is_oom
    from report import read_points, table

    common = {"model": "m", "tokens": 4096, "dtype": "fp32", "zero_stage": 3, "target_tokens": 64, "window": None}
    rows = [{**common, "method": method, "tokens_per_s": speed, "run_id": run, **extra}
            for method, speed, run, extra in [("hf_ds_gc", 100.0, "a", {}), ("cached", 150.0, "a", {}),
                                              ("hf_ds_gc", 200.0, "b", {}), ("cached", 150.0, "b", {}),
                                              ("cached", 300.0, "a", {"zero_stage": 0})]]
    rows.append({**common, "method": "cached", "run_id": "a", "oom": False,
                 "error": "exit 1: Traceback ... / ^^^^ / IndexError: index out of range in self"})
    rows[1].update(step_s=1.0, step_times=[0.9, 1.0, 1.1])  # half the range: how far one ratio can be trusted
    text = table(rows)
    assert "| 1.000 ±10% | 150 | 1.50× |" in text and "| 150 | 0.75× |" in text  # each against its own run's baseline
    assert "| 300 | – |" in text  # ZeRO-0 has no ZeRO-0 baseline
    assert "error: IndexError: index out of range in self |" in text
    (tmp_path / "points.jsonl").write_text(json.dumps(rows[0]) + "\n" + '{"method": "cach' + "\n")
    assert read_points(tmp_path) == [rows[0]]
    assert "points.jsonl:2 is not a JSON object" in capsys.readouterr().err
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried"))
    assert is_oom(MemoryError()) and not is_oom(RuntimeError("index out of range"))


def test_a_point_that_errors_fails_the_sweep(tmp_path):
    """An OOM is a result; an error is not: the sweep says where the logs are and exits non-zero."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep.py"), "--smoke", "--methods", "cached", "--tokens", "1024",
                           "--steps", "1", "--warmup", "0", "--no_breakdown", "--config_overrides", "encoder_attention_heads=3",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "1 point(s) failed with an error; their logs are in" in proc.stderr, proc.stderr[-3000:]
    assert "| error: " in (tmp_path / "table.md").read_text()


def test_each_row_divides_by_the_baseline_its_own_sweep_measured():
    """Two sweeps of one run id into one folder (a rerun, a requeued array task): each row's
    ratio is against its own sweep's hf_ds_gc (hf_ds_gc 1.00×), a line without one against the
    run's latest. It used to take whichever hf_ds_gc came last, for every row."""
    sys.path.insert(0, str(ROOT / "bench"))
    from report import table

    def point(method, tokens_per_s, invocation):
        return {"model": "m", "method": method, "tokens": 1024, "dtype": "bf16", "zero_stage": 3, "target_tokens": 64,
                "window": 128, "run_id": "r", "invocation": invocation, "tokens_per_s": tokens_per_s, "step_s": 1024 / tokens_per_s}

    rows = table([point("hf_ds_gc", 100, "a"), point("cached", 150, "a"), point("hf_ds_gc", 200, "b"),
                  point("cached", 300, "b"), point("full", 50, "c")]).splitlines()[2:]
    ratios = {(cells[2], cells[10]) for cells in ([c.strip() for c in row.split("|")] for row in rows)}
    assert ratios == {("hf_ds_gc", "1.00×"), ("cached", "1.50×"), ("full", "0.25×")}
    assert all("| bf16 ZeRO-3 w128 |" in row for row in rows)


def test_a_point_whose_first_step_was_timed_is_marked_as_a_lower_bound():
    """``--warmup 0`` (the plan's long and offloaded lines) times the first step, with its
    allocations and, offloaded, the pinning of many GiB of host buffers: its row says so."""
    sys.path.insert(0, str(ROOT / "bench"))
    from report import FIRST_STEP_NOTE, table

    def point(method, warmup):
        return {"model": "m", "method": method, "tokens": 1024, "warmup": warmup, "step_times": [2.0, 2.2], "step_s": 2.1,
                "tokens_per_s": 1024 / 2.1}

    cells = {row.split("|")[2].strip(): row.split("|")[8].strip() for row in table([point("hf_ds_gc", 1)]).splitlines()[2:]}
    assert cells == {"hf_ds_gc": "2.100 ±5%"}
    text = table([point("hf_ds_gc", 1), point("cached", 0)])
    cells = {row.split("|")[2].strip(): row.split("|")[8].strip() for row in text.splitlines()[2:] if row.startswith("| m")}
    assert cells == {"hf_ds_gc": "2.100 ±5%", "cached": "2.100 ±5%¹"} and text.endswith(FIRST_STEP_NOTE)


def test_timeouts_and_points_left_out_say_so():
    sys.path.insert(0, str(ROOT / "bench"))
    from report import status_of

    base = {"method": "cached", "model": "m", "tokens": 1024}
    assert status_of({**base, "oom": False, "error": "exit timeout: Loading model / step 1"}) == "timeout"
    assert status_of({**base, "oom": False, "error": "exit timeout: step 1", "deadline_cut": True}) == "timeout (deadline)"
    assert status_of({**base, "oom": False, "skipped": "timeout"}) == "timeout (shorter length did)"
    assert status_of({**base, "oom": True, "skipped": "oom"}) == "OOM (shorter length did)"
    assert status_of({**base, "not_run": "deadline"}) == "not run (deadline)"


def test_a_rerun_of_a_run_id_skips_what_it_measured_and_bad_flags_are_refused_first(tmp_path):
    command = [sys.executable, str(ROOT / "bench" / "sweep.py"), "--smoke", "--methods", "cached", "--tokens", "1024",
               "--steps", "1", "--warmup", "0", "--no_breakdown", "--run_id", "again", "--out", str(tmp_path)]
    for _ in range(2):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "measured before in run again" in proc.stderr + proc.stdout
    assert len((tmp_path / "points.jsonl").read_text().splitlines()) == 1
    assert len(list((tmp_path / "logs").glob("*.log"))) == 1
    for flags, message in ((["--point_timeout", "5"], "--point_timeout must be at least 10 s"),
                           (["--window", "0"], "--window must be a positive integer, got 0"),
                           (["--group_tokens", "0"], "--group_tokens must be a positive integer, got 0")):
        proc = subprocess.run(command + flags, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    full_size = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep.py"), "--model", "bart-large", "--tokens", "16384",
                                "--out", str(tmp_path / "big")], capture_output=True, text=True, timeout=120)
    assert full_size.returncode == 1 and "no GPU here, and bart-large at its real size takes hours per point" in full_size.stderr


def test_sweep_sbatch_gives_each_task_its_own_length_whatever_sweep_args_hold(tmp_path):
    """A --tokens list in SWEEP_ARGS (with SWEEP_TOKENS unset, the array's lengths come from it)
    used to override each task's own length: every task ran every length."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\nshift\nexec "$@"\n')  # drops --ntasks=1
    (fake / "srun").chmod(0o755)
    env = {**launcher_env(), "PATH": f"{fake}:{os.environ['PATH']}", "PYTHON": sys.executable, "SLURM_SUBMIT_DIR": str(ROOT),
           "SLURM_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "0", "SWEEP_OUT": str(tmp_path / "out"),
           "SWEEP_ARGS": "--smoke --methods cached --steps 1 --warmup 0 --no_breakdown --tokens 512,1024"}
    env.pop("SWEEP_TOKENS", None)
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "slurm" / "sweep.sbatch")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    points = [json.loads(line) for line in (tmp_path / "out" / "points.task0.jsonl").read_text().splitlines()]
    assert [p["tokens"] for p in points] == [512]
