"""Decoder cross-attention over very long encoder states without N-sized activations.

HF's decoder cross-attention projects all N fused encoder states to K and V and forms a
(batch, heads, target, N) score tensor, and autograd keeps all three for backward in every decoder
layer. Here the keys are visited in blocks of ``block`` tokens with an online softmax (flash
attention's log-sum-exp merge): each block's K and V are projected from ``states`` on the fly in
forward and projected *again* in backward. Saved for backward: the projected queries, the output,
the per-row log-sum-exp, a (batch, N) boolean key mask and ``states`` itself (the caller's tensor,
shared by every layer) — nothing else grows with N.

    model = AutoModelForSeq2SeqLM.from_pretrained("facebook/bart-large", attention_dropout=0.0)
    install_streaming_cross_attention(model, block=4096)
    loss = CachedSeq2Seq(model)(input_ids, attention_mask, labels=labels).loss   # streaming
    loss.backward()
    remove_streaming_cross_attention(model)   # HF's modules again; the parameters never changed

Decisions:

- **Families**: BART, mBART, PEGASUS and the others with BART's module (PLBart, Marian, M2M100,
  BlenderBot, PEGASUS-X, BigBird-Pegasus: scores scaled by head_dim**-0.5, biases on q/k/v/out)
  and T5, mT5, LongT5 (no scaling, no biases, no relative bias in cross-attention) — the
  ``LAYOUTS`` table.
  Biases are read from the projection modules, so a family without them simply has ``None``.
- **Same parameters**: the replacement registers the original's projection modules under their
  own names, so ``state_dict`` keys, saved models and optimizer state are unchanged.
- **No attention-probability dropout**: matching HF's masks would need HF's (batch, heads, target,
  N) draw. A training forward with nonzero cross-attention dropout raises ``ValueError`` naming
  the config field (``attention_dropout``; T5's ``dropout_rate``, which also sets hidden dropout,
  so there the fix is to zero only the cross-attention modules' ``.dropout``). Hidden and
  activation dropout are untouched, and no random number is drawn here, so the decoder's
  dropout stream is the same as HF's.
- **Generation**: with a KV cache (``use_cache=True``, ``generate``) the original module runs:
  cached cross-attention K/V are N-sized by definition — per beam, in HF's beam search. Inside
  ``CachedSeq2Seq.generate`` these modules take their ``shared_encoder_side`` path instead
  (``shared_beam_generation``): K/V once per document, shared by its beams. T5/LongT5 build a
  cache in training too unless ``use_cache=False`` (``CachedSeq2Seq`` passes it); that case
  warns. Without a cache the streaming path runs in training and in eval alike (both exact).
- **Masks**: HF hands cross-attention a (batch, 1, target, N) mask built from the 2-D encoder
  mask; it is reduced to a (batch, N) key mask. A mask that differs between queries runs HF's module.
- Attention weights are never formed, so they are returned as ``None`` (HF's
  ``output_attentions`` gets no cross-attention weights from these modules).
- **Out-of-band states gradient** (``gradient_sink.GradientSink``): when ``states`` carries a
  sink the layers add d(loss)/d(states) block by block into its one fp32 buffer instead of each
  returning an N-sized gradient for autograd to sum in the states' dtype. ``CachedSeq2Seq``'s
  cached encoder output carries one (its gradient cache); ``with_gradient_sink`` adds one to
  any other states tensor.
- **Kernels**: with right-padded keys (CachED's fused states) each block runs on the device's
  fused SDPA kernel (``block_attention``: ATen's flash attention on CPU and CUDA, memory-efficient
  attention for fp32 on CUDA), so no (target × block) score tensor is formed either; the blocks'
  outputs are merged by log-sum-exp, and each block's backward is handed the merged output and
  log-sum-exp. Other masks, devices and dtypes run the same algorithm in plain PyTorch ops.
- **Adapters**: the K/V projections are read through ``projections.linear_parts`` each call, so
  peft's LoRA on them is applied here too: its low-rank terms ride along each block's projection
  and get their gradients in backward (not merged into the weight, where bf16 would round a
  small update away). What cannot be applied exactly (LoRA dropout, DoRA) is refused by name.
- Not covered here: DeepSpeed ZeRO-3 (the K/V weights are read outside their ``nn.Linear``'s
  forward, where ZeRO-3 has them partitioned): ``deepspeed_engine`` makes these modules leaves.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial, reduce

import torch
from torch import nn

from .block_attention import BlockKernel, block_kernel
from .host_offload import is_offloaded, prefetched, rows_to_device, to_device
from .projections import LinearParts, linear_parts
from .tensor_tags import get_tag, set_tag
from .gradient_sink import (
    GradientSink,
    accumulation_dtype,
    attach,
    sink_of,
)

INF = float("inf")
LENGTHS_TAG = "key_lengths"  # on a right-padded key mask (a tensor_tags tag): visible keys per document
DEFAULT_BLOCK = 1024  # key tokens per online-softmax step


@dataclass(frozen=True)
class CrossAttentionLayout:
    """What differs between families' decoder cross-attention modules."""

    projections: tuple[str, str, str, str]  # query, key, value, output submodule names
    heads: str  # attribute holding the head count
    head_dim: str  # attribute holding the per-head width
    scaled: bool  # scores multiplied by head_dim**-0.5 (T5 folds the scale into its init instead)
    mask_kwarg: str  # keyword the decoder layer passes the encoder mask under
    dropout_field: str  # config field that sets the module's attention-probability dropout
    returns_position_bias: bool  # T5 modules return (output, position_bias, weights)
    slots: Callable[[nn.Module], Iterator[tuple[nn.Module, str]]]  # decoder -> (parent, attribute)


