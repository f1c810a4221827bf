"""Rank helpers that also work without an initialised process group (plain single-process use)."""

from __future__ import annotations

import itertools
import os
import socket
import time
import uuid
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


PATIENT_TIMEOUT = timedelta(days=7)
_patient_barriers = itertools.count()  # every rank calls patient_barrier in the same order: same keys


def patient_barrier(reason: str, stall: timedelta | None = None) -> None:
    """Every rank waits here until all have arrived, for up to ``PATIENT_TIMEOUT``: for waits of
    unknown length (rank 0 tokenizing a corpus of books, reading every shard for the export,
    ranks generating summaries of uneven length) that a collective would give up on at the
    process group's timeout (DeepSpeed's default: 10 min, ``DEEPSPEED_TIMEOUT``; NCCL's watchdog
    then aborts the job, and a requeue starts the tokenization over).

    It waits on the rendezvous store the ranks met through (each rank sets a key, then waits for
    everyone's), not on a collective: no watchdog, and no new connection between nodes (a gloo
    group of its own, as before, opens one, and where a node's hostname resolves to loopback it
    would retry that for days). A rank that dies is noticed by the launcher: torchrun (one per
    node, as ``train.sbatch`` runs it, with ``--kill-on-bad-exit``) and the deepspeed launcher on
    one node stop the others at once, and where rank 0 hosts the store (a launch without
    torchrun), its end ends the wait. A multi-node deepspeed (pdsh) launch does not stop the other
    nodes: ``stall`` then bounds the wait for ranks that report progress (``progress_beat``):
    one that has not arrived and not reported for that long is taken for dead, and this raises.
    Nothing on one rank. ``reason`` names the wait in the key (and in the errors)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    # The default group's store: torch keeps it in a private accessor (unchanged since torch 1.x).
    store = dist.distributed_c10d._get_default_store()
    key = f"cached_ds/patient_barrier/{next(_patient_barriers)}/{reason}"
    store.set(f"{key}/{rank()}", "arrived")
    arrived = [f"{key}/{other}" for other in range(world_size())]
    if stall is None:
        store.wait(arrived, PATIENT_TIMEOUT)
        return
    deadline, last_seen = time.monotonic() + PATIENT_TIMEOUT.total_seconds(), {}
    while True:
        try:
            store.wait(arrived, timedelta(seconds=min(60.0, stall.total_seconds() / 4)))
            return
        except dist.DistStoreError:
            if time.monotonic() > deadline:
                raise
        now = time.monotonic()
        for other, name in enumerate(arrived):
            if store.check([name]):
                continue
            beats = store.add(f"{_PROGRESS}/{other}", 0)  # reads the count without changing it
            if last_seen.get(other, (None,))[0] != beats:
                last_seen[other] = (beats, now)
            elif now - last_seen[other][1] > stall.total_seconds():
                raise RuntimeError(f"rank {other} has neither reached the {reason!r} wait nor reported progress for "
                                   f"{stall}: it is taken to have stopped (see its log); the launcher did not end this job")


_PROGRESS = "cached_ds/progress"


def progress_beat() -> None:
    """Tell the other ranks this one is working (a counter in the rendezvous store), for
    ``patient_barrier``'s ``stall``. Nothing on one rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.distributed_c10d._get_default_store().add(f"{_PROGRESS}/{rank()}", 1)


def from_rank0(value):
    """``value`` as rank 0 has it, on every rank (a collective: every rank calls it)."""
    if not dist.is_initialized():
        return value
    box = [value if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def require_shared_directory(path: Path, flag: str) -> None:
    """Stop at the start unless every rank sees the same ``path``: each rank writes its own
    checkpoint shards there and rank 0 reads them all to export, so a node-local path (/tmp, a
    node's scratch disk) trains for hours on several nodes and fails at the end. Rank 0 writes a
    file of a name never used before (no stale cache entry on NFS), each rank looks for it (for up
    to 10 s: a network filesystem may show it late), and every rank raises the same error.
    A collective; nothing on one rank. ``flag`` names the setting in the error."""
    if world_size() == 1:
        return
    token = from_rank0(uuid.uuid4().hex)
    probe = Path(path) / f".cached_ds_shared_{token}"
    if rank() == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    barrier()
    seen = _shows(probe, token)
    views = [None] * world_size()
    dist.all_gather_object(views, (rank(), socket.gethostname(), seen))  # each rank's view: every rank has looked
    if rank() == 0:
        probe.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for r, host, ok in views if not ok]
    if blind:
        raise ValueError(f"{flag} {path} is not one folder that every rank sees: {', '.join(blind)} cannot read the file "
                         f"rank 0 (on {views[0][1]}) wrote there. Every rank writes its checkpoint shards there and rank 0 "
                         f"reads them all to export: give a path on a filesystem every node mounts (shared scratch or home, "
                         f"not /tmp or a node-local disk)")


