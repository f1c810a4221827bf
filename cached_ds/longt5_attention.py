"""Fast LongT5 encoder attention: local and transient-global, on ``t5_attention``'s blocked kernel
(``flex_attention`` on CUDA, global keys appended to the local ones).

HF's local attention cuts the sequence into blocks of ``local_radius + 1`` tokens and lets each
query see its own and both neighbouring blocks, masking keys further than ``local_radius``:
that is exactly a band ``|key - query| <= local_radius`` (any key that close lies in a
neighbouring block), with the T5 relative bias of ``key - query`` and padded keys masked. So it
is ``BlockedBiasAttention`` with a radius, which skips every key block outside the band.
Transient-global adds one key per ``global_block_size`` tokens: the layer-normed sum of the
block's inputs, projected by the layer's own k/v, with a bias from the first layer's
``global_relative_attention_bias`` at bucket(global block - query's block), attended where
HF's rule ``mask[query] == global_segment_ids[global]`` holds.

    from cached_ds.t5_attention import install_fast_t5_attention
    install_fast_t5_attention(long_t5_model)   # also replaces these two (see t5_attention.py)

The fast first layer hands the later ones an ``OffsetBias`` (HF hands them its (batch, blocks,
heads, block, 3·block) bias with the mask folded in); each layer reads the padding from its own
``mask`` argument, which HF passes to every layer.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.longt5 import modeling_longt5 as hf_longt5

from .t5_attention import (
    Layout,
    OffsetBias,
    SideKeys,
    attention,
    project_heads,
    project_qkv,
    t5_self_attention_forward,
)


def targets(module: nn.Module):
    """(attention module, fast forward) pairs that ``module`` contributes (see ``t5_attention``)."""
    if isinstance(module, hf_longt5.LongT5LayerSelfAttention):
        yield module.SelfAttention, t5_self_attention_forward
    elif isinstance(module, hf_longt5.LongT5LayerLocalSelfAttention):
        yield module.LocalSelfAttention, local_attention_forward
    elif isinstance(module, hf_longt5.LongT5LayerTransientGlobalSelfAttention):
        yield module.TransientGlobalSelfAttention, transient_global_attention_forward


def has_banded_attention(model: nn.Module) -> bool:
    """The model has LongT5 local or transient-global layers (what ``local_sdpa`` runs)."""
    banded = (hf_longt5.LongT5LayerLocalSelfAttention, hf_longt5.LongT5LayerTransientGlobalSelfAttention)
    return any(isinstance(module, banded) for module in model.modules())


def has_transient_global_attention(model: nn.Module) -> bool:
    return any(isinstance(module, hf_longt5.LongT5LayerTransientGlobalSelfAttention) for module in model.modules())


# HF's LongT5 skips its global bias's backward for a window group shorter than one global block (a
# short last window, a rank's one-token stand-in group): ZeRO-3, which gathers each module's
# parameters in its backward, then gathers in another order on that rank than on the others
# (gloo aborts; NCCL hangs or mixes the weights up).
TRANSIENT_GLOBAL_NEEDS_GATHERED = (
    'LongT5 transient-global under ZeRO-3 on several ranks needs "cached.keep_encoder_gathered": true, the encoder '
    "gathered whole while it runs (its parameters on every rank then: about 2 bytes each in bf16), so that no rank's "
    "shorter windows change the order of ZeRO-3's gathers; set it in the config's \"cached\" section "
    "(ds_configs/zero3.json has it), and train through cached_ds.deepspeed_engine.initialize (launchers/train.py does)"
)


def _hf_or_none(self, position_bias, output_attentions):
    """Call HF's forward instead when the fast path would not be exact (see ``t5_attention``)."""
    if not (output_attentions or (self.training and self.dropout > 0) or isinstance(position_bias, torch.Tensor)):
        return False
    if isinstance(position_bias, OffsetBias):
        raise RuntimeError(
            f"{type(self).__name__}: an earlier layer ran the fast attention but this one cannot "
            "(attention dropout in training or output_attentions); install or remove the fast attention "
            "for the whole model, not per layer"
        )
    return True


def _key_padding_from_local_mask(mask: torch.Tensor | None, block_len: int, length: int) -> torch.Tensor | None:
    """HF's local mask (batch, 1, blocks, block, 3·block) holds each token's own padding bit on
    the diagonal of its block (query i against key block_len + i)."""
    if mask is None:
        return None
    diagonal = torch.arange(block_len, device=mask.device)
    own = mask[:, 0, :, diagonal, block_len + diagonal]  # (batch, blocks, block)
    return own.reshape(mask.shape[0], -1)[:, :length] > 0


