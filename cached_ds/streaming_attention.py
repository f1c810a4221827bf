"""Attention of a few queries over very long keys without N-sized activations (the kernel of
``streaming_cross_attention``, which installs it in HF's decoders).

HF's decoder cross-attention projects all N fused encoder states to K and V and forms a
(batch, heads, target, N) score tensor, and autograd keeps all three for backward in every decoder
layer. Here the keys are visited in blocks of ``block`` tokens with an online softmax (flash
attention's log-sum-exp merge): each block's K and V are projected from ``states`` on the fly in
forward and projected *again* in backward. Saved for backward: the projected queries, the output,
the per-row log-sum-exp, a (batch, N) boolean key mask and ``states`` itself (the caller's tensor,
shared by every layer) — nothing else grows with N.

    out = streaming_cross_attention(query, states, keep, k_weight, k_bias, v_weight, v_bias,
                                    scale=64**-0.5, block=65536)   # (batch, heads, target, head_dim)

- **Kernels**: with right-padded keys (CachED's fused states) each block runs on the device's
  fused SDPA kernel (``block_attention``: ATen's flash attention on CPU and CUDA, memory-efficient
  attention for fp32 on CUDA), so no (target × block) score tensor is formed either; the blocks'
  outputs are merged by log-sum-exp, and each block's backward is handed the merged output and
  log-sum-exp. Other masks, devices and dtypes run the same algorithm in plain PyTorch ops.
- **Out-of-band states gradient**: given a ``gradient_sink.GradientSink``, d(loss)/d(states) is
  added block by block into its one fp32 buffer instead of returned as an N-sized gradient for
  autograd to sum in the states' dtype.
- **Adapters**: peft's LoRA terms of the K/V projections (``stacked_low_rank``) ride along each
  block's projection and get their gradients in backward (not merged into the weight, where
  bf16 would round a small update away).
- **Offloaded states** (``host_offload``): blocks of host-memory states come to the device one
  by one, the next already on its way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import partial, reduce

import torch
from torch import nn

from .block_attention import BlockKernel, block_kernel
from .gradient_sink import accumulation_dtype
from .host_offload import is_offloaded, prefetched, rows_to_device
from .projections import LinearParts
from .tensor_tags import get_tag

INF = float("inf")
LENGTHS_TAG = "key_lengths"  # on a right-padded key mask (a tensor_tags tag): visible keys per document
DEFAULT_BLOCK = 1024  # key tokens per online-softmax step


def _scores(query, key, keep, start, scale) -> torch.Tensor:
    """Scores of one key block in the statistics dtype, -inf on masked keys."""
    scores = torch.matmul(query, key.transpose(-1, -2)).to(accumulation_dtype(query.dtype))
    if scale != 1.0:
        scores = scores * scale
    if keep is not None:
        visible = keep[:, None, None, start : start + key.shape[2]]
        scores = scores.masked_fill(~visible, -INF)
    return scores


class _Blocks:
    """Per-block K/V of ``states``, projected in the queries' dtype (autocast's, when it is on).

    K and V come from one matmul with the two weights stacked, (2 · inner, d): per key block one
    GEMM of twice the width instead of two, in forward and in the backward's recompute, and in
    backward one GEMM each for d(states) and the weights' gradient (``_add_projection_grads``).
    Host-side launches per block are what small blocks pay for (``bench/gpu_checks/pick_block.py``)."""

    def __init__(self, query, states, k_weight, k_bias, v_weight, v_bias, block, offloaded=False, low_rank=(None, None)):
        self.dtype, self.heads, self.block, self.device = query.dtype, query.shape[1], block, query.device
        # adapters' (A, scaling · B) of both projections, stacked (``stacked_low_rank``), or Nones
        self.down, self.up = low_rank
        self.states = states  # on the device, or in host memory when offloaded: blocks come over one by one
        self.offloaded = offloaded
        self.kv_weight = torch.cat([k_weight, v_weight]).to(self.dtype)
        if k_bias is None and v_bias is None:
            self.kv_bias = None
        else:  # a missing bias is a zero one (no gradient is returned for it)
            k_bias = k_bias if k_bias is not None else torch.zeros_like(v_bias)
            v_bias = v_bias if v_bias is not None else torch.zeros_like(k_bias)
            self.kv_bias = torch.cat([k_bias, v_bias]).to(self.dtype)

    def __iter__(self):
        starts = range(0, self.states.shape[1], self.block)
        if self.offloaded:
            blocks = self._from_host(starts)
        else:
            # contiguous, as blocks from host memory arrive: the same kernels on the same layout, so
            # both paths give the same bits (the projection would copy a batch > 1 slice anyway)
            blocks = (self.states[:, start : start + self.block].to(self.device).contiguous() for start in starts)
        for start, x in zip(starts, blocks):
            x = x.to(self.dtype)
            key_value = self._project(x).view(*x.shape[:2], 2 * self.heads, -1).transpose(1, 2)  # (batch, 2 · heads, n, head_dim)
            yield start, x, key_value[:, : self.heads], key_value[:, self.heads :]

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """x Wᵀ + b, plus the adapters' terms in their own dtype and summed there, as peft does."""
        y = nn.functional.linear(x, self.kv_weight, self.kv_bias)
        if self.down is None:
            return y
        return (y + self.low_rank_input(x) @ self.up.transpose(0, 1)).to(self.dtype)

    def low_rank_input(self, x: torch.Tensor) -> torch.Tensor:
        """x Aᵀ, (batch, n, adapter ranks), in the adapters' dtype."""
        return nn.functional.linear(x.to(self.down.dtype), self.down)

    def _from_host(self, starts: range) -> Iterator[torch.Tensor]:
        """Blocks of host-memory states on the device, block i+1 already on its way while block i
        is used (``host_offload``: a side stream on CUDA)."""
        batch, length, hidden = self.states.shape
        rows = self.states.view(-1, hidden)

        def fetch(start):
            n = min(self.block, length - start)
            return rows_to_device(rows, [(b * length + start, b * n, n) for b in range(batch)], batch * n, self.device)

        for _, x in prefetched(starts, fetch):
            yield x.view(batch, -1, hidden)


