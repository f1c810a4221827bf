"""Encoder activation memory is one window group, whatever the document length."""

import torch
from reference import windowed_encoder_states
from tiny_models import make_model, random_batch
from transformers.modeling_outputs import BaseModelOutput

from cached_ds import CachedConfig, CachedSeq2Seq, SavedTensorMeter

WINDOW = 16


def encoder_saved_peak(model, mode: str, windows: int, group_windows: int = 2) -> int:
    """Peak live bytes saved for backward by the encoder's modules over one forward + backward."""
    ids, mask, labels = random_batch([windows * WINDOW], [6], model.config.pad_token_id)
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=group_windows, mode=mode))
    meter = SavedTensorMeter()
    with meter.watch(model.get_encoder()):
        wrapped(ids, mask, labels=labels).loss.backward()
    model.zero_grad(set_to_none=True)
    assert meter.live_bytes == 0, "every saved tensor is released after backward"
    return meter.peak_bytes


def bounded_by_one_group(peak_short: int, peak_long: int, one_group: int) -> bool:
    return peak_short <= one_group and peak_long <= one_group


def test_cached_encoder_memory_is_one_group_and_flat_in_length():
    model = make_model("bart")
    one_group = encoder_saved_peak(model, "full", windows=2)  # a document that is exactly one group
    assert one_group > 0
    short, long = encoder_saved_peak(model, "cached", 8), encoder_saved_peak(model, "cached", 32)
    assert bounded_by_one_group(short, long, one_group)
    assert long == short


def test_control_that_keeps_every_group_graph_fails_the_bound():
    """``full`` mode keeps every group's graph: the same check fails, and memory grows with length."""
    model = make_model("bart")
    one_group = encoder_saved_peak(model, "full", windows=2)
    short, long = encoder_saved_peak(model, "full", 8), encoder_saved_peak(model, "full", 32)
    assert not bounded_by_one_group(short, long, one_group)
    assert 3.5 <= long / short <= 4.5


def test_quarter_million_token_document_one_step():
    """One CPU step on a 256K-token document matches the plain-HF reference loss."""
    model = make_model("bart", max_position_embeddings=1024)
    tokens = 256 * 1024
    ids, mask, labels = random_batch([tokens], [12], model.config.pad_token_id)
    wrapped = CachedSeq2Seq(model, CachedConfig(window=1024, group_windows=16))
    torch.manual_seed(3)
    loss = wrapped(ids, mask, labels=labels).loss
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.get_encoder().layers[0].fc1.weight.grad.abs().sum() > 0

    torch.manual_seed(3)
    with torch.no_grad():
        fused, fused_mask = windowed_encoder_states(model, ids, mask, 1024, 16)
        assert fused.shape[1] == tokens
        ref = model(encoder_outputs=BaseModelOutput(last_hidden_state=fused), attention_mask=fused_mask, labels=labels).loss
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-6, atol=0)


def test_the_window_plan_holds_no_copy_of_a_documents_ids_or_mask():
    """Every group of whole windows reads the batch's ids in place and a broadcast mask, and the
    fused mask is the batch's own: on the H200 each copy was 8 bytes per document token on the
    device (the 4M -> 8M growth was 6.05 GiB per 2**20 tokens against the 6 of the fused states
    and their fp32 gradient). Without padding neither encoder nor decoder gets a mask."""
    from cached_ds.windows import WindowPlan

    ids, mask, _ = random_batch([10 * WINDOW, 4 * WINDOW + 5], [3, 3], pad_token_id=1)
    plan = WindowPlan.build(ids, mask, WINDOW, pad_token_id=1, group_windows=3)
    shares = [g.input_ids.untyped_storage().data_ptr() == ids.untyped_storage().data_ptr() for g in plan.groups]
    in_place = [g for g, shared in zip(plan.groups, shares) if shared]
    copied = [g for g, shared in zip(plan.groups, shares) if not shared]
    # windows in order, 3 per group: three groups inside document 0, one across both documents
    # (copied, no padding), then document 1's last two whole windows and its partial one (padded)
    assert len(in_place) == 3 and [g.has_padding for g in copied] == [False, True]
    assert all(g.attention_mask.stride() == (0, 0) and g.encoder_mask is None for g in in_place)
    assert plan.fused_mask.untyped_storage().data_ptr() == mask.untyped_storage().data_ptr()
    assert plan.decoder_mask is plan.fused_mask  # document 1 is padded
    for g in plan.groups:  # the same windows as a copying plan: each run's ids in their fused places
        for group_row, fused_row, count in g.runs:
            assert torch.equal(g.input_ids.reshape(-1)[group_row : group_row + count], ids.reshape(-1)[fused_row : fused_row + count])
        assert torch.equal(g.attention_mask, (g.input_ids != 1).long() if g.has_padding else torch.ones_like(g.input_ids))

    one = WindowPlan.build(ids[:1], mask[:1], WINDOW, pad_token_id=1, group_windows=3)
    assert one.decoder_mask is None and all(g.encoder_mask is None for g in one.groups)


