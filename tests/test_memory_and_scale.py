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
