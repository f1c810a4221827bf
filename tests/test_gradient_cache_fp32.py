"""The gradient cache is written out of band in fp32 when the decoder streams cross-attention.

``encode_windows`` (cached mode) hands the decoder fused states that carry a ``GradientSink``;
streaming cross-attention layers add d(loss)/d(states) into its fp32 buffer instead of returning
N-sized gradients for autograd to sum in the states' dtype, and ``CachedEncoderFunction.backward``
takes the buffer (plus whatever autograd delivered from layers that ran HF's module) as the
gradient cache. Observed here through plain hooks: a forward pre-hook on the HF decoder sees the
states it is given, a tensor hook on them sees what autograd delivers."""

import copy
import math

import pytest
import torch
from op_meters import OpOutputs
from reference import (
    assert_grads_match,
    grads_of,
    windowed_encoder_states,
    windowed_hf_step,
)
from tiny_models import (
    make_model,
    make_model_without_cross_attention_dropout,
    random_batch,
)
from transformers.modeling_outputs import BaseModelOutput

from cached_ds import CachedConfig, CachedSeq2Seq, encode_windows
from cached_ds.gradient_sink import GradientSink, detach_sink, sink_of
from cached_ds.streaming_cross_attention import install_streaming_cross_attention

WINDOW = 16
BLOCK = 7
SEED = 1234


class DecoderStates:
    """Records the encoder states the HF decoder is called with, and every gradient autograd
    delivers to them (``None`` when no layer returned one: gradients are not materialised).
    ``drop_sink`` removes the sink before the decoder runs: every layer then returns its states
    gradient through autograd, summed in the states' dtype (the path without this feature)."""

    def __init__(self, model, drop_sink: bool = False):
        self.states, self.sinks, self.through_autograd = [], [], []
        self.drop_sink = drop_sink
        self.handle = model.get_decoder().register_forward_pre_hook(self._see, with_kwargs=True)

    def _see(self, module, args, kwargs):
        states = kwargs["encoder_hidden_states"]
        self.states.append(states)
        self.sinks.append(sink_of(states))
        if self.drop_sink:
            detach_sink(states)
        if states.requires_grad:
            states.register_hook(self.through_autograd.append)

    def remove(self):
        self.handle.remove()


def revert_last_layer(model) -> None:
    """Put HF's own cross-attention back in the last decoder layer only (not the first: in T5 the
    position bias HF's module returns is passed on, and every later layer would run HF's too)."""
    decoder = model.get_decoder()
    if hasattr(decoder, "layers"):
        decoder.layers[-1].encoder_attn = decoder.layers[-1].encoder_attn.original
    else:
        decoder.block[-1].layer[1].EncDecAttention = decoder.block[-1].layer[1].EncDecAttention.original


@pytest.mark.parametrize("one_hf_layer", [False, True], ids=["all-streaming", "last-layer-hf"])
@pytest.mark.parametrize("family", ["bart", "t5"])
def test_cached_streaming_equals_windowed_hf(family, one_hf_layer):
    """fp32, dropout on (but on cross-attention probabilities), 2 padded documents in 3 window
    groups: equal to plain HF backprop through the same windowed model. With every layer
    streaming, autograd delivers no states gradient at all and the sink holds every layer's
    blocks; with the last layer running HF's module, both shares reach the gradient cache."""
    model = make_model_without_cross_attention_dropout(family)
    reference = copy.deepcopy(model)
    installed = install_streaming_cross_attention(model, block=BLOCK)
    if one_hf_layer:
        revert_last_layer(model)
    ids, mask, labels = random_batch([3 * WINDOW + 5, WINDOW + 2], [7, 4], model.config.pad_token_id)
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=2))
    assert len(wrapped.plan(ids, mask).groups) == 3

    seen = DecoderStates(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    loss = wrapped(ids, mask, labels=labels).loss
    loss.backward()
    seen.remove()
    ref_loss, ref = windowed_hf_step(reference, ids, mask, labels, WINDOW, 2, SEED)

    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads_of(model), ref)
    [sink] = seen.sinks
    assert isinstance(sink, GradientSink) and sink.total is None, "the backward took the sink's total"
    streaming_layers = len(installed) - one_hf_layer
    assert sink.blocks_added == streaming_layers * math.ceil(ids.shape[1] / BLOCK)
    if one_hf_layer:
        [delivered] = seen.through_autograd
        assert delivered is not None and delivered.shape == seen.states[0].shape
    else:
        assert all(g is None for g in seen.through_autograd), "no layer returned an N-sized states gradient"


