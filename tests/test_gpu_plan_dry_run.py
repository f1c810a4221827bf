"""The GPU plan's plumbing on CPU (``bench/gpu_checks``): a lent GPU comes for minutes, so the
script it runs must not fail on anything a CPU can find first. The numbers are not checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def test_pick_block_times_each_block_and_prints_the_fastest(tmp_path):
    report = tmp_path / "checks.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_checks/pick_block.py"), "--keys", "1024", "--blocks", "256,1024",
                           "--report", str(report)], capture_output=True, text=True, timeout=300, env=cpu_env(CHECK_DEVICE="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = report.read_text().splitlines()
    timing = json.loads(line)["block_timing"]
    assert set(timing["layer_ms"]) == {"256", "1024"} and all(ms > 0 for ms in timing["layer_ms"].values())
    assert proc.stdout.strip() == str(timing["chosen"]) == min(timing["layer_ms"], key=timing["layer_ms"].get)


def test_device_sweep_runs_its_plan_with_the_fallback_block(tmp_path):
    """No CUDA here: the block timing fails, the plan falls back to 32768-key blocks, and a PLAN
    in single quotes gets ``$BLOCK`` filled in."""
    plan = "--tokens 1024 --methods hf_ds_gc,cached\n--tokens 1024 --methods cached --cross_attention_block $BLOCK"
    env = cpu_env(OUT=str(tmp_path), NO_WHEELS="1", MODEL="tiny-bart", PLAN=plan, BUDGET_S="400",
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
    assert (tmp_path / "logs.tgz").is_file() and (results / "table.md").is_file()
