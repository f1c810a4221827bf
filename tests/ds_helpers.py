"""Real DeepSpeed engines on the CPU accelerator for tests: one rank in-process, configs from
``ds_configs/`` with their ``"auto"`` values resolved to fixed test values (the launcher resolves
them the HF way for users)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from cached_ds.ds_config import resolve_auto
from cached_ds.gradient_sink import sink_of
from cached_ds.host_offload import is_offloaded
from cached_ds.streaming_cross_attention import StreamingCrossAttention

CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
LR, WEIGHT_DECAY = 1e-3, 0.01


def single_rank_distributed() -> None:
    """A one-rank gloo group for this pytest process, on a free port (a fixed one collided
    whenever two test runs shared a machine)."""
    from cached_ds.distributed import free_port

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        os.environ.setdefault(key, value)
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")


def resolved_config(name: str, *, gas: int = 1, micro: int = 1, world: int = 1, clip: float = 0.0, bf16: bool = False,
                hidden: int = 16, cached: dict | None = None) -> dict:
    """A shipped config with fixed test values: small buckets, every parameter partitioned."""
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    values = {
        "train_batch_size": micro * gas * world, "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas, "gradient_clipping": clip, "bf16.enabled": bf16,
        "lr": LR, "weight_decay": WEIGHT_DECAY, "warmup_max_lr": LR, "warmup_num_steps": 10, "total_num_steps": 100,
        "reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": 0,
        "stage3_param_persistence_threshold": 0,  # else tiny test parameters are never partitioned
        "stage3_max_reuse_distance": hidden * hidden,
    }
    values["warmup_min_lr"] = LR  # a constant rate the reference can use
    config = resolve_auto(config, values)
    if "reduce_bucket_size" in config["zero_optimization"]:  # the shipped 5e7 would make one bucket of a tiny model
        config["zero_optimization"]["reduce_bucket_size"] = values["reduce_bucket_size"]
    config["optimizer"]["params"]["torch_adam"] = True
    config["zero_allow_untested_optimizer"] = True
    if "offload_optimizer" in config["zero_optimization"]:
        config["zero_force_ds_cpu_optimizer"] = False
        for section in ("offload_param", "offload_optimizer"):
            config["zero_optimization"][section]["pin_memory"] = False
    config["cached"] = {**config["cached"], **(cached or {})}
    return config


def reference_adamw_step(model, grads: dict[str, torch.Tensor], clip: float = 0.0) -> float:
    """Plain torch AdamW step on a copy of ``model`` given its gradients; returns the grad norm."""
    model = copy.deepcopy(model)
    for name, p in model.named_parameters():
        p.grad = grads[name].clone() if name in grads else None
    params = [p for p in model.parameters() if p.grad is not None]
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))
    torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY).step()
    return model, norm


def record_streaming_states(model) -> list[tuple[bool, bool]]:
    """For each streaming cross-attention call: whether the states it read carried the CachED
    encoder's gradient sink (the fp32 out-of-band cache), and whether they were in host memory.
    ZeRO-3 hands every module an alias of its inputs, so both have to survive that."""
    seen: list[tuple[bool, bool]] = []

    def hook(module, args, kwargs):
        states = kwargs["key_value_states"]
        seen.append((sink_of(states) is not None, is_offloaded(states)))

    for module in model.modules():
        if isinstance(module, StreamingCrossAttention):
            module.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def reduced_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The gradient the optimizer will use. Under ZeRO-3 that is the reduced partition's:
    ``safe_get_full_grad`` returns a ``param.grad`` first, and a gradient still there after
    ZeRO-3's reduce is one the partition never got (a leaf module's hook that fired before it
    arrived reduced zeros: the optimizer would train on those)."""
    from deepspeed.utils import safe_get_full_grad

    if hasattr(param, "ds_id"):
        assert param.grad is None, f"a gradient of shape {tuple(param.grad.shape)} left outside ZeRO-3's partition"
        return param._z3_optimizer.get_fp32_grad_for_param(param)
    return safe_get_full_grad(param)