def _bart_slots(decoder):
    for layer in decoder.layers:
        yield layer, "encoder_attn"


def _t5_slots(decoder):
    for block in decoder.block:
        yield block.layer[1], "EncDecAttention"


_BART_LIKE = CrossAttentionLayout(
    projections=("q_proj", "k_proj", "v_proj", "out_proj"), heads="num_heads", head_dim="head_dim", scaled=True,
    mask_kwarg="attention_mask", dropout_field="attention_dropout", returns_position_bias=False, slots=_bart_slots,
)
_T5_LIKE = CrossAttentionLayout(
    projections=("q", "k", "v", "o"), heads="n_heads", head_dim="key_value_proj_dim", scaled=False,
    mask_kwarg="mask", dropout_field="dropout_rate", returns_position_bias=True, slots=_t5_slots,
)
LAYOUTS = {
    "bart": _BART_LIKE, "mbart": _BART_LIKE, "pegasus": _BART_LIKE, "t5": _T5_LIKE, "longt5": _T5_LIKE, "mt5": _T5_LIKE,
    # the same cross-attention module as BART's, under other names
    **dict.fromkeys(("plbart", "marian", "m2m_100", "blenderbot", "blenderbot-small", "pegasus_x", "bigbird_pegasus"), _BART_LIKE),
    # not LED: its decoder calls cross-attention with another signature (HF's module runs there)
}


def layout_of(model: nn.Module) -> CrossAttentionLayout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        hint = ("pass the Hugging Face model itself (CachedSeq2Seq's .model)" if model_type is None else
                "leave cross_attention_block unset for it (HF's cross-attention, exact)")
        raise ValueError(f"streaming cross-attention supports {sorted(LAYOUTS)}, got model_type={model_type!r} "
                         f"({type(model).__name__}); {hint}")
    return LAYOUTS[model_type]


# --------------------------------------------------------------------------- the attention itself


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, n, head_dim) -> (batch, n, heads * head_dim)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


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
            lengths = _visible_lengths(keep, states.shape[0], states.shape[1]) if kernel is not None else None
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


def _visible_lengths(keep, batch: int, keys: int) -> list[int] | None:
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


# --------------------------------------------------------------------------- out-of-band states gradient


class _SinkOutlet(torch.autograd.Function):
    """Identity in forward; in backward, the sink's total plus whatever reached it through
    autograd (a layer that ran HF's module), cast once to the states' dtype. It runs after every
    consumer of its output has run its backward: autograd's dependency order guarantees it."""

    @staticmethod
    def forward(ctx, states, sink):
        ctx.set_materialize_grads(False)  # no N-sized zeros when every layer used the sink
        ctx.sink, ctx.dtype = sink, states.dtype
        return states.view_as(states)

    @staticmethod
    def backward(ctx, grad):
        total = ctx.sink.take()
        if total is None:
            return grad, None
        if grad is not None:
            total += grad
        return total.to(ctx.dtype), None


def with_gradient_sink(states: torch.Tensor) -> torch.Tensor:
    """``states`` whose gradient the streaming layers deliver out of band through one fp32
    ``GradientSink`` (``sink_of`` finds it); give the result to the decoder. The sink is a
    ``tensor_tags`` tag, found on any tensor viewing the same memory the same way, so the input
    carries it too: the decoder must read only the returned tensor, whose backward collects the
    sink after every reader's.

        states = with_gradient_sink(encoder_states)
        model(encoder_outputs=BaseModelOutput(last_hidden_state=states), ...).loss.backward()
    """
    sink = GradientSink()
    return attach(_SinkOutlet.apply(states, sink), sink)


# --------------------------------------------------------------------------- the module replacement

_NOT_KEY_PADDING = object()


