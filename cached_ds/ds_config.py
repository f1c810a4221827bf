"""DeepSpeed JSON configs: loading with precise errors, and HF-style ``"auto"`` resolution.

``"auto"`` is filled the way Hugging Face's Trainer does: batch sizes from the run's flags and
world size, optimizer and scheduler values from the flags, ``reduce_bucket_size = hidden²``,
``stage3_prefetch_bucket_size = 0.9·hidden²``, ``stage3_param_persistence_threshold = 10·hidden``,
and ``stage3_max_reuse_distance = hidden²`` (``reuse_distance``: not HF's value, see there).
The shipped configs set ``reduce_bucket_size`` to 5e7 instead of "auto" (docs/engine.md, "ZeRO's
reduce bucket": hidden² makes every weight matrix a ZeRO flush of its own).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path


def load_config(config: str | Path | dict) -> dict:
    """A DeepSpeed config from a dict or a JSON file, with errors that say where it is wrong."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = Path(config)
    if path.is_dir():
        raise ValueError(f"DeepSpeed config {str(path)!r} is a directory; --deepspeed takes a JSON file, e.g. ds_configs/zero3.json")
    if not path.is_file():
        raise ValueError(f"DeepSpeed config {str(path)!r} does not exist; pass --deepspeed ds_configs/zero3.json or another file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"DeepSpeed config {str(path)!r} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}") from None


# The "auto" fields a run fills, as HF's Trainer does (by key; "bf16.enabled" by its section, so
# an fp16 section's "enabled" is not taken for it). Other "auto" values are DeepSpeed's own
# (data_types.keep_in_fp32_modules, pipeline.stages) and stay for it to interpret.
AUTO_FIELDS = frozenset({
    "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping", "lr",
    "weight_decay", "betas", "eps", "warmup_max_lr", "warmup_min_lr", "warmup_num_steps", "total_num_steps", "bf16.enabled",
    "fp16.enabled", "reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
    "stage3_max_reuse_distance",
})
DEEPSPEED_AUTO = ("data_types.keep_in_fp32_modules", "pipeline.stages")  # "auto" DeepSpeed itself reads


def _field(parent: str | None, key: str) -> str | None:
    """The ``AUTO_FIELDS`` name of ``parent.key``, or None."""
    dotted = f"{parent}.{key}"
    return dotted if dotted in AUTO_FIELDS else key if key in AUTO_FIELDS else None


def resolve_auto(config: dict, values: dict) -> dict:
    """Replace ``"auto"`` in every ``AUTO_FIELDS`` field by ``values[field]``."""

    def walk(node, parent=None):
        if not isinstance(node, dict):
            return node
        resolved = {}
        for key, value in node.items():
            field = _field(parent, key)
            if value == "auto" and field is not None:
                if field not in values:
                    raise ValueError(f'no value for "auto" field {field!r}; set it to a number in the DeepSpeed config')
                value = values[field]
            resolved[key] = walk(value, key)
        return resolved

    return walk(config)


def unresolved_auto(config: dict, parent: str | None = None, prefix: str = "", fillable: bool = True) -> list[str]:
    """Dotted paths of the fields still set to ``"auto"``, but those DeepSpeed reads itself
    (``DEEPSPEED_AUTO``): elsewhere DeepSpeed takes the string for a number and fails deep inside
    (``betas`` in Adam's C++ call) or, in a section its model drops it from, runs its default.
    ``fillable=False``: only those ``resolve_auto`` would not fill either."""
    found = []
    for key, value in config.items():
        if isinstance(value, dict):
            found += unresolved_auto(value, key, f"{prefix}{key}.", fillable)
        elif value == "auto" and prefix + key not in DEEPSPEED_AUTO and (fillable or _field(parent, key) is None):
            found.append(prefix + key)
    return found


