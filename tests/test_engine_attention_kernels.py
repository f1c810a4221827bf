"""Streaming cross-attention and the fast T5 attention switched on from the "cached" section, in
real DeepSpeed engines (ZeRO-2 and ZeRO-3, CPU, 1 rank): gradients equal the plain windowed HF
reference, and the replacement kernels are what actually ran."""

import copy

import pytest
import torch
from ds_helpers import record_streaming_states, resolved_config, single_rank_distributed
from op_meters import OpOutputs, OpsSeen
from reference import assert_grads_match
from test_engine_single_rank import CACHED, micro_batches, reference_gradients, train_step
from test_t5_attention import without_attention_dropout
from tiny_models import make_model_without_cross_attention_dropout, random_batch

from cached_ds.streaming_cross_attention import StreamingCrossAttention
from cached_ds.t5_attention import attention_targets


@pytest.fixture(scope="module", autouse=True)
def distributed():
    single_rank_distributed()


def autograd_functions(tensor, depth: int = 24) -> set[str]:
    """Names of the backward nodes within ``depth`` steps of ``tensor`` (what produced it)."""
    seen, frontier = set(), [tensor.grad_fn]
    for _ in range(depth):
        frontier = [n for f in frontier if f is not None for n, _ in f.next_functions]
        seen |= {type(f).__name__ for f in frontier if f is not None}
    return seen


def record_kernels(model):
    """Backward-node names under each replaced module's output, collected by forward hooks."""
    names: set[str] = set()
    hook = lambda module, args, out: names.update(autograd_functions(out[0] if isinstance(out, tuple) else out))  # noqa: E731
    for module in model.modules():
        if isinstance(module, StreamingCrossAttention) or "_cached_ds_hf_forward" in module.__dict__:
            module.register_forward_hook(hook)
    return names


def record_states_gradients(model) -> list:
    """Every gradient autograd delivers to the encoder states the HF decoder is given."""
    delivered: list = []

    def hook(module, args, kwargs):
        states = kwargs["encoder_hidden_states"]
        if states.requires_grad:
            states.register_hook(delivered.append)

    model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    return delivered


CASES = [
    ("zero3", "bart", {"cross_attention_block": 8}, "StreamingAttentionFunctionBackward"),
    ("zero2", "bart", {"cross_attention_block": 8}, "StreamingAttentionFunctionBackward"),
    # their decoder layers call the cross-attention with keywords only (BART passes hidden_states
    # positionally): ZeRO-3's leaf-module hook then fired before the projections' gradients came
    ("zero3", "mbart", {"cross_attention_block": 8}, "StreamingAttentionFunctionBackward"),
    ("zero3", "pegasus", {"cross_attention_block": 8, "keep_decoder_gathered": False}, "StreamingAttentionFunctionBackward"),
    ("zero3", "bart", {"cross_attention_block": 8, "decoder_gradient_checkpointing": True}, "StreamingAttentionFunctionBackward"),
    ("zero3", "t5", {"cross_attention_block": 8, "decoder_gradient_checkpointing": True, "keep_encoder_gathered": False},
     "StreamingAttentionFunctionBackward"),
    ("zero3", "t5", {"cross_attention_block": 8, "fast_t5_attention": True}, "BlockedBiasAttentionBackward"),
    # torch's non-reentrant checkpointing keeps the bias the fast layers pass on exact (DeepSpeed's is refused)
    ("zero3", "t5", {"fast_t5_attention": True, "decoder_gradient_checkpointing": True, "encoder_gradient_checkpointing": True},
     "BlockedBiasAttentionBackward"),
    ("zero3", "bart", {"cross_attention_block": 8, "offload_gradient_cache": True, "offload_encoder_states": True},
     "StreamingAttentionFunctionBackward"),
    ("zero2", "t5", {"cross_attention_block": 8, "offload_gradient_cache": True, "offload_encoder_states": True},
     "StreamingAttentionFunctionBackward"),
    ("zero3", "longt5-tglobal", {"fast_t5_attention": True}, "BlockedBiasAttentionBackward"),
    ("zero2", "longt5-tglobal", {"fast_t5_attention": True}, "BlockedBiasAttentionBackward"),
    # the encoder on SDPA over blocks: its key neighbourhoods are unfolded (local_sdpa)
    ("zero3", "longt5-tglobal", {"fast_t5_attention": True, "t5_attention_kernel": "local_sdpa"}, "UnfoldBackward0"),
]


