"""CUDA path of ``t5_attention``: ``flex_attention`` with the relative bias as a ``score_mod``.

The offset bias (Lq + Lk - 1, heads) is a captured tensor: flex_attention's generated backward
returns its gradient, which autograd carries on to the bucket table. Causality, the LongT5 band
and key padding become a block mask, so blocks with nothing to attend are skipped; HF's 4-D
mask, where given, is read inside the mods (bool: masks, float: added).

    out = flex_bias_attention(q, k, v, Layout(block=128, offsets=offsets, causal=True))

Compiled (``torch.compile``): eager flex_attention would materialise the scores, and so would a
call Dynamo declines to compile. Every call shares one code object's recompile budget (8 by
default), and the calls differ in structure (encoder/decoder, band, padding, autograd on/off)
and in shape (each document's last window group, whatever its length): with static shapes a
training run on varied documents spends the budget within a few steps and every later call runs
eager (measured on CPU: the 9th length fell back). So on CUDA shapes are automatic-dynamic (a
second shape recompiles once, with symbolic sizes, for every later one; the GPU check runs a
second length); on CPU, where only the tests run flex, they stay static, as Inductor's CPU flex
template fails to compile symbolic sizes (torch 2.13: "cur_kvSplitSize0 was not declared").
The budget, only around these calls, is ``RECOMPILE_LIMIT``; past it Dynamo raises instead of
running eager, and ``t5_attention`` then runs its blocked kernel.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.profiler import record_function

from .t5_attention import Layout

_compiled_flex = {"cuda": torch.compile(flex_attention, dynamic=None), "cpu": torch.compile(flex_attention, dynamic=False)}
RECOMPILE_LIMIT = 64  # structures x (static, dynamic): far more than a model's few structures need
failure: str | None = None  # why flex attention was given up in this process (t5_attention.try_flex)
calls = 0  # how many attentions ran compiled here (the GPU check reads it to show this path was taken)


def flex_bias_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                        side_k: torch.Tensor | None = None, side_v: torch.Tensor | None = None,
                        side_table: torch.Tensor | None = None) -> torch.Tensor:
    """LongT5 transient-global (``layout.side``): the global keys are appended after the local
    ones; their bias is read from the global table by (global index - the query's block), through
    a (2G + 1, heads) gather of it, so no (L × G) bias tensor is formed either."""
    global calls
    batch, _, lq, _ = q.shape
    lk = k.shape[2]
    offsets, mask, key_valid, radius, causal = layout.offsets, layout.mask, layout.key_valid, layout.radius, layout.causal
    float_mask = mask if mask is not None and mask.dtype != torch.bool else None
    bool_mask = mask if mask is not None and mask.dtype == torch.bool else None
    side = layout.side if side_k is not None and side_k.shape[2] > 0 else None
    if side is not None:
        count = side_k.shape[2]
        k, v = torch.cat([k, side_k], 2), torch.cat([v, side_v], 2)
        # relative (global - query block) runs over -(G-1)..G (padding queries sit in block -1)
        relative = torch.arange(-count, count + 1, device=q.device)
        global_bias = side_table[side.bucket(relative)].t().contiguous()  # (heads, 2G + 1), differentiable
        block_ids, segments, query_mask = side.block_ids.long(), side.segments, side.query_mask

    # The bias tables are read heads-first, so that a tile's neighbouring keys read neighbouring
    # entries: offsets is (offset, heads), whose reads along a row of keys stride by the head count,
    # ~8x the cache sectors per read of the contiguous layout (the kernel ran at ~5 TFLOP/s on an
    # H200 with it; a copy of a few hundred KiB per call). Autograd carries the gradient back.
    by_head = offsets.t().contiguous() if offsets is not None else None  # (heads, Lq + Lk - 1)

    def score_mod(score, b, h, q_idx, kv_idx):
        local = kv_idx < lk
        if by_head is not None:
            local_bias = by_head[h, (kv_idx - q_idx + lq - 1).clamp(0, lq + lk - 2)].to(score.dtype)
            score = score + (torch.where(local, local_bias, 0.0) if side is not None else local_bias)
        if side is not None:
            g = (kv_idx - lk).clamp(0, count - 1)
            score = score + torch.where(local, 0.0, global_bias[h, g - block_ids[b, q_idx] + count].to(score.dtype))
        if float_mask is not None:
            score = score + float_mask[b, 0, q_idx, kv_idx.clamp(max=lk - 1)].to(score.dtype)
        return score

    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= 0  # all-true start, a tensor of the right kind
        if causal:
            keep = keep & (kv_idx <= q_idx)
        if radius is not None:
            keep = keep & ((kv_idx - q_idx).abs() <= radius)
        if key_valid is not None:
            keep = keep & key_valid[b, kv_idx.clamp(max=lk - 1)]
        if bool_mask is not None:
            keep = keep & bool_mask[b, 0, q_idx, kv_idx.clamp(max=lk - 1)]
        if side is None:
            return keep
        local = kv_idx < lk
        on_global = query_mask[b, q_idx] == segments[b, (kv_idx - lk).clamp(0, count - 1)]
        return torch.where(local, keep, on_global)

    masked = causal or radius is not None or key_valid is not None or bool_mask is not None or side is not None
    block_mask = None
    if masked:  # built once per forward of a stack: the later layers find it in layout.shared
        store = layout.shared if layout.shared is not None else {}
        key = ("flex_block_mask", batch, lq, k.shape[2])
        if key not in store:
            store[key] = create_block_mask(mask_mod, batch, None, lq, k.shape[2], device=q.device)
        block_mask = store[key]
    limit = max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
    # a profiler span per kind of layout: the compiled kernels all carry the same names, so a
    # profile (bench/sweep.py --profile) tells encoder from decoder calls only by this
    kind = "global" if side is not None else "band" if radius is not None else "causal" if causal else "full"
    with record_function(f"cached_ds:flex_t5:{kind}"), torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
        out = _compiled_flex["cuda" if q.is_cuda else "cpu"](q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0)
    calls += 1
    return out