def test_sink_only_on_the_cached_encoder_output():
    """``full`` mode and encoding without autograd are unchanged: no sink on their states."""
    model = make_model("bart", dropout=0.0)
    install_streaming_cross_attention(model)
    ids, mask, _ = random_batch([2 * WINDOW + 3], [5], model.config.pad_token_id)
    plan = CachedSeq2Seq(model, CachedConfig(window=WINDOW)).plan(ids, mask)
    assert isinstance(sink_of(encode_windows(model, plan, "cached")), GradientSink)
    assert sink_of(encode_windows(model, plan, "full")) is None
    with torch.no_grad():
        assert sink_of(encode_windows(model, plan, "cached")) is None


class _NoStatesGradient(torch.autograd.Function):
    """Consumes ``states`` in the graph but returns no gradient for them (``None``)."""

    @staticmethod
    def forward(ctx, states, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def test_no_states_gradient_gives_zero_encoder_gradients():
    """Neither the sink nor autograd delivers anything: the encoder still gets its (zero)
    gradients, once, as when autograd materialised a zero gradient cache."""
    model = make_model("bart", dropout=0.0)
    ids, mask, _ = random_batch([2 * WINDOW + 3, WINDOW], [5, 3], model.config.pad_token_id)
    plan = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=1)).plan(ids, mask)
    model.zero_grad(set_to_none=True)
    x = torch.ones(3, requires_grad=True)
    out = _NoStatesGradient.apply(encode_windows(model, plan), x).sum()
    keys = int(mask.sum(1).max())
    with OpOutputs(lambda t: keys in t.shape and t.numel() >= keys * model.config.d_model, new_only=True) as n_sized:
        out.backward()
    assert n_sized.made == [], "the zero gradient cache is one row, expanded"
    encoder = dict(model.get_encoder().named_parameters())
    assert encoder and all(p.grad is not None and not p.grad.any() for p in encoder.values())
    assert torch.equal(x.grad, torch.ones(3))


DECODER_LAYERS = 6


def bf16_encoder_fp32_decoder(seed: int):
    """T5 whose encoder layers are bf16 (so the fused states are bf16; T5's layer norm casts to
    its weight's dtype) and whose decoder, LM head and shared embedding stay fp32: every decoder
    layer's states gradient is computed in fp32, so where the layers' shares are summed is what
    decides the gradient cache's precision."""
    model = make_model_without_cross_attention_dropout("t5", dropout=0.0, seed=seed, num_decoder_layers=DECODER_LAYERS)
    encoder = model.get_encoder()
    encoder.block.to(torch.bfloat16)
    encoder.final_layer_norm.to(torch.bfloat16)
    return model


def encoder_error(grads, ref) -> float:
    num = sum(float((grads[k].double() - ref[k].double()).pow(2).sum()) for k in ref)
    return (num / sum(float(ref[k].double().pow(2).sum()) for k in ref)) ** 0.5


def test_fp32_gradient_cache_beats_summing_in_bf16():
    """bf16 states, 6 streaming decoder layers. Reference, from plain HF calls only: the exact
    d(loss)/d(states) of an fp64 copy of the model on the very states the decoder was given,
    rounded once to bf16 and backpropagated through the same bf16 encoder. The fp32 sink rounds
    the summed cache once, as the reference does, so it lands on (or within an ulp of) it; with
    the sink removed autograd sums 6 bf16 gradients in bf16, several roundings off.

    The reference isolates the summation on purpose: against a plain fp32 reference, in this
    model or in an all-bf16 one (where each layer's share is itself computed in bf16), both
    runs are off by the same forward and per-layer rounding and the two errors are within 10%
    of each other."""
    model = bf16_encoder_fp32_decoder(seed=0)
    ids, mask, labels = random_batch([6 * WINDOW + 5, 3 * WINDOW], [12, 5], model.config.pad_token_id, seed=5)
    fp64 = copy.deepcopy(model).double()
    reference = copy.deepcopy(model)
    install_streaming_cross_attention(model, block=64)
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW))  # one group: the reference runs it as one call
    encoder_keys = [name for name, p in model.named_parameters() if p.dtype == torch.bfloat16]
    assert encoder_keys and all(k.startswith("encoder.") for k in encoder_keys)

    grads, states = {}, {}
    for drop_sink in (False, True):
        seen = DecoderStates(model, drop_sink=drop_sink)
        model.zero_grad(set_to_none=True)
        wrapped(ids, mask, labels=labels).loss.backward()
        seen.remove()
        [sink], [states[drop_sink]] = seen.sinks, seen.states
        assert states[drop_sink].dtype == torch.bfloat16
        assert (sink.blocks_added > 0) != drop_sink, "the sink was used exactly when it was left on"
        grads[drop_sink] = {k: g for k, g in grads_of(model).items() if k in encoder_keys}
    assert torch.equal(states[False], states[True]), "both runs decode the same states"

    exact = states[False].detach().double().requires_grad_()
    fused, fused_mask = windowed_encoder_states(reference, ids, mask, WINDOW, None)
    fp64(encoder_outputs=BaseModelOutput(last_hidden_state=exact), attention_mask=fused_mask, labels=labels).loss.backward()
    reference.zero_grad(set_to_none=True)
    fused.backward(exact.grad.to(fused.dtype))
    ref = {k: g for k, g in grads_of(reference).items() if k in encoder_keys}

    sink_error, bf16_sum_error = encoder_error(grads[False], ref), encoder_error(grads[True], ref)
    print(f"encoder-gradient error: fp32 sink {sink_error:.3e}, bf16 autograd sum {bf16_sum_error:.3e}")
    assert bf16_sum_error > 1e-3, f"summing in bf16 really rounds ({bf16_sum_error:.2e})"
    assert sink_error < 0.3 * bf16_sum_error, f"fp32 sink {sink_error:.2e} vs bf16 sum {bf16_sum_error:.2e}"