@pytest.mark.parametrize("config, family, kernels, node", CASES, ids=[f"{c}-{f}-{'-'.join(k)}" for c, f, k, _ in CASES])
def test_engine_with_attention_kernels_matches_reference(config, family, kernels, node):
    from cached_ds.deepspeed_engine import initialize

    model = without_attention_dropout(make_model_without_cross_attention_dropout(family))
    pristine = copy.deepcopy(model)
    batches = micro_batches(model, gas=2)
    ref_grads = reference_gradients(pristine, batches)

    engine, *_ = initialize(model, resolved_config(config, gas=2, cached={**CACHED, **kernels}))
    ran = record_kernels(engine.module.model)
    states_seen = record_streaming_states(engine.module.model)
    delivered = record_states_gradients(engine.module.model)
    grads = train_step(engine, batches)
    assert node in ran, str(sorted(ran))
    if "cross_attention_block" in kernels:
        offloaded = bool(kernels.get("offload_encoder_states"))
        assert states_seen and set(states_seen) == {(True, offloaded)}, states_seen
        # The sink took the states gradient: autograd delivers none, not even zeros (ZeRO-3's
        # per-module Functions would materialise N-sized ones).
        assert all(g is None for g in delivered), [None if g is None else tuple(g.shape) for g in delivered]
    if "cross_attention_block" in kernels:
        assert "StreamingAttentionFunctionBackward" in ran
    assert_grads_match({k: g.float() for k, g in grads.items() if k in ref_grads}, ref_grads)


def test_bad_kernel_settings_name_the_field():
    from cached_ds import CachedConfig, CachedSeq2Seq

    with pytest.raises(ValueError, match="cross_attention_block"):
        CachedConfig(cross_attention_block=0)
    with pytest.raises(ValueError, match="fast_t5_attention"):
        CachedSeq2Seq(make_model_without_cross_attention_dropout("bart"), CachedConfig(fast_t5_attention=True))
    # settings that changed nothing, accepted without a word
    with pytest.raises(ValueError, match=r"keep_attention_dropout=false .* neither is on \(cross_attention_block, fast_t5_attention\)"):
        CachedConfig(keep_attention_dropout=False)
    with pytest.raises(ValueError, match=r"offload_gradient_cache is for mode 'cached' \(mode 'full' has no gradient cache"):
        CachedConfig(mode="full", cross_attention_block=8, offload_gradient_cache=True)
    with pytest.raises(ValueError, match=r"'local_sdpa' runs LongT5's local and transient-global encoder layers, and this t5 model"):
        CachedSeq2Seq(make_model_without_cross_attention_dropout("t5"),
                      CachedConfig(fast_t5_attention=True, t5_attention_kernel="local_sdpa", keep_attention_dropout=False))


def test_keep_attention_dropout_false_trains_t5_on_the_kernels_from_the_config():
    """T5's dropout_rate sets hidden and attention-probability dropout alike, and a DeepSpeed
    config cannot reach module attributes: "keep_attention_dropout": false switches the latter off
    in the replaced modules only. Reference: the same model with exactly those modules' dropout 0."""
    from tiny_models import cross_attention_modules, make_model

    from cached_ds.deepspeed_engine import initialize

    model = make_model("t5")  # dropout 0.1 everywhere
    pristine = without_attention_dropout(copy.deepcopy(model))
    for module in cross_attention_modules(pristine):
        module.dropout = 0.0
    batches = micro_batches(model, gas=1)
    ref_grads = reference_gradients(pristine, batches)
    kernels = {"cross_attention_block": 8, "fast_t5_attention": True, "keep_attention_dropout": False}
    engine, *_ = initialize(model, resolved_config("zero3", cached={**CACHED, **kernels}))
    ran = record_kernels(engine.module.model)
    grads = train_step(engine, batches)
    assert {"StreamingAttentionFunctionBackward", "BlockedBiasAttentionBackward"} <= ran
    assert_grads_match({k: g.float() for k, g in grads.items() if k in ref_grads}, ref_grads)


