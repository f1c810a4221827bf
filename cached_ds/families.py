"""What CachED needs to know about a Hugging Face encoder–decoder family.

The core computes input embeddings itself (``F.embedding(ids, weight) * scale``) so that the tied
embedding's encoder share of the gradient can be returned from the recompute; that needs the
family's embedding scale. Families with absolute positions (BART, mBART, PEGASUS) also bound the
window by their position table; relative-position families (T5, LongT5) do not.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

# Relative-position families have no position table; these are their default windows.
_DEFAULT_RELATIVE_WINDOW = {"longt5": 4096}
_FALLBACK_RELATIVE_WINDOW = 512


def require_encoder_decoder(model: nn.Module) -> None:
    if hasattr(model, "cached_config") and isinstance(getattr(model, "model", None), nn.Module):  # a CachedSeq2Seq
        raise ValueError(
            f"model is already a {type(model).__name__}: pass the Hugging Face model it wraps (its .model), with its "
            "settings in the DeepSpeed config's \"cached\" section (or the CachedConfig), and it is wrapped once"
        )
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "is_encoder_decoder", False) or not hasattr(model, "get_encoder"):
        raise ValueError(
            f"model must be a Hugging Face encoder–decoder (config.is_encoder_decoder=True), got "
            f"{type(model).__name__}; load one with AutoModelForSeq2SeqLM (BART, mBART, PEGASUS, T5, LongT5)"
        )
    if model.get_output_embeddings() is None:  # BartModel, T5Model: no logits, no loss
        raise ValueError(
            f"{type(model).__name__} has no language-modelling head (no logits or loss for summaries); load the model "
            f"with AutoModelForSeq2SeqLM (e.g. BartForConditionalGeneration), not AutoModel"
        )
    reason = _unsupported(model)
    if reason:
        raise ValueError(
            f"{type(model).__name__} (model_type {config.model_type!r}) is not supported: {reason}; CachED runs "
            f"encoder–decoders built like BART, mBART, PEGASUS, T5 and LongT5 (Marian, mT5, M2M100 and the like)"
        )


def _unsupported(model: nn.Module) -> str | None:
    """Why the core cannot run ``model``'s encoder window by window (it embeds the ids itself
    and calls the encoder with ``inputs_embeds``), or None. Caught here instead of as an
    AttributeError or TypeError deep in the first step."""
    encoder, config = model.get_encoder(), model.config
    if getattr(config, "num_experts", None):
        return "a mixture-of-experts model's loss needs the encoder's router outputs, which windowed encoding does not give"
    embedding = getattr(encoder, "embed_tokens", None)
    if type(embedding).__module__.split(".")[0] == "peft":  # LoRA on it, or peft's trainable tokens
        return (f"an adapter ({type(embedding).__name__}) wraps its input embedding, and CachED embeds the windows' ids "
                f"with the table itself, so the adapter would be dropped; leave embed_tokens / shared out of peft's "
                f"target_modules, modules_to_save and trainable_token_indices")
    if not isinstance(embedding, nn.Embedding):
        return f"its encoder ({type(encoder).__name__}) keeps no embed_tokens embedding for the windows' ids"
    parameters = inspect.signature(encoder.forward).parameters
    required = [p.name for p in parameters.values() if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    if "inputs_embeds" not in parameters or required:
        return f"its encoder's forward does not take inputs_embeds alone (required: {required or 'inputs_embeds missing'})"
    if hasattr(encoder, "embed_positions") and _positions(config, "encoder") is None:
        return "its position table's size is not config.max_position_embeddings, which bounds the window"
    if getattr(config, "attention_type", None) == "block_sparse":  # BigBird-Pegasus
        # HF's encoder switches itself to full attention for good at the first short input (a
        # document's last window), and draws its random blocks with numpy: the recompute would
        # differentiate another function than the forward ran
        return ('its encoder\'s block-sparse attention changes between a window\'s forward and its recompute; '
                'load it with attention_type="original_full" (exact: each window is short)')
    return None


def input_embedding(model: nn.Module) -> nn.Embedding:
    return model.get_encoder().embed_tokens


def embedding_scale(model: nn.Module) -> float:
    """The factor the encoder applies to token embeddings when given ``input_ids``.

    BART/mBART keep it on their scaled embedding module, PEGASUS on the encoder (it scales only
    ids, never ``inputs_embeds``), T5/LongT5 have none."""
    encoder = model.get_encoder()
    for owner in (encoder.embed_tokens, encoder):
        scale = getattr(owner, "embed_scale", None)
        if scale is not None:
            return float(scale)
    return 1.0


def _positions_field(config, side: str) -> str:
    """The config field with the size of the encoder's or decoder's position table: LED names
    each side's (``max_encoder_position_embeddings``: 16384, ``max_decoder_position_embeddings``:
    1024), the others one ``max_position_embeddings`` for both."""
    own = f"max_{side}_position_embeddings"
    return own if getattr(config, own, None) else "max_position_embeddings"


def _positions(config, side: str) -> int | None:
    size = getattr(config, _positions_field(config, side), None)
    return None if size is None else int(size)


def encoder_positions_field(config) -> str:
    return _positions_field(config, "encoder")


def decoder_positions_field(config) -> str:
    return _positions_field(config, "decoder")


def max_window(model: nn.Module) -> int | None:
    """Largest window the encoder can position, or ``None`` for relative-position families."""
    if hasattr(model.get_encoder(), "embed_positions"):
        return _positions(model.config, "encoder")
    return None


def decoder_positions(model: nn.Module) -> int | None:
    """Where learned or sinusoidal decoder positions end (summary tokens, the start token
    included), or ``None`` for relative-position families."""
    if hasattr(model.get_decoder(), "embed_positions"):
        return _positions(model.config, "decoder")
    return None


def max_new_tokens(model: nn.Module, asked: int) -> int:
    """``asked``, capped where the decoder's positions end (BART, mBART, PEGASUS, LED): generating
    past them fails with an index error (a device-side assert on a GPU). The start token takes a
    position too."""
    limit = decoder_positions(model)
    return asked if limit is None else min(asked, limit - 1)


def default_window(model: nn.Module) -> int:
    return max_window(model) or _DEFAULT_RELATIVE_WINDOW.get(model.config.model_type, _FALLBACK_RELATIVE_WINDOW)


def embed(model: nn.Module, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The encoder's input embeddings computed from an explicit ``weight`` (same ops as HF), for
    the encoder to be called with ``inputs_embeds``.

    M2M100/NLLB number positions from the ids where given: a pad id, even inside the text, takes
    the padding position and every later token moves down one; from ``inputs_embeds`` positions
    just count. The difference of the two is added here (zero where a window holds no pad id; the
    position table is fixed: no gradient changes), so the encoder's states are HF's from ids (to
    rounding, where a pad id is inside: e + (a - b) + b against HF's e + a). It
    is read from the table, not through the module: a ZeRO-3 engine traces module calls, and
    ranks whose windows differ in holding a pad id would then trace different ones."""
    embedding = input_embedding(model)
    embeds = nn.functional.embedding(input_ids, weight, embedding.padding_idx)
    scale = embedding_scale(model)
    embeds = embeds * scale if scale != 1.0 else embeds
    positions = getattr(model.get_encoder(), "embed_positions", None)
    if hasattr(positions, "create_position_ids_from_input_ids"):
        pad = positions.padding_idx
        from_ids = positions.create_position_ids_from_input_ids(input_ids, pad, 0)
        counted = positions.create_position_ids_from_inputs_embeds(embeds, 0, pad)
        needed = pad + 1 + input_ids.shape[1]
        if needed > positions.weights.shape[0]:  # as the module's forward grows its table
            positions.make_weights(needed + positions.offset, positions.embedding_dim, pad)
        table = positions.weights.to(embeds.device)
        embeds = embeds + (table[from_ids] - table[counted]).to(embeds.dtype)
    return embeds
