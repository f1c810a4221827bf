"""The tied embedding gets encoder + decoder + LM-head shares; padding never changes the result."""

import pytest
import torch
from reference import assert_grads_match, grads_of, windowed_encoder_states, windowed_hf_step
from tiny_models import make_model, random_batch
from transformers.modeling_outputs import BaseModelOutput

from cached_ds import CachedConfig, CachedSeq2Seq

WINDOW = 16


@pytest.mark.parametrize("family", ["bart", "pegasus", "t5"])
def test_tied_embedding_gets_every_share(family):
    model = make_model(family)
    shared = model.get_input_embeddings().weight
    ids, mask, labels = random_batch([3 * WINDOW + 4], [6], model.config.pad_token_id)

    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=1))(ids, mask, labels=labels).loss.backward()
    ours = shared.grad.clone()

    _, ref = windowed_hf_step(model, ids, mask, labels, WINDOW, 1, seed=7)
    name = next(n for n, p in model.named_parameters() if p is shared)
    # The decoder + LM-head share alone: plain HF with the encoder states cut from the graph.
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    fused, fused_mask = windowed_encoder_states(model, ids, mask, WINDOW, 1)
    model(encoder_outputs=BaseModelOutput(last_hidden_state=fused.detach()), attention_mask=fused_mask, labels=labels).loss.backward()
    decoder_share = shared.grad.clone()
    encoder_share = ref[name] - decoder_share

    # Each share is over 10x the bound below, so dropping either one fails the comparison.
    bound = 1e-5
    for share in (decoder_share, encoder_share):
        assert share.norm() / ref[name].norm() > 10 * bound
    assert (ours - ref[name]).norm() / ref[name].norm() <= bound


@pytest.mark.parametrize("family", ["bart", "longt5-tglobal"])
def test_padding_changes_nothing(family):
    """Dropout off: a padded batch gives each document's own loss and gradient (token-weighted)."""
    model = make_model(family, dropout=0.0)
    lengths, label_lengths = [3 * WINDOW + 5, WINDOW - 3], [7, 3]
    ids, mask, labels = random_batch(lengths, label_lengths, model.config.pad_token_id)

    model.zero_grad(set_to_none=True)
    batch_loss = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=2))(ids, mask, labels=labels).loss
    (batch_loss * sum(label_lengths)).backward()
    batch_grads = grads_of(model)

    summed_loss, summed_grads = 0.0, {}
    for row, (n, m) in enumerate(zip(lengths, label_lengths)):
        loss, grads = windowed_hf_step(model, ids[row : row + 1, :n], mask[row : row + 1, :n], labels[row : row + 1, :m], WINDOW, 2, seed=0)
        summed_loss += loss * m
        for k, g in grads.items():
            summed_grads[k] = summed_grads.get(k, 0) + g * m
    torch.testing.assert_close(batch_loss * sum(label_lengths), summed_loss, rtol=1e-6, atol=0)
    assert_grads_match(batch_grads, summed_grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.int32])
def test_any_mask_dtype_hf_takes(dtype):
    """Float, bool and int32 masks (HF takes all of them) give HF's result with the int64 mask."""
    model = make_model("bart")
    ids, mask, labels = random_batch([2 * WINDOW + 5, WINDOW - 3], [7, 3], model.config.pad_token_id)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(4)
    loss = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=2))(ids, mask.to(dtype), labels=labels).loss
    loss.backward()
    ref_loss, ref = windowed_hf_step(model, ids, mask, labels, WINDOW, 2, seed=4)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=0)
    assert_grads_match(grads_of(model), ref)
