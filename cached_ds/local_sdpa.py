"""LongT5 local and transient-global attention as one ``scaled_dot_product_attention`` call over
query blocks, the relative bias passed as a dense per-block mask.

HF's LongT5 cuts the sequence into blocks of ``local_radius + 1`` tokens; a block's queries see
their own block and both neighbours (keys further than the radius masked) and, for
transient-global, every global key. HF runs that as eager fp32 einsums. Flex attention
(``flex_t5``) runs it block-sparse but gathers the T5 bias inside the kernel for every score,
which left it at about 5 TFLOP/s on an H200 (LongT5-large, 16K tokens; flex with a gathered T5
bias trails fused SDPA: pytorch/pytorch#138493). Here each query block is one batch row of SDPA
with its 3-block neighbourhood (plus the global keys) as keys, and the bias is a plain tensor:
its local part depends only on key - query inside a block pair (one (heads, block, 3·block)
gather, broadcast over the blocks); key padding and the global keys' bias are per block. On
CUDA, SDPA runs its memory-efficient kernel (the fused one that takes a bias needing a
gradient); on CPU the same call runs SDPA's math kernel, forward and backward (tested against
HF in CI).

    from cached_ds.t5_attention import install_fast_t5_attention
    install_fast_t5_attention(long_t5_model, local_sdpa=True)   # LongT5 encoder layers only

Memory: per call, K and V three times over (the neighbourhoods) and the global keys once per
block; once per forward of the stack, a (blocks, heads, block, 3·block + globals) bias in the
input dtype. The bias depends only on the mask and the first layer's tables, which HF gives
every layer, so the first layer builds it and the others reuse it (``Layout.shared``); autograd
sums the layers' gradients into it. What SDPA saves for backward, for a 16K-token group of
LongT5-large in bf16: about 0.3 GiB a layer plus the bias's 0.33 GiB once, 8 GiB over the
recompute's 24 layers (17 GiB when every layer built its own bias; flex saves only q, k, v and
the output). With one global key per 16 tokens the global part grows with the window's square
(heads × L × L/16, as HF's own): 32 MiB for a 4096-token window of LongT5-large in bf16.
Padding queries (no key to attend) get finite don't-care outputs, as in HF.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .t5_attention import Layout


def local_sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                         side_k: torch.Tensor | None = None, side_v: torch.Tensor | None = None,
                         side_table: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ + bias) v for ``layout``'s band (``radius``) and its LongT5 global keys
    (``layout.side``); q, k, v (batch, heads, L, d) -> (batch, heads, L, d)."""
    if layout.radius is None or layout.mask is not None or layout.causal:
        raise ValueError("local_sdpa_attention runs LongT5's banded encoder attention only (radius, key padding, global keys)")
    batch, heads, length, dim = q.shape
    block = layout.radius + 1
    blocks = -(-length // block)
    tail = blocks * block - length

    def neighbourhoods(x: torch.Tensor) -> torch.Tensor:  # (batch, heads, L, d) -> (batch * blocks, heads, 3 * block, d)
        x = F.pad(x, (0, 0, block, tail + block))  # one empty block before the first and after the last
        windows = x.unfold(2, 3 * block, block)  # (batch, heads, blocks, d, 3 * block)
        return windows.permute(0, 2, 1, 4, 3).reshape(batch * blocks, heads, 3 * block, x.shape[-1])

    keys, values = neighbourhoods(k), neighbourhoods(v)
    side = layout.side if side_k is not None else None
    if side is not None:  # every block's queries also see every global key (none in inputs under one global block:
        # still joined, empty, so the global projections get their zero gradients as HF gives them)
        count = side_k.shape[2]
        keys = torch.cat([keys, side_k[:, None].expand(-1, blocks, -1, -1, -1).reshape(batch * blocks, heads, count, dim)], 2)
        values = torch.cat([values, side_v[:, None].expand(-1, blocks, -1, -1, -1).reshape(batch * blocks, heads, count, dim)], 2)
    # The bias depends on the mask and the first layer's tables only, which every layer of the
    # stack shares: built by the first layer, reused by the others (``layout.shared``), so SDPA's
    # backward keeps one copy, not one per layer, and autograd sums the layers' gradients into it.
    store = layout.shared if layout.shared is not None else {}
    key = ("local_sdpa_bias", batch, heads, length, q.dtype, side is not None)
    if key not in store:
        store[key] = _dense_bias(layout, side_table if side is not None else None, batch, heads, length, q.dtype, q.device)
    bias = store[key]
    # Memory-efficient (CUDA) or math: the kernels that return the bias's gradient, of those the
    # caller's ``sdpa_kernel`` leaves on. Left to choose, SDPA may take cuDNN on an H100/H200 with
    # a recent cuDNN (``check_prefer_cudnn_attention``), whose backward gives q, k, v gradients only.
    allowed = [backend for backend, on in ((SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled()),
                                           (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled())) if on]
    with sdpa_kernel(allowed or [SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(_by_block(q, block), keys, values, attn_mask=bias, scale=1.0)
    out = out.view(batch, blocks, heads, block, dim).transpose(1, 2).reshape(batch, heads, blocks * block, dim)
    return out[:, :, :length]


def _by_block(x: torch.Tensor, block: int) -> torch.Tensor:
    """(batch, heads, L, n) -> (batch * blocks, heads, block, n), the last block zero-padded."""
    batch, heads, length, n = x.shape
    blocks = -(-length // block)
    x = F.pad(x, (0, 0, 0, blocks * block - length))
    return x.view(batch, heads, blocks, block, n).transpose(1, 2).reshape(batch * blocks, heads, block, n)


def _dense_bias(layout: Layout, side_table: torch.Tensor | None, batch: int, heads: int, length: int, dtype: torch.dtype,
                device) -> torch.Tensor:
    """(batch * blocks, heads, block, 3 * block [+ globals]): the relative bias of each query
    block against its neighbourhood (and the global keys), a large finite negative where masked."""
    block = layout.radius + 1
    blocks = -(-length // block)
    tail = blocks * block - length
    masked = torch.finfo(dtype).min / 2  # finite: a padding query with nothing to attend stays finite
    valid = layout.key_valid if layout.key_valid is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
    edge = valid.new_zeros(batch, block)
    valid = torch.cat([edge, valid, valid.new_zeros(batch, tail), edge], 1).unfold(1, 3 * block, block)  # (batch, blocks, 3 * block)
    relative = torch.arange(3 * block, device=device)[None, :] - block - torch.arange(block, device=device)[:, None]
    allowed = (relative.abs() <= layout.radius) & valid[:, :, None, :]  # (batch, blocks, block, 3 * block)
    if layout.offsets is not None:  # offsets[key - query + L - 1]; out-of-range ones only reach masked keys
        local = layout.offsets[(relative + length - 1).clamp(0, layout.offsets.shape[0] - 1)].permute(2, 0, 1).to(dtype)
    else:
        local = torch.zeros(heads, block, 3 * block, dtype=dtype, device=device)
    bias = torch.where(allowed[:, :, None], local, masked).reshape(batch * blocks, heads, block, 3 * block)
    if side_table is None:
        return bias
    side = layout.side
    global_bias = side_table[side.bucket_ids(0, length)].permute(0, 3, 1, 2).to(dtype)  # (batch, heads, L, G)
    global_bias = torch.where(side.allowed(0, length), global_bias, masked)
    return torch.cat([bias, _by_block(global_bias, block)], 3)
