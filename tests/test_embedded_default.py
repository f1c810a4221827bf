"""The README's first command, end to end: the embedded default through the real deepspeed
launcher. CachED on whole documents must lead the truncated baseline by >= 10 ROUGE-2 points."""

import json
import subprocess

from launcher_helpers import REPO, launcher_env


def test_readme_main_command_runs_the_embedded_default(tmp_path):
    out = tmp_path / "run"
    command = ["deepspeed", "launchers/train.py", "--deepspeed", "ds_configs/zero3.json", "--output_dir", str(out)]
    result = subprocess.run(command, cwd=REPO, env=launcher_env(OMP_NUM_THREADS="2"), capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    scores = json.loads((out / "eval_results.json").read_text())
    truncated = scores["truncated"]
    assert scores["rouge2"] - truncated["rouge2"] >= 10, scores
    assert "CachED, whole documents" in result.stdout and "truncated to the first" in result.stdout
    held_out = (out / "data" / "eval.jsonl").read_text().splitlines()
    assert len(held_out) >= 20
    assert len((out / "predictions_final.jsonl").read_text().splitlines()) == len(held_out)