def _shows(probe: Path, token: str, wait_s: float = 10.0) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if probe.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def _reduction_device() -> torch.device:
    """Where a tensor must live for the default group to reduce it: host memory for gloo and MPI,
    else the accelerator's (NCCL, HCCL, XCCL take device tensors only: "No backend type
    associated with device type cpu")."""
    if str(dist.get_backend()).lower() in ("gloo", "mpi"):
        return torch.device("cpu")
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def all_reduce_sum(value: float) -> float:
    if not dist.is_initialized():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=_reduction_device())
    dist.all_reduce(total)
    return float(total.item())


def shutdown() -> None:
    """End the process group after a run that finished on every rank. Left to interpreter exit,
    its C++ threads are torn down in no fixed order: a two-rank CPU run once ended with
    "terminate called without an active exception" (exit -6) after all its work was done."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_rendezvous_env(env: dict | None = None) -> dict:
    """``env`` (default ``os.environ``) for a child process that starts a process group of its
    own: without the rendezvous variables inherited from a launcher, SLURM or a group this process
    holds, and with a free ``MASTER_PORT``."""
    env = {k: v for k, v in (os.environ if env is None else env).items() if k not in RENDEZVOUS}
    return {**env, "MASTER_PORT": str(free_port())}


# Set by MPI launchers (mpirun, deepspeed --launcher openmpi/mvapich/impi) for every rank.
MPI_WORLD_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


def init_process_group() -> None:
    """torchrun, the deepspeed launcher and SLURM+torchrun all set RANK/WORLD_SIZE; a plain
    ``python`` run becomes a one-rank group. An MPI launch without them is left to DeepSpeed's
    MPI discovery: filled in with one-rank defaults, each of its ranks would train alone.
    gloo on the CPU accelerator, NCCL on GPUs."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if dist.is_initialized():
        return
    backend = "gloo" if get_accelerator().device_name() == "cpu" else None
    mpi = next((name for name in MPI_WORLD_SIZE if int(os.environ.get(name, "1") or "1") > 1), None)
    if mpi and "RANK" not in os.environ:
        try:
            import mpi4py  # noqa: F401  (DeepSpeed's MPI discovery reads ranks with it)
        except ImportError:
            raise ValueError(f"launched by MPI ({mpi}={os.environ[mpi]}) without RANK/WORLD_SIZE: DeepSpeed finds the ranks "
                             "with mpi4py (pip install mpi4py), or launch with torchrun / the deepspeed launcher") from None
        deepspeed.init_distributed(dist_backend=backend)
        _use_local_device()
        return
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or "1")
    if tasks > 1 and "RANK" not in os.environ:  # srun starting the ranks itself, without an MPI plugin (PMI_*)
        raise ValueError(f"started by srun as one of {tasks} tasks (SLURM_STEP_NUM_TASKS) without RANK/WORLD_SIZE: each task "
                         "would train alone on the first GPU, all writing one output_dir. Start one task per node running "
                         "torchrun (launchers/slurm/train.sbatch does), or use the deepspeed launcher")
    # One rank alone: any free port (a fixed 29500 failed with EADDRINUSE beside another job);
    # ranks of a launch that named no port must agree on one: torch's default.
    port = str(free_port()) if os.environ.get("WORLD_SIZE", "1") == "1" else "29500"
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend=backend)
    _use_local_device()


def _use_local_device() -> None:
    """Make this rank's GPU (``LOCAL_RANK``) the current device right after the group starts.
    DeepSpeed does it only when the engine is built, but the run talks before that (rank 0's
    choice of checkpoint, ``from_rank0``): NCCL's object collectives use the *current* device
    (``broadcast_object_list``'s docs: "the user's responsibility ... torch.cuda.set_device()"),
    so every rank would send from GPU 0 — refused on ranks >= 1 where DeepSpeed bound the group
    to their own GPU ("Attempt to perform collective on tensor not on device passed to
    init_process_group"), "Duplicate GPU detected" or a hang where it did not. The same call
    the engine makes later (``engine.py``: ``set_device(self.local_rank)``); a no-op on CPU."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu" and accelerator.is_available() and "LOCAL_RANK" in os.environ:
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))


def max_over_ranks(count: int) -> int:
    """ZeRO-3 gathers parameters in every encoder call: ranks with fewer window groups pad up
    to the most any rank has (2 ranks at 2 vs 4 groups: gloo aborts, NCCL hangs)."""
    total = torch.tensor([count], dtype=torch.long, device=_reduction_device())
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return int(total.item())


def min_over_ranks(count: int) -> int:
    """The fewest any rank has (ZeRO-3: window groups whose graphs every rank keeps)."""
    total = torch.tensor([count], dtype=torch.long, device=_reduction_device())
    dist.all_reduce(total, op=dist.ReduceOp.MIN)
    return int(total.item())


def partitioned_across_ranks(module: torch.nn.Module) -> bool:
    """Whether ``module``'s parameters are ZeRO-3 partitions (DeepSpeed marks them with
    ``ds_id``) shared by more than one rank."""
    first = next(module.parameters(), None)
    return (first is not None and hasattr(first, "ds_id") and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)