def key_padding_mask(mask: torch.Tensor | None):
    """(batch, N) bool, True on visible keys, from the mask HF passes cross-attention: ``None``
    (all visible), a (batch, 1, target, N) boolean (sdpa) or additive float mask (eager: 0 where
    visible). A fresh compact tensor, so what is saved for backward is N bytes per document, not
    HF's target × N mask. ``_NOT_KEY_PADDING`` when the mask differs between queries or heads."""
    if mask is None:
        return None
    row = mask[:, :1, :1, :]
    # (batch, 1, 1, N) is one row by shape; anything else is compared (a device sync per layer)
    if mask.shape[1:3] != (1, 1) and not torch.equal(mask, row.expand_as(mask)):
        return _NOT_KEY_PADDING
    row = row[:, 0, 0, :]
    keep = row.clone() if row.dtype == torch.bool else row == 0
    lengths = get_tag(mask, LENGTHS_TAG)
    if lengths is not None:  # compact_key_mask's: right padding, counted once per step
        set_tag(keep, LENGTHS_TAG, lengths)
    return keep


def _checked_block(block: int) -> int:
    if block < 1:
        raise ValueError(f"block must be a positive number of key tokens, got {block}")
    return block


class StreamingCrossAttention(nn.Module):
    """Stands in for one decoder cross-attention module: its projection modules are registered
    here under their own names (same parameters, same ``state_dict`` keys); the original module
    is kept, unregistered, at ``.original`` for the cached (generation) path and for removal."""

    def __init__(self, original: nn.Module, layout: CrossAttentionLayout, block: int):
        super().__init__()
        self.layout, self.block = layout, _checked_block(block)
        self.fused = True  # each key block on a fused SDPA kernel where one applies (block_attention)
        for name, child in original.named_children():
            self.add_module(name, child)
        self.__dict__["original"] = original  # not a submodule: that would duplicate the state_dict keys
        # Set for one ``CachedSeq2Seq.generate`` call by ``shared_beam_generation``: an object whose
        # ``attend(module, query, states)`` attends with K/V held once per document.
        self.shared_encoder_side = None
        self.train(original.training)

    def __getattr__(self, name):
        # The original's plain attributes (layer_idx, config, dropout, ...) stay readable.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "original" not in self.__dict__:
                raise
            return getattr(self.__dict__["original"], name)

    def forward(self, hidden_states, *args, **kwargs):
        states = kwargs.get("key_value_states")
        if self.shared_encoder_side is not None:
            return self._shared_forward(hidden_states, states, args)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # renamed in transformers 5.2x
        keep = key_padding_mask(kwargs.get(self.layout.mask_kwarg))
        # Positional arguments: a calling convention we do not know. A position bias: an earlier T5
        # layer ran HF's module and shares its bias (mask included) with the next.
        position_bias = kwargs.get("position_bias")
        if args or states is None or cache is not None or position_bias is not None or keep is _NOT_KEY_PADDING:
            if cache is not None and self.training and torch.is_grad_enabled():
                warnings.warn(
                    "a KV cache was passed to cross-attention in training, so HF's module runs (N-sized K/V "
                    "and scores); call the model with use_cache=False to stream (CachedSeq2Seq does)",
                    stacklevel=2,
                )
            return self.synced_original()(hidden_states, *args, **kwargs)
        self._check_no_attention_dropout()
        _, k_name, v_name, _ = self.layout.projections
        # read each call: peft may wrap the projections after install, and its active adapters change
        k, v = (linear_parts(getattr(self, name), f"decoder cross-attention {name}", "cross_attention_block")
                for name in (k_name, v_name))
        out = streaming_cross_attention(
            self._query(hidden_states), states, keep, k.weight, k.bias, v.weight, v.bias,
            self.scale, self.block, sink_of(states), self.fused, stacked_low_rank(k, v),
        )
        return self._output(out)

    def synced_original(self) -> nn.Module:
        """HF's module, given the projection modules registered here now: something that wrapped
        them after install (peft applied to a model that already streams) swapped them here only."""
        for name, child in self.named_children():
            if getattr(self.original, name, None) is not child:
                setattr(self.original, name, child)
        self.original.train(self.training)
        return self.original

    def _shared_forward(self, hidden_states, states, args):
        """Generation inside ``shared_beam_generation``: the encoder mask comes from the shared side
        (HF is given none), so there is no fallback to HF's module here."""
        if args or states is None:
            raise TypeError(
                f"{type(self.original).__name__} was called without key_value_states or with positional "
                f"arguments during shared-beam generation; this transformers version calls cross-attention "
                f"in a way shared_beam_generation does not know"
            )
        self._check_no_attention_dropout()
        return self._output(self.shared_encoder_side.attend(self, self._query(hidden_states), states))

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5 if self.layout.scaled else 1.0

    @property
    def num_heads(self) -> int:
        return getattr(self.original, self.layout.heads)

    @property
    def head_dim(self) -> int:
        return getattr(self.original, self.layout.head_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n, heads * head_dim) -> (batch, heads, n, head_dim)."""
        return x.view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def _query(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._split_heads(getattr(self, self.layout.projections[0])(hidden_states))

    def key_value(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of all of ``states`` at once, (batch, heads, N, head_dim): for generation only."""
        _, k_name, v_name, _ = self.layout.projections
        return self._split_heads(getattr(self, k_name)(states)), self._split_heads(getattr(self, v_name)(states))

    def _output(self, out: torch.Tensor):
        """Attention output (batch, heads, target, head_dim) -> what HF's module returns."""
        out = getattr(self, self.layout.projections[3])(_merge_heads(out))
        # T5 also returns the position bias it used; None lets the next layer build its own.
        return (out, None, None) if self.layout.returns_position_bias else (out, None)

    def _check_no_attention_dropout(self) -> None:
        p = self.original.dropout
        if self.training and p > 0:
            field = self.layout.dropout_field
            raise ValueError(
                f"streaming cross-attention has no dropout on attention probabilities, but this decoder's "
                f"cross-attention has {p} (config.{field}); set \"keep_attention_dropout\": false in the "
                f"\"cached\" section (CachedConfig) to drop it from the replaced modules only (hidden dropout "
                f"stays on), or build the model with {field}=0.0"
            )


