"""Encoder-decoders beyond the five the toolkit is built around, as people use them for long
documents and translation: each trains exactly against the windowed HF reference (dropout on),
with streaming cross-attention too, and generates HF's tokens; what cannot be exact is refused."""

import copy

import cached_steps
import pytest
import torch
import transformers as hf
from reference import assert_grads_match, windowed_hf_step
from tiny_models import MORE_BART_LIKE, make_model, make_model_without_cross_attention_dropout, random_batch

from cached_ds import CachedConfig, CachedSeq2Seq, families
from cached_ds.streaming_cross_attention import LAYOUTS

WINDOW = 16
FAMILIES = [*MORE_BART_LIKE, "mt5"]


def cached_step(model, ids, mask, labels, seed, **settings):
    return cached_steps.cached_step(model, ids, mask, labels, seed, WINDOW, **settings)


@pytest.mark.parametrize("family, streaming", [(f, False) for f in FAMILIES] + [(f, True) for f in FAMILIES if f in LAYOUTS],
                         ids=[f"{f}-hf-cross-attention" for f in FAMILIES] + [f"{f}-streaming" for f in FAMILIES if f in LAYOUTS])
def test_training_step_equals_the_windowed_hf_reference(family, streaming):
    model = make_model_without_cross_attention_dropout(family) if streaming else make_model(family)
    ids, mask, labels = random_batch([2 * WINDOW + 8, WINDOW + 7], [6, 4], model.config.pad_token_id)
    ref_loss, ref = windowed_hf_step(copy.deepcopy(model), ids, mask, labels, WINDOW, 1, seed=5)
    loss, grads = cached_step(model, ids, mask, labels, seed=5, **({"cross_attention_block": 8} if streaming else {}))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads, ref)


@pytest.mark.parametrize("family", ["bart", "t5", *FAMILIES])
def test_special_ids_inside_the_text_train_as_hf_reads_them(family):
    """Pad, start and end ids inside a document (a tokenizer gives them for "<pad>" in the text):
    M2M100/NLLB position a pad id as padding and shift the tokens after it, which CachED, calling
    the encoder with embeddings, did not (1.3e-2 gradient error)."""
    model = make_model(family)
    config = model.config
    ids, mask, labels = random_batch([2 * WINDOW + 8, WINDOW + 7], [6, 4], config.pad_token_id)
    special = [i for i in (getattr(config, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id")) if i is not None]
    for row, column in ((0, 3), (0, WINDOW + 2), (0, 2 * WINDOW + 5), (1, 9)):
        ids[row, column] = special[(row + column) % len(special)]
    assert (ids[mask.bool()] == config.pad_token_id).sum() >= 2
    ref_loss, ref = windowed_hf_step(copy.deepcopy(model), ids, mask, labels, WINDOW, 1, seed=5)
    loss, grads = cached_step(model, ids, mask, labels, seed=5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_equals_hf_on_a_document_within_one_window(family):
    model = make_model(family).eval()
    ids, mask, _ = random_batch([WINDOW - 2, WINDOW - 6], [1, 1], model.config.pad_token_id, seed=3)
    want = copy.deepcopy(model).generate(input_ids=ids, attention_mask=mask, num_beams=3, max_new_tokens=6, do_sample=False)
    got = CachedSeq2Seq(model, CachedConfig(window=WINDOW)).generate(ids, mask, num_beams=3, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_led_windows_use_its_encoder_positions_and_summaries_its_decoder_ones():
    """LED names each side's position table: windows are bounded by the encoder's, generated
    summaries by the decoder's (a cap by the encoder's would run past the decoder's table).
    Streaming cross-attention is refused for it by name."""
    model = make_model("led", max_position_embeddings=64)
    model.config.max_decoder_position_embeddings = 32
    assert families.max_window(model) == 64
    assert families.max_new_tokens(model, 1000) == 31
    with pytest.raises(ValueError, match=r"window=65 exceeds the encoder's 64 positions \(config.max_encoder_position_embeddings"):
        CachedSeq2Seq(model, CachedConfig(window=65))
    with pytest.raises(ValueError, match="streaming cross-attention supports .* got model_type='led'"):
        CachedSeq2Seq(model, CachedConfig(window=WINDOW, cross_attention_block=8))


def test_bigbird_block_sparse_attention_is_refused_naming_the_fix():
    """HF's BigBird encoder switches to full attention for good at the first short input (a last
    window) and draws its random blocks with numpy: the recompute would not be the forward."""
    config = hf.BigBirdPegasusConfig(**{**make_model("bigbird_pegasus").config.to_dict(), "attention_type": "block_sparse"})
    model = hf.BigBirdPegasusForConditionalGeneration(config)
    with pytest.raises(ValueError, match='block-sparse attention.*attention_type="original_full"'):
        CachedSeq2Seq(model, CachedConfig(window=WINDOW))


def test_mt5_on_the_fast_t5_attention():
    """mT5 is T5 in copied module classes: the fast kernels take it from the "cached" settings."""
    model = make_model("mt5")
    for module in model.modules():  # the fast path has no attention-probability dropout
        if type(module).__name__ == "MT5Attention":
            module.dropout = 0.0
    ids, mask, labels = random_batch([2 * WINDOW + 8, WINDOW + 7], [6, 4], model.config.pad_token_id)
    _, ref = windowed_hf_step(copy.deepcopy(model), ids, mask, labels, WINDOW, 1, seed=5)
    _, grads = cached_step(model, ids, mask, labels, seed=5, fast_t5_attention=True)
    assert any("_cached_ds_hf_forward" in m.__dict__ for m in model.modules())
    assert_grads_match(grads, ref)
