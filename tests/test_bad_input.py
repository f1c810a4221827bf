"""Bad input fails early with a ValueError that names the argument and the fix."""

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


def test_window_larger_than_positions():
    with pytest.raises(ValueError, match=r"window=65 exceeds the encoder's 64 positions.*set window <= 64"):
        CachedSeq2Seq(make_model("bart"), CachedConfig(window=65))


def test_relative_position_families_take_any_window():
    assert CachedSeq2Seq(make_model("t5"), CachedConfig(window=100_000)).window == 100_000


def test_decoder_only_model():
    gpt2 = hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="must be a Hugging Face encoder–decoder.*AutoModelForSeq2SeqLM"):
        CachedSeq2Seq(gpt2)


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
        (dict(group_windows=2, group_tokens=64), "either group_windows or group_tokens"),
        (dict(group_windows="some"), "group_windows must be a positive integer or 'all'"),
        (dict(mode="fast"), "mode must be one of"),
        (dict(grad_dtype="int8"), "grad_dtype must be one of"),
    ],
)
def test_config_values(settings, message):
    with pytest.raises(ValueError, match=message):
        CachedConfig(**settings)


def test_unknown_config_key():
    with pytest.raises(ValueError, match=r"unknown CachED settings \['windw'\]; valid keys"):
        CachedConfig.from_dict({"windw": 512})
