"""Fast T5/LongT5 self-attention (cached_ds.t5_attention) equals HF's eager attention, and
encoder gradient checkpointing keeps CachED exact.

The fast path does not reproduce HF's attention-probability dropout (its mask is (batch, heads,
L, L)); these tests switch that one dropout off on the replaced modules (``dropout = 0``) in
both models and keep every other dropout on, except where they check the fallback to HF.
"""

import copy

import pytest
import torch
from reference import assert_grads_match, grads_of, windowed_hf_step
from tiny_models import make_model, random_batch

from cached_ds import CachedConfig, CachedSeq2Seq, SavedTensorMeter
from cached_ds.t5_attention import (
    OffsetBias,
    attention_targets,
    fast_t5_attention,
    install_fast_t5_attention,
    remove_fast_t5_attention,
)

FAST_FAMILIES = ("t5", "longt5-local", "longt5-tglobal", "mt5")
BLOCK = 4  # several query/key blocks even in these short sequences
SEED = 1234
WINDOW = 16


def without_attention_dropout(model):
    """Attention-probability dropout off on the modules the fast attention replaces (the fast
    path cannot replay HF's (batch, heads, L, L) mask); residual/FF/cross-attention dropout stays."""
    for module, _ in attention_targets(model):
        module.dropout = 0.0
    return model


def pair(family, dropout=0.1, fast_attn_impl=None, local_sdpa=False):
    """A model with the fast attention and an untouched deep copy running HF's eager attention.
    ``fast_attn_impl`` sets the masks HF hands the fast model (sdpa: bool or None, eager: additive);
    ``local_sdpa``: LongT5's encoder layers on ``cached_ds.local_sdpa``."""
    model = without_attention_dropout(make_model(family, dropout=dropout))
    reference = copy.deepcopy(model)
    if reference.config._attn_implementation != "eager":
        reference.set_attn_implementation("eager")
    if fast_attn_impl is not None:
        model.set_attn_implementation(fast_attn_impl)
    install_fast_t5_attention(model, block=BLOCK, local_sdpa=local_sdpa)
    return model, reference


def first_self_attention_bias(model):
    """What the encoder's first self-attention returned as ``position_bias`` (a real forward hook)."""
    seen = []
    module = next(m for m, _ in attention_targets(model.get_encoder()))
    handle = module.register_forward_hook(lambda mod, args, out: seen.append(out[1]))
    return seen, handle


def run(model, lengths, label_lengths, seed=SEED):
    """Encoder states and logits at real (unpadded) positions, after backward of a fixed random
    weighting of both (padding positions' outputs are don't-cares: HF fills them with garbage); returns outputs, parameter gradients and the input-embedding gradients."""
    gen = torch.Generator().manual_seed(7)
    ids, mask, _ = random_batch(lengths, label_lengths, model.config.pad_token_id)
    dec_ids, dec_mask, _ = random_batch(label_lengths, label_lengths, model.config.pad_token_id, seed=3)
    embed = model.get_input_embeddings()
    x = embed(ids).detach().requires_grad_(True)
    y = embed(dec_ids).detach().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(inputs_embeds=x, attention_mask=mask, decoder_inputs_embeds=y, decoder_attention_mask=dec_mask, use_cache=False)
    enc = out.encoder_last_hidden_state * mask[..., None]
    logits = out.logits * dec_mask[..., None]
    # random weights scaled like a mean, so gradients have a cross-entropy loss's size
    loss = sum((t * torch.randn(t.shape, generator=gen)).sum() / t.numel() for t in (enc, logits))
    loss.backward()
    return enc.detach(), logits.detach(), grads_of(model), x.grad, y.grad


def assert_same_step(fast, ref):
    for name, a, b in zip(("encoder states", "logits"), fast[:2], ref[:2]):
        rel = float((a - b).norm() / b.norm())
        assert rel <= 1e-5, f"{name}: relative error {rel:.2e}"
    assert_grads_match(fast[2], ref[2])
    assert_grads_match({"inputs_embeds": fast[3], "decoder_inputs_embeds": fast[4]}, {"inputs_embeds": ref[3], "decoder_inputs_embeds": ref[4]})