def _no_autocast(device: torch.device):
    # Forward and backward must project in the same dtype; autocast is on in one and off in the other.
    return torch.autocast(device.type, enabled=False)


class StreamingAttentionFunction(torch.autograd.Function):
    """softmax(q kᵀ · scale + mask) v over key blocks; K, V recomputed from ``states`` in backward.

    Inputs: ``query`` (batch, heads, target, head_dim), already projected; ``states`` (batch, N, d);
    ``keep`` (batch, N) bool or ``None``; the key and value projections' weights and biases
    (biases may be ``None``); ``scale``; ``block``; ``sink``, a ``GradientSink`` that takes
    d(loss)/d(states) instead of autograd, or ``None``; ``fused``: run each block on the device's
    fused SDPA kernel (``block_attention``) where there is one and ``keep`` is right padding (what
    CachED's fused states have), else on plain PyTorch ops; ``down``, ``up``: adapters' low-rank
    terms of the stacked K/V projection (``stacked_low_rank``), or ``None``. Every row needs one
    visible key."""

    @staticmethod
    def forward(ctx, query, states, keep, k_weight, k_bias, v_weight, v_bias, scale, block, sink=None, fused=True,
                down=None, up=None):
        with _no_autocast(query.device):
            offloaded = is_offloaded(states)
            blocks = _Blocks(query, states, k_weight, k_bias, v_weight, v_bias, block, offloaded, (down, up))
            kernel = block_kernel(query) if fused else None
            lengths = visible_lengths(keep, states.shape[0], states.shape[1]) if kernel is not None else None
            kernel = kernel if lengths is not None else None
            if kernel is not None:
                out, lse = _attend_fused(query, blocks, lengths, scale, kernel)
            else:
                out, lse = _attend(query, blocks, keep, scale)
        ctx.save_for_backward(query, states, keep, k_weight, k_bias, v_weight, v_bias, out, lse, down, up)
        ctx.scale, ctx.block, ctx.sink, ctx.offloaded, ctx.kernel, ctx.lengths = scale, block, sink, offloaded, kernel, lengths
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, states, keep, k_weight, k_bias, v_weight, v_bias, out, lse, down, up = ctx.saved_tensors
        with _no_autocast(query.device):
            grads, low_rank_grads = _attend_backward(
                ctx, grad_out, query, states, keep, (k_weight, k_bias, v_weight, v_bias), out, lse, (down, up))
        return (*grads, None, None, None, None, *low_rank_grads)


