"""Fast T5/LongT5 self-attention: no (heads × L × L) tensor, same modules, same parameters.

HF's T5 attention builds the whole (1, heads, L, L) relative-position bias in the first layer
and hands it to every later layer; its backward keeps a (batch, heads, L, L) score tensor per
layer. Here the bias is kept per *offset* instead: ``offsets[k - q + Lq - 1]`` (an
(Lq + Lk - 1, heads) gather from the bucketed ``relative_attention_bias`` table, so its gradient
reaches the table through autograd) and attention runs over query blocks × key blocks with an
online softmax. ``BlockedBiasAttention`` saves q, k, v, the output and the log-sum-exp and
recomputes each block's scores in backward (flash-attention style). On CUDA, T5 and LongT5
(local and transient-global) attention go through ``flex_attention`` with a ``score_mod`` reading
the same offset bias (``flex_t5.py``).

    from cached_ds.t5_attention import install_fast_t5_attention, remove_fast_t5_attention
    model = AutoModelForSeq2SeqLM.from_pretrained("google/long-t5-tglobal-base")
    install_fast_t5_attention(model)       # encoder + decoder self-attention, same parameters
    loss = model(input_ids, attention_mask, labels=labels).loss
    remove_fast_t5_attention(model)        # HF's forward again; state_dict never changed

Exact where HF is deterministic. Attention-probability dropout (``dropout_rate`` in training)
would need HF's (batch, heads, L, L) dropout mask, so a module in training with a non-zero
``dropout`` runs HF's own forward instead (exact, not fast); set the attention modules'
``dropout`` to 0 (or ``config.dropout_rate=0``) to train on the fast path. The decoder's
cross-attention is not replaced, nor is generation with a filled KV cache (both run HF's code).
"""

from __future__ import annotations

import inspect
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.mt5.modeling_mt5 import MT5LayerSelfAttention
from transformers.models.t5.modeling_t5 import T5Attention, T5LayerSelfAttention

