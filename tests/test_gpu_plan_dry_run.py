"""The GPU plan's plumbing on CPU (``bench/gpu_checks``): a lent GPU comes for minutes, so the
script it runs must not fail on anything a CPU can find first. The numbers are not checked."""

import json
import shlex
import subprocess
import sys

import pytest
from launcher_helpers import REPO as ROOT, launcher_env

sys.path.insert(0, str(ROOT / "bench"))
from gpu_checks.case_lines import merged  # noqa: E402
from gpu_checks.fallbacks import needed_flags  # noqa: E402
from sweep import parse_args  # noqa: E402


def test_pick_block_times_each_block_and_prints_the_fastest(tmp_path):
    report = tmp_path / "checks.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_checks/pick_block.py"), "--keys", "1024", "--blocks", "256,1024",
                           "--report", str(report)], capture_output=True, text=True, timeout=300, env=launcher_env(CHECK_DEVICE="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = report.read_text().splitlines()
    timing = json.loads(line)["block_timing"]
    assert set(timing["layer_ms"]) == {"256", "1024"} and all(ms > 0 for ms in timing["layer_ms"].values())
    assert proc.stdout.strip() == str(timing["chosen"]) == min(timing["layer_ms"], key=timing["layer_ms"].get)


def test_device_sweep_runs_its_plan_with_the_fallback_block(tmp_path):
    """No CUDA here: the block timing fails, the plan falls back to 32768-key blocks, and a PLAN
    in single quotes gets ``$BLOCK`` and ``$LONG`` (one step, no breakdown step) filled in."""
    plan = "--tokens 1024 --methods hf_ds_gc,cached\n--tokens 1024 --methods cached --cross_attention_block $BLOCK --warmup 0 $LONG"
    env = launcher_env(OUT=str(tmp_path), NO_WHEELS="1", MODEL="tiny-bart", PLAN=plan, BUDGET_S="400", SWEEP_WORK=str(tmp_path.parent / "work"),
                  SWEEP_ARGS="--dtype fp32 --target_tokens 64 --group_tokens 512")
    env.pop("BLOCK", None)
    proc = subprocess.run(["bash", str(ROOT / "bench/gpu_checks/device_sweep.sh")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "streaming cross-attention key block: 32768" in proc.stdout
    results = tmp_path / "tiny"
    points = [json.loads(line) for line in (results / "points.jsonl").read_text().splitlines()]
    blocks = sorted((p["method"], p["kernels"].get("cross_attention_block", 0)) for p in points)
    assert blocks == [("cached", 0), ("cached", 32768), ("hf_ds_gc", 0)]
    assert all(not p["oom"] and p["step_s"] > 0 for p in points)
    long_line = [p for p in points if p["kernels"]]
    assert [len(p["step_times"]) for p in long_line] == [1] and "breakdown" not in long_line[0]
    assert (tmp_path / "logs.tgz").is_file() and "# Sweep results" in proc.stdout
    assert sorted(f.name for f in tmp_path.rglob("*") if f.is_file()) == ["logs.tgz", "points.jsonl"]  # of the 8 files back
    assert " hf_ds_gc      1024 tokens: " in proc.stdout  # each point's line, not dropped with tqdm's bar


def test_streaming_check_passes_on_cpu_and_names_the_cases_fallbacks_read():
    """The streaming cross-attention check's CPU cases (its plumbing before a GPU runs it): every
    case passes, and the cases ``fallbacks.py`` switches on are there under those names (a
    rename would leave a failed fused kernel in the plan unnoticed)."""
    from gpu_checks.fallbacks import FALLBACKS

    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_checks/streaming_cross_attention_check.py")], capture_output=True,
                          text=True, timeout=600, env=launcher_env(CHECK_DEVICE="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = merged(proc.stdout.splitlines())
    cases = {name: case for name, case in report.items() if isinstance(case, dict)}
    assert all(case["ok"] for case in cases.values()), {name: case for name, case in cases.items() if not case["ok"]}
    # a line per case, printed as it ends: a check stopped at its time limit keeps what it ran
    assert len(proc.stdout.splitlines()) == 1 + len(cases)
    streaming_pairs = FALLBACKS["--plain_cross_attention"]
    assert {name for pair in streaming_pairs for name in pair} <= set(cases)
    assert {cases[fused]["block_kernel"] for fused, _ in streaming_pairs} == {"cpu-flash"}
    assert {cases[plain]["block_kernel"] for _, plain in streaming_pairs} == {"plain"}


def test_the_one_call_session_lists_both_plans_and_leaves_few_files(tmp_path):
    """``session.sh`` runs BART-large, then LongT5 with the block the first part chose; listed
    here (``PRINT_PLAN``), it must reach both plans, and leave no more files than the device
    tool brings back (8)."""
    env = launcher_env(OUT=str(tmp_path), NO_WHEELS="1", PRINT_PLAN="1")
    for name in ("PLAN", "SWEEP_ARGS", "PLAIN", "BLOCKED_T5", "MODEL", "BLOCK"):
        env.pop(name, None)
    proc = subprocess.run(["bash", str(ROOT / "bench/gpu_checks/session.sh")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bart, long = ((tmp_path / name).read_text() for name in ("bart.log", "long.log"))
    bart_lines = [line for line in bart.splitlines() if line.startswith("plan: ")]
    long_lines = [line for line in long.splitlines() if line.startswith("plan: ")]
    # the question each model's target hangs on first: BART's ratio at the lengths not yet run,
    # LongT5 16K profiled (the flex kernel's time since its bias reads went heads-first), then 64K
    # with streaming (results/2026-11-28-nvidia-h200/NOTES.md)
    assert bart_lines[0] == "plan: --tokens 16384,32768,131072 --methods hf_ds_gc,cached"
    assert "plan: --tokens 16777216 --methods cached --cross_attention_block 32768 --offload --warmup 0 --steps 1 --no_breakdown --point_timeout 600" in bart_lines
    assert long_lines[:2] == ["plan: --tokens 16384 --methods hf_ds_gc,cached --cross_attention_block 32768 --profile",
                              "plan: --tokens 65536 --methods cached --cross_attention_block 32768 --warmup 1 --steps 1"] \
        and "16777216" not in long
    assert any("524288 --methods hf_ds_gc,cached" in line for line in bart_lines)  # 512K with its baseline
    assert len([f for f in tmp_path.rglob("*") if f.is_file()]) <= 8


def check_lines(**cases) -> str:
    """checks.jsonl as the two check scripts write it: one JSON line each, cases with their "ok"."""
    streaming = {name: {"ok": ok} for name, ok in cases.items() if name.startswith(("bart", "t5-"))}
    t5 = {name: {"ok": ok} for name, ok in cases.items() if name.startswith("longt5")}
    return json.dumps({"device": "H100", **streaming}) + "\n" + json.dumps({"check": "t5_attention", **t5}) + "\n"


@pytest.mark.parametrize("cases, flags", [
    ({"bart-bf16": True, "bart-bf16-plain-blocks": True, "longt5-tglobal-flex": True, "longt5-tglobal-blocked": True}, []),
    ({"bart-bf16": False, "bart-bf16-plain-blocks": True, "longt5-tglobal-flex": False, "longt5-tglobal-blocked": True},
     ["--plain_cross_attention", "--blocked_t5_attention"]),
    ({"bart-bf16": False, "bart-bf16-plain-blocks": False}, []),  # the fallback failed too: nothing to switch to
    ({"longt5-tglobal-flex": False}, []),  # the fallback's case missing: no guess
    ({"bart-bf16": True, "t5-bf16": False, "t5-bf16-plain-blocks": True}, ["--plain_cross_attention"]),  # one family fails
], ids=["all-pass", "both-fused-fail", "fallback-fails-too", "fallback-unchecked", "t5-fused-fails"])
def test_fallback_flags_follow_the_checks(cases, flags, tmp_path):
    checks = tmp_path / "checks.jsonl"
    checks.write_text(check_lines(**cases) + '{"block_timing": {"chosen": 32768}}\nnot json\n')
    assert needed_flags(checks) == flags


@pytest.mark.parametrize("failed_checks", [False, True], ids=["checks-pass", "fused-kernels-failed"])
@pytest.mark.parametrize("model", ["bart-large", "long-t5-tglobal-large"])
def test_every_line_of_the_default_plans_parses(model, failed_checks, tmp_path):
    """Each line, as the script hands it to sweep.py, is accepted by sweep.py's own parser; where
    the fused kernels failed their checks (and their fallbacks passed), the lines use the fallbacks."""
    if failed_checks:
        (tmp_path / "checks.jsonl").write_text(check_lines(**{"bart-bf16": False, "bart-bf16-plain-blocks": True,
                                                               "longt5-tglobal-flex": False, "longt5-tglobal-blocked": True}))
    env = launcher_env(OUT=str(tmp_path), NO_WHEELS="1", MODEL=model, BLOCK="32768", PRINT_PLAN="1")
    for name in ("PLAN", "SWEEP_ARGS", "PLAIN", "BLOCKED_T5"):
        env.pop(name, None)
    proc = subprocess.run(["bash", str(ROOT / "bench/gpu_checks/device_sweep.sh")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line.removeprefix("plan: ") for line in proc.stdout.splitlines() if line.startswith("plan: ")]
    assert len(lines) >= 4
    t5 = model.startswith("long-t5")
    for line in lines:
        args = parse_args(["--model", model, "--dtype", "bf16", "--zero_stage", "3", *(["--fast_t5_attention"] if t5 else []),
                           "--warmup", "2", "--steps", "2", *shlex.split(line)])
        assert args.model == model and args.tokens
        if args.cross_attention_block is not None:
            assert args.cross_attention_block == 32768 and args.plain_cross_attention == failed_checks
        # flex failed: lines on flex take the blocked code; the SDPA lines have no flex in the encoder
        assert args.blocked_t5_attention == (failed_checks and t5 and not args.local_sdpa_t5_attention)


LACKING_ON_THE_GPU_MACHINE = '''
import sys


class Lacking:  # ../shared/device/wheelhouse.sh: the GPU machine has neither, and the plan installs neither
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("datasets", "rouge_score"):
            raise ModuleNotFoundError(f"No module named {name!r} (the GPU machine lacks it)")


sys.meta_path.insert(0, Lacking())
'''


def test_a_bench_point_needs_nothing_the_gpu_machine_lacks(tmp_path):
    """The GPU machine has no datasets or rouge-score and the plan installs only DeepSpeed's
    wheels: a sweep of cached_ds's methods must import neither (one did, through
    ``cached_ds.trainer``, and would have failed every such point of a GPU session). The
    sweep and its point processes run with both imports refused (a ``sitecustomize``)."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(LACKING_ON_THE_GPU_MACHINE)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/sweep.py"), "--model", "tiny-bart", "--tokens", "1024",
                           "--methods", "cached,full", "--target_tokens", "64", "--group_tokens", "512", "--steps", "1",
                           "--warmup", "0", "--no_breakdown", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=launcher_env(PYTHONPATH=f"{tmp_path / 'site'}:{ROOT}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    points = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    logs = "".join(path.read_text() for path in (out / "logs").glob("*.log"))
    assert [p["method"] for p in points] == ["cached", "full"], logs[-3000:]
    assert all(p.get("tokens_per_s") and not p.get("error") for p in points), logs[-3000:]
    check = subprocess.run([sys.executable, "-c", "import datasets"], capture_output=True, text=True,
                           env=launcher_env(PYTHONPATH=str(tmp_path / "site")))
    assert "the GPU machine lacks it" in check.stderr  # the refusal itself works


def test_the_engine_check_passes_on_cpu_with_what_the_gpu_machine_has(tmp_path):
    """``engine_check.py`` (a DeepSpeed engine step against the plain-HF reference; on a GPU its
    CUDA streams, pinned memory and DeepSpeed's asynchronous cpu_checkpointing) runs its cases
    on the CPU accelerator here, importing nothing the GPU machine lacks, and every case passes."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(LACKING_ON_THE_GPU_MACHINE)
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_checks/engine_check.py")], capture_output=True, text=True,
                          timeout=600, env=launcher_env(CHECK_DEVICE="cpu", PYTHONPATH=f"{tmp_path / 'site'}:{ROOT}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = merged(proc.stdout.splitlines())
    cases = {name: case for name, case in report.items() if isinstance(case, dict)}
    assert set(cases) == {"engine-zero3", "engine-zero3-streaming-cpu-checkpointing", "engine-zero3_offload", "engine-zero2-fp16"}
    assert all(case["ok"] for case in cases.values()), cases
    assert cases["engine-zero3"]["linear"] == "linear" and cases["engine-zero3_offload"]["linear"] == "zero3_linear_wrap"
    assert cases["engine-zero3-streaming-cpu-checkpointing"]["gradient_cache_offloaded"]


def test_flex_variants_time_every_variant_on_cpu():
    """``flex_variants.py`` (where LongT5's flex attention loses its time, [t5-speed]) runs each
    variant's forward at tiny shapes here: a GPU session finds no plumbing error in it."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_checks/flex_variants.py")], capture_output=True, text=True,
                          timeout=600, env=launcher_env(CHECK_DEVICE="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = merged(proc.stdout.splitlines())
    cases = {name: case for name, case in report.items() if name.startswith("flex_variants-")}
    assert set(cases) == {f"flex_variants-{n}" for n in ("sdpa_dense", "flex_band", "flex_band_bias", "flex_band_bias_grad", "flex_tglobal")}
    assert all(case["ok"] and case["forward_ms"] > 0 for case in cases.values()), cases
