"""examples/train_long_documents.py runs as its docstring says and reports what it promises."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_long_documents.py"


def test_example_trains_and_checks_its_gradient():
    run = subprocess.run([sys.executable, str(EXAMPLE), "--tokens", "4096", "--steps", "10"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    error = float(re.search(r"gradient vs full backprop: relative error (\S+)", run.stdout).group(1))
    cached, full = map(float, re.search(r"encoder activations saved: cached (\S+) MiB, full (\S+) MiB", run.stdout).groups())
    steps = re.findall(r"step\s+(\d+)\s+loss (\S+)", run.stdout)
    assert error <= 1e-5 and cached < full
    assert [int(s) for s, _ in steps] == [1, 10]  # it prints step 1 and every tenth
    assert float(steps[1][1]) < float(steps[0][1]), "the loss went down"
