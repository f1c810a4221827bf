"""Running launchers/train.py as users do, on a small generated corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cached_ds.distributed import free_port, fresh_rendezvous_env

REPO = Path(__file__).resolve().parents[1]


def launcher_env(**extra) -> dict:
    """The test process's environment without its own rendezvous (this pytest process may hold a
    single-rank group on MASTER_PORT), plus a free port for single-process runs."""
    return {**fresh_rendezvous_env(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def train_command(*args, ranks: int = 1) -> list[str]:
    script = str(REPO / "launchers" / "train.py")
    if ranks == 1:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port()), script, *args]


def run_train(*args, ranks: int = 1, timeout: int = 600, check: bool = True, **env) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(*args, ranks=ranks), cwd=REPO, env=launcher_env(**env), capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def make_corpus(root: Path, documents: int = 16, words: int = 500, window: int = 128) -> dict[str, str]:
    """Generated train/eval JSONL, a sentencepiece tokenizer and a random tiny BART saved with
    save_pretrained: the flags a user passes for their own data and model."""
    from cached_ds import synthetic
    from cached_ds.embedded import Preset, _prepare

    preset = Preset(train_documents=documents, eval_documents=3, document_words=words, window=window, steps=4,
                    micro_batch_size=2, lr=3e-3, warmup_steps=0, vocab_size=256, max_new_tokens=8)
    _prepare(root, preset, seed=0)
    assert synthetic  # the corpus comes from the same generator as the embedded default
    return {"model": str(root / "model"), "train_file": str(root / "train.jsonl"), "eval_file": str(root / "eval.jsonl")}