def _attend(query, blocks: Iterable, keep, scale):
    """Online softmax: a running row max, row sum and unnormalised output, rescaled per block."""
    batch, heads, target, head_dim = query.shape
    row_max = query.new_full((batch, heads, target), -INF, dtype=accumulation_dtype(query.dtype))
    row_sum = torch.zeros_like(row_max)
    acc = query.new_zeros((batch, heads, target, head_dim), dtype=row_max.dtype)
    for start, _, key, value in blocks:
        scores = _scores(query, key, keep, start, scale)
        new_max = torch.maximum(row_max, scores.amax(-1))
        # A row that has only seen masked keys so far keeps max -inf; exponentiate against 0 there
        # (its probabilities and rescale factor are then exactly 0 instead of NaN).
        safe_max = new_max.masked_fill(new_max == -INF, 0.0)
        probs = torch.exp(scores - safe_max[..., None])
        rescale = torch.exp(row_max - safe_max)
        row_sum = row_sum * rescale + probs.sum(-1)
        acc = acc * rescale[..., None] + torch.matmul(probs.to(query.dtype), value)
        row_max = new_max
    return (acc / row_sum[..., None]).to(query.dtype), row_max + row_sum.log()


def visible_lengths(keep, batch: int, keys: int) -> list[int] | None:
    """Each document's visible key count when ``keep`` is right padding; ``None`` otherwise.
    Read from the device (a sync) unless ``compact_key_mask`` counted them already."""
    if keep is None:
        return [keys] * batch
    known = get_tag(keep, LENGTHS_TAG)
    if known is not None:
        return known
    lengths = keep.sum(1)
    right_padding = torch.arange(keys, device=keep.device)[None, :] < lengths[:, None]
    return lengths.tolist() if torch.equal(keep, right_padding) else None


def _visible_parts(lengths: list[int], start: int, size: int) -> list[tuple[slice, int]]:
    """(batch rows, visible keys) to give a kernel for the key block [start, start + size): the
    whole batch in one call when every document sees the whole block, else one call per document
    that sees part of it (right padding: its first keys)."""
    visible = [min(max(length - start, 0), size) for length in lengths]
    if all(v == size for v in visible):
        return [(slice(None), size)]
    return [(slice(b, b + 1), v) for b, v in enumerate(visible) if v > 0]


def _attend_fused(query, blocks: Iterable, lengths: list[int], scale, kernel: BlockKernel):
    """The same softmax with each block on a fused kernel, blocks merged by their log-sum-exps
    (out = Σ exp(lse_i - lse) out_i). ``lse`` stays in the kernel's layout, which its backward reads."""
    target, stats = query.shape[2], accumulation_dtype(query.dtype)
    out = lse = None
    for start, _, key, value in blocks:
        for rows, visible in _visible_parts(lengths, start, key.shape[2]):
            block_out, block_lse = kernel.forward(query[rows], key[rows, :, :visible], value[rows, :, :visible], scale)
            block_lse = block_lse.to(stats)
            if out is None:  # the first block: every document sees its first key, so every row is set
                out = torch.zeros(query.shape, dtype=stats, device=query.device)
                lse = torch.full((*query.shape[:2], block_lse.shape[-1]), -INF, dtype=stats, device=query.device)
            merged = torch.logaddexp(lse[rows], block_lse)
            old = torch.exp(kernel.rows(lse[rows] - merged, target))[..., None]  # 0 where nothing was seen yet
            new = torch.exp(kernel.rows(block_lse - merged, target))[..., None]
            out[rows] = out[rows] * old + block_out.to(stats) * new
            lse[rows] = merged
    return out.to(query.dtype), lse


