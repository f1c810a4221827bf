"""peft's LoRA on a model that CachED trains: the adapters on every projection, including the
decoder cross-attention K/V that streaming cross-attention applies in its own kernel, get the
gradients full backprop of the same peft model gives; what the kernels cannot apply exactly is
refused by name; beam search and the other order of wrapping keep the adapters."""

import copy

import cached_steps
import pytest
import torch
from peft import LoraConfig, get_peft_model
from reference import assert_grads_match, windowed_hf_step
from test_engine_single_rank import CACHED, micro_batches, reference_gradients, train_step
from test_t5_attention import without_attention_dropout
from tiny_models import make_model_without_cross_attention_dropout, random_batch

from cached_ds import CachedConfig, CachedSeq2Seq
from cached_ds.streaming_cross_attention import StreamingCrossAttention, remove_streaming_cross_attention

WINDOW = 16
TARGETS = {"bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"], "t5": ["q", "k", "v", "o", "wi"]}


def with_lora(model, family, dropout=0.0, seed=0, **settings):
    """The model under LoRA with B drawn at random (peft starts it at zero, where an adapter
    dropped from the computation would not change the loss)."""
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS[family], **settings))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return model


def cached_step(model, ids, mask, labels, seed, **settings):
    return cached_steps.cached_step(model, ids, mask, labels, seed, WINDOW, **settings)


def cross_attention_lora_names(grads):
    return [n for n in grads if "lora_" in n and ("encoder_attn.k_proj" in n or "encoder_attn.v_proj" in n
                                                  or "EncDecAttention.k" in n or "EncDecAttention.v" in n)]


@pytest.mark.parametrize("family, bias", [("bart", "none"), ("bart", "lora_bias"), ("t5", "none")])
def test_lora_on_streamed_cross_attention_matches_full_backprop(family, bias):
    """Hidden dropout on: the encoder's re-run replays it, the decoder's draws are HF's."""
    settings = {"lora_bias": True} if bias == "lora_bias" else {}
    model = with_lora(make_model_without_cross_attention_dropout(family, dropout=0.1), family, **settings)
    ids, mask, labels = random_batch([3 * WINDOW + 5, 2 * WINDOW], [6, 4], model.config.pad_token_id)
    ref_loss, ref = windowed_hf_step(copy.deepcopy(model), ids, mask, labels, WINDOW, 1, seed=3)
    loss, grads = cached_step(model, ids, mask, labels, seed=3, cross_attention_block=8)
    assert any(isinstance(m, StreamingCrossAttention) for m in model.modules())
    layers = model.config.num_decoder_layers if family == "t5" else model.config.decoder_layers
    per_layer = 6 if bias == "lora_bias" else 4  # A and B of K and V, and B's bias
    assert len(cross_attention_lora_names(grads)) == per_layer * layers
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads, ref)


def test_two_active_adapters_on_streamed_cross_attention():
    model = with_lora(make_model_without_cross_attention_dropout("bart", dropout=0.0), "bart")
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj"]))
    model.base_model.set_adapter(["default", "second"])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B.second" in name:
                parameter.normal_(0, 0.5)
    ids, mask, labels = random_batch([2 * WINDOW + 3], [5], model.config.pad_token_id)
    _, ref = windowed_hf_step(copy.deepcopy(model), ids, mask, labels, WINDOW, 1, seed=4)
    _, grads = cached_step(model, ids, mask, labels, seed=4, cross_attention_block=8)
    assert any("lora_A.second" in n and "encoder_attn.k_proj" in n for n in grads)
    assert_grads_match(grads, ref)


def test_what_the_streamed_kernel_cannot_apply_is_refused_by_name():
    model = with_lora(make_model_without_cross_attention_dropout("bart", dropout=0.0), "bart", dropout=0.1)
    ids, mask, labels = random_batch([2 * WINDOW], [4], model.config.pad_token_id)
    with pytest.raises(ValueError, match=r"cross-attention k_proj.*lora_dropout=0.1.*target_modules.*cross_attention_block"):
        cached_step(model, ids, mask, labels, seed=1, cross_attention_block=8)
    model.eval()  # no dropout in eval: scored exactly
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, cross_attention_block=8))
    loss = wrapped(ids, mask, labels=labels).loss.detach()
    torch.testing.assert_close(loss, windowed_hf_step(model, ids, mask, labels, WINDOW, None, seed=1)[0])

    dora = get_peft_model(make_model_without_cross_attention_dropout("bart", dropout=0.0),
                          LoraConfig(r=2, target_modules=["k_proj"], use_dora=True))
    with pytest.raises(ValueError, match=r"LoRA variant"):
        cached_step(dora, ids, mask, labels, seed=1, cross_attention_block=8)

    from peft import AdaLoraConfig
    adalora = get_peft_model(make_model_without_cross_attention_dropout("bart", dropout=0.0),
                             AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"k_proj: adapter 'default' is a SVDLinear, not plain LoRA"):
        cached_step(adalora, ids, mask, labels, seed=1, cross_attention_block=8)


