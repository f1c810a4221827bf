"""Bad input fails early with a ValueError that names the argument and the fix."""

import re

import pytest
import torch
import transformers as hf
from tiny_models import make_model, random_batch

from cached_ds import CachedConfig, CachedSeq2Seq


@pytest.fixture(scope="module")
def wrapped():
    return CachedSeq2Seq(make_model("bart"), CachedConfig(window=16))


def test_empty_document(wrapped):
    ids, mask, labels = random_batch([20, 5], [3, 3], 1)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] are empty documents.*drop empty documents"):
        wrapped(ids, mask, labels=labels)


@pytest.mark.parametrize(
    "labels, message",
    [
        (None, "labels is required"),
        (torch.zeros((1, 0), dtype=torch.long), "labels must be a non-empty"),
        (torch.full((1, 4), -100), "labels must be a non-empty"),
        (torch.ones((2, 4), dtype=torch.long), "labels has 2 rows but input_ids has 1"),
    ],
)
def test_missing_or_empty_labels(wrapped, labels, message):
    ids, mask, _ = random_batch([20], [3], 1)
    with pytest.raises(ValueError, match=message):
        wrapped(ids, mask, labels=labels)


@pytest.mark.parametrize("ids_dtype, labels_dtype, message", [
    (torch.float32, torch.long, "input_ids must hold token ids (an integer dtype), got torch.float32"),
    (torch.long, torch.float32, "labels must hold token ids (an integer dtype, -100 where ignored), got torch.float32"),
])
def test_ids_and_labels_that_are_not_integers(wrapped, ids_dtype, labels_dtype, message):
    ids, mask, labels = random_batch([20], [3], 1)
    with pytest.raises(ValueError, match=re.escape(message)):
        wrapped(ids.to(ids_dtype), mask, labels=labels.to(labels_dtype))


def test_int32_ids_and_labels_give_the_int64_loss(wrapped):
    ids, mask, labels = random_batch([20, 37], [3, 5], 1)
    torch.manual_seed(0)
    want = wrapped(ids, mask, labels=labels).loss
    torch.manual_seed(0)
    assert torch.equal(wrapped(ids.int(), mask.int(), labels=labels.int()).loss, want)


def test_summaries_past_the_decoder_positions_name_the_limit(wrapped):
    ids, mask, _ = random_batch([20], [3], 1)
    labels = torch.randint(4, 50, (1, 65))
    with pytest.raises(ValueError, match=re.escape("the summaries have 65 tokens, past the decoder's 64 positions "
                                                   "(config.max_position_embeddings); truncate them to 64 tokens")):
        wrapped(ids, mask, labels=labels)
    assert wrapped(ids, mask, labels=labels[:, :64]).loss.isfinite()
    with pytest.raises(ValueError, match=re.escape("max_new_tokens=64 runs past the decoder's 64 positions")):
        wrapped.generate(ids, mask, max_new_tokens=64)
    with pytest.raises(ValueError, match=re.escape("max_length=65 runs past")):
        wrapped.generate(ids, mask, max_length=65)
    assert wrapped.generate(ids, mask, max_new_tokens=63, min_new_tokens=63).shape[1] == 64
    # the same lengths given through a GenerationConfig, or the model's own, were an IndexError
    with pytest.raises(ValueError, match=re.escape("generation_config.max_new_tokens=100 runs past the decoder's 64 positions")):
        wrapped.generate(ids, mask, generation_config=hf.GenerationConfig(max_new_tokens=100))
    saved = wrapped.model.generation_config.max_length
    wrapped.model.generation_config.max_length = 100
    try:
        with pytest.raises(ValueError, match=re.escape("model.generation_config.max_length=100 runs past")):
            wrapped.generate(ids, mask)
        # a passed config that leaves max_length unset gets the model's, as in HF
        with pytest.raises(ValueError, match=re.escape("model.generation_config.max_length=100 runs past")):
            wrapped.generate(ids, mask, generation_config=hf.GenerationConfig(min_length=3))
        assert wrapped.generate(ids, mask, max_new_tokens=5).shape[1] <= 6  # max_new_tokens decides: max_length is not read
    finally:
        wrapped.model.generation_config.max_length = saved


def test_models_without_a_language_modelling_head_are_refused():
    with pytest.raises(ValueError, match=r"BartModel has no language-modelling head.*AutoModelForSeq2SeqLM"):
        CachedSeq2Seq(make_model("bart").model)