@pytest.mark.parametrize(
    "family, attn_impl, local_sdpa",
    [("t5", "sdpa", False), ("t5", "eager", False), ("longt5-local", None, False), ("longt5-tglobal", None, False),
     ("longt5-local", None, True), ("longt5-tglobal", None, True)],
    ids=["t5-bool-masks", "t5-additive-masks", "longt5-local", "longt5-tglobal",  # LongT5 is eager-only in HF
         "longt5-local-sdpa", "longt5-tglobal-sdpa"],
)
def test_fast_attention_equals_hf_eager(family, attn_impl, local_sdpa):
    """Two padded documents (23 and 14 tokens: not multiples of the block, local block or global
    block), several blocks each; decoder summaries of 6 and 4 tokens (causal, padded).
    Dropout on everywhere except attention probabilities."""
    model, reference = pair(family, fast_attn_impl=attn_impl, local_sdpa=local_sdpa)
    seen, handle = first_self_attention_bias(model)
    fast = run(model, [23, 14], [6, 4])
    handle.remove()
    assert isinstance(seen[0], OffsetBias), "the fast path ran (not HF's forward)"
    assert_same_step(fast, run(reference, [23, 14], [6, 4]))
    bias = "encoder.block.0.layer.0." + ("SelfAttention" if family == "t5" else "LocalSelfAttention" if family == "longt5-local" else "TransientGlobalSelfAttention")
    assert fast[2][bias + ".relative_attention_bias.weight"].abs().sum() > 0
    if family == "longt5-tglobal":
        assert fast[2][bias + ".global_relative_attention_bias.weight"].abs().sum() > 0


@pytest.mark.parametrize("family, local_sdpa", [(f, False) for f in FAST_FAMILIES] + [("longt5-local", True), ("longt5-tglobal", True)],
                         ids=[*FAST_FAMILIES, "longt5-local-sdpa", "longt5-tglobal-sdpa"])
@pytest.mark.parametrize("lengths", [[1, 70], [3, 2]], ids=["1-and-70", "shorter-than-a-global-block"])
def test_edge_sizes(family, local_sdpa, lengths):
    """A 1-token document beside one far longer than the bias buckets' max distance (32); and a
    batch shorter than one transient-global block (4 tokens), which has no global keys at all."""
    model, reference = pair(family, local_sdpa=local_sdpa)
    fast, ref = run(model, lengths, [1, 9]), run(reference, lengths, [1, 9])
    for name in set(ref[2]) ^ set(fast[2]):
        # No global keys: the global bias table takes no part; one side reports no gradient for
        # it (HF: None), the other an all-zero one.
        assert "global_relative_attention_bias" in name and max(lengths) < 4
        grad = fast[2].pop(name) if name in fast[2] else ref[2].pop(name)
        assert not grad.any()
    assert_same_step(fast, ref)


@pytest.mark.parametrize("family", ["t5", "longt5-local"])
def test_attention_dropout_falls_back_to_hf_exactly(family):
    """With attention dropout in training the replaced modules run HF's own forward: exact, not fast."""
    model = make_model(family)  # attention dropout 0.1
    reference = copy.deepcopy(model)
    install_fast_t5_attention(model, block=BLOCK)
    seen, handle = first_self_attention_bias(model)
    fast = run(model, [19, 11], [5, 3])
    handle.remove()
    assert isinstance(seen[0], torch.Tensor), "HF's forward ran"
    assert_same_step(fast, run(reference, [19, 11], [5, 3]))


@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_generation_unchanged(family):
    """Greedy and beam search give HF's tokens: the encoder and the first decoder step run fast,
    later steps (filled KV cache) HF's forward."""
    model = make_model(family).eval()
    reference = copy.deepcopy(model)
    install_fast_t5_attention(model, block=BLOCK)
    ids, mask, _ = random_batch([23, 14], [1, 1], model.config.pad_token_id)
    for options in ({"do_sample": False}, {"num_beams": 3}):
        fast = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **options)
        assert torch.equal(fast, reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **options))


