"""Model FLOPs of one training step (forward + backward = 3 × forward), recompute not counted.

    F = 6·(P_enc·N + P_dec·T + V·d·T)                       dense layers (P_* without embeddings) and LM head
      + 12·d_attn·(L_enc·N·S + L_dec·T·T + L_dec·T·N)        attention scores and values

N document tokens, T target tokens, d_attn = heads × head dim, S = the keys an encoder query
sees: the window for full attention (BART), 2·radius+1 (+ window/16 global tokens for
transient-global) for LongT5. The count is the windowed model's for every method, so model
TFLOP/s ranks methods exactly as tokens/s does; it does not credit recomputation.
"""

from __future__ import annotations

from torch import nn


def _dense_params(module: nn.Module) -> int:
    """Parameters of a stack minus its embedding tables (lookups, not matrix products)."""
    embedded = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in embedded)


def _attention_width(config) -> int:
    if getattr(config, "d_kv", None):
        return config.num_heads * config.d_kv
    return config.d_model


def _encoder_span(config, window: int, tokens: int) -> int:
    window = min(window, tokens)
    if config.model_type != "longt5":
        return window
    span = min(2 * config.local_radius + 1, window)
    if getattr(config, "encoder_attention_type", "local") == "transient-global":
        span += window // config.global_block_size
    return span


def step_flops(model: nn.Module, tokens: int, target_tokens: int, window: int) -> float:
    config = model.config
    encoder, decoder = model.get_encoder(), model.get_decoder()
    enc_layers = sum(1 for _ in _layers(encoder))
    dec_layers = sum(1 for _ in _layers(decoder))
    d_attn = _attention_width(config)
    dense = 6 * (_dense_params(encoder) * tokens + _dense_params(decoder) * target_tokens
                 + config.vocab_size * config.d_model * target_tokens)
    attention = 12 * d_attn * (enc_layers * tokens * _encoder_span(config, window, tokens)
                               + dec_layers * target_tokens * (target_tokens + tokens))
    return float(dense + attention)


def _layers(stack: nn.Module):
    return getattr(stack, "layers", None) or getattr(stack, "block")