def test_a_wrapper_is_not_wrapped_again_and_rewrapping_with_other_settings_warns():
    from cached_ds.deepspeed_engine import initialize

    model = make_model("bart")
    wrapper = CachedSeq2Seq(model, CachedConfig(window=16, cross_attention_block=8, keep_attention_dropout=False))
    with pytest.raises(ValueError, match=r"model is already a CachedSeq2Seq: pass the Hugging Face model it wraps \(its .model\)"):
        initialize(wrapper, {"train_micro_batch_size_per_gpu": 1})
    assert CachedSeq2Seq(model, wrapper.cached_config).cached_config == wrapper.cached_config  # the same settings: fine
    with pytest.warns(UserWarning, match=r"wrapped before by a CachedSeq2Seq that changed it in place with other settings \(cross_attention_block 8 then, None now, keep_attention_dropout False then, True now\)"):
        CachedSeq2Seq(model, CachedConfig(window=16))  # still streams, and save_pretrained would say it does not


def test_the_wrapper_is_in_the_mode_of_the_model_it_wraps(tmp_path):
    model = make_model("bart")
    model.save_pretrained(tmp_path)
    loaded = hf.AutoModelForSeq2SeqLM.from_pretrained(tmp_path)  # eval mode, as HF gives it
    assert not CachedSeq2Seq(loaded, CachedConfig(window=16)).training
    assert CachedSeq2Seq(make_model("bart"), CachedConfig(window=16)).training


def test_window_larger_than_positions():
    with pytest.raises(ValueError, match=r"window=65 exceeds the encoder's 64 positions.*set window <= 64"):
        CachedSeq2Seq(make_model("bart"), CachedConfig(window=65))


def test_relative_position_families_take_any_window():
    assert CachedSeq2Seq(make_model("t5"), CachedConfig(window=100_000)).window == 100_000


def test_decoder_only_model():
    gpt2 = hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="must be a Hugging Face encoder–decoder.*AutoModelForSeq2SeqLM"):
        CachedSeq2Seq(gpt2)


_SMALL = dict(vocab_size=50, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
              encoder_ffn_dim=32, decoder_ffn_dim=32)


def _bert2bert():
    bert = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config = hf.EncoderDecoderConfig.from_encoder_decoder_configs(
        hf.BertConfig(**bert), hf.BertConfig(**bert, is_decoder=True, add_cross_attention=True))
    return hf.EncoderDecoderModel(config=config)


UNSUPPORTED = {
    "fsmt": (lambda: hf.FSMTForConditionalGeneration(hf.FSMTConfig(
        langs=["en", "de"], src_vocab_size=50, tgt_vocab_size=50, d_model=16, **{k: v for k, v in _SMALL.items() if k != "vocab_size"})),
        r"does not take inputs_embeds alone \(required: \['input_ids'\]\)"),
    "prophetnet": (lambda: hf.ProphetNetForConditionalGeneration(hf.ProphetNetConfig(
        vocab_size=50, hidden_size=16, encoder_ffn_dim=32, decoder_ffn_dim=32, num_encoder_layers=1, num_decoder_layers=1,
        num_encoder_attention_heads=2, num_decoder_attention_heads=2)), "keeps no embed_tokens"),
    "encoder-decoder": (_bert2bert, "keeps no embed_tokens"),
    "switch_transformers": (lambda: hf.SwitchTransformersForConditionalGeneration(hf.SwitchTransformersConfig(
        vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2, num_experts=2)),
        "mixture-of-experts"),
}


@pytest.mark.parametrize("family", UNSUPPORTED)
def test_encoder_decoders_built_otherwise_are_refused_by_name(family):
    """Not an AttributeError or TypeError from inside the first step."""
    build, reason = UNSUPPORTED[family]
    with pytest.raises(ValueError, match=rf"model_type '{family}'\) is not supported: .*{reason}.*built like BART"):
        CachedSeq2Seq(build())


def test_fast_t5_attention_on_a_model_without_t5_attention():
    from cached_ds.t5_attention import install_fast_t5_attention

    with pytest.raises(ValueError, match=r"BartForConditionalGeneration \(model_type 'bart'\) has no T5 or LongT5 self-attention"):
        install_fast_t5_attention(make_model("bart"))


def test_mismatched_mask_and_ids(wrapped):
    ids, mask, labels = random_batch([20], [3], 1)
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 19\) does not match input_ids shape \(1, 20\)"):
        wrapped(ids, mask[:, :19], labels=labels)


def test_left_padding_is_refused_not_truncated(wrapped):
    ids, mask, labels = random_batch([20, 12], [3, 3], 1)
    with pytest.raises(ValueError, match="right-padded.*padding_side = 'right'"):
        wrapped(ids, mask.flip(1), labels=labels)


