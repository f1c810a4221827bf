"""A memory budget for kept encoder graphs (``keep_graphs_bytes``): groups whose graph fits are
not recomputed, the rest are; gradients stay exact in every split (fp32, dropout on)."""

import copy

import pytest
import torch
from reference import assert_grads_match, grads_of, windowed_hf_step
from tiny_models import make_model, random_batch

from cached_ds import CachedConfig, CachedSeq2Seq, SavedTensorMeter

WINDOW = 16
GROUP_WINDOWS = 2
SEED = 1234
EVERY_GROUP = 2**40  # bytes: more than any test needs
CACHED_ONE_WINDOW = {"window": WINDOW, "group_windows": 1, "group_tokens": None}


def two_documents(model):
    """Groups of 2 windows: four (2, 16) groups and a (1, 5) one, the second document padded."""
    return random_batch([6 * WINDOW, 2 * WINDOW + 5], [7, 4], model.config.pad_token_id)


def cached_step(model, batch, budget, seed=SEED, group_windows=GROUP_WINDOWS, **config):
    """One CachED forward + backward; returns the wrapper (for its kept-graph stats), loss, grads."""
    ids, mask, labels = batch
    config = CachedConfig(window=WINDOW, group_windows=group_windows, keep_graphs_bytes=budget, **config)
    wrapped = CachedSeq2Seq(model, config)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = wrapped(ids, mask, labels=labels).loss
    loss.backward()
    return wrapped, loss.detach(), grads_of(model)


def budgets(model, batch, **step) -> dict[str, int]:
    """0; half of what every group's graph takes in the same step (some groups kept); enough for
    all of them."""
    every = cached_step(copy.deepcopy(model), batch, EVERY_GROUP, **step)[0].last_kept_bytes
    return {"none": 0, "some": every // 2, "all": EVERY_GROUP}


def groups_in(model, batch) -> int:
    return len(CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=GROUP_WINDOWS)).plan(*batch[:2]).groups)


def assert_kept(wrapped, split: str, groups: int) -> None:
    kept = wrapped.last_kept_groups
    assert {"none": kept == 0, "some": 0 < kept < groups, "all": kept == groups}[split], (split, kept, groups)
    assert (wrapped.last_kept_bytes > 0) == (kept > 0)


@pytest.mark.parametrize("family", ["bart", "t5", "longt5-tglobal"])
@pytest.mark.parametrize("split", ["none", "some", "all"])
def test_exact_in_every_split(family, split):
    model = make_model(family)
    batch = two_documents(model)
    wrapped, loss, grads = cached_step(model, batch, budgets(model, batch)[split])
    next_draw = torch.rand(1)
    assert_kept(wrapped, split, groups_in(model, batch))
    ref_loss, ref = windowed_hf_step(model, *batch, WINDOW, GROUP_WINDOWS, SEED)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads, ref)
    assert torch.equal(next_draw, torch.rand(1)), "kept or not, the dropout stream ends where the reference's does"


@pytest.mark.parametrize("split", ["some", "all"])
@pytest.mark.parametrize("seed", range(3))
def test_layerdrop_with_kept_groups(split, seed):
    """LayerDrop draws per group; with every group kept the last one, which delivers the sums,
    comes from the forward, and a layer it skipped still gets the other groups' gradient."""
    model = make_model("bart", encoder_layerdrop=0.5, encoder_layers=3)
    batch = two_documents(model)
    wrapped, loss, grads = cached_step(model, batch, budgets(model, batch, seed=seed)[split], seed=seed)
    assert_kept(wrapped, split, groups_in(model, batch))
    ref_loss, ref = windowed_hf_step(model, *batch, WINDOW, GROUP_WINDOWS, seed)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads, ref)


def test_encoder_checkpointing_inside_kept_groups():
    model = make_model("t5")
    batch = two_documents(model)
    wrapped, loss, grads = cached_step(model, batch, budgets(model, batch, encoder_gradient_checkpointing=True)["some"],
                                       encoder_gradient_checkpointing=True)
    assert_kept(wrapped, "some", groups_in(model, batch))
    ref_loss, ref = windowed_hf_step(model, *batch, WINDOW, GROUP_WINDOWS, SEED)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads, ref)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_every_group_kept_means_no_recompute(family):
    """With every graph kept, the encoder runs once per group, with autograd, as in full
    backprop; with none kept, once without autograd and once more in backward."""
    model = make_model(family)
    batch = two_documents(model)
    groups = groups_in(model, batch)
    calls, split_budgets = {}, budgets(model, batch)
    for split in ("none", "all"):
        seen = calls[split] = []
        handle = model.get_encoder().register_forward_hook(lambda *_, seen=seen: seen.append(torch.is_grad_enabled()))
        cached_step(model, batch, split_budgets[split])
        handle.remove()
    assert calls["all"] == [True] * groups
    assert calls["none"] == [False] * groups + [True] * groups


