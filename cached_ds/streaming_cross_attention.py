"""Decoder cross-attention over very long encoder states without N-sized activations: HF's
cross-attention modules replaced by ones that run ``streaming_attention`` (key blocks with an
online softmax, K/V projected on the fly and again in backward: nothing N-sized saved beyond the
states themselves).

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
- **Adapters**: the K/V projections are read through ``projections.linear_parts`` each call, so
  peft's LoRA on them is applied here too (its low-rank terms ride along each block's
  projection). What cannot be applied exactly (LoRA dropout, DoRA) is refused by name.
- Not covered here: DeepSpeed ZeRO-3 (the K/V weights are read outside their ``nn.Linear``'s
  forward, where ZeRO-3 has them partitioned): ``deepspeed_engine`` makes these modules leaves.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .gradient_sink import GradientSink, attach, sink_of
from .host_offload import to_device
from .projections import linear_parts
from .streaming_attention import DEFAULT_BLOCK, LENGTHS_TAG, visible_lengths, stacked_low_rank, streaming_cross_attention
from .tensor_tags import get_tag, set_tag


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


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, n, head_dim) -> (batch, n, heads * head_dim)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


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
    lengths = visible_lengths(keep, mask.shape[0], mask.shape[1])
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
