"""CachED loss and gradients equal full backprop through the same windowed model (fp32, dropout on)."""

import pytest
import torch
from reference import assert_grads_match, grads_of, hf_step, windowed_hf_step
from tiny_models import FAMILIES, make_model, random_batch

from cached_ds import CachedConfig, CachedSeq2Seq

WINDOW = 16
SEED = 1234


def cached_step(model, ids, mask, labels, seed=SEED, **config):
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, **config))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = wrapped(ids, mask, labels=labels).loss
    loss.backward()
    return loss.detach(), grads_of(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_shorter_than_a_window_equals_plain_hf(family):
    model = make_model(family)
    ids, mask, labels = random_batch([11], [5], model.config.pad_token_id)
    loss, grads = cached_step(model, ids, mask, labels)
    ref_loss, ref = hf_step(model, ids, mask, labels, SEED)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads, ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tokens", [2 * WINDOW + 7, 4 * WINDOW], ids=["partial-last-window", "four-windows"])
@pytest.mark.parametrize("group_windows", [1, 2, "all"])
def test_long_document(family, tokens, group_windows):
    model = make_model(family)
    ids, mask, labels = random_batch([tokens], [6], model.config.pad_token_id)
    loss, grads = cached_step(model, ids, mask, labels, group_windows=group_windows)
    group = None if group_windows == "all" else group_windows
    ref_loss, ref = windowed_hf_step(model, ids, mask, labels, WINDOW, group, SEED)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_of_two_documents(family):
    model = make_model(family)
    ids, mask, labels = random_batch([3 * WINDOW + 5, WINDOW + 2], [7, 4], model.config.pad_token_id)
    loss, grads = cached_step(model, ids, mask, labels, group_windows=2)
    ref_loss, ref = windowed_hf_step(model, ids, mask, labels, WINDOW, 2, SEED)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads, ref)


@pytest.mark.parametrize("family", ["bart", "t5"])
@pytest.mark.parametrize("mode", ["cached", "full"])
def test_decoder_gradient_checkpointing_stays_exact(family, mode):
    model = make_model(family)
    ids, mask, labels = random_batch([3 * WINDOW + 1], [6], model.config.pad_token_id)
    loss, grads = cached_step(model, ids, mask, labels, group_windows=2, mode=mode, decoder_gradient_checkpointing=True)
    ref_loss, ref = windowed_hf_step(model, ids, mask, labels, WINDOW, 2, SEED)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads, ref)


@pytest.mark.parametrize("family", ["bart", "longt5-tglobal"])
def test_full_mode_is_the_same_model(family):
    model = make_model(family)
    ids, mask, labels = random_batch([2 * WINDOW + 3], [6], model.config.pad_token_id)
    loss, grads = cached_step(model, ids, mask, labels, group_windows=1, mode="full")
    ref_loss, ref = windowed_hf_step(model, ids, mask, labels, WINDOW, 1, SEED)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads, ref)


def test_token_budget_groups_equal_count_groups():
    """A 40-token budget with 16-token windows packs 2 windows per group: same as group_windows=2."""
    model = make_model("bart")
    ids, mask, labels = random_batch([5 * WINDOW + 3], [6], model.config.pad_token_id)
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_tokens=40))
    assert [g.input_ids.shape[0] for g in wrapped.plan(ids, mask).groups] == [2, 2, 2]
    loss, grads = cached_step(model, ids, mask, labels, group_tokens=40)
    ref_loss, ref = windowed_hf_step(model, ids, mask, labels, WINDOW, 2, SEED)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads, ref)


@pytest.mark.parametrize("seed", range(4))
def test_layerdrop_skipping_layers_in_some_groups(seed):
    """LayerDrop draws per group: a layer used by early groups but skipped by the last one still
    gets its gradient (and the RNG replay makes every group drop the same layers again)."""
    model = make_model("bart", encoder_layerdrop=0.5, encoder_layers=3)
    ids, mask, labels = random_batch([4 * WINDOW], [6], model.config.pad_token_id)
    loss, grads = cached_step(model, ids, mask, labels, seed=seed, group_windows=1)
    ref_loss, ref = windowed_hf_step(model, ids, mask, labels, WINDOW, 1, seed)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads, ref)


@pytest.mark.parametrize("mode", ["cached", "full"])
def test_padding_groups_change_nothing(mode):
    """Groups added so data-parallel ranks agree on a count leave loss, gradients and RNG alone."""
    model = make_model("bart")
    ids, mask, labels = random_batch([3 * WINDOW + 2], [6], model.config.pad_token_id)
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=1, mode=mode))
    wrapped.sync_group_count = lambda count: count + 3
    assert [g.padding for g in wrapped.plan(ids, mask).groups] == [True] * 3 + [False] * 4
    model.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    loss = wrapped(ids, mask, labels=labels).loss
    loss.backward()
    grads, next_draw = grads_of(model), torch.rand(1)
    ref_loss, ref = windowed_hf_step(model, ids, mask, labels, WINDOW, 1, SEED)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads, ref)
    assert torch.equal(next_draw, torch.rand(1)), "the RNG stream ends where the reference's does"
