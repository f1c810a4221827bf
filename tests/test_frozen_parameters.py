"""Frozen parameters get no gradient; a frozen encoder path skips the recompute entirely."""

import pytest
import torch
from reference import assert_grads_match, grads_of, windowed_hf_step
from tiny_models import make_model, random_batch

from cached_ds import CachedConfig, CachedSeq2Seq

WINDOW = 16


def run_counting_encoder_calls(model, ids, mask, labels, seed):
    calls = []
    handle = model.get_encoder().register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=1))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    wrapped(ids, mask, labels=labels).loss.backward()
    handle.remove()
    return grads_of(model), calls


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_frozen_encoder_skips_recompute(family):
    model = make_model(family)
    model.get_encoder().requires_grad_(False)  # the shared embedding too
    ids, mask, labels = random_batch([3 * WINDOW + 2], [5], model.config.pad_token_id)
    grads, calls = run_counting_encoder_calls(model, ids, mask, labels, seed=5)
    assert calls == [False] * 4, "one no-grad encoder call per window group, no recompute"
    _, ref = windowed_hf_step(model, ids, mask, labels, WINDOW, 1, seed=5)
    assert grads and not any(k.startswith(("model.encoder", "encoder")) for k in grads)
    assert_grads_match(grads, ref)


@pytest.mark.parametrize("family", ["bart", "longt5-local"])
def test_frozen_embedding_with_trainable_encoder(family):
    """As PEFT/LoRA does: the embedding is frozen, the encoder still gets its exact gradient."""
    model = make_model(family)
    model.get_input_embeddings().weight.requires_grad_(False)
    ids, mask, labels = random_batch([2 * WINDOW + 9], [5], model.config.pad_token_id)
    grads, calls = run_counting_encoder_calls(model, ids, mask, labels, seed=6)
    assert calls == [False] * 3 + [True] * 3, "3 groups encoded, then recomputed with autograd"
    _, ref = windowed_hf_step(model, ids, mask, labels, WINDOW, 1, seed=6)
    assert any("encoder" in k for k in ref)
    assert_grads_match(grads, ref)


def test_partly_frozen_encoder_layer():
    model = make_model("pegasus")
    model.get_encoder().layers[0].requires_grad_(False)
    ids, mask, labels = random_batch([2 * WINDOW + 1], [5], model.config.pad_token_id)
    grads, _ = run_counting_encoder_calls(model, ids, mask, labels, seed=8)
    _, ref = windowed_hf_step(model, ids, mask, labels, WINDOW, 1, seed=8)
    assert not any(k.startswith("model.encoder.layers.0.") for k in grads)
    assert any(k.startswith("model.encoder.layers.1.") for k in grads)
    assert_grads_match(grads, ref)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_frozen_encoder_body_with_trainable_embedding(family):
    """The encoder's layers frozen, the shared token embedding trained (e.g. new language codes
    added to the vocabulary): the embedding still gets its encoder share, through the recompute."""
    model = make_model(family)
    embedding = model.get_input_embeddings().weight
    for p in model.get_encoder().parameters():
        if p is not embedding:
            p.requires_grad_(False)
    ids, mask, labels = random_batch([3 * WINDOW + 2], [5], model.config.pad_token_id)
    grads, calls = run_counting_encoder_calls(model, ids, mask, labels, seed=5)
    assert calls == [False] * 4 + [True] * 4, "4 groups encoded, then recomputed for the embedding's gradient"
    _, ref = windowed_hf_step(model, ids, mask, labels, WINDOW, 1, seed=5)
    frozen = ("model.encoder.layers.", "encoder.block.")
    assert not any(k.startswith(frozen) for k in grads) and not any(k.startswith(frozen) for k in ref)
    assert_grads_match(grads, ref)