@pytest.mark.parametrize("one_hf_layer", [False, True], ids=["all-streaming", "last-layer-hf"])
@pytest.mark.parametrize("family", ["bart", "t5"])
def test_offloaded_gradient_cache_stays_exact(family, one_hf_layer):
    """offload_gradient_cache keeps the sink's fp32 buffer in host memory, adds autograd's share
    (a layer on HF's module) to it there, and hands each group its slice on the device. On this
    CPU-only machine host and device coincide: what is checked is that the path is taken and
    stays exact; the device-memory saving needs the GPU check."""
    model = make_model_without_cross_attention_dropout(family)
    reference = copy.deepcopy(model)
    install_streaming_cross_attention(model, block=BLOCK)
    if one_hf_layer:
        revert_last_layer(model)
    ids, mask, labels = random_batch([3 * WINDOW + 5, WINDOW + 2], [7, 4], model.config.pad_token_id)
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=2, offload_gradient_cache=True))
    seen = DecoderStates(model)
    torch.manual_seed(SEED)
    wrapped(ids, mask, labels=labels).loss.backward()
    seen.remove()
    [sink] = seen.sinks
    assert sink.offload and sink.blocks_added > 0
    _, ref = windowed_hf_step(reference, ids, mask, labels, WINDOW, 2, SEED)
    assert_grads_match(grads_of(model), ref)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_offloaded_encoder_states_stay_exact(family):
    """offload_encoder_states returns the fused states in host memory (each group's output copied
    there as it is made) and streaming cross-attention brings them over block by block. As above,
    host and device coincide here: the path and its exactness are checked, not the saving."""
    model = make_model_without_cross_attention_dropout(family)
    reference = copy.deepcopy(model)
    ids, mask, labels = random_batch([3 * WINDOW + 5, WINDOW + 2], [7, 4], model.config.pad_token_id)
    config = CachedConfig(window=WINDOW, group_windows=2, cross_attention_block=BLOCK, offload_encoder_states=True,
                          offload_gradient_cache=True)
    wrapped = CachedSeq2Seq(model, config)
    seen = DecoderStates(model)
    torch.manual_seed(SEED)
    wrapped(ids, mask, labels=labels).loss.backward()
    seen.remove()
    [states] = seen.states
    assert states.device.type == "cpu" and seen.sinks[0].blocks_added > 0
    _, ref = windowed_hf_step(reference, ids, mask, labels, WINDOW, 2, SEED)
    assert_grads_match(grads_of(model), ref)


def test_offloaded_states_need_streaming_cross_attention():
    with pytest.raises(ValueError, match="offload_encoder_states needs cross_attention_block"):
        CachedConfig(offload_encoder_states=True)
    with pytest.raises(ValueError, match="offload_encoder_states is for mode 'cached'"):
        CachedConfig(offload_encoder_states=True, cross_attention_block=8, mode="full")


def test_offloaded_gradient_cache_needs_streaming_cross_attention():
    """Only streaming cross-attention writes the out-of-band cache: without it the flag would do nothing."""
    with pytest.raises(ValueError, match="offload_gradient_cache offloads .* this model has none; set cross_attention_block"):
        CachedSeq2Seq(make_model_without_cross_attention_dropout("bart"), CachedConfig(window=WINDOW, offload_gradient_cache=True))


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "hf-cross-attention"])
def test_deepspeed_cpu_checkpointing_offloads_the_gradient_cache(streaming):
    """With streaming cross-attention the cache goes to the host with the activations; without
    it there is no out-of-band cache to offload, and the flag stays off."""
    from ds_helpers import resolved_config, single_rank_distributed

    from cached_ds.deepspeed_engine import initialize

    single_rank_distributed()
    config = resolved_config("zero2", cached={"window": WINDOW, "cross_attention_block": BLOCK if streaming else None})
    config["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": True}
    engine, *_ = initialize(make_model_without_cross_attention_dropout("bart"), config)
    assert engine.module.cached_config.offload_gradient_cache == streaming