def test_install_keeps_parameters_and_remove_restores_hf():
    model = make_model("longt5-tglobal")
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert install_fast_t5_attention(model) == 4  # 2 encoder (tglobal) + 2 decoder self-attention
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    assert model.state_dict().keys() == state.keys()
    cross = model.decoder.block[0].layer[1].EncDecAttention
    assert "forward" not in cross.__dict__, "cross-attention is left to HF"
    assert remove_fast_t5_attention(model) == 4
    assert not any("forward" in m.__dict__ for m in model.modules())
    with fast_t5_attention(model, block=8):
        assert sum("forward" in m.__dict__ for m in model.modules()) == 4
    assert not any("forward" in m.__dict__ for m in model.modules())
    with pytest.raises(ValueError, match="block"):
        install_fast_t5_attention(model, block=0)


@pytest.mark.parametrize("family, local_sdpa", [(f, False) for f in FAST_FAMILIES] + [("longt5-tglobal", True)],
                         ids=[*FAST_FAMILIES, "longt5-tglobal-sdpa"])
def test_cached_step_with_fast_attention_equals_windowed_hf(family, local_sdpa):
    """CachedSeq2Seq (cached mode, groups of 2 windows) with the fast attention installed: same
    loss and gradients as plain windowed HF (dropout on except attention probabilities)."""
    model, reference = pair(family, local_sdpa=local_sdpa)
    assert_cached_step_matches(model, reference, [3 * WINDOW + 5, WINDOW + 2], [7, 4], CachedConfig(window=WINDOW, group_windows=2))


@pytest.mark.parametrize("local_sdpa", [False, True], ids=["blocked", "local_sdpa"])
def test_windows_shorter_than_a_global_block_leave_the_global_table_without_gradient(local_sdpa):
    """No window reaches a global block: HF's global bias takes no part and gets no gradient
    (None), where a zero one would still be weight-decayed and moved by Adam's moments."""
    model, reference = pair("longt5-tglobal", local_sdpa=local_sdpa)
    for module in [*model.modules(), *reference.modules()]:
        if hasattr(module, "global_block_size"):
            module.global_block_size = 2 * WINDOW
    assert_cached_step_matches(model, reference, [3 * WINDOW + 5, WINDOW + 2], [7, 4], CachedConfig(window=WINDOW, group_windows=2))


def assert_cached_step_matches(model, reference, lengths, label_lengths, config):
    """One CachedSeq2Seq step on ``model`` against plain windowed HF on ``reference``."""
    ids, mask, labels = random_batch(lengths, label_lengths, model.config.pad_token_id)
    wrapped = CachedSeq2Seq(model, config)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    loss = wrapped(ids, mask, labels=labels).loss
    loss.backward()
    ref_loss, ref = windowed_hf_step(reference, ids, mask, labels, WINDOW, config.group_windows, SEED)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads_of(model), ref)


@pytest.mark.parametrize("family", ["t5", "longt5-local", "longt5-tglobal"])
@pytest.mark.parametrize("mode", ["cached", "full"])
def test_encoder_gradient_checkpointing_stays_exact(family, mode):
    """Non-reentrant checkpointing of the encoder layers inside the recompute, dropout on
    everywhere (attention included): still the windowed HF gradients."""
    model = make_model(family)
    reference = copy.deepcopy(model)
    config = CachedConfig(window=WINDOW, group_windows=2, mode=mode, encoder_gradient_checkpointing=True)
    assert_cached_step_matches(model, reference, [3 * WINDOW + 1, WINDOW + 3], [6, 3], config)
    assert all(block.gradient_checkpointing for block in model.get_encoder().block)
    assert not any(block.gradient_checkpointing for block in model.get_decoder().block)


def encoder_saved_peak(model, length, wrapped=None):
    """Peak bytes the encoder keeps for backward over one forward + backward."""
    ids, mask, labels = random_batch([length], [4], model.config.pad_token_id)
    meter = SavedTensorMeter()
    with meter.watch(model.get_encoder()):
        if wrapped is None:
            model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
        else:
            wrapped(ids, mask, labels=labels).loss.backward()
    return meter.peak_bytes