def has_streaming_cross_attention(model: nn.Module) -> bool:
    return any(isinstance(module, StreamingCrossAttention) for module in model.modules())


def streams_every_layer(model: nn.Module) -> bool:
    """Whether every decoder cross-attention module of the HF ``model`` is a streaming one."""
    layout = LAYOUTS.get(getattr(getattr(model, "config", None), "model_type", None))
    return layout is not None and all(
        isinstance(getattr(parent, name), StreamingCrossAttention) for parent, name in layout.slots(model.get_decoder())
    )


def compact_key_mask(mask: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """The (batch, N) encoder mask as a (batch, 1, 1, N) bool view for HF's decoder. Given the
    2-D mask, HF's mask builder makes a (batch, 1, target, N) mask in every decoder forward
    (1 byte per entry with sdpa, 4 with eager: a GiB per million tokens at 1024 targets);
    a 4-D mask it passes on as is (``masking_utils._preprocess_mask_arguments``), and the
    streaming modules only read its key-padding row. HF's own modules would misread a bool mask
    under eager attention, so give it only to a decoder that streams every layer.

    A right-padded mask also carries its documents' lengths (``LENGTHS_TAG``), counted here
    once, so no layer has to read them back from the device to pick its kernel calls. A mask in
    host memory is counted there, with no wait for the device, and goes to ``device`` as bool
    (``to_device``: nor does the copy wait)."""
    keep = mask.bool()
    lengths = _visible_lengths(keep, mask.shape[0], mask.shape[1])
    compact = to_device(keep, device or keep.device)[:, None, None, :]
    if lengths is not None:
        set_tag(compact, LENGTHS_TAG, lengths)
    return compact


def install_streaming_cross_attention(model: nn.Module, block: int = DEFAULT_BLOCK, fused: bool = True) -> list[StreamingCrossAttention]:
    """Replace every decoder cross-attention module of the HF ``model`` with a streaming one of
    ``block`` key tokens per step, each block on a fused SDPA kernel where one applies (``fused``)
    or on plain PyTorch ops (installing again only updates ``block`` and ``fused``). Returns them."""
    modules, _ = _install(model, block)
    for module in modules:
        module.block, module.fused = _checked_block(block), fused
    return modules


def remove_streaming_cross_attention(model: nn.Module) -> None:
    """Put HF's original cross-attention modules back (they hold the same parameters)."""
    _restore(
        (parent, name) for parent, name in layout_of(model).slots(model.get_decoder())
        if isinstance(getattr(parent, name), StreamingCrossAttention)
    )


@contextmanager
def streaming_cross_attention_installed(model: nn.Module, block: int = DEFAULT_BLOCK) -> Iterator[list[StreamingCrossAttention]]:
    """Every decoder cross-attention module streaming inside the block; on exit the model is as it
    was: modules installed here are removed, ones installed before stay, with their ``block``."""
    modules, added = _install(model, block)
    try:
        yield modules
    finally:
        _restore(added)


def _install(model, block):
    """(every slot's streaming module, the (parent, name) slots that were wrapped just now)."""
    layout = layout_of(model)
    modules, added = [], []
    for parent, name in layout.slots(model.get_decoder()):
        module = getattr(parent, name)
        if not isinstance(module, StreamingCrossAttention):
            module = StreamingCrossAttention(module, layout, block)
            setattr(parent, name, module)
            added.append((parent, name))
        modules.append(module)
    return modules, added


def _restore(slots) -> None:
    for parent, name in slots:
        setattr(parent, name, getattr(parent, name).synced_original())