DEFAULT_BLOCK = 128
# transformers renamed T5Attention.forward's ``past_key_values`` to ``cache`` (5.2x); accept both.
_CACHE_KW = "cache" if "cache" in inspect.signature(T5Attention.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class Settings:
    block: int = DEFAULT_BLOCK
    use_flex: bool = True
    local_sdpa: bool = False  # LongT5 local / transient-global layers: ``local_sdpa`` (any device)


# ----------------------------------------------------------------------------------------------
# The blocked attention (any device)


@dataclass
class Layout:
    """Which (query, key) pairs attend and what is added to their scores besides q·k.

    offsets: (Lq + Lk - 1, heads) bias of key - query offset, or None.
    mask: HF's 4-D mask broadcastable to (batch, 1, Lq, Lk): bool (True attends) or additive.
    key_valid: (batch, Lk) bool, keys that exist. causal: key <= query. radius: |key - query| <= radius.
    side: extra global keys (LongT5 transient-global), see ``SideKeys``.
    shared: what the layers of a stack share in one forward, built by the first that needs it and
        reused by the others: ``flex_t5``'s block masks, ``local_sdpa``'s dense bias.
    """

    block: int
    offsets: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None
    causal: bool = False
    radius: int | None = None
    side: SideKeys | None = None
    shared: dict | None = None  # by (kind, shapes...): one store per stack forward (OffsetBias)


@dataclass
class SideKeys:
    """LongT5 transient-global keys: one per ``global_block_size`` tokens, with a bias read from
    ``table`` at bucket(global index - block_ids[query]) and attended where
    ``query_mask[query] == segments[global]`` (HF's rule, kept as is)."""

    block_ids: torch.Tensor  # (batch, Lq) global block of each query, -1 on padding
    segments: torch.Tensor  # (batch, G)
    query_mask: torch.Tensor  # (batch, Lq)
    bucket: object  # relative position -> bucket id (the module's own bucket function)

    def bucket_ids(self, q0: int, q1: int) -> torch.Tensor:
        globals_ = torch.arange(self.segments.shape[1], device=self.block_ids.device)
        return self.bucket(globals_ - self.block_ids[:, q0:q1, None].long())  # (batch, bq, G)

    def allowed(self, q0: int, q1: int) -> torch.Tensor:
        return (self.query_mask[:, q0:q1, None] == self.segments[:, None, :])[:, None]


def _key_blocks(layout: Layout, q0: int, q1: int, length: int) -> Iterator[tuple[int, int]]:
    """Key blocks that can hold an attended key for queries q0..q1-1 (causal / band skip the rest)."""
    first, last = 0, length
    if layout.radius is not None:
        first, last = max(0, q0 - layout.radius), min(length, q1 + layout.radius)
    if layout.causal:
        last = min(last, q1)
    start = first - first % layout.block
    for k0 in range(start, last, layout.block):
        yield max(k0, first), min(k0 + layout.block, last)


def _local_scores(q, k, layout: Layout, offsets, q0, q1, k0, k1, lq):
    """Scores of queries q0..q1 on keys k0..k1 (fp32), not-attended entries at -inf; and the
    offset indices the bias was read at (for its gradient)."""
    s = q @ k.transpose(-1, -2)
    qpos = torch.arange(q0, q1, device=q.device)[:, None]
    kpos = torch.arange(k0, k1, device=q.device)[None, :]
    index = kpos - qpos + (lq - 1)
    if offsets is not None:
        s = s + offsets[index].permute(2, 0, 1).float()
    allowed = None
    if layout.causal:
        allowed = kpos <= qpos
    if layout.radius is not None:
        band = (kpos - qpos).abs() <= layout.radius
        allowed = band if allowed is None else allowed & band
    if layout.key_valid is not None:
        valid = layout.key_valid[:, None, None, k0:k1]
        allowed = valid if allowed is None else allowed & valid
    if layout.mask is not None:
        m = layout.mask[:, :, q0:q1, k0:k1]
        if m.dtype == torch.bool:
            allowed = m if allowed is None else allowed & m
        else:
            s = s + m.float()
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s, index


def _side_scores(q, side_k, side_table, side: SideKeys, q0, q1):
    s = q @ side_k.transpose(-1, -2)
    buckets = side.bucket_ids(q0, q1)
    s = s + side_table[buckets].permute(0, 3, 1, 2).float()
    return s.masked_fill(~side.allowed(q0, q1), float("-inf")), buckets


def _chunks(layout, q, k, v, offsets, side_k, side_v, side_table, q0, q1):
    """(scores, values, key tensor, key range or None, bias index) of every key chunk of a query block."""
    lq, lk = q.shape[2], k.shape[2]
    qb = q[:, :, q0:q1].float()
    if layout.side is not None and side_k.shape[2] > 0:  # no global block in inputs shorter than one
        s, buckets = _side_scores(qb, side_k.float(), side_table, layout.side, q0, q1)
        yield s, side_v.float(), side_k.float(), None, buckets
    for k0, k1 in _key_blocks(layout, q0, q1, lk):
        kb = k[:, :, k0:k1].float()
        s, index = _local_scores(qb, kb, layout, offsets, q0, q1, k0, k1, lq)
        yield s, v[:, :, k0:k1].float(), kb, (k0, k1), index


class BlockedBiasAttention(torch.autograd.Function):
    """softmax(q kᵀ + bias + mask) v over blocks; saves only inputs, output and log-sum-exp.

    Inputs ``(q, k, v, offsets, side_k, side_v, side_table, layout)``, q/k/v (batch, heads, L, d);
    the side tensors are None except for LongT5 transient-global."""

    @staticmethod
    def forward(ctx, q, k, v, offsets, side_k, side_v, side_table, layout: Layout):
        batch, heads, lq, _ = q.shape
        out = torch.zeros(batch, heads, lq, v.shape[-1], dtype=torch.float32, device=q.device)
        lse = torch.full((batch, heads, lq), float("-inf"), dtype=torch.float32, device=q.device)
        for q0 in range(0, lq, layout.block):
            q1 = min(q0 + layout.block, lq)
            m = torch.full((batch, heads, q1 - q0), float("-inf"), device=q.device)
            total = torch.zeros_like(m)
            acc = out[:, :, q0:q1]
            for s, vb, *_ in _chunks(layout, q, k, v, offsets, side_k, side_v, side_table, q0, q1):
                m_new = torch.maximum(m, s.amax(-1))
                # a row with nothing attended so far keeps max -inf: shift by 0 so exp gives 0, not NaN
                shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                p = torch.exp(s - shift[..., None])
                rescale = torch.exp(m - shift)
                total = total * rescale + p.sum(-1)
                acc.mul_(rescale[..., None]).add_(p @ vb)
                m = m_new
            # rows with no attended key at all (padding queries) give 0, never NaN
            acc.div_(torch.where(total > 0, total, torch.ones_like(total))[..., None])
            lse[:, :, q0:q1] = torch.where(total > 0, m + total.log(), lse[:, :, q0:q1])
        out = out.to(q.dtype)
        ctx.layout = layout
        ctx.save_for_backward(q, k, v, offsets, side_k, side_v, side_table, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, offsets, side_k, side_v, side_table, out, lse = ctx.saved_tensors
        layout = ctx.layout
        lq = q.shape[2]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        d_offsets = None if offsets is None else torch.zeros(offsets.shape, dtype=torch.float32, device=q.device)
        d_side_k = d_side_v = d_side_table = None
        if layout.side is not None:
            d_side_k = torch.zeros(side_k.shape, dtype=torch.float32, device=q.device)
            d_side_v = torch.zeros(side_v.shape, dtype=torch.float32, device=q.device)
            d_side_table = torch.zeros(side_table.shape, dtype=torch.float32, device=q.device)
        grad_out = grad_out.float()
        delta = (grad_out * out.float()).sum(-1)  # rowsum(dO ∘ O), the softmax-backward correction
        safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        heads = q.shape[1]
        for q0 in range(0, lq, layout.block):
            q1 = min(q0 + layout.block, lq)
            qb, go = q[:, :, q0:q1].float(), grad_out[:, :, q0:q1]
            for s, vb, kb, span, index in _chunks(layout, q, k, v, offsets, side_k, side_v, side_table, q0, q1):
                p = torch.exp(s - safe_lse[:, :, q0:q1, None])
                ds = p * (go @ vb.transpose(-1, -2) - delta[:, :, q0:q1, None])
                dq[:, :, q0:q1] += ds @ kb
                if span is None:  # the global side keys
                    d_side_v += p.transpose(-1, -2) @ go
                    d_side_k += ds.transpose(-1, -2) @ qb
                    d_side_table.index_add_(0, index.reshape(-1), ds.permute(0, 2, 3, 1).reshape(-1, heads))
                    continue
                k0, k1 = span
                dv[:, :, k0:k1] += p.transpose(-1, -2) @ go
                dk[:, :, k0:k1] += ds.transpose(-1, -2) @ qb
                if d_offsets is not None:
                    d_offsets.index_add_(0, index.reshape(-1), ds.sum(0).permute(1, 2, 0).reshape(-1, heads))
        cast = lambda g, like: None if g is None else g.to(like.dtype)
        return (
            dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), cast(d_offsets, offsets),
            cast(d_side_k, side_k), cast(d_side_v, side_v), cast(d_side_table, side_table), None,
        )


def attention(q, k, v, layout: Layout, side_k=None, side_v=None, side_table=None, use_flex: bool = True,
              local_sdpa: bool = False):
    """Blocked attention; on CUDA, ``flex_attention`` when ``use_flex`` (its Triton kernels need
    head dimensions of 16 or more), LongT5's global keys included. ``local_sdpa``: LongT5's
    banded layouts (``radius``) run ``local_sdpa`` instead, on any device."""
    if local_sdpa and layout.radius is not None:
        from .local_sdpa import local_sdpa_attention  # here: local_sdpa imports this module

        return local_sdpa_attention(q, k, v, layout, side_k, side_v, side_table)
    if use_flex and q.is_cuda and q.shape[-1] >= 16:
        out = try_flex(q, k, v, layout, side_k, side_v, side_table)
        if out is not None:
            return out
    return BlockedBiasAttention.apply(q, k, v, layout.offsets, side_k, side_v, side_table, layout)


def try_flex(q, k, v, layout: Layout, side_k=None, side_v=None, side_table=None) -> torch.Tensor | None:
    """``flex_t5.flex_bias_attention``, or ``None`` once it has failed in this process (a compiler
    error, a recompile budget spent: ``flex_t5``), with one warning naming the error: the caller
    then runs the blocked kernel, exact and without (L × L) tensors, where eager flex_attention
    would materialise the scores. Running out of memory is not a flex failure: it is raised.
    Only the forward is guarded: flex's backward compiles at the first backward, inside autograd
    (in CachED, the recompute), where a failure stops the step with its error; the fix is
    ``t5_attention_kernel="blocked"``."""
    from . import flex_t5

    if flex_t5.failure is not None:
        return None
    try:
        return flex_t5.flex_bias_attention(q, k, v, layout, side_k, side_v, side_table)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any compile or kernel failure: the blocked kernel is exact
        flex_t5.failure = f"{type(error).__name__}: {error}"[:500]
        warnings.warn(f"flex_attention failed ({flex_t5.failure}); fast T5 attention runs the blocked kernel from now "
                      "on in this process (t5_attention_kernel='blocked' chooses that from the start)", stacklevel=2)
        return None


# ----------------------------------------------------------------------------------------------
# The relative-position bias passed from the first layer to the others


@dataclass
class OffsetBias:
    """What the fast first layer returns as ``position_bias``: the bias per key - query offset.

    Later layers receive it instead of HF's (1, heads, Lq, Lk) tensor, as HF passes its own;
    ``offsets`` is None where no layer has a bias table (HF then adds zeros)."""

    offsets: torch.Tensor | None
    query_length: int
    key_length: int
    extra: dict | None = None  # LongT5 transient-global: the global bias and block ids
    # what the layers share (Layout.shared): HF gives every layer of a stack the same mask and
    # bias, so a flex block mask (costly: ``create_block_mask``) or local_sdpa's dense bias (saved
    # for backward: once, not once per layer) is built by the first layer and reused by the others
    shared: dict = field(default_factory=dict)

    @classmethod
    def of(cls, module: nn.Module, query_length: int, key_length: int) -> OffsetBias:
        if not getattr(module, "has_relative_attention_bias", False):
            return cls(None, query_length, key_length)
        relative = torch.arange(-(query_length - 1), key_length, device=module.q.weight.device)
        buckets = module._relative_position_bucket(
            relative, bidirectional=not module.is_decoder, num_buckets=module.relative_attention_num_buckets,
            max_distance=module.relative_attention_max_distance,
        )
        # The table's module is called, not its .weight read: ZeRO-3 gathers a partitioned table
        # for a module call (outside the engine's forward too: generate), and an adapter on it applies.
        return cls(module.relative_attention_bias(buckets), query_length, key_length)

    def dense(self, heads: int, dtype: torch.dtype, device) -> torch.Tensor:
        """HF's (1, heads, Lq, Lk) position bias, for a layer that falls back to HF's forward."""
        if self.offsets is None:
            return torch.zeros(1, heads, self.query_length, self.key_length, dtype=dtype, device=device)
        qpos = torch.arange(self.query_length, device=self.offsets.device)[:, None]
        kpos = torch.arange(self.key_length, device=self.offsets.device)[None, :]
        return self.offsets[kpos - qpos + self.query_length - 1].permute(2, 0, 1)[None].to(dtype)


# ----------------------------------------------------------------------------------------------
# T5Attention (T5 and LongT5 self-attention) replacement


def _why_hf(module, key_value_states, position_bias, cache, mask, kwargs) -> str | None:
    """The reason this call must run HF's forward, or None when the fast path is exact."""
    if key_value_states is not None:
        return "cross-attention"
    if module.training and module.dropout > 0:
        return "attention dropout in training"
    if isinstance(position_bias, torch.Tensor):
        return "an HF position bias from an earlier layer"
    if cache is not None and cache.get_seq_length(module.layer_idx) > 0:
        return "generation with a filled cache"
    if mask is not None and not isinstance(mask, torch.Tensor):
        return "a flex BlockMask"
    if kwargs.get("output_attentions"):
        return "attention weights requested"
    return None


def project_heads(module: nn.Module, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(batch, n, d) through one of ``module``'s projections -> (batch, heads, n, head dim)."""
    return linear(x).view(x.shape[0], -1, module.n_heads, module.key_value_proj_dim).transpose(1, 2)


def project_qkv(module: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(project_heads(module, linear, hidden_states) for linear in (module.q, module.k, module.v))


def t5_self_attention_forward(
    self, hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None, past_key_values=None,
    **kwargs,
):
    """Drop-in for ``T5Attention.forward`` / ``LongT5Attention.forward`` (self-attention)."""
    cache = cache if cache is not None else past_key_values
    if _why_hf(self, key_value_states, position_bias, cache, mask, kwargs):
        if isinstance(position_bias, OffsetBias):
            position_bias = position_bias.dense(self.n_heads, hidden_states.dtype, hidden_states.device)
        return self._cached_ds_hf_forward(
            hidden_states, mask=mask, key_value_states=key_value_states, position_bias=position_bias,
            **{_CACHE_KW: cache}, **kwargs,
        )
    batch, length = hidden_states.shape[:2]
    q, k, v = project_qkv(self, hidden_states)
    if cache is not None:  # empty: fill it as HF does (a decoder called with use_cache=True)
        own = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        k, v = own.update(k, v, self.layer_idx)
    if position_bias is None:
        position_bias = OffsetBias.of(self, length, k.shape[2])
    settings = self._cached_ds_settings
    if mask is not None:
        mask = mask.expand(batch, 1, length, k.shape[2])
    layout = Layout(settings.block, position_bias.offsets, mask=mask, causal=bool(getattr(self, "is_causal", self.is_decoder)),
                    shared=position_bias.shared)
    out = attention(q, k, v, layout, use_flex=settings.use_flex)
    out = self.o(out.transpose(1, 2).reshape(batch, length, -1))
    return out, position_bias, None


# ----------------------------------------------------------------------------------------------
# The switch


def attention_targets(model: nn.Module) -> Iterator[tuple[nn.Module, object]]:
    """(attention module, fast forward) for every self-attention this module replaces."""
    from . import longt5_attention as longt5

    for module in model.modules():
        if isinstance(module, (T5LayerSelfAttention, MT5LayerSelfAttention)):  # mT5: T5's modules, copied
            yield module.SelfAttention, t5_self_attention_forward
        yield from longt5.targets(module)


def install_fast_t5_attention(model: nn.Module, block: int = DEFAULT_BLOCK, use_flex: bool = True, local_sdpa: bool = False) -> int:
    """Replace the forward of every T5/LongT5 self-attention in ``model`` (encoder and decoder;
    not cross-attention). Parameters, module tree and state_dict stay the same. Returns how many
    modules were replaced; calling it again only updates the settings. ``local_sdpa``: LongT5's
    local and transient-global layers run ``local_sdpa`` instead (one SDPA call over blocks)."""
    if block < 1:
        raise ValueError(f"block must be a positive number of tokens, got {block}")
    count = 0
    for module, forward in attention_targets(model):
        if "_cached_ds_hf_forward" not in module.__dict__:
            module._cached_ds_hf_forward = module.forward
            module.forward = types.MethodType(forward, module)
        module._cached_ds_settings = Settings(block, use_flex, local_sdpa)
        count += 1
    if count == 0:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"{type(model).__name__} (model_type {model_type!r}) has no T5 or LongT5 self-attention to replace; "
            f"the fast T5 attention is for T5 and LongT5 models (for BART-like ones, leave it off)"
        )
    return count


def remove_fast_t5_attention(model: nn.Module) -> int:
    """Give every replaced module HF's forward back. Returns how many were restored."""
    count = 0
    for module in model.modules():
        if "_cached_ds_hf_forward" in module.__dict__:
            del module.forward, module._cached_ds_hf_forward, module._cached_ds_settings
            count += 1
    return count


@contextmanager
def fast_t5_attention(model: nn.Module, block: int = DEFAULT_BLOCK, use_flex: bool = True):
    """``with fast_t5_attention(model): ...`` installs for the block, then restores HF's forward."""
    install_fast_t5_attention(model, block, use_flex)
    try:
        yield model
    finally:
        remove_fast_t5_attention(model)