def encoder_saved_peak(model, batch, budget) -> tuple[int, int]:
    """Peak live bytes the encoder saves for backward over one step, and the groups kept."""
    meter = SavedTensorMeter()
    with meter.watch(model.get_encoder()):
        wrapped, *_ = cached_step(model, batch, budget)
    assert meter.live_bytes == 0, "every kept graph is released by the backward"
    return meter.peak_bytes, wrapped.last_kept_groups


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_saved_memory_grows_with_kept_groups_within_budget(family):
    model = make_model(family)
    batch = two_documents(model)
    split = budgets(model, batch)
    peaks = {name: encoder_saved_peak(model, batch, budget) for name, budget in split.items()}
    one_group, _ = peaks["none"]
    (some, kept_some), (every, kept_all) = peaks["some"], peaks["all"]
    assert 2 <= kept_some < kept_all
    assert one_group < some < every, peaks
    assert some <= split["some"] + one_group, "the budget plus the one group being recomputed"
    assert every > 3 * one_group, "all five groups' graphs were held at once, as full backprop holds them"


@pytest.mark.parametrize("family", ["bart", "t5"])
@pytest.mark.parametrize("share", [4, 2], ids=["one-kept", "two-kept"])
def test_kept_graphs_are_freed_before_the_first_recompute(family, share):
    """Backward takes the kept (leading) groups' graphs first and frees each as it goes, so the
    encoder never holds kept graphs and a recomputed group at once: its peak is the larger of
    the two, not their sum (the widest group, run last, is the latest widest: one not kept)."""
    model = make_model(family)
    batch = two_documents(model)
    every = cached_step(copy.deepcopy(model), batch, EVERY_GROUP)[0].last_kept_bytes
    one_group, _ = encoder_saved_peak(model, batch, 0)
    meter = SavedTensorMeter()
    with meter.watch(model.get_encoder()):
        wrapped, *_ = cached_step(model, batch, every // share)
    assert wrapped.last_kept_groups == 4 // share
    assert meter.peak_bytes <= max(one_group, wrapped.last_kept_bytes), (meter.peak_bytes, one_group, wrapped.last_kept_bytes)


@pytest.mark.parametrize("budget", [0, EVERY_GROUP], ids=["none-kept", "all-kept"])
def test_a_second_backward_recomputes_what_the_first_used(budget):
    """A kept graph serves one backward (it is released by it); a second backward through a
    retained loss graph recomputes every group, as it does without a budget: the gradients are
    twice the reference's."""
    model = make_model("bart")
    ids, mask, labels = two_documents(model)
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=GROUP_WINDOWS, keep_graphs_bytes=budget))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    loss = wrapped(ids, mask, labels=labels).loss
    assert (wrapped.last_kept_groups > 0) == (budget > 0)
    loss.backward(retain_graph=True)
    loss.backward()
    twice = {name: grad / 2 for name, grad in grads_of(model).items()}  # before the reference zeroes them
    _, ref = windowed_hf_step(model, ids, mask, labels, WINDOW, GROUP_WINDOWS, SEED)
    assert_grads_match(twice, ref)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_kept_bytes_are_what_the_kept_graphs_hold(family):
    """The budget is charged what keeping costs: the tensors the encoder saved for backward (as
    SavedTensorMeter sees them, parameters left out) plus each kept group's output, within the
    embedding lookup's few percent, not the parameters and not less than the outputs."""
    model = make_model(family)
    ids, mask, labels = two_documents(model)
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=GROUP_WINDOWS, keep_graphs_bytes=EVERY_GROUP))
    meter = SavedTensorMeter()
    with meter.watch(model.get_encoder()):
        torch.manual_seed(SEED)
        loss = wrapped(ids, mask, labels=labels).loss
        held = meter.live_bytes  # every group's graph, kept until backward
        loss.backward()
    groups = wrapped.plan(ids, mask).groups
    assert wrapped.last_kept_groups == len(groups)
    outputs = sum(group.input_ids.numel() * model.config.d_model * 4 for group in groups)  # fp32 states
    assert held + outputs <= wrapped.last_kept_bytes <= 1.05 * (held + outputs), (wrapped.last_kept_bytes, held, outputs)


@pytest.mark.parametrize("value", [-1, True, 1.5, "1GB"], ids=["negative", "bool", "float", "string"])
def test_bad_budget_names_the_field(value):
    with pytest.raises(ValueError, match="keep_graphs_bytes must be a non-negative number of bytes"):
        CachedConfig(keep_graphs_bytes=value)


def test_budget_in_full_mode_is_an_error():
    with pytest.raises(ValueError, match="keep_graphs_bytes is for mode 'cached'"):
        CachedConfig(mode="full", keep_graphs_bytes=1 << 20)
    CachedConfig(mode="full", keep_graphs_bytes=0)  # 0: nothing kept, nothing to object to


@pytest.fixture
def distributed():
    from ds_helpers import single_rank_distributed

    single_rank_distributed()