@pytest.mark.parametrize("damage", ["hole", "two"])
def test_a_mask_that_is_not_ones_then_zeros_is_refused(wrapped, damage):
    """A zero inside the document, or a value other than 0/1, is not a right-padded mask either."""
    ids, mask, labels = random_batch([20, 12], [3, 3], 1)
    if damage == "hole":
        mask[0, 5] = 0
    else:
        mask[1, 3] = 2
    with pytest.raises(ValueError, match="right-padded"):
        wrapped(ids, mask, labels=labels)


def test_one_dimensional_ids(wrapped):
    ids, _, labels = random_batch([20], [3], 1)
    with pytest.raises(ValueError, match=r"must be 2-D.*unsqueeze\(0\)"):
        wrapped(ids[0], None, labels=labels)


def test_group_budget_smaller_than_window():
    with pytest.raises(ValueError, match="group_tokens=8 is smaller than one window"):
        CachedSeq2Seq(make_model("bart"), CachedConfig(window=16, group_tokens=8))


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(window=0), "window must be a positive integer"),
        (dict(window=True), "window must be a positive integer"),  # JSON's true is not a count
        (dict(group_windows=True), "group_windows must be a positive integer"),
        (dict(group_tokens=False), "group_tokens must be a positive integer"),
        (dict(group_windows=2, group_tokens=64), "either group_windows or group_tokens"),
        (dict(group_windows="some"), "group_windows must be a positive integer or 'all'"),
        (dict(mode="fast"), "mode must be one of"),
        (dict(grad_dtype="int8"), "grad_dtype must be one of"),
        # a kernel choice for a kernel that is off was ignored without a word
        (dict(t5_attention_kernel="blocked"), "t5_attention_kernel='blocked' picks how fast_t5_attention runs, which is off"),
        (dict(cross_attention_kernel="plain"), "cross_attention_kernel='plain' picks how streaming cross-attention runs, which is off"),
    ],
)
def test_config_values(settings, message):
    with pytest.raises(ValueError, match=message):
        CachedConfig(**settings)


def test_unknown_config_key():
    with pytest.raises(ValueError, match=r"unknown CachED settings \['windw'\]; valid keys"):
        CachedConfig.from_dict({"windw": 512})


def test_autograd_grad_and_selected_inputs_are_refused_not_silently_partial():
    """The encoder's parameters are not in the autograd graph (CachED writes their .grad from a
    nested backward): torch.autograd.grad would return None for them and write .grad anyway."""
    model = make_model("bart")
    wrapped = CachedSeq2Seq(model, CachedConfig(window=16))
    ids, mask, labels = random_batch([40], [5], model.config.pad_token_id)
    encoder_weight = model.get_encoder().layers[0].fc1.weight
    decoder_weight = model.get_decoder().layers[0].fc1.weight
    refused = r"accumulated into \.grad by loss\.backward\(\).*requires_grad_\(False\).*mode='full'"
    with pytest.raises(RuntimeError, match=refused):
        torch.autograd.grad(wrapped(ids, mask, labels=labels).loss, list(model.parameters()), allow_unused=True)
    with pytest.raises(RuntimeError, match=refused):
        wrapped(ids, mask, labels=labels).loss.backward(inputs=[model.get_input_embeddings().weight])
    assert encoder_weight.grad is None
    # inputs that do not reach the encoder never run its backward: the decoder's only, as in HF
    wrapped(ids, mask, labels=labels).loss.backward(inputs=[decoder_weight])
    assert encoder_weight.grad is None and decoder_weight.grad is not None
    # ordinary backprop (mode "full") answers autograd.grad for every parameter
    full = CachedSeq2Seq(model, CachedConfig(window=16, mode="full"))
    grads = torch.autograd.grad(full(ids, mask, labels=labels).loss, [encoder_weight, decoder_weight])
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_autograd_grad_of_the_embedding_alone_when_the_encoder_is_frozen():
    """Nothing of the encoder trains but the embedding, an input of the Function: autograd.grad
    gets its exact gradient (that of ordinary backprop) and no .grad is written."""
    model = make_model("bart", dropout=0.0)
    embedding = model.get_input_embeddings().weight
    for p in model.get_encoder().parameters():
        p.requires_grad_(p is embedding)
    ids, mask, labels = random_batch([40], [5], model.config.pad_token_id)
    grads = {mode: torch.autograd.grad(CachedSeq2Seq(model, CachedConfig(window=16, mode=mode))(ids, mask, labels=labels).loss,
                                       [embedding])[0] for mode in ("cached", "full")}
    torch.testing.assert_close(grads["cached"], grads["full"], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())
