"""Beam search with one copy of each document's encoder side: same tokens as HF's beam search,
and encoder-side storage that does not grow with the number of beams (HF's grows ~num_beams×)."""

import pytest
import torch
from tiny_models import cross_attention_modules, make_model, random_batch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from cached_ds import CachedConfig, CachedSeq2Seq
from cached_ds.shared_beam_generation import EXPANSION_HOOK, generate_shared
from cached_ds.streaming_cross_attention import (
    StreamingCrossAttention,
    install_streaming_cross_attention,
)

LENGTHS = [41, 23, 30]  # right-padded to N = 41, a size no decoder-side tensor has
NEW_TOKENS = 12
BEAMS = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "num_beams": 4, "do_sample": False}
GREEDY = {**BEAMS, "num_beams": 1}
SAMPLING = {"max_new_tokens": NEW_TOKENS, "do_sample": True, "top_k": 20, "num_return_sequences": 2}


def documents(model, lengths=LENGTHS):
    ids, mask, _ = random_batch(lengths, [1] * len(lengths), model.config.pad_token_id)
    return ids, mask


def hf_encoder_outputs(model, ids, mask) -> BaseModelOutput:
    """A fresh one per call: HF's generate replaces the tensors inside it with expanded ones."""
    with torch.no_grad():
        states = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    return BaseModelOutput(last_hidden_state=states)


def hf_and_shared(model, ids, mask, seed=0, **kwargs):
    torch.manual_seed(seed)
    reference = model.generate(encoder_outputs=hf_encoder_outputs(model, ids, mask), attention_mask=mask, **kwargs)
    torch.manual_seed(seed)
    with torch.no_grad():
        shared = generate_shared(model, hf_encoder_outputs(model, ids, mask), mask, **kwargs)
    return reference, shared


@pytest.mark.parametrize("family", ["bart", "t5", "longt5-tglobal"])
@pytest.mark.parametrize(
    "kwargs",
    [BEAMS, {**BEAMS, "num_return_sequences": 2}, GREEDY, SAMPLING],
    ids=["beams", "beams-2-returned", "greedy", "sampling"],
)
def test_same_tokens_as_hf_generate(family, kwargs):
    model = make_model(family).eval()
    reference, shared = hf_and_shared(model, *documents(model), **kwargs)
    assert torch.equal(shared, reference)


def test_beams_stay_in_their_document_and_cross_attention_cache_stays_empty(monkeypatch):
    """What makes one K/V per document exact: HF's beam search reorders rows only within a
    document's block of ``num_beams`` rows, and there is no cross-attention cache to reorder."""
    model = make_model("bart").eval()
    hf_reorder, seen = EncoderDecoderCache.reorder_cache, []

    def reorder(cache, beam_idx):
        assert cache.cross_attention_cache.get_seq_length() == 0
        seen.append(beam_idx.clone())
        return hf_reorder(cache, beam_idx)

    monkeypatch.setattr(EncoderDecoderCache, "reorder_cache", reorder)
    ids, mask = documents(model)
    with torch.no_grad():
        generate_shared(model, hf_encoder_outputs(model, ids, mask), mask, **BEAMS)
    assert len(seen) >= NEW_TOKENS - 1
    rows = torch.arange(len(LENGTHS) * BEAMS["num_beams"])
    for beam_idx in seen:
        assert torch.equal(beam_idx // BEAMS["num_beams"], rows // BEAMS["num_beams"])
    assert any(not torch.equal(beam_idx, rows) for beam_idx in seen)  # beams did get reordered


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_cached_seq2seq_beam_search_on_long_documents(family):
    """Several windows per document: the same tokens as HF's beam search on the fused states, and
    the model is left as it was (HF's modules, HF's expansion)."""
    model = make_model(family).eval()
    ids, mask = documents(model)
    wrapped = CachedSeq2Seq(model, CachedConfig(window=16, group_windows=2))
    ours = wrapped.generate(ids, mask, **BEAMS)
    encoder_outputs, fused_mask = wrapped.encode_long(ids, mask)
    reference = model.generate(encoder_outputs=encoder_outputs, attention_mask=fused_mask, **BEAMS)
    assert torch.equal(ours, reference)
    assert not any(isinstance(m, StreamingCrossAttention) for m in cross_attention_modules(model))
    assert EXPANSION_HOOK not in vars(model)


@pytest.mark.parametrize("family", ["bart", "t5"])
@pytest.mark.parametrize("streaming_installed", [False, True], ids=["hf-modules", "streaming-installed"])
def test_generate_in_training_mode_with_attention_dropout_runs_hf_generate(family, streaming_installed):
    """``generate`` does not switch to eval, and HF's drops cross-attention probabilities there,
    which the shared path cannot: the same tokens as HF's generate under the same seed, a warning
    that says to call eval(), and the model's modules as they were."""
    model = make_model(family)  # training mode, dropout 0.1 everywhere
    modules = install_streaming_cross_attention(model, block=7) if streaming_installed else cross_attention_modules(model)
    wrapped = CachedSeq2Seq(model, CachedConfig(window=16, group_windows=2))
    ids, mask = documents(model)
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match=r"training mode with cross-attention dropout 0\.1.*model\.eval\(\)"):
        ours = wrapped.generate(ids, mask, **BEAMS)
    torch.manual_seed(3)
    encoder_outputs, fused_mask = wrapped.encode_long(ids, mask)  # the same dropout draws as generate's encoding
    reference = model.generate(encoder_outputs=encoder_outputs, attention_mask=fused_mask, **BEAMS)
    assert torch.equal(ours, reference)
    assert cross_attention_modules(model) == modules and model.training


