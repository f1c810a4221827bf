"""CachED's encoder pass as one autograd Function (Saxena, Tang & Keller, TACL 2025).

The steps, as in GradCache's ``grad_cache.py``:

1. ``WindowPlan`` splits the documents into windows and window groups (``windows.py``).
2. ``forward``: encode every group without autograd, remembering its RNG and autocast state,
   and fuse the outputs into one (batch, tokens, hidden) tensor for the decoder.
3. The caller runs the decoder and ``loss.backward()``; autograd hands us d(loss)/d(fused states):
   the gradient cache.
4. ``backward``: re-encode group by group *with* autograd, replaying each group's RNG state (same
   dropout masks) and autocast state, push the group's slice of the gradient cache through it, and
   sum the encoder's parameter gradients in fp32. They are returned as the Function's input
   gradients, so every parameter's ``.grad`` is written exactly once per backward — whatever
   engine hooks sit on it fire once, not once per group.

Encoder activation memory is one window group, whatever the document length. The token embedding
weight is an input too: its encoder share comes back from the recompute and autograd adds it to
the decoder's and the LM head's shares (the tied embedding gets all three).

No DeepSpeed, logging or CLI in here: engines integrate by wrapping ``loss.backward()``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from . import families
from .windows import WindowGroup, WindowPlan


@dataclass(frozen=True)
class RngState:
    """The generator state dropout reads: CPU always, plus the accelerator's when the data is on one."""

    cpu: torch.Tensor
    device_type: str
    device: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        accelerator = None if device.type == "cpu" else getattr(torch, device.type)
        return cls(torch.get_rng_state(), device.type, accelerator.get_rng_state(device) if accelerator else None)

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            getattr(torch, self.device_type).set_rng_state(self.device, device)


@dataclass(frozen=True)
class AutocastState:
    """The forward's autocast settings, replayed in the recompute (as ``torch.utils.checkpoint`` does)."""

    device_type: str
    enabled: bool
    dtype: torch.dtype
    cache_enabled: bool

    @classmethod
    def capture(cls, device: torch.device) -> AutocastState:
        kind = device.type
        return cls(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind), torch.is_autocast_cache_enabled())

    def replay(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled, cache_enabled=self.cache_enabled)


@contextmanager
def replayed(rng: RngState, autocast: AutocastState, device: torch.device) -> Iterator[None]:
    """Run with a group's forward RNG and autocast state, then put the outer RNG back."""
    outer = RngState.capture(device)
    rng.restore(device)
    try:
        with torch.enable_grad(), autocast.replay():
            yield
    finally:
        outer.restore(device)


def encode_group(model: nn.Module, weight: torch.Tensor, group: WindowGroup) -> torch.Tensor:
    """One HF encoder call over a group's stacked windows (positions restart in every window)."""
    embeds = families.embed(model, group.input_ids, weight)
    return model.get_encoder()(inputs_embeds=embeds, attention_mask=group.attention_mask).last_hidden_state


class CachedEncoderFunction(torch.autograd.Function):
    """forward: steps 1–2 without autograd; backward: step 4, returning parameter gradients.

    Inputs are ``(model, plan, grad_dtype, weight, *params)``: ``params`` are the encoder's
    trainable parameters (besides the embedding). They must be inputs even though ``backward``
    could reach them through the module: autograd calls a Function's backward only when an input
    needs a gradient, so a frozen embedding would otherwise silently cut the encoder off.
    """

    @staticmethod
    def forward(ctx, model, plan: WindowPlan, grad_dtype, weight, *params):
        device = weight.device
        ctx.model, ctx.plan, ctx.grad_dtype, ctx.device = model, plan, grad_dtype, device
        ctx.autocast = AutocastState.capture(device)
        ctx.rng_states, outputs = [], []
        for group in plan.groups:
            ctx.rng_states.append(RngState.capture(device))
            outputs.append(encode_group(model, weight, group))
        ctx.weight, ctx.params = weight, params
        return plan.fuse(outputs)

    @staticmethod
    def backward(ctx, grad_fused):
        needs_weight = ctx.needs_input_grad[3]
        sums: list[torch.Tensor | None] = [None] * (1 + len(ctx.params))
        for group, rng, grad in zip(ctx.plan.groups, ctx.rng_states, ctx.plan.split_gradient(grad_fused)):
            with replayed(rng, ctx.autocast, ctx.device):
                weight = ctx.weight.detach().requires_grad_(needs_weight)
                output = encode_group(ctx.model, weight, group)
            targets = ([weight] if needs_weight else []) + list(ctx.params)
            grads = torch.autograd.grad(output, targets, grad.to(output.dtype), allow_unused=True)
            if not needs_weight:
                grads = (None, *grads)
            for i, g in enumerate(grads):
                if g is not None:
                    sums[i] = g.to(ctx.grad_dtype, copy=True) if sums[i] is None else sums[i].add_(g)
        inputs = (ctx.weight, *ctx.params)
        results = [None if s is None else s.to(t.dtype) for s, t in zip(sums, inputs)]
        return (None, None, None, *results)


def trainable_encoder_params(model: nn.Module) -> list[nn.Parameter]:
    """Encoder parameters that need a gradient, the input embedding excluded (it is ``weight``)."""
    weight = families.input_embedding(model).weight
    return [p for p in model.get_encoder().parameters() if p.requires_grad and p is not weight]


def encode_windows(model: nn.Module, plan: WindowPlan, mode: str = "cached", grad_dtype=torch.float32) -> torch.Tensor:
    """Fused encoder states for ``plan``.

    ``cached``: CachED (encoder memory of one group); ``full``: ordinary backprop through every
    group (the baseline). Without autograd, or when nothing on the encoder path is trainable, the
    encoder runs once without a graph and no recompute ever happens.
    """
    weight = families.input_embedding(model).weight
    params = trainable_encoder_params(model)
    if not torch.is_grad_enabled() or not (weight.requires_grad or params):
        with torch.no_grad():
            return plan.fuse([encode_group(model, weight, g) for g in plan.groups])
    if mode == "full":
        return plan.fuse([encode_group(model, weight, g) for g in plan.groups])
    return CachedEncoderFunction.apply(model, plan, grad_dtype, weight, *params)
