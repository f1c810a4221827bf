"""Beam search over long documents with one copy of each document's encoder side, shared by its beams.

HF's ``generate`` repeats the encoder states ``num_beams`` times (``_expand_inputs_for_generation``),
and every decoder layer's cross-attention then caches K and V of shape (batch·beams, heads, N,
head_dim): with N in the hundreds of thousands, beams multiply the largest tensors of generation.
None of it differs between the beams of a document, so here, for one ``generate`` call:

- the encoder states and mask stay at batch = documents (HF's expansion skips ``encoder_outputs``,
  and HF is given no encoder mask: the cross-attention modules hold it);
- each decoder layer's cross-attention projects K/V once per document on its first step and keeps
  them until the call ends; the queries of a document's beams are grouped, (docs·beams, heads, t,
  head_dim) -> (docs, heads, beams·t, head_dim), and attend to (docs, heads, N, head_dim) — a
  broadcast, never a repeat — through the streaming modules' online softmax (one key block's
  scores at a time).

    with shared_beam_generation(model, fused_mask):
        ids = model.generate(encoder_outputs=encoder_outputs, num_beams=4)   # no attention_mask

``CachedSeq2Seq.generate`` does this. Why it stays exact: HF's beam search reorders the cache with
``beam_idx`` = document·num_beams + beam, so beams never leave their document's block of rows;
only the self-attention cache is reordered, and cross-attention K/V are the same for every beam of
a document. Greedy and sampling are the same computation with one (or ``num_return_sequences``)
query row per document.

Decisions:

- **Hook**: an instance attribute shadows ``_expand_inputs_for_generation`` for the call and calls
  HF's own with ``is_encoder_decoder=False`` and no ``encoder_outputs`` (the decoder ids and every
  other kwarg are still expanded by HF). Its signature is the same in transformers 5.17 (a
  staticmethod) and 5.24 (a method), both called with keywords only.
- **Modules**: the decoder's cross-attention modules are ``StreamingCrossAttention``s for the call
  (installed on demand and removed after; modules a user installed for training stay, with their
  ``block``). HF's cross-attention cache stays empty, so ``reorder_cache`` has nothing to move there.
- **Families**: those of ``streaming_cross_attention.LAYOUTS``; for others ``generate_shared``
  runs plain HF ``generate`` (per-beam copies).
- No attention dropout and no cross-attention weights (``output_attentions`` gets ``None``), as
  with streaming cross-attention in training. A model left in training mode with cross-attention
  dropout (``generate`` does not switch to eval, and HF drops attention probabilities there)
  runs plain HF ``generate`` instead, with a warning: same tokens as HF, per-beam copies.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .streaming_attention import DEFAULT_BLOCK, attend_to_cached
from .streaming_cross_attention import LAYOUTS, layout_of, streaming_cross_attention_installed

EXPANSION_HOOK = "_expand_inputs_for_generation"
PROCESSORS_HOOK = "_get_logits_processor"  # generate calls it with encoder_input_ids= (transformers 5.x)


class SharedEncoderSide:
    """The encoder side of one ``generate`` call, once per document: the key mask (documents, N)
    and each cross-attention layer's K/V, projected on the layer's first step and reused after."""

    def __init__(self, fused_mask: torch.Tensor):
        keep = fused_mask.bool()
        self.documents = keep.shape[0]
        self.keep = None if bool(keep.all()) else keep
        self._key_values: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, module: nn.Module, query: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """``module``'s attention output for ``query`` (documents·copies, heads, t, head_dim), rows
        grouped by document as HF lays them out; ``states`` (documents, N, d)."""
        if states.shape[0] != self.documents or query.shape[0] % self.documents:
            raise RuntimeError(
                f"cross-attention got states for {states.shape[0]} rows and queries for {query.shape[0]} "
                f"rows, but generation is over {self.documents} documents: transformers expanded the "
                f"encoder states per beam ({EXPANSION_HOOK} changed?)"
            )
        if module not in self._key_values:
            self._key_values[module] = module.key_value(states)
        key, value = self._key_values[module]
        grouped = attend_to_cached(_group_copies(query, self.documents), key, value, self.keep, module.scale, module.block)
        return _ungroup_copies(grouped, query.shape[0])


def _group_copies(query: torch.Tensor, documents: int) -> torch.Tensor:
    """(documents·copies, heads, t, head_dim) -> (documents, heads, copies·t, head_dim)."""
    rows, heads, target, head_dim = query.shape
    return query.view(documents, rows // documents, heads, target, head_dim).transpose(1, 2).reshape(
        documents, heads, -1, head_dim
    )


def _ungroup_copies(out: torch.Tensor, rows: int) -> torch.Tensor:
    """The inverse of ``_group_copies``."""
    documents, heads, _, head_dim = out.shape
    return out.view(documents, heads, rows // documents, -1, head_dim).transpose(1, 2).reshape(rows, heads, -1, head_dim)


@contextmanager
def shadowed_method(model: nn.Module, name: str, make: Callable) -> Iterator[None]:
    """Inside, ``model.<name>`` is ``make(hf_method)`` (an instance attribute over the class's
    method; one already there is put back after). A peft model's generate runs the HF model's
    own: the method is shadowed there."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    shadowed = model.__dict__.get(name)
    model.__dict__[name] = make(getattr(model, name))
    try:
        yield
    finally:
        if shadowed is None:
            del model.__dict__[name]
        else:
            model.__dict__[name] = shadowed