def test_streaming_installed_for_training_stays_installed():
    model = make_model("t5").eval()
    modules = install_streaming_cross_attention(model, block=7)
    reference = make_model("t5").eval()
    ids, mask = documents(model)
    ours = CachedSeq2Seq(model, CachedConfig(window=16)).generate(ids, mask, **BEAMS)
    encoder_outputs, fused_mask = CachedSeq2Seq(reference, CachedConfig(window=16)).encode_long(ids, mask)
    assert torch.equal(ours, reference.generate(encoder_outputs=encoder_outputs, attention_mask=fused_mask, **BEAMS))
    assert cross_attention_modules(model) == modules
    assert all(m.block == 7 and m.shared_encoder_side is None for m in modules)


# --------------------------------------------------------------------------- storage accounting


class EncoderSideMeter(TorchDispatchMode):
    """Bytes of live storages holding a tensor with an N-sized dimension (the encoder side: states,
    masks, cross-attention K/V) that any op of generation read or wrote, sampled each time the
    decoder returns (a step's transients, such as attention scores, are gone by then); the peak.
    Storages are deduplicated by address, and views count their whole storage."""

    def __init__(self, length: int):
        super().__init__()
        self.length, self.peak_bytes = length, 0
        self._storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves((args, kwargs, out)):
            if isinstance(tensor, torch.Tensor) and self.length in tensor.shape:
                storage = tensor.untyped_storage()
                self._storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def sample(self, *_) -> None:
        live = sum(nbytes for ref, nbytes in self._storages.values() if not ref.expired())
        self.peak_bytes = max(self.peak_bytes, live)


def encoder_side_bytes(model, generate, **kwargs) -> int:
    """``EncoderSideMeter``'s peak over ``generate(model, HF encoder outputs, mask, **kwargs)``."""
    ids, mask = documents(model)
    encoder_outputs = hf_encoder_outputs(model, ids, mask)
    meter = EncoderSideMeter(max(LENGTHS))
    handle = model.get_decoder().register_forward_hook(meter.sample)
    try:
        with torch.no_grad(), meter:
            generate(model, encoder_outputs, mask, **kwargs)
    finally:
        handle.remove()
    return meter.peak_bytes


def hf_generate(model, encoder_outputs, mask, **kwargs):
    return model.generate(encoder_outputs=encoder_outputs, attention_mask=mask, **kwargs)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_encoder_side_storage_does_not_grow_with_beams(family):
    model = make_model(family).eval()
    shared = {beams: encoder_side_bytes(model, generate_shared, **{**BEAMS, "num_beams": beams}) for beams in (1, 4)}
    hf = {beams: encoder_side_bytes(model, hf_generate, **{**BEAMS, "num_beams": beams}) for beams in (1, 4)}
    states_bytes = len(LENGTHS) * max(LENGTHS) * model.config.d_model * 4
    layers = len(cross_attention_modules(model))
    assert shared[1] >= states_bytes * (1 + 2 * layers)  # the meter sees the states and every layer's K and V
    assert shared[4] == shared[1]
    assert hf[4] > 3.5 * hf[1]  # the same meter on HF's beam search: a copy per beam
    assert hf[4] > 3.5 * shared[4]
