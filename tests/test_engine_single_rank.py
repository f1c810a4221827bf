"""CachED through a real DeepSpeed engine (CPU accelerator, 1 rank, in-process) against plain HF
+ torch AdamW: gradients at the accumulation boundary, grad norm, parameters after the step."""

import copy

import pytest
import torch
from ds_helpers import reference_adamw_step, resolved_config, single_rank_distributed
from reference import assert_grads_match, windowed_hf_step
from tiny_models import cross_attention_modules, make_model, make_model_without_cross_attention_dropout, random_batch

from cached_ds.cached_encoder import CachedEncoderFunction, _recompute

WINDOW = 16
CACHED = {"window": WINDOW, "group_windows": 1, "group_tokens": None}


@pytest.fixture(scope="module", autouse=True)
def distributed():
    single_rank_distributed()


def micro_batches(model, gas):
    pad = model.config.pad_token_id
    return [random_batch([(2 + i) * WINDOW + 3 * i + 1], [5 + i], pad, seed=20 + i) for i in range(gas)]


def reference_gradients(model, batches):
    """Mean over micro-batches (DeepSpeed divides each micro-batch loss by GAS)."""
    total = {}
    for i, (ids, mask, labels) in enumerate(batches):
        _, grads = windowed_hf_step(model, ids, mask, labels, WINDOW, 1, seed=100 + i)
        for k, g in grads.items():
            total[k] = total.get(k, 0) + g / len(batches)
    model.zero_grad(set_to_none=True)
    return total


def train_step(engine, batches):
    """One optimizer step over GAS micro-batches; returns the full gradients at the boundary."""
    from ds_helpers import reduced_grad

    for i, (ids, mask, labels) in enumerate(batches):
        torch.manual_seed(100 + i)
        engine.backward(engine(ids, mask, labels=labels).loss)
        if i < len(batches) - 1:
            engine.step()
    assert engine.is_gradient_accumulation_boundary()
    grads = {name: reduced_grad(p) for name, p in engine.module.model.named_parameters()}
    engine.step()
    return grads


CASES = [
    ("zero0", "bart", 1, 0.0),
    ("zero1", "bart", 1, 0.0),
    ("zero2", "bart", 1, 0.0),
    ("zero3", "bart", 1, 0.0),
    ("zero3_offload", "bart", 1, 0.0),
    ("zero0", "t5", 3, 0.0),
    ("zero2", "bart", 3, 0.5),
    ("zero3", "t5", 3, 0.0),
    ("zero3", "bart", 1, 0.5),
    ("zero3_long", "bart", 1, 0.0),
    ("zero3_long", "t5", 3, 0.0),
]


