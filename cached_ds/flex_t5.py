"""CUDA path of ``t5_attention``: ``flex_attention`` with the relative bias as a ``score_mod``.

The offset bias (Lq + Lk - 1, heads) is a captured tensor: flex_attention's generated backward
returns its gradient, which autograd carries on to the bucket table. Causality, the LongT5 band
and key padding become a block mask, so blocks with nothing to attend are skipped; HF's 4-D
mask, where given, is read inside the mods (bool: masks, float: added).

    out = flex_bias_attention(q, k, v, Layout(block=128, offsets=offsets, causal=True))

Compiled once per shape (``torch.compile``; eager flex_attention would materialise the scores).
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from .t5_attention import Layout

_compiled_flex = torch.compile(flex_attention, dynamic=False)
calls = 0  # how many attentions ran here (the GPU check reads it to show this path was taken)


def flex_bias_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout) -> torch.Tensor:
    global calls
    calls += 1
    batch, _, lq, _ = q.shape
    lk = k.shape[2]
    offsets, mask, key_valid, radius, causal = layout.offsets, layout.mask, layout.key_valid, layout.radius, layout.causal
    float_mask = mask if mask is not None and mask.dtype != torch.bool else None
    bool_mask = mask if mask is not None and mask.dtype == torch.bool else None

    def score_mod(score, b, h, q_idx, kv_idx):
        if offsets is not None:
            score = score + offsets[kv_idx - q_idx + lq - 1, h].to(score.dtype)
        if float_mask is not None:
            score = score + float_mask[b, 0, q_idx, kv_idx].to(score.dtype)
        return score

    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= 0  # all-true start, a tensor of the right kind
        if causal:
            keep = keep & (kv_idx <= q_idx)
        if radius is not None:
            keep = keep & ((kv_idx - q_idx).abs() <= radius)
        if key_valid is not None:
            keep = keep & key_valid[b, kv_idx]
        if bool_mask is not None:
            keep = keep & bool_mask[b, 0, q_idx, kv_idx]
        return keep

    masked = causal or radius is not None or key_valid is not None or bool_mask is not None
    block_mask = create_block_mask(mask_mod, batch, None, lq, lk, device=q.device) if masked else None
    return _compiled_flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0)
