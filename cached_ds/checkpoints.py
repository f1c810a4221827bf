"""Atomic, resumable checkpoints under ``<output_dir>/checkpoints``.

DeepSpeed writes each checkpoint into ``.staging/<tag>``; once every rank has finished, rank 0
renames it to ``<tag>`` and then replaces the ``latest`` file (write aside + ``os.replace``), so a
crash at any moment leaves ``latest`` naming a complete checkpoint. Each rank's RNG state is saved
beside DeepSpeed's files, so a resumed run draws the same dropout masks.
"""

from __future__ import annotations

from collections.abc import Callable

import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from .distributed import barrier, rank

FAULT_ENV = "CACHED_DS_FAULT"  # fault injection for crash tests: "kill_during_save@STEP"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def injected_fault(name: str, step: int) -> bool:
    """True when the environment asks this run to fail at ``name`` on ``step`` (tests only)."""
    return os.environ.get(FAULT_ENV) == f"{name}@{step}"


class CheckpointStore:
    def __init__(self, output_dir: str | Path, keep: int = 2):
        self.root = Path(output_dir) / "checkpoints"
        self.staging = self.root / ".staging"
        self.keep = keep

    def latest(self) -> str | None:
        marker = self.root / "latest"
        if not marker.is_file():
            return None
        tag = marker.read_text().strip()
        return tag if (self.root / tag).is_dir() else None

    def discard_partial(self) -> None:
        """A crash mid-save leaves only staging behind; nothing published is touched."""
        if rank() == 0 and self.staging.exists():
            shutil.rmtree(self.staging)
        barrier()

    def save(self, engine, step: int, client_state: dict) -> str:
        tag = f"step{step:08d}"
        engine.save_checkpoint(str(self.staging), tag=tag, client_state=client_state)
        torch.save(rng_state(), self.staging / tag / f"rng_rank{rank()}.pt")
        barrier()
        if injected_fault("kill_during_save", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if rank() == 0:
            target = self.root / tag
            if target.exists():
                shutil.rmtree(target)
            os.replace(self.staging / tag, target)
            aside = self.root / "latest.tmp"
            aside.write_text(tag + "\n")
            os.replace(aside, self.root / "latest")
            shutil.rmtree(self.staging)  # what is left is DeepSpeed's own "latest" file for staging
            self._prune()
        barrier()
        return tag

    def load(self, engine, check: Callable[[dict], None] | None = None) -> dict:
        """Restore the latest checkpoint (model, optimizer, scheduler, this rank's RNG); returns
        the client state saved with it, which ``check`` sees first (before the per-rank files)."""
        tag = self.latest()
        if tag is None:
            raise ValueError(f"--resume: no complete checkpoint in {self.root}; run without --resume to start fresh")
        _, client_state = engine.load_checkpoint(str(self.root), tag=tag)
        if check is not None:
            check(client_state)
        set_rng_state(torch.load(self.root / tag / f"rng_rank{rank()}.pt", weights_only=False))
        return client_state

    def _prune(self) -> None:
        published = sorted(p for p in self.root.glob("step*") if p.is_dir())
        for old in published[: max(0, len(published) - self.keep)]:
            shutil.rmtree(old)