@pytest.mark.parametrize("config, family, gas, clip", CASES, ids=[f"{c}-{f}-gas{g}-clip{k}" for c, f, g, k in CASES])
def test_engine_matches_reference(config, family, gas, clip):
    from deepspeed.utils import safe_get_full_fp32_param

    from cached_ds.deepspeed_engine import initialize
    from cached_ds.streaming_cross_attention import has_streaming_cross_attention

    model = make_model(family)
    pristine = copy.deepcopy(model)
    if config == "zero3_long":  # its "keep_attention_dropout": false drops the cross-attention's (only), which streams
        for module in cross_attention_modules(pristine):
            module.dropout = 0.0
    batches = micro_batches(model, gas)
    ref_grads = reference_gradients(pristine, batches)
    ref_model, ref_norm = reference_adamw_step(pristine, ref_grads, clip)

    engine, *_ = initialize(model, resolved_config(config, gas=gas, clip=clip, cached=CACHED))
    if config.startswith("zero3"):  # zero3.json runs torch's linear, zero3_offload.json DeepSpeed's wrapper
        assert (torch.nn.functional.linear.__name__ == "zero3_linear_wrap") == (config == "zero3_offload")
    assert has_streaming_cross_attention(engine.module.model) == (config == "zero3_long")
    grads = train_step(engine, batches)

    assert_grads_match(grads, ref_grads)
    if clip or config != "zero0":  # DeepSpeed computes no norm for unclipped ZeRO-0
        assert engine.get_global_grad_norm() == pytest.approx(ref_norm, rel=1e-5)
    if clip:
        assert ref_norm > clip, "clipping really happened"
    ref_params = dict(ref_model.named_parameters())
    for name, p in engine.module.model.named_parameters():
        value = p.detach() if config == "zero0" else safe_get_full_fp32_param(p)  # ZeRO-0 keeps no master copy
        torch.testing.assert_close(value, ref_params[name].detach(), rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("config, extra, deepspeed_checkpointing", [
    ("zero3_offload", {"keep_encoder_gathered": True, "keep_decoder_gathered": True}, False),  # partitions in host memory
    ("zero3", {}, True),  # zero3.json keeps the decoder gathered; deepspeed.checkpointing recomputes its layers
    # full backprop under zero3.json, whose kept-gathered encoder lifted ZeRO-3's hooks for the
    # forward only: the backward ran on released (empty) weights
    ("zero3", {"mode": "full"}, False),
], ids=["zero3_offload-both-gathered", "zero3-deepspeed-checkpointing", "zero3-full-mode"])
def test_kept_gathered_decoder_matches_reference(config, extra, deepspeed_checkpointing):
    """keep_decoder_gathered where ZeRO-3 keeps the partitions in host memory, and under
    DeepSpeed's own (reentrant) activation checkpointing of the decoder, which recomputes each
    layer inside the backward, with gradient accumulation."""
    from cached_ds.deepspeed_engine import initialize

    model = make_model("bart")
    batches = micro_batches(model, 2)
    ref_grads = reference_gradients(copy.deepcopy(model), batches)
    ds_config = resolved_config(config, gas=2, cached={**CACHED, **extra})
    if deepspeed_checkpointing:
        ds_config["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": False}
    engine, *_ = initialize(model, ds_config)
    assert engine.module.decoder_scope is not None
    assert_grads_match(train_step(engine, batches), ref_grads)


class NaiveCachedEncoder(CachedEncoderFunction):
    """The naive CachED (as the official code does it): one ordinary nested backward per window
    group, so every group accumulates into ``.grad`` and fires DeepSpeed's gradient hooks."""

    @staticmethod
    def backward(ctx, grad_fused):
        weight_grad = 0
        for group, rng, grad in zip(ctx.plan.groups, ctx.rng_states, ctx.plan.split_gradient(grad_fused)):
            weight, output = _recompute(ctx, group, rng, True)
            torch.autograd.backward(output, grad)
            weight_grad = weight_grad + weight.grad
        return None, None, None, None, weight_grad, None


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_naive_nested_backward_breaks_zero(config, monkeypatch):
    """Why the engine design exists: the naive approach raises under ZeRO-2 and gives wrong
    gradients under ZeRO-3."""
    from cached_ds import cached_encoder
    from cached_ds.deepspeed_engine import initialize

    monkeypatch.setattr(cached_encoder, "CachedEncoderFunction", NaiveCachedEncoder)
    model = make_model("bart")
    batches = micro_batches(model, 1)
    ref_grads = reference_gradients(copy.deepcopy(model), batches)
    engine, *_ = initialize(model, resolved_config(config, cached=CACHED))
    if config == "zero2":
        with pytest.raises(AssertionError, match="Gradient computed twice for this partition"):
            train_step(engine, batches)
    else:
        with pytest.raises(AssertionError, match="global relative gradient error"):
            assert_grads_match(train_step(engine, batches), ref_grads)


def cpu_checkpointed_step(family: str, streaming: bool, decoder_layers: int):
    """One ZeRO-3 step (GAS 2) with DeepSpeed's cpu_checkpointing of the decoder: the engine, its
    gradients at the boundary and the plain-HF reference's."""
    from cached_ds.deepspeed_engine import initialize

    layers = {"decoder_layers": decoder_layers} if family == "bart" else {"num_decoder_layers": decoder_layers}
    model = make_model_without_cross_attention_dropout(family, **layers)
    batches = micro_batches(model, 2)
    ref_grads = reference_gradients(copy.deepcopy(model), batches)
    cached = {**CACHED, "cross_attention_block": 8} if streaming else CACHED
    config = resolved_config("zero3", gas=2, cached=cached)
    config["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": True}
    engine, *_ = initialize(model, config)
    return engine, train_step(engine, batches), ref_grads


@pytest.mark.parametrize("family, streaming", [("bart", False), ("bart", True), ("t5", True)],
                         ids=["bart-hf-cross-attention", "bart-streaming", "t5-streaming"])
def test_deepspeed_cpu_checkpointing_of_the_decoder_is_exact(family, streaming):
    """DeepSpeed's cpu_checkpointing empties each checkpointed input once its layer has run; HF
    passes the same encoder states and masks to every decoder layer, so the second layer read
    emptied states until the engine marked the shared inputs (deepspeed_engine._checkpoint_layer).
    With streaming cross-attention the gradient cache goes to the host too."""
    engine, grads, ref_grads = cpu_checkpointed_step(family, streaming, decoder_layers=3)  # T5: position bias shared too
    assert engine.module.cached_config.offload_gradient_cache == streaming
    assert_grads_match(grads, ref_grads)


@pytest.mark.parametrize("family, streaming", [("bart", False), ("t5", True)], ids=["bart-hf-cross-attention", "t5-streaming"])
def test_deepspeeds_gpu_offload_path_of_cpu_checkpointing_is_exact(family, streaming, monkeypatch):
    """What a GPU runs: DeepSpeed's asynchronous offload engine copies each layer's input to host
    memory and back (``_ActivationOffloadEngine``), while the inputs the layers share stay out of
    it. On the CPU accelerator DeepSpeed never builds that engine and would skip every tensor, so
    here it is DeepSpeed's own class without streams, pinning or its short on-device stash, told
    not to skip host tensors: every offloaded input comes back from the host copy. Four layers:
    the last one's input stays where it is (``keep_last_count``), the other three go out and back."""
    from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing
    from deepspeed.runtime.activation_checkpointing.offload_activations import _ActivationOffloadEngine

    class HostTensorsToo(_ActivationOffloadEngine):
        def _should_skip(self, tensor):
            return tensor.numel() <= 1

    offload = HostTensorsToo(use_pin_memory=False, use_streams=False, min_offload_bytes=0, keep_last_count=1, max_fwd_stash_count=0)
    monkeypatch.setattr(ds_checkpointing, "_get_cpu_offload_engine", lambda: offload if ds_checkpointing.CPU_CHECKPOINT else None)
    _, grads, ref_grads = cpu_checkpointed_step(family, streaming, decoder_layers=4)
    assert_grads_match(grads, ref_grads)
    stats = offload.stats  # per micro-batch: 3 layers' inputs out and back, the last one's kept
    assert (stats.offloaded_tensors, stats.restored_tensors, stats.kept_last_tensors) == (2 * 3, 2 * 3, 2 * 1)


def test_deepspeed_activation_checkpointing_of_the_decoder():
    """A non-empty activation_checkpointing section checkpoints decoder layers through
    deepspeed.checkpointing: gradients stay exact and the decoder stores less for backward."""
    from cached_ds import SavedTensorMeter
    from cached_ds.deepspeed_engine import initialize

    peaks = {}
    for checkpointing in (False, True):
        model = make_model("bart", decoder_layers=3)
        batches = micro_batches(model, 1)
        ref_grads = reference_gradients(copy.deepcopy(model), batches)
        config = resolved_config("zero2", cached=CACHED)
        if checkpointing:
            config["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": False}
        engine, *_ = initialize(model, config)
        meter = SavedTensorMeter()
        with meter.watch(engine.module.model.get_decoder()):
            grads = train_step(engine, batches)
        assert_grads_match(grads, ref_grads)
        peaks[checkpointing] = meter.peak_bytes
    assert peaks[True] < 0.5 * peaks[False]


@pytest.mark.parametrize("keep_encoder_gathered", [False, True])
def test_zero3_longt5_whose_last_group_is_narrower_than_a_global_block(keep_encoder_gathered):
    """LongT5's transient-global bias is unused by windows shorter than a global block (4 here):
    a document's last window of 3 tokens alone in its group. That group ran last and its unused
    bias got its sum outside any module forward, where ZeRO-3 holds it as an empty partition
    ("Mismatch in shape: grad_output[0] has a shape of [8, 2] and output[0] has a shape of [0]"). The widest
    group runs last now; exact either way."""
    from ds_helpers import reduced_grad

    from cached_ds.deepspeed_engine import initialize

    model = make_model("longt5-tglobal")
    pristine = copy.deepcopy(model)
    ids, mask, labels = random_batch([4 * 10 + 3], [7], model.config.pad_token_id, seed=5)
    config = resolved_config("zero3", cached={"window": 10, "group_windows": 1, "group_tokens": None,
                                              "keep_encoder_gathered": keep_encoder_gathered})
    engine, *_ = initialize(model, config)
    torch.manual_seed(7)
    engine.backward(engine(ids, mask, labels=labels).loss)
    grads = {n: reduced_grad(p) for n, p in engine.module.model.named_parameters()}
    _, ref = windowed_hf_step(pristine, ids, mask, labels, 10, 1, seed=7)
    assert_grads_match(grads, ref)
