"""Atomic, resumable checkpoints under ``<output_dir>/checkpoints``.

DeepSpeed writes each checkpoint into ``.staging/<tag>``; each rank flushes the files it wrote to
disk (``fsync``), and once every rank has, rank 0 renames the folder to ``<tag>`` and then
replaces the ``latest`` file (write aside, flush, ``os.replace``), so neither a crash nor a power
loss at any moment leaves ``latest`` naming an incomplete checkpoint. Rank 0 alone reads
``latest`` and tells the others: on a shared filesystem one node's view can lag, and a rank
holding an older tag would load it, or wait in a collective, alone. Each rank's RNG state is
saved beside DeepSpeed's files, so a resumed run draws the same dropout masks.
"""

from __future__ import annotations

from collections.abc import Callable

import os
import random
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from .distributed import barrier, from_rank0, rank, world_size

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


RANK_IN_NAME = re.compile(r"pp_rank_(\d+)_|^rng_rank(\d+)\.pt$")  # DeepSpeed's ZeRO shards, our RNG states


def written_by(folder: Path, of_rank: int, ranks: int) -> list[Path]:
    """The files under ``folder`` that rank ``of_rank`` wrote and so flushes: DeepSpeed's
    ``zero_pp_rank_<r>_…`` shards and our ``rng_rank<r>.pt``; rank 0 also takes every file that
    names no rank (DeepSpeed's ``mp_rank_00_model_states.pt``, anything a later version adds) and
    the folders themselves (their entries must be durable too)."""
    def owner(path: Path) -> int:
        named = RANK_IN_NAME.search(path.name) if path.is_file() else None
        rank_named = int(named.group(1) or named.group(2)) if named else 0
        return rank_named if rank_named < ranks else 0
    return [p for p in sorted(folder.rglob("*")) + [folder] if owner(p) == of_rank]


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def injected_fault(name: str, step: int) -> bool:
    """True when the environment asks this run to fail at ``name`` on ``step`` (tests only)."""
    return os.environ.get(FAULT_ENV) == f"{name}@{step}"


class CheckpointStore:
    def __init__(self, output_dir: str | Path, keep: int = 2):
        self.root = Path(output_dir) / "checkpoints"
        self.staging = self.root / ".staging"
        self.keep = keep

    def latest(self) -> str | None:
        """The newest complete checkpoint's tag as rank 0 sees it (every rank calls this together)."""
        if rank() != 0:
            return from_rank0(None)
        marker = self.root / "latest"
        tag = marker.read_text().strip() if marker.is_file() else None
        return from_rank0(tag if tag is not None and (self.root / tag).is_dir() else None)

    def discard_partial(self) -> None:
        """A crash mid-save leaves only staging behind; nothing published is touched."""
        if rank() == 0 and self.staging.exists():
            shutil.rmtree(self.staging)
        barrier()

    def save(self, engine, step: int, client_state: dict) -> str:
        tag = f"step{step:08d}"
        engine.save_checkpoint(str(self.staging), tag=tag, client_state=client_state)
        torch.save(rng_state(), self.staging / tag / f"rng_rank{rank()}.pt")
        for path in written_by(self.staging / tag, rank(), world_size()):
            fsync(path)
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
            fsync(aside)
            os.replace(aside, self.root / "latest")
            fsync(self.root)  # the renames themselves
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
