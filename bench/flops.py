"""Model FLOPs of one training step (forward + backward = 3 × forward), recompute not counted.

    F = 6·(P_enc·N + (P_dec - P_xkv)·T + P_xkv·N + V·d·T)   dense layers and LM head
      + 12·d_attn·(L_enc·N·S + L_dec·T·T + L_dec·T·N)        attention scores and values

N document tokens, T target tokens, P_* parameters without embeddings, P_xkv the decoder's
cross-attention key/value projections (they run over the N encoder states, not the T targets),
d_attn = heads × head dim, S = the keys an encoder query is scored against: the window for full
attention (BART); for LongT5 the three blocks of local_radius + 1 that HF's local attention
scores (plus window/16 global tokens for transient-global). The count is the windowed model's
for every method, so model TFLOP/s ranks methods exactly as tokens/s does; it does not credit
recomputation. ``tests/test_bench_flops.py`` checks it against torch's FlopCounterMode.
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
    span = min(3 * (config.local_radius + 1), window)
    if getattr(config, "encoder_attention_type", "local") == "transient-global":
        span += window // config.global_block_size
    return span


def step_flops(model: nn.Module, tokens: int, target_tokens: int, window: int) -> float:
    config = model.config
    encoder, decoder = model.get_encoder(), model.get_decoder()
    enc_layers = sum(1 for _ in _layers(encoder))
    dec_layers = sum(1 for _ in _layers(decoder))
    d_attn = _attention_width(config)
    cross_kv = _cross_attention_kv_params(decoder)
    dense = 6 * (_dense_params(encoder) * tokens + (_dense_params(decoder) - cross_kv) * target_tokens
                 + cross_kv * tokens + config.vocab_size * config.d_model * target_tokens)
    attention = 12 * d_attn * (enc_layers * tokens * _encoder_span(config, window, tokens)
                               + dec_layers * target_tokens * (target_tokens + tokens))
    return float(dense + attention)


def _cross_attention_kv_params(decoder: nn.Module) -> int:
    """Parameters of the decoder's cross-attention key/value projections (BART ``encoder_attn``'s
    k_proj/v_proj, T5 ``EncDecAttention``'s k/v)."""
    total = 0
    for name, module in decoder.named_modules():
        if "encoder_attn" in name or "EncDecAttention" in name:
            for projection in ("k_proj", "v_proj", "k", "v"):
                child = getattr(module, projection, None)
                if isinstance(child, nn.Linear):
                    total += sum(p.numel() for p in child.parameters())
    return total


def _layers(stack: nn.Module):
    return getattr(stack, "layers", None) or getattr(stack, "block")