def test_an_adapter_on_the_input_embedding_is_refused_by_name():
    model = get_peft_model(make_model_without_cross_attention_dropout("bart"), LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(ValueError, match=r"adapter.*wraps its input embedding.*target_modules"):
        CachedSeq2Seq(model, CachedConfig(window=WINDOW))


@pytest.mark.parametrize("task_type", [None, "SEQ_2_SEQ_LM"])
def test_beam_search_on_a_peft_model_matches_peft(task_type):
    """peft's generate runs the HF model's own: the beams' shared encoder side must be set up there."""
    settings = {"task_type": task_type} if task_type else {}
    model = with_lora(make_model_without_cross_attention_dropout("bart", dropout=0.0), "bart", **settings).eval()
    ids, mask, _ = random_batch([WINDOW - 2, WINDOW - 5], [3, 3], model.config.pad_token_id)
    want = copy.deepcopy(model).generate(input_ids=ids, attention_mask=mask, num_beams=3, max_new_tokens=8, do_sample=False)
    got = CachedSeq2Seq(model, CachedConfig(window=WINDOW)).generate(ids, mask, num_beams=3, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


def test_peft_applied_after_streaming_keeps_its_adapters_in_hf_modules():
    """peft swaps the projections registered on the streaming module; HF's module, run with a KV
    cache and put back on removal, must use the same ones."""
    model = make_model_without_cross_attention_dropout("bart", dropout=0.0)
    CachedSeq2Seq(model, CachedConfig(window=WINDOW, cross_attention_block=8))
    model = with_lora(model, "bart").eval()
    hf = model.get_base_model()
    ids, mask, labels = random_batch([WINDOW - 3], [4], model.config.pad_token_id)
    with torch.no_grad():
        streamed = hf(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).logits
        with_cache = hf(input_ids=ids, attention_mask=mask, labels=labels, use_cache=True).logits  # HF's module
    torch.testing.assert_close(with_cache, streamed)
    remove_streaming_cross_attention(hf)
    assert all(hasattr(layer.encoder_attn.k_proj, "lora_A") for layer in hf.get_decoder().layers)


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_lora_with_streamed_cross_attention_in_a_deepspeed_engine(config):
    """A frozen base under ZeRO: the adapters' gradients equal the plain peft reference's, and
    the base parameters are not in the optimizer."""
    from ds_helpers import resolved_config, single_rank_distributed

    from cached_ds.deepspeed_engine import initialize

    single_rank_distributed()
    model = with_lora(make_model_without_cross_attention_dropout("bart", dropout=0.1), "bart")
    batches = micro_batches(model, gas=2)
    ref = reference_gradients(copy.deepcopy(model), batches)
    engine, *_ = initialize(model, resolved_config(config, gas=2, cached={**CACHED, "cross_attention_block": 8}))
    grads = {k: g for k, g in train_step(engine, batches).items() if g is not None}
    assert set(grads) == {n for n, p in model.named_parameters() if p.requires_grad} == set(ref)
    assert cross_attention_lora_names(grads)
    assert_grads_match({k: g.float() for k, g in grads.items()}, ref)



@pytest.mark.parametrize("family, table", [("t5", "relative_attention_bias"), ("longt5-tglobal", "global_relative_attention_bias")])
def test_lora_on_the_tables_the_fast_t5_kernel_reads(family, table):
    """The kernels call the bias tables' modules (as ZeRO-3 needs), so an adapter there applies."""
    model = without_attention_dropout(make_model_without_cross_attention_dropout(family, dropout=0.1))  # hidden dropout stays
    model = get_peft_model(model, LoraConfig(r=2, target_modules=[table, "q"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:  # peft starts the table's A at zero
                parameter.normal_(0, 0.5)
    ids, mask, labels = random_batch([3 * WINDOW + 5, 2 * WINDOW], [6, 4], model.config.pad_token_id)
    _, ref = windowed_hf_step(copy.deepcopy(model), ids, mask, labels, WINDOW, 1, seed=3)
    _, grads = cached_step(model, ids, mask, labels, seed=3, fast_t5_attention=True, keep_attention_dropout=False)
    assert sum(table in n and "lora_embedding" in n for n in grads) >= 2, sorted(grads)
    assert_grads_match(grads, ref)
