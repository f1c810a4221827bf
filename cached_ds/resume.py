"""Resuming a run: which checkpoint, whether this run may continue it, and its new ``--lr``.

    deepspeed launchers/train.py --deepspeed ds_configs/zero3.json ... --resume auto   # first start and requeue alike

Each checkpoint carries ``resume.json`` (``ResumeState.sidecar``): the ZeRO stage, the rank count,
the data plan and the learning rate. It is checked before DeepSpeed loads anything: DeepSpeed
fails on another ZeRO stage or rank count with a bare assertion, and a saved position in an epoch
means something only in the document order it was saved in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .ds_config import REPLACED_SCHEDULERS

logger = logging.getLogger("cached_ds")

_PLAN_NAMES = {"ranks": "ranks", "micro_batch_size": "--micro_batch_size", "seed": "--seed",
               "gradient_accumulation_steps": "--gradient_accumulation_steps", "documents": "training documents"}


def choose_checkpoint(store, asked: str | bool | None) -> str | None:
    """The checkpoint this run continues from, or None: ``--resume`` needs one, a run without it
    refuses an earlier run's, ``--resume auto`` takes one where there is one."""
    store.discard_partial()
    earlier = store.latest()
    if asked == "auto":
        logger.info("--resume auto: %s", f"resuming from {earlier}" if earlier else "no checkpoint yet, starting fresh")
        return earlier
    if asked and earlier is None:
        raise ValueError(f"--resume: no complete checkpoint in {store.root}; run without --resume to start fresh "
                         "(--resume auto does either)")
    if not asked and earlier is not None:
        # Its "latest" would be exported instead of this run's weights, and pruning by step
        # would delete this run's checkpoints as soon as they are written.
        raise ValueError(f"{store.root} holds checkpoints of an earlier run (latest: {earlier}); "
                         "pass --resume to continue it, or a new --output_dir to start over")
    return earlier if asked else None


@dataclass(frozen=True)
class ResumeState:
    """What this run is: a resumed one must match the checkpoint's in all of it but the rate."""
    zero_stage: int
    world_size: int
    data_plan: dict  # what the document order and the place in an epoch depend on
    lr: float  # the peak rate
    lr_schedule: str  # who sets the rate: "ours" (the launcher's warm-up), a DeepSpeed scheduler's type, or "none"
    config_path: str  # --deepspeed, for the messages

    def sidecar(self) -> dict:
        """``resume.json`` of each checkpoint this run writes."""
        return {"zero_stage": self.zero_stage, "world_size": self.world_size, "data_plan": self.data_plan,
                "lr": self.lr, "lr_schedule": self.lr_schedule}

    def check(self, saved: dict) -> None:
        """``saved``: a checkpoint's ``resume.json``, or (older checkpoints) the client state
        after the load, which holds the data plan only."""
        stage = saved.get("zero_stage")
        if stage is not None and stage != self.zero_stage:
            raise ValueError(f"--deepspeed: the checkpoint was written by ZeRO stage {stage}, this run is stage {self.zero_stage} "
                             f"({self.config_path}); resume with the same config, or start over in a new --output_dir")
        ranks = saved.get("world_size")
        if ranks is not None and ranks != self.world_size:
            raise ValueError(f"--resume: the checkpoint was written by {ranks} ranks, this run has {self.world_size}; resume on as "
                             "many ranks (nodes × ranks per node), or start over in a new --output_dir")
        schedule = saved.get("lr_schedule")
        if schedule is not None and schedule != self.lr_schedule:
            if schedule in REPLACED_SCHEDULERS and self.lr_schedule == "ours":  # a checkpoint of DeepSpeed's own, from before
                raise ValueError(f"--deepspeed: the checkpoint's learning rate was set by DeepSpeed's {schedule}, which this version "
                                 "runs as HF's schedule instead (DeepSpeed's lose their first two steps), and the two keep other "
                                 "states; finish that run with the cached-ds that started it, or start over in a new --output_dir")
            raise ValueError(f"--deepspeed: the checkpoint's learning rate was set by {_schedule_name(schedule)}, this run's by "
                             f"{_schedule_name(self.lr_schedule)}; resume with the same config, or start over in a new --output_dir")
        lr = saved.get("lr")
        if lr is not None and lr != self.lr and self.lr_schedule not in ("ours", "none"):
            raise ValueError(f"--lr: the checkpoint's run used {lr}, this run {self.lr}, and the config's {self.lr_schedule} "
                             f"scheduler restores its own rate from the checkpoint; resume with --lr {lr}, or start over in a "
                             "new --output_dir")
        plan = saved.get("data_plan")
        if plan is None:  # written before checkpoints carried it
            return
        changed = [f"{name} {plan[key]} then, {self.data_plan[key]} now" for key, name in _PLAN_NAMES.items()
                   if plan.get(key) != self.data_plan[key]]
        if changed:
            raise ValueError(f"--resume: the checkpoint's data order was made with other settings ({'; '.join(changed)}); "
                             "resume with the same ones, or start over in a new --output_dir")

    def apply_new_lr(self, engine) -> float | None:
        """A resumed run's ``--lr`` is its new peak: the restored scheduler (ours) and optimizer
        would keep the checkpoint's. The schedule goes on from where it was (its current factor
        times the new peak). The config's own DeepSpeed schedulers are refused another rate
        (``check``). Returns the checkpoint's rate where it changed, else None."""
        if self.lr_schedule == "ours":
            scheduler = engine.lr_scheduler
            old, groups = scheduler.base_lrs[0], scheduler.optimizer.param_groups
            if old == self.lr:
                return None
            for group, factor in zip(groups, (f(scheduler.last_epoch) for f in scheduler.lr_lambdas)):
                group["initial_lr"], group["lr"] = self.lr, self.lr * factor
            scheduler.base_lrs = [self.lr] * len(groups)
            scheduler._last_lr = [group["lr"] for group in groups]
            return old
        if self.lr_schedule == "none" and engine.optimizer is not None:
            groups = engine.optimizer.param_groups
            old = groups[0]["lr"]
            if old == self.lr:
                return None
            for group in groups:
                group["lr"] = self.lr
            return old
        return None


def _schedule_name(schedule: str) -> str:
    return {"ours": "the launcher's warm-up schedule (WarmupLR/WarmupDecayLR/WarmupCosineLR)", "none": "no scheduler (a constant rate)"}.get(
        schedule, f"DeepSpeed's {schedule} scheduler")