def step_peak_bytes(wrapped, tokens: int) -> tuple[int, int]:
    """Peak bytes the CPU allocator holds over one forward + backward (after a warm-up step, so
    parameter gradients exist already), from the profiler's allocation and free events: every
    tensor of the step counted, saved or not. Two peaks: up to the encoder's backward (forward,
    decoder backward) and in it (from the gradient cache on: ``cached_ds:backward:gradient_cache``
    in ``cached_encoder.py``; 0 where there is none). The batch is made before the profile starts."""
    from torch.profiler import ProfilerActivity, profile

    ids, mask, labels = random_batch([tokens], [16], wrapped.model.config.pad_token_id)
    wrapped(ids, mask, labels=labels).loss.backward()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        wrapped(ids, mask, labels=labels).loss.backward()
    # the raw events ("[memory]": + bytes at an allocation, - at a free); prof.events() folds
    # most of them into the ops that made them
    events = list(prof.profiler.kineto_results.events())
    encoder_backward = min((e.start_ns() for e in events if e.name() == "cached_ds:backward:gradient_cache"), default=None)
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live, peaks = 0, [0, 0]
    for start, change in changes:
        live += change
        phase = int(encoder_backward is not None and start >= encoder_backward)
        peaks[phase] = max(peaks[phase], live)
    return peaks[0], peaks[1]


def test_a_streaming_step_grows_with_the_document_by_its_states_and_gradient_cache_alone():
    """[decoder-memory]: with streaming cross-attention, what a whole CachED step holds grows per
    document token by the fused states and their fp32 gradient cache (4 + 4 bytes per hidden unit
    in fp32) up to the encoder's backward, by the cache alone in it (the states are freed with
    the decoder's graph), and by the CPU RNG state kept per window group (5 KiB per 1024 tokens
    here): nothing else. The control, HF's cross-attention, keeps every decoder layer's K and V
    (another 2 x 4 bytes per hidden unit per layer) and more."""
    hidden, group_tokens = 32, 1024
    rng_state = torch.get_rng_state().numel() / group_tokens  # bytes per token: kept per group to replay its dropout
    growth = {}
    for block in (256, None):
        model = make_model("bart", attention_dropout=0.0, d_model=hidden, max_position_embeddings=64)
        wrapped = CachedSeq2Seq(model, CachedConfig(window=64, group_tokens=group_tokens, cross_attention_block=block))
        short, long = step_peak_bytes(wrapped, 32768), step_peak_bytes(wrapped, 65536)
        growth[block] = [(b - a) / 32768 for a, b in zip(short, long)]
    before, during = growth[256]
    assert 8 * hidden + rng_state - 4 <= before <= 8 * hidden + rng_state + 2, growth  # 260.9 bytes per token
    assert 4 * hidden + rng_state - 4 <= during <= 4 * hidden + rng_state + 2, growth  # 132.9
    assert growth[None][0] > 8 * hidden + rng_state + 2 * 2 * 4 * hidden, growth  # 2 decoder layers' K and V at least