@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_fast_attention_saves_linear_memory(family):
    """Doubling the length doubles what the fast encoder saves (no L × L tensor); HF's T5 grows
    faster (its (batch, heads, L, L) scores), which shows the measure would catch one."""
    model = without_attention_dropout(make_model(family))
    hf_ratio = encoder_saved_peak(model, 512) / encoder_saved_peak(model, 256)
    install_fast_t5_attention(model)
    fast_ratio = encoder_saved_peak(model, 512) / encoder_saved_peak(model, 256)
    assert fast_ratio <= 2.05, fast_ratio
    if family != "longt5-local":  # HF's local attention is linear too
        assert hf_ratio > 2.5, hf_ratio


def test_encoder_gradient_checkpointing_saves_less():
    """With the flag the recompute keeps one layer's activations (2 layers here: under half)."""
    peaks = {}
    for flag in (False, True):
        model = make_model("t5")
        wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=4, encoder_gradient_checkpointing=flag))
        peaks[flag] = encoder_saved_peak(model, 64, wrapped)
    assert peaks[True] < peaks[False] / 2, peaks


def test_encoder_gradient_checkpointing_is_validated():
    with pytest.raises(ValueError, match="encoder_gradient_checkpointing"):
        CachedConfig(encoder_gradient_checkpointing="yes")


@pytest.mark.parametrize("kernel, use_flex, local_sdpa", [("flex", True, False), ("blocked", False, False), ("local_sdpa", True, True)])
def test_the_t5_attention_kernel_setting_reaches_every_replaced_module(kernel, use_flex, local_sdpa):
    """``t5_attention_kernel``: "blocked" keeps CUDA on our blocked code instead of flex_attention
    (on CPU both run it: which one CUDA takes is the GPU check's to see); "local_sdpa" puts
    LongT5's encoder layers on ``local_sdpa`` and leaves the decoder's on flex."""
    model = make_model("longt5-tglobal")
    CachedSeq2Seq(model, CachedConfig(window=WINDOW, fast_t5_attention=True, keep_attention_dropout=False, t5_attention_kernel=kernel))
    settings = [module._cached_ds_settings for module, _ in attention_targets(model)]
    assert settings and all(s.use_flex is use_flex and s.local_sdpa is local_sdpa for s in settings)


def test_local_sdpa_runs_one_sdpa_call_per_longt5_encoder_layer():
    """The encoder's local / transient-global layers each make one SDPA call, and the blocked
    kernel is not used there."""
    from op_meters import OpsSeen

    model, _ = pair("longt5-tglobal", local_sdpa=True)
    ids, mask, _ = random_batch([23, 14], [6, 4], model.config.pad_token_id)
    with OpsSeen() as ops:
        model.get_encoder()(input_ids=ids, attention_mask=mask)
    # on CPU, SDPA with a bias that needs a gradient runs its math kernel, which decomposes into
    # one softmax; the blocked kernel's online softmax would show as amax
    assert ops.counts["_safe_softmax"] == model.config.num_layers and "amax" not in ops.counts, ops.counts


