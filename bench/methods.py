"""The four ways of training one long document that the sweep compares, each a DeepSpeed engine
built from the same config (ZeRO stage, precision, AdamW), so only the method differs.

- ``full``: cached_ds's windowed fusion-in-decoder with ordinary backprop (``mode="full"``).
- ``full_gc``: the same with HF gradient checkpointing in encoder and decoder.
- ``hf_ds_gc``: what users run today, plain HF + DeepSpeed + HF gradient checkpointing and no
  cached_ds code: BART-style models (a learned 1024-position table) as a windowed
  fusion-in-decoder (``WindowedFusionInDecoder`` below); T5/LongT5 on the whole input.
- ``cached``: cached_ds's CachED through ``deepspeed_engine.initialize``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("full", "full_gc", "hf_ds_gc", "cached")


class WindowedFusionInDecoder(nn.Module):
    """The windowed baseline as users write it with plain HF calls: the document cut into
    ``window``-token rows, one HF encoder call on all of them, the states concatenated back into
    one sequence per document and given to the HF decoder (``encoder_outputs``)."""

    def __init__(self, model: nn.Module, window: int):
        super().__init__()
        self.model, self.window = model, window

    def forward(self, input_ids, attention_mask, labels):
        batch, length = input_ids.shape
        pad = (-length) % self.window
        ids = F.pad(input_ids, (0, pad), value=self.model.config.pad_token_id)
        mask = F.pad(attention_mask, (0, pad))
        states = self.model.get_encoder()(
            input_ids=ids.view(-1, self.window), attention_mask=mask.view(-1, self.window)
        ).last_hidden_state
        states = states.reshape(batch, ids.shape[1], -1)
        return self.model(encoder_outputs=(states,), attention_mask=mask, labels=labels, use_cache=False)


class WholeInput(nn.Module):
    """T5/LongT5 as users run them: one HF call on the whole document."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)


def without_attention_dropout(model: nn.Module) -> None:
    """Attention-probability dropout off in every attention module (BART-style ``k_proj``, T5-style
    ``k``): the kernels have none, and the sweep applies it to every method alike. Hidden and
    feed-forward dropout stay on."""
    for module in model.modules():
        if isinstance(getattr(module, "dropout", None), float) and (hasattr(module, "k_proj") or hasattr(module, "k")):
            module.dropout = 0.0


def enable_hf_checkpointing(model: nn.Module) -> None:
    # Non-reentrant: the reentrant variant needs inputs that require grad and misses parameter
    # gradients under ZeRO-3 otherwise; it is what HF recommends with DeepSpeed.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_engine(method: str, model: nn.Module, ds_config: dict, window: int, group_tokens: int, extra: dict | None = None):
    """A DeepSpeed engine whose ``engine(input_ids=, attention_mask=, labels=)`` returns HF's output.
    ``extra``: more "cached" settings for ``cached`` (``cross_attention_block``, ``fast_t5_attention``,
    ``keep_graphs_bytes``, ``keep_decoder_gathered``)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "hf_ds_gc":
        import deepspeed

        from cached_ds import families

        enable_hf_checkpointing(model)
        # Relative positions (T5/LongT5) take the whole input; a position table (BART) needs windows.
        module = WholeInput(model) if families.max_window(model) is None else WindowedFusionInDecoder(model, window)
        engine, *_ = deepspeed.initialize(model=module, config=ds_config, model_parameters=[p for p in module.parameters() if p.requires_grad])
        return engine

    from cached_ds.deepspeed_engine import initialize

    if method == "full_gc":
        enable_hf_checkpointing(model)
    streaming = bool((extra or {}).get("cross_attention_block"))
    cached = {
        "window": window,
        "group_tokens": group_tokens,
        "mode": "cached" if method == "cached" else "full",
        # CachED's decoder side grows with the document (HF's cross-attention keeps every layer's
        # N-sized K/V): checkpointing the decoder keeps one layer's worth, as full_gc and hf_ds_gc
        # do. Streaming cross-attention keeps nothing N-sized, so there checkpointing would only
        # re-run the decoder, N-sized K/V projections included, for target-sized savings.
        "decoder_gradient_checkpointing": method == "cached" and not streaming,
    }
    if method == "cached":
        cached.update(extra or {})
        if ds_config["zero_optimization"]["stage"] == 3:  # as the shipped zero3.json; ``extra`` may say otherwise
            cached.setdefault("keep_encoder_gathered", True)
            cached.setdefault("keep_decoder_gathered", True)
    engine, *_ = initialize(model, {**ds_config, "cached": cached})
    return engine


def attn_implementation(model: nn.Module) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def window_for(model: nn.Module, requested: int | None) -> int:
    """The encoder window: the request, else cached_ds's default for the family (BART: its 1024
    positions, LongT5: 4096)."""
    from cached_ds import families  # here, not at the top: sweep.py imports this module without cached_ds

    return requested or families.default_window(model)


def random_document(method: str, tokens: int, target_tokens: int, vocab: int, device, seed: int = 0) -> dict:
    """One document and its summary, placed as ``method`` takes them: HF's models read the ids on
    the device; cached_ds's keep the document in host memory, as its trainer does
    (``cached_ds.host_offload.placed``)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (1, tokens), generator=gen)
    labels = torch.randint(4, vocab, (1, target_tokens), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if method == "hf_ds_gc":
        return {k: v.to(device) for k, v in batch.items()}
    # here: sweep.py imports this module without cached_ds; and not through cached_ds.trainer,
    # which needs datasets and rouge-score, which the GPU machine lacks
    from cached_ds.host_offload import placed

    return placed(batch, torch.device(device))
