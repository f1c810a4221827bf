"""Tiny random-init models of the real architectures (no downloads), dropout on, scaled embeddings on
where the family has them (with the default ``False`` a missing scale would go unnoticed)."""

from __future__ import annotations

import torch
import transformers as hf

VOCAB = 96
DROPOUT = 0.1

_BART_LIKE = dict(
    vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
    decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
    scale_embedding=True,
)
_T5_LIKE = dict(
    vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
    relative_attention_num_buckets=8, relative_attention_max_distance=32, decoder_start_token_id=0,
)

FAMILIES = ("bart", "mbart", "pegasus", "t5", "longt5-local", "longt5-tglobal")
_SPECIAL_IDS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
# more encoder-decoders built like BART (learned or sinusoidal positions, BART-like cross-attention)
MORE_BART_LIKE = {
    "plbart": (hf.PLBartConfig, hf.PLBartForConditionalGeneration, _SPECIAL_IDS),
    "marian": (hf.MarianConfig, hf.MarianMTModel, {**_SPECIAL_IDS, "decoder_start_token_id": 1}),
    "m2m_100": (hf.M2M100Config, hf.M2M100ForConditionalGeneration, {**_SPECIAL_IDS, "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0}),
    "blenderbot": (hf.BlenderbotConfig, hf.BlenderbotForConditionalGeneration, _SPECIAL_IDS),
    "blenderbot-small": (hf.BlenderbotSmallConfig, hf.BlenderbotSmallForConditionalGeneration, _SPECIAL_IDS),
    "pegasus_x": (hf.PegasusXConfig, hf.PegasusXForConditionalGeneration,
                  {**_SPECIAL_IDS, "num_global_tokens": 4, "block_size": 4, "stagger_local_blocks": True}),
    "bigbird_pegasus": (hf.BigBirdPegasusConfig, hf.BigBirdPegasusForConditionalGeneration,
                        {**_SPECIAL_IDS, "attention_type": "original_full"}),
    "led": (hf.LEDConfig, hf.LEDForConditionalGeneration, {**_SPECIAL_IDS, "attention_window": [4, 4]}),
}


def make_model(family: str, dropout: float = DROPOUT, seed: int = 0, **overrides) -> hf.PreTrainedModel:
    torch.manual_seed(seed)
    bart_drop = dict(dropout=dropout, attention_dropout=dropout, activation_dropout=dropout)
    if family == "bart":
        model = hf.BartForConditionalGeneration(hf.BartConfig(**{**_BART_LIKE, **bart_drop, **overrides}))
    elif family == "mbart":
        model = hf.MBartForConditionalGeneration(hf.MBartConfig(**{**_BART_LIKE, **bart_drop, **overrides}))
    elif family == "pegasus":
        model = hf.PegasusForConditionalGeneration(hf.PegasusConfig(**{**_BART_LIKE, **bart_drop, **overrides}))
    elif family == "t5":
        model = hf.T5ForConditionalGeneration(hf.T5Config(**{**_T5_LIKE, "dropout_rate": dropout, **overrides}))
    elif family in MORE_BART_LIKE:
        config_class, model_class, extra = MORE_BART_LIKE[family]
        fields = {**_BART_LIKE, **bart_drop, **extra, **overrides}
        if family == "led":  # each side names its own position table
            fields["max_encoder_position_embeddings"] = fields["max_decoder_position_embeddings"] = fields.pop("max_position_embeddings")
        model = model_class(config_class(**fields))
    elif family == "mt5":
        model = hf.MT5ForConditionalGeneration(hf.MT5Config(**{**_T5_LIKE, "dropout_rate": dropout, **overrides}))
    elif family.startswith("longt5"):
        attention = {"longt5-local": "local", "longt5-tglobal": "transient-global"}[family]
        config = hf.LongT5Config(
            **{**_T5_LIKE, "dropout_rate": dropout, "encoder_attention_type": attention, "local_radius": 3,
               "global_block_size": 4, **overrides}
        )
        model = hf.LongT5ForConditionalGeneration(config)
    else:
        raise KeyError(family)
    return model.train()


def random_batch(lengths: list[int], label_lengths: list[int], pad_token_id: int, seed: int = 1):
    """Right-padded ids/mask for documents of ``lengths`` tokens and -100-padded labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full((len(lengths), max(label_lengths)), -100, dtype=torch.long)
    for row, (n, m) in enumerate(zip(lengths, label_lengths)):
        ids[row, :n] = torch.randint(4, VOCAB, (n,), generator=gen)
        mask[row, :n] = 1
        labels[row, :m] = torch.randint(4, VOCAB, (m,), generator=gen)
    return ids, mask, labels


def cross_attention_modules(model: hf.PreTrainedModel) -> list[torch.nn.Module]:
    """The decoder's cross-attention modules, located with plain HF attribute paths."""
    decoder = model.get_decoder()
    if hasattr(decoder, "layers"):  # BART, mBART, PEGASUS
        return [layer.encoder_attn for layer in decoder.layers]
    return [block.layer[1].EncDecAttention for block in decoder.block]  # T5, LongT5


def make_model_without_cross_attention_dropout(family: str, dropout: float = DROPOUT, seed: int = 0, **overrides):
    """``make_model`` with no dropout on the decoder's cross-attention probabilities (streaming
    cross-attention has none) and every other dropout on. Zeroing the modules' ``dropout`` rather
    than a config field keeps T5's hidden dropout (its ``dropout_rate`` sets both) and BART's
    self-attention dropout (its ``attention_dropout`` sets all attention modules)."""
    model = make_model(family, dropout, seed, **overrides)
    for module in cross_attention_modules(model):
        module.dropout = 0.0
    return model