def test_kept_attention_dropout_is_flagged_when_the_kernels_are_installed():
    from tiny_models import make_model

    from cached_ds import CachedConfig, CachedSeq2Seq

    with pytest.warns(UserWarning, match="keep_attention_dropout"):
        CachedSeq2Seq(make_model("t5"), CachedConfig(cross_attention_block=8))
    model = make_model("t5")
    CachedSeq2Seq(model, CachedConfig(cross_attention_block=8, fast_t5_attention=True, keep_attention_dropout=False))
    assert all(module.dropout == 0.0 for module, _ in attention_targets(model))


def n_sized_allocations(keys: int, size: int) -> OpOutputs:
    """Tensors of ``size`` elements or more that an op made (not views or in-place results of
    its inputs) with a dimension of exactly ``keys``: what grows with the document."""
    return OpOutputs(lambda t: keys in t.shape and t.numel() >= size, new_only=True)


@pytest.mark.parametrize("family, config, extra", [("bart", "zero2", {}), ("bart", "zero3", {}),
                                                   ("bart", "zero3", {"decoder_gradient_checkpointing": True}), ("t5", "zero3", {})],
                         ids=["bart-zero2", "bart-zero3", "bart-zero3-decoder-checkpointing", "t5-zero3"])
def test_only_the_states_and_the_gradient_cache_grow_with_the_document(family, config, extra):
    """[decoder-memory]'s budget: in a whole engine step (forward and backward, streaming
    cross-attention), the only tensors as long as the document are the fused encoder states and
    the fp32 gradient cache: no per-layer K/V, scores or states gradients, and no zero gradients
    from ZeRO-3's per-module Functions."""
    from cached_ds.deepspeed_engine import initialize

    keys = 211  # a length no other dimension has
    model = make_model_without_cross_attention_dropout(family)
    ids, mask, labels = random_batch([keys], [6], model.config.pad_token_id)
    cached = {"window": 16, "group_windows": 2, "group_tokens": None, "cross_attention_block": 32, **extra}
    engine, *_ = initialize(model, resolved_config(config, cached=cached))
    engine.backward(engine(ids, mask, labels=labels).loss)  # warm-up: ZeRO-3 records its trace
    engine.step()
    with n_sized_allocations(keys, size=keys * model.config.d_model) as seen:
        engine.backward(engine(ids, mask, labels=labels).loss)
    assert sorted(seen.made, key=str) == sorted([("empty", (keys, 16), torch.float32), ("zeros", (1, keys, 16), torch.float32)], key=str)


def test_zero3_checkpointed_decoder_reads_document_lengths_once_per_step():
    """Under ZeRO-3 the layers get aliases of the key mask, and decoder checkpointing re-runs them
    in backward after the forward's Python objects are gone: the lengths counted once per step
    (a tag the gradient sink owns) still reach every layer, so the syncs do not grow with depth."""
    from cached_ds.deepspeed_engine import initialize

    counts = {}
    for layers in (2, 6):
        model = make_model_without_cross_attention_dropout("bart", decoder_layers=layers)
        ids, mask, labels = random_batch([53, 20], [6, 4], model.config.pad_token_id)
        cached = {"window": 16, "group_windows": 2, "group_tokens": None, "cross_attention_block": 7,
                  "decoder_gradient_checkpointing": True}
        engine, *_ = initialize(model, resolved_config("zero3", cached=cached))
        engine.backward(engine(ids, mask, labels=labels).loss)  # warm-up: ZeRO-3 records its trace
        engine.step()
        with OpsSeen() as seen:  # each aten.equal reads a result back from the device (a sync)
            engine.backward(engine(ids, mask, labels=labels).loss)
        counts[layers] = seen.counts["equal"]
    assert counts[6] == counts[2], counts
