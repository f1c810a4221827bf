"""Streaming cross-attention equals HF's decoder cross-attention (fp32) and saves nothing N-sized.

Every comparison is against an untouched deep copy of the same HF model, same inputs, same RNG
seed, with hidden/activation dropout on (only cross-attention probabilities have no dropout)."""

import copy
from contextlib import ExitStack

import pytest
import torch
import torch.nn.functional as F
from op_meters import OpOutputs, OpsSeen
from reference import assert_grads_match, grads_of, windowed_hf_step
from tiny_models import (
    FAMILIES,
    cross_attention_modules,
    make_model,
    make_model_without_cross_attention_dropout,
    random_batch,
)
from transformers import AutoModelForSeq2SeqLM
from transformers.modeling_outputs import BaseModelOutput

from cached_ds import CachedConfig, CachedSeq2Seq
from cached_ds.gradient_sink import GradientSink
from cached_ds.memory import SavedTensorMeter
from cached_ds.streaming_attention import streaming_cross_attention
from cached_ds.streaming_cross_attention import (
    StreamingCrossAttention,
    install_streaming_cross_attention,
    remove_streaming_cross_attention,
    with_gradient_sink,
)

SEED = 1234
HIDDEN = 16  # d_model of the tiny models
BLOCK = 5


def decoder_inputs(tokens: int, short: int, seed: int = 3):
    """Encoder states of two documents (``tokens`` and ``short`` tokens, right-padded) and labels."""
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(2, tokens, HIDDEN, generator=gen)
    mask = torch.ones(2, tokens, dtype=torch.long)
    mask[1, short:] = 0
    labels = torch.randint(4, 90, (2, 6), generator=gen)
    labels[1, 4:] = -100
    return states, mask, labels


def run(model, states, mask, labels, **kwargs):
    """One HF forward on given encoder states."""
    return model(encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=mask, labels=labels, **kwargs)


def decoder_step(model, states, mask, labels, **kwargs):
    """Loss, parameter gradients and d(loss)/d(states) of one training step on given encoder states."""
    model.zero_grad(set_to_none=True)
    states = states.clone().requires_grad_()
    torch.manual_seed(SEED)
    out = run(model, states, mask, labels, **kwargs)
    out.loss.backward()
    return out.loss.detach(), grads_of(model), states.grad, out.loss.grad_fn