def test_local_sdpa_builds_its_bias_once_per_forward_and_every_layer_reuses_it(monkeypatch):
    """The dense bias (what SDPA saves for backward besides K and V) depends on the mask and the
    first layer's tables only: one per forward of the stack, not one per layer. SDPA is spied on,
    not replaced; the gradients still equal HF's (test_fast_attention_equals_hf_eager)."""
    from cached_ds import local_sdpa

    masks = []
    real = local_sdpa.F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return real(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(local_sdpa.F, "scaled_dot_product_attention", spy)
    model, _ = pair("longt5-tglobal", local_sdpa=True)
    ids, mask, _ = random_batch([23, 14], [6, 4], model.config.pad_token_id)
    for _ in range(2):
        model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
    layers = model.config.num_layers
    assert len(masks) == 2 * layers and masks[0].requires_grad
    first, second = masks[:layers], masks[layers:]
    assert all(m is first[0] for m in first) and all(m is second[0] for m in second) and first[0] is not second[0]


def test_an_unknown_t5_attention_kernel_names_the_field():
    with pytest.raises(ValueError, match=r"t5_attention_kernel must be one of \('flex', 'blocked', 'local_sdpa'\), got 'triton'"):
        CachedConfig(t5_attention_kernel="triton")


@pytest.mark.parametrize("causal, radius", [(False, None), (True, None), (False, 5)], ids=["full", "causal", "band"])
def test_flex_forward_equals_the_blocked_kernel_on_cpu(causal, radius):
    """The CUDA path's score_mod (offset bias) and block mask (causal, band, key padding), run
    forward on CPU (compiled flex_attention; its backward is CUDA-only, checked by
    bench/gpu_checks/t5_attention_check.py) against the blocked kernel on padded keys."""
    from cached_ds.flex_t5 import flex_bias_attention
    from cached_ds.t5_attention import BlockedBiasAttention, Layout

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=gen) for _ in range(3))
    offsets = torch.randn(2 * 40 - 1, 2, generator=gen)
    key_valid = torch.ones(2, 40, dtype=torch.bool)
    key_valid[1, 30:] = False
    layout = Layout(block=8, offsets=offsets, key_valid=key_valid, causal=causal, radius=radius)
    with torch.no_grad():
        blocked = BlockedBiasAttention.apply(q, k, v, offsets, None, None, None, layout)
        flex = flex_bias_attention(q, k, v, layout)
    torch.testing.assert_close(flex, blocked, rtol=1e-5, atol=1e-5)


def test_flex_forward_with_transient_global_keys_equals_the_blocked_kernel_on_cpu():
    """LongT5 transient-global on the CUDA path: global keys appended to the local ones, their
    bias gathered by (global index - query block), HF's segment rule as the mask. Forward on
    CPU against the blocked kernel, two padded documents (one shorter than a global block's worth
    of padding), several global blocks."""
    from cached_ds.flex_t5 import flex_bias_attention
    from cached_ds.longt5_attention import _first_layer_bias
    from cached_ds.t5_attention import BlockedBiasAttention, Layout

    model = make_model("longt5-tglobal")  # local_radius 3, global_block_size 4
    module = model.get_encoder().block[0].layer[0].TransientGlobalSelfAttention
    length = 30
    mask = torch.ones(2, length)
    mask[1, 19:] = 0
    bias = _first_layer_bias(module, mask, length)
    side = bias.extra["side"]
    count = side.segments.shape[1]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, length, 16, generator=gen) for _ in range(3))
    side_k, side_v = (torch.randn(2, 2, count, 16, generator=gen) for _ in range(2))
    layout = Layout(block=8, offsets=bias.offsets, key_valid=mask > 0, radius=module.local_radius, side=side)
    with torch.no_grad():
        blocked = BlockedBiasAttention.apply(q, k, v, bias.offsets, side_k, side_v, bias.extra["table"], layout)
        flex = flex_bias_attention(q, k, v, layout, side_k, side_v, bias.extra["table"])
    real = (mask > 0)[:, None, :, None].expand_as(blocked)  # padding queries' outputs are don't-cares
    torch.testing.assert_close(flex[real], blocked[real], rtol=1e-5, atol=1e-5)


def test_a_stacks_layers_share_one_flex_block_mask_per_forward(monkeypatch):
    """Building a flex block mask evaluates the mask over every (query, key) pair, so the first
    layer of a stack builds it and the others reuse it (``OffsetBias.shared``): every fast
    layer of one forward is handed the same store, and a second forward a fresh one. The
    attention is spied on, not replaced: the outputs still come from it."""
    from cached_ds import longt5_attention, t5_attention

    stores = []
    real = t5_attention.attention

    def spy(q, k, v, layout, *args, **kwargs):
        stores.append(layout.shared)
        return real(q, k, v, layout, *args, **kwargs)

    monkeypatch.setattr(t5_attention, "attention", spy)
    monkeypatch.setattr(longt5_attention, "attention", spy)
    model = make_model("longt5-tglobal").eval()
    install_fast_t5_attention(model)
    ids = torch.randint(4, 96, (2, 30))
    with torch.no_grad():
        for _ in range(2):
            model.get_encoder()(input_ids=ids, attention_mask=torch.ones_like(ids))
    layers = len(model.get_encoder().block)
    assert len(stores) == 2 * layers and all(store is not None for store in stores)
    first, second = stores[:layers], stores[layers:]
    assert all(store is first[0] for store in first) and all(store is second[0] for store in second)
    assert first[0] is not second[0]