@pytest.mark.parametrize("config", ["zero2", "zero3"])
@pytest.mark.parametrize("split", ["some", "all"])
def test_engine_with_a_budget_matches_the_reference(distributed, config, split):
    """ZeRO-2/3 reduce each gradient from the hook on its ``.grad``: kept groups, the last one
    included, still leave exactly one accumulation per parameter per micro-batch. ZeRO-3 (with
    the shipped keep_encoder_gathered) holds the encoder gathered from forward to backward."""
    from ds_helpers import resolved_config
    from test_engine_single_rank import CACHED, micro_batches, reference_gradients, train_step

    from cached_ds.deepspeed_engine import initialize

    model = make_model("bart")
    batches = micro_batches(model, gas=2)
    ref_grads = reference_gradients(copy.deepcopy(model), batches)
    every = max(
        cached_step(copy.deepcopy(model), batch, EVERY_GROUP, group_windows=1)[0].last_kept_bytes
        for batch in batches
    )
    budget = {"some": every // 2, "all": EVERY_GROUP}[split]
    engine, *_ = initialize(model, resolved_config(config, gas=2, cached={**CACHED, "keep_graphs_bytes": budget}))
    grads = train_step(engine, batches)
    kept, groups = engine.module.last_kept_groups, len(engine.module.plan(*batches[-1][:2]).groups)
    assert 0 < kept < groups if split == "some" else kept == groups
    assert_grads_match(grads, ref_grads)


def test_zero3_engine_rejects_a_budget_without_a_gathered_encoder(distributed):
    from ds_helpers import resolved_config

    from cached_ds.deepspeed_engine import initialize

    config = resolved_config("zero3", cached={"window": WINDOW, "keep_graphs_bytes": 1 << 20, "keep_encoder_gathered": False})
    with pytest.raises(ValueError, match="keep_graphs_bytes\" under ZeRO-3 needs \"cached.keep_encoder_gathered\": true"):
        initialize(make_model("bart"), config)


def test_a_forward_without_backward_releases_the_held_encoder(distributed):
    """Under a budget the forward's gather stays open for the backward; a loss that is never
    backpropagated must not leave the encoder gathered (and ZeRO-3's hooks off) for good, nor
    release it under a later step that still holds it."""
    import gc

    from ds_helpers import resolved_config

    from cached_ds.deepspeed_engine import initialize

    model = make_model("bart")
    engine, *_ = initialize(model, resolved_config("zero3", cached={**CACHED_ONE_WINDOW, "keep_graphs_bytes": EVERY_GROUP}))
    encoder = engine.module.model.get_encoder()
    ids, mask, labels = random_batch([3 * WINDOW], [4], model.config.pad_token_id)
    # the engine's _GatheredModules for the encoder, whose scope the core enters
    hold = lambda: engine.module.encoder_scope.__self__.holders  # noqa: E731
    loss = engine(ids, mask, labels=labels).loss
    assert hold() == 1 and engine.module.last_kept_groups == 3
    # A second step while the first graph lives; the first is then freed unused. The second's
    # kept graphs must still find the encoder gathered, and its backward must be exact.
    second = engine(ids, mask, labels=labels).loss
    assert hold() == 2
    del loss
    gc.collect()
    assert hold() == 1 and all(p.ds_persist for p in encoder.layers.parameters())
    engine.backward(second)
    assert hold() == 0 and all(p.ds_persist is False for p in encoder.layers.parameters())
    del second
    gc.collect()
    assert hold() == 0


@pytest.mark.parametrize("family", ["bart", "t5", "longt5-tglobal"])
def test_every_piece_at_once_equals_the_reference(family):
    """Kept graphs for some groups, streaming cross-attention with its fp32 gradient cache, the
    cache and the fused states offloaded, checkpointed encoder and decoder layers, the fast T5
    attention where it applies: still plain windowed HF backprop, dropout on (but on the attention
    probabilities of the replaced modules, which ``keep_attention_dropout=False`` switches off)."""
    from tiny_models import cross_attention_modules

    from cached_ds.t5_attention import attention_targets

    model = make_model(family)
    reference = copy.deepcopy(model)
    fast_t5 = family != "bart"
    for module in cross_attention_modules(reference) + [m for m, _ in attention_targets(reference) if fast_t5]:
        module.dropout = 0.0
    batch = two_documents(model)
    pieces = dict(cross_attention_block=7, keep_attention_dropout=False, fast_t5_attention=fast_t5,
                  offload_gradient_cache=True, offload_encoder_states=True,
                  decoder_gradient_checkpointing=True, encoder_gradient_checkpointing=True)
    wrapped, loss, grads = cached_step(model, batch, budgets(model, batch, **pieces)["some"], **pieces)
    assert_kept(wrapped, "some", groups_in(model, batch))
    ref_loss, ref = windowed_hf_step(reference, *batch, WINDOW, GROUP_WINDOWS, SEED)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads, ref)