def _attend_backward(ctx, grad_out, query, states, keep, weights, out, lse, low_rank):
    """Per block: its share of d(query) and its d(key), d(value) (``_fused_block_grads`` or
    ``_plain_block_grads``); then through the K/V projections to their weights, biases, low-rank
    terms and ``states``. Returns (the gradients of query … v_bias, those of ``low_rank``)."""
    needs_query, needs_states, _, *needs_weights = ctx.needs_input_grad[:7]
    dtype, stats, scale = query.dtype, accumulation_dtype(query.dtype), ctx.scale
    grad_out = grad_out.to(dtype).contiguous()
    grad_query = torch.zeros_like(query, dtype=stats) if needs_query else None
    sink = ctx.sink if needs_states else None
    grad_states = torch.empty_like(states) if needs_states and sink is None else None
    k_weight, k_bias, v_weight, v_bias = weights
    # The stacked K/V weight's and bias's gradients, summed over blocks (None: not needed / no bias)
    weight_sum = torch.zeros((2 * k_weight.shape[0], k_weight.shape[1]), dtype=stats, device=k_weight.device) \
        if needs_weights[0] or needs_weights[2] else None
    has_bias = k_bias is not None or v_bias is not None
    bias_sum = torch.zeros(2 * k_weight.shape[0], dtype=stats, device=k_weight.device) \
        if has_bias and (needs_weights[1] or needs_weights[3]) else None
    down, up = low_rank
    # the low-rank terms' gradients (the rank-wide input h = x Aᵀ and its gradient, per block)
    down_sum = torch.zeros(down.shape, dtype=stats, device=down.device) if ctx.needs_input_grad[11] else None
    up_sum = torch.zeros(up.shape, dtype=stats, device=up.device) if ctx.needs_input_grad[12] else None
    if ctx.kernel is not None:
        out = ctx.kernel.backward_layout(out)
        block_grads = partial(_fused_block_grads, ctx.kernel, grad_out, query, out, lse, ctx.lengths, scale)
    else:
        delta = (grad_out.to(stats) * out.to(stats)).sum(-1, keepdim=True)
        block_grads = partial(_plain_block_grads, grad_out, query, keep, lse, delta, scale, needs_query)
    blocks = _Blocks(query, states, *weights, ctx.block, ctx.offloaded, low_rank)
    for start, x, key, value in blocks:
        block_grad_query, block_grad_key, block_grad_value = block_grads(start, key, value)
        if grad_query is not None:
            grad_query += block_grad_query
        # (batch, block, 2 · inner): the stacked projection's output gradient, in one copy
        grad_kv = torch.stack([block_grad_key.transpose(1, 2), block_grad_value.transpose(1, 2)], 2).flatten(2)
        _add_projection_grads(weight_sum, bias_sum, grad_kv, x)
        if down is not None:
            grad_h = torch.matmul(grad_kv.to(up.dtype), up)
            _add_projection_grads(up_sum, None, grad_kv.to(up.dtype), blocks.low_rank_input(x))
            _add_projection_grads(down_sum, None, grad_h, x.to(down.dtype))
        if needs_states:
            grad_x = torch.matmul(grad_kv, blocks.kv_weight)
            if down is not None:
                grad_x = (grad_x + torch.matmul(grad_h, down)).to(grad_x.dtype)
            if sink is not None:
                sink.add(states, start, grad_x)
            else:
                grad_states[:, start : start + x.shape[1]] = grad_x
    grad_query = None if grad_query is None else grad_query.to(dtype)
    inner = k_weight.shape[0]
    halves = [None if weight_sum is None else weight_sum[:inner], None if bias_sum is None else bias_sum[:inner],
              None if weight_sum is None else weight_sum[inner:], None if bias_sum is None else bias_sum[inner:]]
    grads = [None if g is None or w is None or not need else g.to(w.dtype) for g, w, need in zip(halves, weights, needs_weights)]
    low_rank_grads = [None if g is None else g.to(t.dtype) for g, t in ((down_sum, down), (up_sum, up))]
    return (grad_query, grad_states, None, *grads), low_rank_grads