def streams(grad_fn) -> bool:
    """Whether the autograd graph below ``grad_fn`` went through the streaming Function."""
    seen, stack = set(), [grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn.name() == "StreamingAttentionFunctionBackward":
            return True
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return False


def streaming_and_reference(family: str, block: int = BLOCK, **overrides):
    model = make_model_without_cross_attention_dropout(family, **overrides)
    reference = copy.deepcopy(model)
    install_streaming_cross_attention(model, block=block)
    return model, reference


CASES = [(family, "eager") for family in FAMILIES] + [("bart", "sdpa"), ("t5", "sdpa")]


@pytest.mark.parametrize("family,attention", CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_loss_and_every_gradient_equal_hf(family, attention):
    """23 keys in blocks of 5 (the last partial); the second document's 14 tokens leave two
    blocks fully masked for it. Eager's additive and sdpa's boolean masks are both handled."""
    model, reference = streaming_and_reference(family, attn_implementation=attention)
    states, mask, labels = decoder_inputs(tokens=23, short=14)
    loss, grads, grad_states, graph = decoder_step(model, states, mask, labels, use_cache=False)
    ref_loss, ref, ref_grad_states, ref_graph = decoder_step(reference, states, mask, labels, use_cache=False)
    assert streams(graph) and not streams(ref_graph)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads, ref)
    rel = float((grad_states - ref_grad_states).norm() / ref_grad_states.norm())
    assert rel <= 1e-5, f"relative error of d(loss)/d(states) {rel:.3e}"
    torch.testing.assert_close(grad_states, ref_grad_states, rtol=1e-4, atol=1e-7)
    assert torch.equal(grad_states[1, 14:], torch.zeros_like(grad_states[1, 14:])), "padding gets no gradient"


@pytest.mark.parametrize("biases", [True, False], ids=["bart-like", "t5-like"])
def test_function_gradcheck_with_masked_leading_block(biases):
    """float64 gradcheck of every input; one document's first key block is fully masked, so the
    online softmax starts from a row that has only seen -inf."""
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    heads, head_dim, hidden, keys = 2, 3, 5, 11
    query, states = leaf(2, heads, 3, head_dim), leaf(2, keys, hidden)
    k_weight, v_weight = leaf(heads * head_dim, hidden), leaf(heads * head_dim, hidden)
    k_bias, v_bias = (leaf(heads * head_dim), leaf(heads * head_dim)) if biases else (None, None)
    keep = torch.ones(2, keys, dtype=torch.bool)
    keep[0, :4] = False  # the whole first block of 4
    keep[1, 9:] = False
    scale = head_dim**-0.5 if biases else 1.0

    def attend(*inputs):
        return streaming_cross_attention(*inputs[:2], keep, *inputs[2:], scale=scale, block=4)

    inputs = (query, states, k_weight, k_bias, v_weight, v_bias)
    assert torch.autograd.gradcheck(attend, inputs)


def saved_bytes(model, tokens: int) -> int:
    """Peak bytes the decoder's cross-attention modules save for backward in one training step."""
    states, mask, labels = decoder_inputs(tokens=tokens, short=tokens - 5)
    states.requires_grad_()
    meter = SavedTensorMeter()
    with ExitStack() as stack:
        for module in cross_attention_modules(model):
            stack.enter_context(meter.watch(module))
        run(model, states, mask, labels, use_cache=False).loss.backward()
    return meter.peak_bytes


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_saves_nothing_n_sized_but_the_states(family):
    """From 40 to 200 keys, what cross-attention saves may grow by the states themselves (shared
    by every layer) and a 1-byte-per-key mask per layer; HF's grows by K, V and the scores."""
    model, reference = streaming_and_reference(family, block=16)
    short, long = 40, 200
    layers = len(cross_attention_modules(model))
    states_growth = 2 * (long - short) * HIDDEN * 4  # (batch 2, tokens, hidden) fp32
    bound = states_growth + layers * 2 * (long - short)
    growth = saved_bytes(model, long) - saved_bytes(model, short)
    hf_growth = saved_bytes(reference, long) - saved_bytes(reference, short)
    assert hf_growth > bound, "the bound is one HF's module fails"
    assert growth <= bound, f"saved bytes grew by {growth}, more than the states' {states_growth} + key masks"


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_eval_and_generation_equal_hf(family):
    """Eval forwards without a cache stream (and match HF); ``generate`` uses the KV cache, so it
    runs HF's module and produces the same tokens."""
    model, reference = streaming_and_reference(family)
    model.eval(), reference.eval()
    states, mask, labels = decoder_inputs(tokens=23, short=14)
    out, ref_out = (run(m, states, mask, labels, use_cache=False) for m in (model, reference))
    assert streams(out.loss.grad_fn) and not streams(ref_out.loss.grad_fn)
    torch.testing.assert_close(out.logits, ref_out.logits, rtol=1e-5, atol=1e-6)
    encoder_outputs = BaseModelOutput(last_hidden_state=states)
    generated = [
        m.generate(encoder_outputs=encoder_outputs, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for m in (model, reference)
    ]
    assert torch.equal(*generated)


@pytest.mark.parametrize("family", ["mbart", "longt5-tglobal"])
def test_same_parameters_and_state_dict_install_and_remove(family, tmp_path):
    model = make_model_without_cross_attention_dropout(family)
    originals = cross_attention_modules(model)
    before = dict(model.state_dict(keep_vars=True))
    installed = install_streaming_cross_attention(model, block=8)
    assert install_streaming_cross_attention(model, block=4) == installed, "installing again only sets block"
    assert all(isinstance(m, StreamingCrossAttention) and m.block == 4 for m in cross_attention_modules(model))
    after = dict(model.state_dict(keep_vars=True))
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).state_dict()
    assert loaded.keys() == before.keys() and all(torch.equal(loaded[k], before[k]) for k in before)
    remove_streaming_cross_attention(model)
    assert all(m is o for m, o in zip(cross_attention_modules(model), originals))


@pytest.mark.parametrize("family,field", [("bart", "attention_dropout"), ("t5", "dropout_rate")])
def test_attention_dropout_in_training_is_refused(family, field):
    model = make_model(family)  # attention-probability dropout 0.1
    install_streaming_cross_attention(model)
    states, mask, labels = decoder_inputs(tokens=23, short=14)
    with pytest.raises(ValueError, match=f"config.{field}"):
        run(model, states, mask, labels, use_cache=False)
    model.eval()  # no dropout in eval: streams
    assert streams(run(model, states, mask, labels, use_cache=False).loss.grad_fn)


def test_a_cache_in_training_warns_and_falls_back():
    """T5 builds a KV cache unless told use_cache=False; HF's module then runs, exactly."""
    model, reference = streaming_and_reference("t5")
    states, mask, labels = decoder_inputs(tokens=23, short=14)
    with pytest.warns(UserWarning, match="use_cache=False"):
        loss, grads, _, graph = decoder_step(model, states, mask, labels)
    ref_loss, ref, _, _ = decoder_step(reference, states, mask, labels)
    assert not streams(graph)
    assert torch.equal(loss, ref_loss) and all(torch.equal(grads[k], ref[k]) for k in ref)


WINDOW = 16


CACHED_CASES = [(family, False) for family in FAMILIES] + [("bart", True), ("t5", True)]


@pytest.mark.parametrize(
    "family,checkpointing", CACHED_CASES, ids=[f + "-decoder-checkpointing" * c for f, c in CACHED_CASES]
)
def test_cached_seq2seq_with_streaming_equals_windowed_hf(family, checkpointing):
    """The whole CachED model (windowed encoder with the gradient cache, streaming decoder
    cross-attention, optionally checkpointed decoder layers) against plain HF backprop through the
    same windowed model."""
    model, reference = streaming_and_reference(family, block=7)
    ids, mask, labels = random_batch([3 * WINDOW + 5, WINDOW + 2], [7, 4], model.config.pad_token_id)
    config = CachedConfig(window=WINDOW, group_windows=2, decoder_gradient_checkpointing=checkpointing)
    wrapped = CachedSeq2Seq(model, config)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    loss = wrapped(ids, mask, labels=labels).loss
    assert streams(loss.grad_fn)
    loss.backward()
    ref_loss, ref = windowed_hf_step(reference, ids, mask, labels, WINDOW, 2, SEED)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads_of(model), ref)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_gradient_sink_delivers_the_states_gradient_out_of_band(family):
    """With ``with_gradient_sink`` no layer returns d(loss)/d(states) through autograd (a hook on
    the states the decoder sees gets no gradient), yet the states get HF's gradient."""
    model, reference = streaming_and_reference(family)
    states, mask, labels = decoder_inputs(tokens=23, short=14)
    leaf = states.clone().requires_grad_()
    sunk = with_gradient_sink(leaf)
    through_autograd = []
    sunk.register_hook(through_autograd.append)
    torch.manual_seed(SEED)
    run(model, sunk, mask, labels, use_cache=False).loss.backward()
    _, ref, ref_grad_states, _ = decoder_step(reference, states, mask, labels, use_cache=False)
    assert all(grad is None for grad in through_autograd), "no layer returned an N-sized states gradient"
    assert_grads_match(grads_of(model), ref)
    torch.testing.assert_close(leaf.grad, ref_grad_states, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_gradient_sink_adds_the_share_of_a_layer_left_to_hf(family):
    """A layer left with HF's cross-attention (a fallback) returns its states gradient through
    autograd: the sink's outlet adds it to what the streaming layers sank."""
    model, reference = streaming_and_reference(family)
    modules = cross_attention_modules(model)
    assert isinstance(modules[-1], StreamingCrossAttention)
    decoder = model.get_decoder()
    if hasattr(decoder, "layers"):
        decoder.layers[-1].encoder_attn = modules[-1].original
    else:
        decoder.block[-1].layer[1].EncDecAttention = modules[-1].original
    states, mask, labels = decoder_inputs(tokens=23, short=14)
    leaf = states.clone().requires_grad_()
    torch.manual_seed(SEED)
    run(model, with_gradient_sink(leaf), mask, labels, use_cache=False).loss.backward()
    _, ref, ref_grad_states, _ = decoder_step(reference, states, mask, labels, use_cache=False)
    assert_grads_match(grads_of(model), ref)
    torch.testing.assert_close(leaf.grad, ref_grad_states, rtol=1e-4, atol=1e-7)


def test_a_mask_that_differs_between_queries_falls_back_to_hf():
    """HF's 4-D cross-attention mask may hide keys from some queries only; streaming attention
    takes one key-padding row per document, so such a mask runs HF's own module."""
    model = make_model_without_cross_attention_dropout("bart", attn_implementation="eager").eval()
    reference = copy.deepcopy(model)
    install_streaming_cross_attention(model, block=BLOCK)
    gen = torch.Generator().manual_seed(0)
    hidden, states = torch.randn(1, 4, HIDDEN, generator=gen), torch.randn(1, 11, HIDDEN, generator=gen)
    mask = torch.zeros(1, 1, 4, 11)
    mask[0, 0, 1:, 7:] = torch.finfo(torch.float32).min  # query 0 sees all 11 keys, queries 1-3 the first 7
    got = cross_attention_modules(model)[0](hidden, key_value_states=states, attention_mask=mask)[0]
    want = cross_attention_modules(reference)[0](hidden, key_value_states=states, attention_mask=mask)[0]
    torch.testing.assert_close(got, want)


def test_gradient_sink_sums_in_fp32_for_bf16_states():
    states = torch.zeros(1, 6, 4, dtype=torch.bfloat16)
    sink = GradientSink()
    sink.add(states, 0, torch.ones(1, 6, 4, dtype=torch.bfloat16))
    for _ in range(3):  # bf16 rounds 1 + 2**-9 back to 1; the fp32 total keeps every addition
        sink.add(states, 2, torch.full((1, 3, 4), 2.0**-9, dtype=torch.bfloat16))
    total = sink.take()
    assert total.dtype == torch.float32 and sink.take() is None
    assert torch.equal(total[0, :, 0], torch.tensor([1, 1, 1 + 3 * 2.0**-9, 1 + 3 * 2.0**-9, 1 + 3 * 2.0**-9, 1]))


def target_by_keys_tensors(target: int, keys: int) -> OpOutputs:
    """Every op output whose last two dimensions are (target, N): a score-shaped or mask-shaped
    tensor over all N keys."""
    return OpOutputs(lambda t: t.dim() >= 2 and tuple(t.shape[-2:]) == (target, keys))


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_no_target_by_keys_tensor_in_a_streaming_step(family):
    """CachedSeq2Seq hands a decoder that streams every layer a (batch, 1, 1, N) mask, so neither
    HF's mask builder nor the attention forms anything (target × N)-sized; the control, the same
    model given the 2-D mask, does (HF's expanded cross-attention mask)."""
    model, _ = streaming_and_reference(family, block=7)
    ids, mask, labels = random_batch([3 * WINDOW + 5, WINDOW + 2], [7, 4], model.config.pad_token_id)
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=2))
    keys = int(mask.sum(1).max())
    with target_by_keys_tensors(labels.shape[1], keys) as meter:
        wrapped(ids, mask, labels=labels).loss.backward()
    assert meter.made == []
    states, fused_mask = wrapped.encode_long(ids, mask)
    with target_by_keys_tensors(labels.shape[1], keys) as control:
        model(encoder_outputs=states, attention_mask=fused_mask, labels=labels, use_cache=False).loss.backward()
    assert control.made