def auto_values(*, micro_batch_size: int, gradient_accumulation_steps: int, world_size: int, lr: float, weight_decay: float,
                warmup_steps: int, total_steps: int, max_grad_norm: float, bf16: bool, hidden_size: int,
                fp16: bool = False) -> dict:
    """A value for every ``AUTO_FIELDS`` field."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "gradient_clipping": max_grad_norm,
        "lr": lr,
        "weight_decay": weight_decay,
        "betas": [0.9, 0.999],  # HF's TrainingArguments defaults (adam_beta1, adam_beta2, adam_epsilon)
        "eps": 1e-8,
        "warmup_max_lr": lr,
        # WarmupDecayLR rises from warmup_min_lr and decays back to it; it needs >= 1 warm-up step
        "warmup_min_lr": 0.0,
        "warmup_num_steps": max(1, warmup_steps),
        "total_num_steps": max(total_steps, warmup_steps + 1),
        "bf16.enabled": bf16,
        "fp16.enabled": fp16,
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
        "stage3_max_reuse_distance": reuse_distance(hidden_size),
    }


def reuse_distance(hidden_size: int) -> int:
    """ZeRO-3's ``stage3_max_reuse_distance`` for CachED: one hidden² weight matrix, not DeepSpeed's 1e9.

    On the first step after ZeRO-3 has recorded its module trace, every module release looks ahead
    in the trace until it has seen this many parameters (``PartitionedParamCoordinator.
    __params_to_release``, cached per step). With 1e9 that is the rest of the trace, so the step
    costs O(trace²) in Python, and CachED's trace is window groups × modules × 2 passes: measured on
    an H100, BART-large at 256K tokens, that step took 58 s against 4 s (tiny-bart on CPU: 3.4 s vs
    0.25 s). DeepSpeed re-records the trace whenever the group count changes, so with documents of
    varied length the cost returns. Keeping a parameter gathered for reuse only pays across ranks;
    the encoder is kept gathered by ``keep_encoder_gathered`` anyway."""
    return hidden_size * hidden_size


def check_batch_sizes(config: dict, world_size: int, micro_batch_size: int | None = None,
                      gradient_accumulation_steps: int | None = None, source: str = "the DeepSpeed config") -> None:
    """The config's micro-batch size and accumulation steps are the run's flags, where given (a
    data plan follows the flags, the engine the config); DeepSpeed asserts train_batch_size =
    micro × GAS × world. Say which fields disagree and how to fix."""
    for key, flag, value in (("train_micro_batch_size_per_gpu", "--micro_batch_size", micro_batch_size),
                             ("gradient_accumulation_steps", "--gradient_accumulation_steps", gradient_accumulation_steps)):
        if value is not None and config.get(key) is None:
            raise ValueError(f'{source} does not set {key}; add "{key}": "auto" there ({flag}, {value}, fills it: the '
                             "data plan follows the flag)")
        if value is not None and config.get(key) != value:
            raise ValueError(f'{source} sets {key}={config.get(key)} but {flag} is {value} (the data plan '
                             f'follows {flag}); set {key} to "auto" there, or pass {flag} {config.get(key)}')
    micro, gas, total = (config.get(k) for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"))
    if None in (micro, gas, total):
        return
    if total != micro * gas * world_size:
        raise ValueError(
            f"train_batch_size={total} but train_micro_batch_size_per_gpu × gradient_accumulation_steps × world size "
            f"= {micro} × {gas} × {world_size} = {micro * gas * world_size}; set train_batch_size to \"auto\" or make them agree"
        )


# The numbers a config may hold where the launcher has a flag: a flag the user gave must agree (as
# HF's Trainer checks), the config's number wins where the flag was left at its default.
FLAG_FIELDS = (("optimizer.params.lr", "optim", "lr", "--lr"), ("optimizer.params.weight_decay", "optim", "weight_decay", "--weight_decay"),
               ("gradient_clipping", "optim", "max_grad_norm", "--max_grad_norm"))
# DeepSpeed's warm-up schedulers that the launcher runs as HF's schedule instead (trainer.py), and
# the parameters of theirs it still reads: the rest come from the flags.
REPLACED_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
READ_SCHEDULER_PARAMS = {"WarmupCosineLR": ("cos_min_ratio",)}
COSINE_MIN_RATIO = 1e-4  # DeepSpeed's WarmupCosineLR default for cos_min_ratio


def cosine_min_ratio(scheduler: dict):
    """A WarmupCosineLR section's final rate as a share of the peak (DeepSpeed's default where unset)."""
    return (scheduler.get("params") or {}).get("cos_min_ratio", COSINE_MIN_RATIO)


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_against_flags(config: dict, chosen: dict, source: str = "the DeepSpeed config") -> None:
    """What the launcher would otherwise ignore without a word. ``chosen``: the flags the user
    gave, by (section, name). A number that disagrees with a given flag; a numeric parameter of a
    WarmupLR/WarmupDecayLR scheduler (the launcher runs HF's schedule from its flags instead); no
    optimizer (the launcher builds none); an "auto" it does not fill; data_efficiency, which needs
    DeepSpeed's dataloader."""
    for dotted, section, name, flag in FLAG_FIELDS:
        number, given = _get(config, dotted), chosen.get((section, name))
        if given is not None and isinstance(number, (int, float)) and not isinstance(number, bool) and number != given:
            raise ValueError(f'{source} sets {dotted}={number} but {flag} is {given}; set it to "auto" there (the flag fills '
                             f"it), or pass {flag} {number}")
    if not isinstance(config.get("optimizer"), dict):
        raise ValueError(f'{source} has no "optimizer" section, and train.py builds no optimizer of its own; add one, e.g. '
                         '"optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}} (as ds_configs/*.json)')
    scheduler = config.get("scheduler") or {}
    kind = scheduler.get("type")
    if kind in REPLACED_SCHEDULERS:
        read = READ_SCHEDULER_PARAMS.get(kind, ())
        fixed = {k: v for k, v in (scheduler.get("params") or {}).items() if v != "auto" and k not in read}
        if fixed:
            raise ValueError(f"{source}: train.py runs {kind} as HF's warm-up schedule from its flags (DeepSpeed's "
                             f"loses its first two steps: docs/engine.md), so scheduler.params {fixed} would be ignored; set "
                             'them to "auto" and use --lr, --warmup_steps' + (" and --lr_decay" if kind != "WarmupCosineLR" else ""))
    if kind == "WarmupCosineLR":
        ratio = cosine_min_ratio(scheduler)
        if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 <= ratio <= 1):
            raise ValueError(f"{source}: scheduler.params.cos_min_ratio is the final rate's share of --lr, a number from 0 to 1; "
                             f"got {ratio!r}")
        if chosen.get(("optim", "lr_decay")) is False:
            raise ValueError(f"{source} has a WarmupCosineLR scheduler, which decays the rate, but --lr_decay is false; drop one "
                             "of them")
    left = unresolved_auto(config, fillable=False)
    if left:
        raise ValueError(f'{source} has "auto" in {left}, which train.py does not fill (it fills {sorted(AUTO_FIELDS)}); '
                         "write numbers there")
    efficiency = config.get("data_efficiency") or {}
    if isinstance(efficiency, dict) and efficiency.get("enabled"):
        raise ValueError(f'{source}: "data_efficiency" works through DeepSpeed\'s own dataloader (or a converted model), which '
                         "train.py does not use, so it would have no effect; remove it")