def _plain_block_grads(grad_out, query, keep, lse, delta, scale, needs_query, start, key, value):
    """Flash attention's backward in PyTorch ops: P = exp(S - lse), dS = P * (dP - rowsum(dO * O))."""
    dtype, stats = query.dtype, lse.dtype
    probs = torch.exp(_scores(query, key, keep, start, scale) - lse[..., None])  # 0 on masked keys
    grad_probs = torch.matmul(grad_out, value.transpose(-1, -2)).to(stats)
    grad_scores = probs * (grad_probs - delta)
    if scale != 1.0:
        grad_scores = grad_scores * scale
    grad_scores = grad_scores.to(dtype)
    grad_query = torch.matmul(grad_scores, key) if needs_query else None
    return grad_query, torch.matmul(grad_scores.transpose(-1, -2), query), torch.matmul(probs.to(dtype).transpose(-1, -2), grad_out)


def _fused_block_grads(kernel: BlockKernel, grad_out, query, out, lse, lengths, scale, start, key, value):
    """The kernel's backward of one block against the merged (out, lse): that block's share of
    d(query) and its exact d(key), d(value); zero on keys past a document's end."""
    parts = _visible_parts(lengths, start, key.shape[2])
    if parts and parts[0][0] == slice(None):
        return kernel.backward(grad_out, query, key, value, out, lse, scale)
    # Some documents, or none (a block past every document's end), see the block: zeros elsewhere.
    grad_query, grad_key, grad_value = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
    for rows, visible in parts:
        grads = kernel.backward(grad_out[rows], query[rows], key[rows, :, :visible], value[rows, :, :visible], out[rows], lse[rows], scale)
        grad_query[rows], grad_key[rows, :, :visible], grad_value[rows, :, :visible] = grads
    return grad_query, grad_key, grad_value


def _add_projection_grads(weight_sum, bias_sum, grad, x) -> None:
    """For y = x Wᵀ + b with output gradient ``grad``: dW += gradᵀ x, db += grad, summed over
    batch and tokens (in place; ``None`` sums are skipped)."""
    if weight_sum is not None:
        weight_sum += torch.matmul(grad.flatten(0, 1).transpose(0, 1), x.flatten(0, 1))
    if bias_sum is not None:
        bias_sum += grad.sum((0, 1))


def streaming_cross_attention(
    query, states, keep, k_weight, k_bias, v_weight, v_bias, scale: float, block: int, sink=None, fused: bool = True,
    low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Attention output (batch, heads, target, head_dim); see ``StreamingAttentionFunction``.
    ``low_rank``: the K/V projections' adapter terms, as ``stacked_low_rank`` gives them."""
    down, up = low_rank or (None, None)
    return StreamingAttentionFunction.apply(
        query, states, keep, k_weight, k_bias, v_weight, v_bias, scale, block, sink, fused, down, up)


def stacked_low_rank(k: LinearParts, v: LinearParts) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The K and V projections' adapter terms as one pair for the stacked (K; V) projection:
    ``down`` (ranks, d) stacks every A; ``up`` (2 · inner, ranks) puts each scaling · B in its
    projection's rows and its adapter's columns, zeros elsewhere. None without adapters."""
    if not k.low_rank and not v.low_rank:
        return None
    dtype = reduce(torch.promote_types, [t.dtype for pair in k.low_rank + v.low_rank for t in pair])
    k_ranks, v_ranks = (sum(a.shape[0] for a, _ in parts.low_rank) for parts in (k, v))

    def rows(parts: LinearParts, before: int, after: int) -> torch.Tensor:
        out = parts.weight.shape[0]
        pieces = [torch.zeros(out, before, dtype=dtype, device=parts.weight.device)] if before else []
        pieces += [b.to(dtype) for _, b in parts.low_rank]
        pieces += [torch.zeros(out, after, dtype=dtype, device=parts.weight.device)] if after else []
        return torch.cat(pieces, 1)

    down = torch.cat([a.to(dtype) for a, _ in k.low_rank + v.low_rank])
    return down, torch.cat([rows(k, 0, v_ranks), rows(v, k_ranks, 0)])


def attend_to_cached(query, key, value, keep, scale: float, block: int) -> torch.Tensor:
    """The same online softmax over K/V projected beforehand, (batch, heads, N, head_dim): for
    generation, which reuses them every step. Forward only; only one key block's scores exist at a
    time, however many queries (beams) there are."""
    blocks = (
        (start, None, key[:, :, start : start + block], value[:, :, start : start + block])
        for start in range(0, key.shape[2], block)
    )
    return _attend(query, blocks, keep, scale)[0]