FUSED_OPS = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"}


def attention_inputs(lengths, keys, dtype=torch.float32, heads=2, head_dim=4, hidden=6, target=3, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

    inputs = (leaf(len(lengths), heads, target, head_dim), leaf(len(lengths), keys, hidden),
              leaf(heads * head_dim, hidden), leaf(heads * head_dim), leaf(heads * head_dim, hidden), leaf(heads * head_dim))
    keep = torch.arange(keys)[None, :] < torch.tensor(lengths)[:, None]
    return inputs, keep


INPUT_NAMES = ("query", "states", "k_weight", "k_bias", "v_weight", "v_bias")


def relative_error(got, want) -> float:
    return float((got - want).detach().norm() / want.detach().norm())


def plain_attention(query, states, k_weight, k_bias, v_weight, v_bias, keep, scale):
    """The reference: HF-style attention in plain torch ops, every key projected at once."""
    batch, heads, _, head_dim = query.shape
    key = torch.nn.functional.linear(states, k_weight, k_bias).view(batch, -1, heads, head_dim).transpose(1, 2)
    value = torch.nn.functional.linear(states, v_weight, v_bias).view(batch, -1, heads, head_dim).transpose(1, 2)
    scores = (query @ key.transpose(-1, -2) * scale).masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.softmax(scores, -1) @ value


@pytest.mark.parametrize("lengths", [[23, 23], [23, 9], [23, 3], [9, 5]],
                         ids=["no-padding", "padding-mid-block", "padding-in-first-block", "blocks-past-every-document"])
def test_fused_block_kernels_equal_plain_attention_and_run(lengths):
    """Right-padded keys (what CachED's fused states have) go to the device's fused SDPA kernel
    block by block (on CPU, ATen's flash attention), merged by log-sum-exp, and the backward hands
    each block the merged output: outputs and every gradient equal plain attention (fp32), and
    the kernel's forward and backward are the ops that ran."""
    inputs, keep = attention_inputs(lengths, keys=23)
    scale = 0.5
    grad = torch.randn(2, 2, 3, 4, generator=torch.Generator().manual_seed(9))
    expected = plain_attention(*inputs, keep, scale)
    expected_grads = torch.autograd.grad(expected, inputs, grad)
    for fused in (True, False):
        with OpsSeen() as ops:
            out = streaming_cross_attention(*inputs[:2], keep, *inputs[2:], scale=scale, block=7, fused=fused)
            grads = torch.autograd.grad(out, inputs, grad)
        assert (FUSED_OPS <= ops.names) if fused else not (FUSED_OPS & ops.names)
        assert relative_error(out, expected) <= 1e-5
        for name, got, want in zip(INPUT_NAMES, grads, expected_grads):
            if name == "k_bias":  # mathematically zero (softmax ignores a shift shared by all keys): rounding only
                assert got.norm() <= 1e-5 * grads[INPUT_NAMES.index("k_weight")].norm()
            else:
                assert relative_error(got, want) <= 1e-5, name
        for doc, length in enumerate(lengths):  # padding: no gradient
            assert torch.equal(grads[1][doc, length:], torch.zeros_like(grads[1][doc, length:]))


def test_fused_block_kernels_gradcheck():
    """float64 gradcheck of every input through the fused kernels, one document ending inside the
    first key block (so later blocks are one call per document that still sees keys)."""
    inputs, keep = attention_inputs([11, 2], keys=11, dtype=torch.float64, heads=2, head_dim=3, hidden=5)

    def attend(*inputs):
        return streaming_cross_attention(*inputs[:2], keep, *inputs[2:], scale=3**-0.5, block=4)

    with OpsSeen() as ops:
        attend(*inputs).sum().backward()
    assert FUSED_OPS <= ops.names
    assert torch.autograd.gradcheck(attend, inputs)


def test_a_mask_that_is_not_right_padding_runs_the_plain_blocks():
    inputs, keep = attention_inputs([23, 23], keys=23)
    keep[0, :5] = False  # leading keys masked: not a prefix
    with OpsSeen() as ops:
        out = streaming_cross_attention(*inputs[:2], keep, *inputs[2:], scale=0.5, block=7)
    assert not FUSED_OPS & ops.names
    assert relative_error(out, plain_attention(*inputs, keep, 0.5)) <= 1e-5


def test_switching_the_sdpa_kernels_off_runs_the_plain_blocks():
    """``sdpa_kernel(SDPBackend.MATH)``, PyTorch's own switch, is the way back to the plain blocks."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    inputs, keep = attention_inputs([23, 9], keys=23)
    with sdpa_kernel(SDPBackend.MATH), OpsSeen() as ops:
        out = streaming_cross_attention(*inputs[:2], keep, *inputs[2:], scale=0.5, block=7)
    assert not FUSED_OPS & ops.names
    assert relative_error(out, plain_attention(*inputs, keep, 0.5)) <= 1e-5


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "decoder-checkpointing"])
@pytest.mark.parametrize("family", ["bart", "t5"])
def test_document_lengths_are_read_from_the_device_once_per_step_not_per_layer(family, checkpointing):
    """Picking a block's kernel calls needs the documents' lengths as numbers: ``compact_key_mask``
    counts them once for the step and every layer reuses them, also when decoder checkpointing
    re-runs the layers in backward, so the comparisons (device syncs) in a CachED training step
    do not grow with the decoder's depth."""
    ids, mask, labels = random_batch([3 * WINDOW + 5, WINDOW + 2], [7, 4], 0)
    comparisons = {}
    for layers in (2, 6):
        model, _ = streaming_and_reference(family, block=7, decoder_layers=layers, num_decoder_layers=layers)
        wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=2, decoder_gradient_checkpointing=checkpointing))
        with OpsSeen() as ops:
            wrapped(ids, mask, labels=labels).loss.backward()
        assert FUSED_OPS <= ops.names
        comparisons[layers] = ops.counts["equal"]
    assert comparisons[6] == comparisons[2], comparisons