def enabled(config: dict, section: str):
    """A section's "enabled" value (``fp16``, ``bf16``): True, False, "auto" or None."""
    return (config.get(section) or {}).get("enabled")


def check_precision(config: dict, *, fp16: bool, bf16: bool | None, source: str = "the DeepSpeed config") -> None:
    """fp16 and bf16 at once (DeepSpeed refuses it after loading data and model), and fp16 where
    the accelerator has none (DeepSpeed's CPU accelerator: "Type fp16 is not supported")."""
    for name, flag in (("fp16", fp16), ("bf16", bf16)):
        if flag is True and enabled(config, name) is False:
            raise ValueError(f'{source} sets {name}.enabled=false but --{name} is on; set it to "auto" there (the flag fills it), '
                             f"or leave --{name} off")
    bf16_on = bf16 is True or enabled(config, "bf16") is True
    fp16_on = fp16 or enabled(config, "fp16") is True
    if fp16_on and bf16_on:
        fp16_by = "--fp16" if fp16 else f'{source} ("fp16": {{"enabled": true}})'
        bf16_by = "--bf16 true" if bf16 else f'{source} ("bf16": {{"enabled": true}})'
        raise ValueError(f'fp16 and bf16 are both on, fp16 by {fp16_by} and bf16 by {bf16_by}; use one (a section\'s '
                         '"enabled": "auto" follows --fp16 and --bf16)')
    if fp16_on:
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            raise ValueError(f"fp16 needs a GPU: DeepSpeed's {get_accelerator().device_name()} accelerator has none; "
                             "train in fp32 or --bf16 true here")


def native_bf16() -> bool:
    """Whether the current GPU computes in bf16 natively (Ampere or newer): the default precision
    there. ``torch.cuda.is_bf16_supported()`` alone also says yes on V100/T4, which only emulate
    bf16 (slowly); there fp32 stays the default and ``--fp16`` is the fast choice."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
