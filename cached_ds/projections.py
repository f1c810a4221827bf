"""A projection module's parameters, for kernels that apply the projection themselves.

Streaming cross-attention projects the fused encoder states to K and V block by block, without
calling the projection modules. Reading ``.weight`` directly would silently drop an adapter that
wraps the module: peft's LoRA layer forwards ``.weight`` to its base layer, so its A and B would
get no gradient and change nothing.

    parts = linear_parts(layer.k_proj, "cross-attention k_proj", "cross_attention_block")
    y = x @ parts.weight.T + parts.bias + Σ (x @ A.T) @ (scaling · B).T   # what the module computes

- a plain ``nn.Linear`` (its own ``forward``) gives its weight and bias;
- peft's LoRA on one gives the base layer's weight and bias plus one ``(A, scaling · B)`` pair
  per active adapter, kept apart (not folded into the weight): in bf16, W + ΔW would round away
  an adapter's update smaller than half a unit of W's last place, which peft's own forward keeps;
- anything else (other adapters, quantised layers, LoRA variants such as DoRA, LoRA dropout in
  training) is refused by name with the fix, instead of giving a wrong loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LinearParts:
    weight: torch.Tensor
    bias: torch.Tensor | None
    low_rank: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (A (r, in), scaling · B (out, r))


def _refusal(what: str, setting: str, why: str) -> ValueError:
    return ValueError(
        f"{what}: {why}. cached-ds applies this module in its own kernel, which the CachED setting {setting} "
        f"turns on; leave the module out of peft's target_modules, or unset {setting}"
    )


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer")  # peft's LoraLayer, without importing peft


def _plain(module: nn.Module, kind: type) -> bool:
    return isinstance(module, kind) and type(module).forward is kind.forward  # not a subclass with its own (quantised)


def linear_parts(module: nn.Module, what: str, setting: str) -> LinearParts:
    """What ``module`` computes as y = x Wᵀ + b (+ low-rank terms). Errors name it by ``what`` and
    the CachED ``setting`` whose kernel reads it."""
    if _is_lora(module):
        return _lora_parts(module, what, setting)
    if _plain(module, nn.Linear):
        return LinearParts(module.weight, module.bias)
    raise _refusal(what, setting, f"it is a {type(module).__module__}.{type(module).__name__}, not an nn.Linear (or peft's LoRA on one)")


def _lora_parts(layer: nn.Module, what: str, setting: str) -> LinearParts:
    base = layer.get_base_layer()
    if not _plain(base, nn.Linear) or getattr(layer, "fan_in_fan_out", False):
        raise _refusal(what, setting, f"peft's LoRA wraps a {type(base).__name__} here, not an nn.Linear")
    parts = LinearParts(base.weight, base.bias)
    if layer.disable_adapters:
        if layer.merged:
            layer.unmerge()  # what peft's forward does with disabled adapters
        return parts
    if layer.merged:  # the base weight holds the adapters already
        return parts
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
            raise _refusal(what, setting, f"adapter {name!r} is a LoRA variant (e.g. DoRA), not plain LoRA")
        dropout = layer.lora_dropout[name]
        if layer.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            raise _refusal(what, setting, f"adapter {name!r} has lora_dropout={dropout.p} (0.0 works: dropout on the "
                                 f"adapter's input would need a mask over every input token)")
        down, up = layer.lora_A[name], layer.lora_B[name]
        if not (isinstance(down, nn.Linear) and isinstance(up, nn.Linear)) or hasattr(layer, "lora_E"):
            raise _refusal(what, setting, f"adapter {name!r} is a {type(layer).__name__}, not plain LoRA (AdaLoRA and the "
                                          f"like keep other factors)")
        parts.low_rank.append((down.weight, up.weight * layer.scaling[name]))
        if up.bias is not None:  # peft's lora_bias: B's bias, scaled as its output is
            bias = up.bias * layer.scaling[name]
            parts.bias = bias if parts.bias is None else parts.bias + bias
    return parts