@pytest.mark.parametrize("kernel", ["fused", "plain"])
def test_the_cross_attention_kernel_setting_picks_the_block_kernels_and_both_are_exact(kernel):
    """``cross_attention_kernel``: "fused" runs the blocks on ATen's fused attention, "plain" (the
    way around a kernel problem on some GPU) on plain ops; both equal plain windowed HF."""
    model = make_model_without_cross_attention_dropout("bart")
    reference = copy.deepcopy(model)
    ids, mask, labels = random_batch([3 * WINDOW + 5, WINDOW + 2], [7, 4], model.config.pad_token_id)
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=2, cross_attention_block=7, cross_attention_kernel=kernel))
    torch.manual_seed(SEED)
    with OpsSeen() as ops:
        wrapped(ids, mask, labels=labels).loss.backward()
    assert (FUSED_OPS <= ops.names) if kernel == "fused" else not (FUSED_OPS & ops.names)
    _, ref = windowed_hf_step(reference, ids, mask, labels, WINDOW, 2, SEED)
    assert_grads_match(grads_of(model), ref)


def test_an_unknown_cross_attention_kernel_names_the_field():
    with pytest.raises(ValueError, match=r"cross_attention_kernel must be one of \('fused', 'plain'\), got 'flash'"):
        CachedConfig(cross_attention_block=8, cross_attention_kernel="flash")