def test_flex_reuses_the_block_mask_a_layout_carries():
    """Two layers' calls with one ``shared`` store: the second reads the mask the first
    built (one entry, the same object), and its output equals a call that builds its own."""
    from dataclasses import replace

    from cached_ds.flex_t5 import flex_bias_attention

    q, k, v, layout = flex_inputs(40)
    store = {}
    shared = replace(layout, shared=store)
    with torch.no_grad():
        flex_bias_attention(q, k, v, shared)
        built = next(iter(store.values()))
        reused = flex_bias_attention(q * 0.5, k, v, shared)
        own = flex_bias_attention(q * 0.5, k, v, layout)
    assert len(store) == 1 and next(iter(store.values())) is built
    torch.testing.assert_close(reused, own, rtol=0, atol=0)


def flex_inputs(length: int, seed: int = 0):
    """q, k, v and a padded, banded layout of ``length`` tokens (two documents, one padded)."""
    from cached_ds.t5_attention import Layout

    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, length, 16, generator=gen) for _ in range(3))
    key_valid = torch.ones(2, length, dtype=torch.bool)
    key_valid[1, length - 7 :] = False
    return q, k, v, Layout(block=8, offsets=torch.randn(2 * length - 1, 2, generator=gen), key_valid=key_valid, radius=9)


def test_flex_stays_compiled_for_more_lengths_than_dynamos_default_budget():
    """Each document's last window group brings a new length. With Dynamo's default budget the
    9th one ran eager flex_attention, which materialises the scores; within ``RECOMPILE_LIMIT``
    every length is compiled (past it Dynamo would raise, not run eager). On CPU shapes are
    static, so each length here is a compile of its own; on CUDA they are automatic-dynamic."""
    from torch._dynamo.utils import counters

    from cached_ds.flex_t5 import RECOMPILE_LIMIT, flex_bias_attention
    from cached_ds.t5_attention import BlockedBiasAttention

    lengths = range(41, 41 + 4 * 10, 4)  # 10 lengths: past the default budget of 8
    assert len(lengths) > torch._dynamo.config.recompile_limit and len(lengths) < RECOMPILE_LIMIT
    before = counters["stats"]["unique_graphs"]
    for length in lengths:
        q, k, v, layout = flex_inputs(length)
        with torch.no_grad():
            flex = flex_bias_attention(q, k, v, layout)
            blocked = BlockedBiasAttention.apply(q, k, v, layout.offsets, None, None, None, layout)
        torch.testing.assert_close(flex, blocked, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] - before >= len(lengths)  # compiled, every one


def test_a_flex_failure_falls_back_to_the_blocked_kernel_once_with_a_warning(monkeypatch):
    """A real flex failure (its backward does not exist on CPU: inputs that need a gradient make
    the compiled call raise) gives ``None`` and one warning, and later calls do not try again."""
    from cached_ds import flex_t5
    from cached_ds.t5_attention import try_flex

    monkeypatch.setattr(flex_t5, "failure", None)  # this process's state, restored after the test
    q, k, v, layout = flex_inputs(33)
    q.requires_grad_()
    with pytest.warns(UserWarning, match="flex_attention failed .*blocked kernel from now on"):
        assert try_flex(q, k, v, layout) is None
    assert "backward" in flex_t5.failure
    calls = flex_t5.calls
    assert try_flex(q.detach(), k, v, layout) is None and flex_t5.calls == calls  # given up: not tried again


