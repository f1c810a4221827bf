"""Atomic, resumable checkpoints under ``<output_dir>/checkpoints``.

DeepSpeed writes each checkpoint into ``.staging/<tag>``; each rank flushes the files it wrote to
disk (``fsync``), and once every rank has, rank 0 renames the folder to ``<tag>`` and then
replaces the ``latest`` file (write aside, flush, ``os.replace``), so neither a crash nor a power
loss at any moment leaves ``latest`` naming an incomplete checkpoint. Rank 0 alone reads
``latest`` and tells the others: on a shared filesystem one node's view can lag, and a rank
holding an older tag would load it, or wait in a collective, alone. Each rank's RNG state is
saved beside DeepSpeed's files, so a resumed run draws the same dropout masks, and rank 0 writes
``resume.json`` there too (before the flush and rename, so it is published with the rest): what
a resumed run must match (ZeRO stage, ranks, data plan, learning rate), checked before DeepSpeed
reads anything, whose own errors for another stage or rank count are bare assertions.

Only ``latest`` publishes a checkpoint: a ``step…`` folder newer than it (a crash between the
folder's rename and ``latest``'s) is unpublished and removed at the next start, and pruning only
ever deletes checkpoints older than the one just published.
"""

from __future__ import annotations

from collections.abc import Callable

import json
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
SIDECAR = "resume.json"  # what a resume must match, beside DeepSpeed's files


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
        """A crash mid-save leaves staging behind, or (between the rename and ``latest``) a
        ``step…`` folder newer than the one ``latest`` names: neither was published. Checkpoints
        up to ``latest`` are not touched."""
        if rank() == 0:
            if self.staging.exists():
                shutil.rmtree(self.staging)
            marker = self.root / "latest"
            # No "latest" (a copied or damaged folder) or a tag not ours: nothing is known to be
            # unpublished, so nothing goes (a --resume then finds no checkpoint and says so).
            named = _step_of(marker.read_text().strip()) if marker.is_file() else None
            for folder in self._published() if named is not None else ():
                if _step_of(folder.name) > named:
                    shutil.rmtree(folder)
        barrier()

    def save(self, engine, step: int, client_state: dict, sidecar: dict | None = None) -> str:
        """``sidecar``: what a resume must match, written by rank 0 as ``resume.json``."""
        tag = f"step{step:08d}"
        engine.save_checkpoint(str(self.staging), tag=tag, client_state=client_state)
        torch.save(rng_state(), self.staging / tag / f"rng_rank{rank()}.pt")
        if sidecar is not None and rank() == 0:
            (self.staging / tag / SIDECAR).write_text(json.dumps({"step": step, **sidecar}, indent=2) + "\n")
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
            self._prune(tag)
        barrier()
        return tag

    def sidecar(self, tag: str) -> dict | None:
        """The ``resume.json`` of checkpoint ``tag`` as rank 0 reads it (every rank calls this
        together); None for checkpoints written before they carried one."""
        if rank() != 0:
            return from_rank0(None)
        path = self.root / tag / SIDECAR
        return from_rank0(json.loads(path.read_text()) if path.is_file() else None)

    def load(self, engine, check: Callable[[dict], None] | None = None) -> dict:
        """Restore the latest checkpoint (model, optimizer, scheduler, this rank's RNG); returns
        the client state saved with it. ``check`` sees the checkpoint's ``resume.json`` before
        DeepSpeed reads anything, or, in an older checkpoint without one, the client state right
        after the load (before the per-rank files)."""
        tag = self.latest()
        if tag is None:
            raise ValueError(f"--resume: no complete checkpoint in {self.root}; run without --resume to start fresh")
        sidecar = self.sidecar(tag) if check is not None else None
        if sidecar is not None:
            check(sidecar)
        _, client_state = engine.load_checkpoint(str(self.root), tag=tag)
        if client_state is None:
            raise ValueError(f"--resume: DeepSpeed could not load {self.root / tag}")
        if check is not None and sidecar is None:
            check(client_state)
        set_rng_state(torch.load(self.root / tag / f"rng_rank{rank()}.pt", weights_only=False))
        return client_state

    def _published(self) -> list[Path]:
        return sorted((p for p in self.root.glob("step*") if p.is_dir() and _step_of(p.name) is not None), key=lambda p: _step_of(p.name))

    def _prune(self, tag: str) -> None:
        """Keep ``tag`` (just published) and the ``keep - 1`` checkpoints before it; a folder newer
        than ``tag`` was never published (``discard_partial`` removes it at the next start)."""
        older = [p for p in self._published() if _step_of(p.name) < _step_of(tag)]
        for old in older[: max(0, len(older) - (self.keep - 1))]:
            shutil.rmtree(old)


def _step_of(tag: str) -> int | None:
    """The step a ``step00000042`` tag names (None for anything else)."""
    matched = re.fullmatch(r"step(\d+)", tag)
    return int(matched.group(1)) if matched else None