def test_bf16_streaming_is_as_accurate_as_sdpa_in_bf16():
    """bf16 inputs over 512 key blocks (one document padded): the output and every input's
    gradient within 2x the error of torch's SDPA run in bf16 on the same inputs, both against
    SDPA in fp64 on those (bf16-rounded) inputs. The blocks' merge and the sums over blocks (the
    output, d(query), the K/V weights' and biases' gradients) must run in fp32: in bf16 each of
    them was 7-15x SDPA's error here."""
    gen = torch.Generator().manual_seed(0)
    b, h, t, n, d = 2, 2, 8, 2048, 8
    q = torch.randn(b, h, t, d, generator=gen).bfloat16()
    x = torch.randn(b, n, h * d, generator=gen).bfloat16()
    wk, wv = (torch.randn(h * d, h * d, generator=gen).bfloat16() * 0.5 for _ in range(2))
    bk, bv = (torch.randn(h * d, generator=gen).bfloat16() for _ in range(2))
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, 1500:] = False
    grad_out = torch.randn(b, h, t, d, generator=gen).bfloat16()

    def sdpa(q, x, wk, bk, wv, bv):
        def split(y):
            return y.view(b, n, h, d).transpose(1, 2)
        k, v = split(x @ wk.T + bk), split(x @ wv.T + bv)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], scale=d**-0.5)

    def streaming(q, x, wk, bk, wv, bv):
        return streaming_cross_attention(q, x, keep, wk, bk, wv, bv, scale=d**-0.5, block=4)

    def run(attention, dtype):
        inputs = [v.to(dtype).clone().requires_grad_() for v in (q, x, wk, bk, wv, bv)]
        out = attention(*inputs)
        out.backward(grad_out.to(dtype))
        return [out.double()] + [v.grad.double() for v in inputs]

    def error(a, b):
        return float((a - b).norm() / b.norm())

    exact, sdpa_bf16, ours = run(sdpa, torch.float64), run(sdpa, torch.bfloat16), run(streaming, torch.bfloat16)
    for name, e, s, o in zip(["out", "query", "states", "k_weight", "k_bias", "v_weight", "v_bias"], exact, sdpa_bf16, ours):
        if e.norm() < 1e-6:  # d(k_bias) is 0 analytically (softmax is shift-invariant): bf16's rounding alone
            assert o.norm() <= 2 * s.norm(), (name, float(o.norm()), float(s.norm()))
            continue
        assert error(s, e) > 1e-4, f"{name}: bf16 really ran"
        assert error(o, e) <= 2 * error(s, e), (name, error(o, e), error(s, e))