def local_attention_forward(self, hidden_states, mask=None, position_bias=None, output_attentions=False, **kwargs):
    """Drop-in for ``LongT5LocalAttention.forward``."""
    if _hf_or_none(self, position_bias, output_attentions):
        return self._cached_ds_hf_forward(hidden_states, mask=mask, position_bias=position_bias, output_attentions=output_attentions)
    length = hidden_states.shape[1]
    q, k, v = project_qkv(self, hidden_states)
    if position_bias is None:
        position_bias = OffsetBias.of(self, length, length)
    settings = self._cached_ds_settings
    layout = Layout(
        settings.block, position_bias.offsets, key_valid=_key_padding_from_local_mask(mask, self.block_len, length),
        radius=self.local_radius, shared=position_bias.shared,
    )
    out = attention(q, k, v, layout, use_flex=settings.use_flex, local_sdpa=settings.local_sdpa)
    return self.o(out.transpose(1, 2).reshape(*hidden_states.shape[:2], -1)), position_bias


def _global_inputs(hidden_states: torch.Tensor, block_ids: torch.Tensor, count: int) -> torch.Tensor:
    """Sum of each global block's token states (HF: an einsum with a (batch, L, G) one-hot);
    padding tokens (block id -1) go to a spare row that is dropped. Summed in fp32, as HF's
    matmul accumulates: CUDA's scatter_add_ adds with atomics in no fixed order, and in bf16
    each of a block's 16 adds would round, differently in the no-grad encode and its recompute.
    In fp32 that order moves only the last bits, which the rounding to bf16 almost always hides."""
    index = torch.where(block_ids >= 0, block_ids, count).long()
    wide = torch.promote_types(hidden_states.dtype, torch.float32)
    sums = hidden_states.new_zeros(hidden_states.shape[0], count + 1, hidden_states.shape[2], dtype=wide)
    sums.scatter_add_(1, index[..., None].expand_as(hidden_states), hidden_states.to(wide))
    return sums[:, :count].to(hidden_states.dtype)


def transient_global_attention_forward(self, hidden_states, mask=None, position_bias=None, output_attentions=False, **kwargs):
    """Drop-in for ``LongT5TransientGlobalAttention.forward`` (``mask`` is the (batch, L) padding mask)."""
    if _hf_or_none(self, position_bias, output_attentions):
        return self._cached_ds_hf_forward(hidden_states, mask=mask, position_bias=position_bias, output_attentions=output_attentions)
    batch, length = hidden_states.shape[:2]
    if mask is None:
        mask = torch.ones(batch, length, device=hidden_states.device)
    if position_bias is None:
        position_bias = _first_layer_bias(self, mask, length)
    extra = position_bias.extra
    global_inputs = self.global_input_layer_norm(_global_inputs(hidden_states, extra["block_ids"], extra["side"].segments.shape[1]))
    q, k, v = project_qkv(self, hidden_states)
    side_k, side_v = project_heads(self, self.k, global_inputs), project_heads(self, self.v, global_inputs)
    settings = self._cached_ds_settings
    layout = Layout(settings.block, position_bias.offsets, key_valid=mask > 0, radius=self.local_radius, side=extra["side"],
                    shared=position_bias.shared)
    out = attention(q, k, v, layout, side_k, side_v, extra["table"], use_flex=settings.use_flex, local_sdpa=settings.local_sdpa)
    return self.o(out.transpose(1, 2).reshape(batch, length, -1)), position_bias


def _first_layer_bias(self, mask: torch.Tensor, length: int) -> OffsetBias:
    """Local offsets plus what every layer's global keys share (HF computes these in layer 0 too)."""
    if not self.has_relative_attention_bias:
        raise RuntimeError("LongT5 transient-global: the first encoder layer must own the relative bias tables")
    # HF's own helper, so block ids and orphan-token handling stay identical across versions
    block_ids, segments = hf_longt5._make_global_fixed_block_ids(mask, self.global_block_size)

    def bucket(relative):
        return self._relative_position_bucket(
            relative, bidirectional=not self.is_decoder, num_buckets=self.relative_attention_num_buckets,
            max_distance=self.relative_attention_max_distance,
        )

    bias = OffsetBias.of(self, length, length)
    # The whole table, through its module (as OffsetBias.of): ZeRO-3 gathers it for the call, the
    # result lives on after ZeRO-3 releases the parameter, and autograd carries its gradient back.
    every_bucket = torch.arange(self.relative_attention_num_buckets, device=mask.device)
    table = self.global_relative_attention_bias(every_bucket)
    if segments.shape[1] == 0:  # shorter than a global block: HF's global bias takes no part, and gets no gradient
        table = table.detach()
    side = SideKeys(block_ids, segments, mask, bucket)
    bias.extra = {"block_ids": block_ids, "side": side, "table": table}
    return bias