def encoder_outputs_not_expanded(model: nn.Module):
    """HF ``generate`` on ``model`` expands everything per beam except ``encoder_outputs``."""
    def make(hf_expand):
        def expand(expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
            encoder_outputs = model_kwargs.pop("encoder_outputs", None)
            input_ids, model_kwargs = hf_expand(expand_size=expand_size, is_encoder_decoder=False, input_ids=input_ids, **model_kwargs)
            if encoder_outputs is not None:
                model_kwargs["encoder_outputs"] = encoder_outputs
            return input_ids, model_kwargs
        return expand

    return shadowed_method(model, EXPANSION_HOOK, make)


def document_ids_for_processors(model: nn.Module, input_ids: torch.Tensor):
    """HF ``generate`` given encoder outputs builds its logits processors without the encoder's
    ids (a -100 placeholder): ``encoder_repetition_penalty`` and ``encoder_no_repeat_ngram_size``
    are then dropped with a warning that no input_ids were passed. Inside, they get
    ``input_ids``, and HF builds them in its own order."""
    def make(hf_processors):
        def processors(*args, **kwargs):
            return hf_processors(*args, **{**kwargs, "encoder_input_ids": input_ids})
        return processors

    return shadowed_method(model, PROCESSORS_HOOK, make)


@contextmanager
def shared_beam_generation(model: nn.Module, fused_mask: torch.Tensor, block: int | None = None) -> Iterator[None]:
    """Inside, ``model.generate(encoder_outputs=...)`` (no ``attention_mask``: ``fused_mask``,
    (documents, N), is it) keeps one copy of the encoder side per document. ``block``: key tokens
    per online-softmax step for cross-attention modules installed here."""
    side = SharedEncoderSide(fused_mask)
    with streaming_cross_attention_installed(model, block or DEFAULT_BLOCK) as modules, encoder_outputs_not_expanded(model):
        for module in modules:
            module.shared_encoder_side = side
        try:
            yield
        finally:
            for module in modules:
                module.shared_encoder_side = None


def generate_shared(model: nn.Module, encoder_outputs, fused_mask: torch.Tensor, block: int | None = None, **generate_kwargs):
    """``model.generate`` on given encoder outputs and their mask, beams sharing the encoder side
    where the family is supported (plain HF ``generate`` otherwise)."""
    supported = model.config.model_type in LAYOUTS
    dropout = supported and _cross_attention_dropout(model)
    if dropout:
        warnings.warn(
            f"generate() on a model in training mode with cross-attention dropout {dropout}: HF's generate "
            f"runs, dropping attention probabilities as HF does, with the encoder states copied per beam; "
            f"call model.eval() first to generate with one copy per document and no dropout",
            stacklevel=3,
        )
    if not supported or dropout:
        return model.generate(encoder_outputs=encoder_outputs, attention_mask=fused_mask, **generate_kwargs)
    with shared_beam_generation(model, fused_mask, block):
        return model.generate(encoder_outputs=encoder_outputs, **generate_kwargs)


def _cross_attention_dropout(model: nn.Module) -> float:
    """The attention-probability dropout HF's generate would apply in the decoder's cross-attention
    (a module in training mode with a non-zero ``dropout``), 0.0 if none would."""
    modules = [getattr(parent, name) for parent, name in layout_of(model).slots(model.get_decoder())]
    return max((float(m.dropout) for m in modules if m.training), default=0.0)