@pytest.mark.parametrize("causal, radius", [(True, None), (False, 5)], ids=["causal", "band"])
def test_blocked_bias_attention_in_bf16_is_as_accurate_as_eager_bf16(causal, radius):
    """bf16 q, k, v and offset bias over 64 query blocks (keys padded in one row): the output and
    the gradients of q, k, v and the bias within 3x the error of rounding the exact answer to
    bf16 (measured: 1.0-2.2x), the exact answer being HF's eager T5 attention in fp64 on the same
    bf16-rounded inputs; the eager attention in bf16 is 3-13x. The kernel's sums over blocks must
    stay fp32: d(q), d(k) or d(v) summed in bf16 (4-5x here) passed every test before (mutation
    testing)."""
    from cached_ds.t5_attention import BlockedBiasAttention, Layout

    gen = torch.Generator().manual_seed(0)
    b, h, length, d = 2, 2, 256, 8
    q, k, v = (torch.randn(b, h, length, d, generator=gen).bfloat16() for _ in range(3))
    offsets = torch.randn(2 * length - 1, h, generator=gen).bfloat16()
    key_valid = torch.ones(b, length, dtype=torch.bool)
    key_valid[1, 252:] = False  # every query still sees a key (a query that sees none is a don't-care row)
    grad_out = torch.randn(b, h, length, d, generator=gen).bfloat16()
    position = torch.arange(length)
    relative = position[None, :] - position[:, None]
    allowed = key_valid[:, None, None, :] & ((relative <= 0) if causal else (relative.abs() <= radius))

    def eager(q, k, v, offsets):  # HF's eager T5 attention with the bias of these offsets
        scores = q @ k.transpose(-1, -2) + offsets[relative + length - 1].permute(2, 0, 1)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        return torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), -1).to(q.dtype) @ v

    def blocked(q, k, v, offsets):
        layout = Layout(BLOCK, offsets, key_valid=key_valid, causal=causal, radius=radius)
        return BlockedBiasAttention.apply(q, k, v, offsets, None, None, None, layout)

    def run(attention, dtype):
        inputs = [t.to(dtype).clone().requires_grad_() for t in (q, k, v, offsets)]
        out = attention(*inputs)
        out.backward(grad_out.to(dtype))
        return [out.detach().double()] + [t.grad.double() for t in inputs]

    def error(a, b):
        return float((a - b).norm() / b.norm())

    exact, ours = run(eager, torch.float64), run(blocked, torch.bfloat16)
    for name, e, o in zip(["out", "q", "k", "v", "offsets"], exact, ours):
        rounding = error(e.bfloat16().double(), e)
        assert error(o, e) <= 3 * rounding, (name, error(o, e), rounding)


@pytest.mark.parametrize("family, local_sdpa", [("t5", False), ("longt5-local", False), ("longt5-tglobal", False),
                                               ("longt5-local", True), ("longt5-tglobal", True)])
def test_fast_attention_in_bf16_is_as_accurate_as_hf_eager_in_bf16(family, local_sdpa):
    """A bf16 model with the fast attention (blocked kernel on CPU, or local_sdpa; LongT5's global
    keys too) trains: its encoder output and encoder gradients are as close to HF's fp32 ones as
    HF's eager attention in bf16 is (within 2x), over many query blocks."""
    base = without_attention_dropout(make_model(family, dropout=0.0))
    base.set_attn_implementation("eager")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 90, (1, 96), generator=gen)
    decoder_ids = torch.randint(4, 90, (1, 8), generator=gen)

    def step(model):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, decoder_input_ids=decoder_ids, use_cache=False)
        weights = torch.randn(out.encoder_last_hidden_state.shape, generator=torch.Generator().manual_seed(7))
        loss = (out.encoder_last_hidden_state.float() * weights).mean() + out.logits.float().logsumexp(-1).mean()
        loss.backward()
        grads = {name: g.double() for name, g in grads_of(model).items() if name.startswith("encoder.")}
        return out.encoder_last_hidden_state.double(), grads

    exact_states, exact = step(copy.deepcopy(base))
    hf_states, hf = step(copy.deepcopy(base).to(torch.bfloat16))
    fast = copy.deepcopy(base).to(torch.bfloat16)
    install_fast_t5_attention(fast, block=BLOCK, local_sdpa=local_sdpa)
    states, ours = step(fast)

    def error(a, b):
        return float((a - b).norm() / b.norm())

    def total_error(grads):
        return sum(float((grads[k] - exact[k]).pow(2).sum()) for k in exact) ** 0.5

    assert set(ours) == set(exact)
    assert error(states, exact_states) <= 2 * error(hf_states, exact_states)
    assert total_error(ours) <= 2 * total_error(hf)
