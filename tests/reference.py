"""Independent references built from plain Hugging Face calls only (no cached_ds code).

``hf_step``: one HF ``model(input_ids, attention_mask, labels)`` call — for documents of at most
one window. ``windowed_hf_step``: one HF encoder call per window group, on padded stacked windows
in the order cached_ds groups them (document by document, ``group_windows`` at a time), outputs
concatenated per document and passed to HF as ``encoder_outputs``; backpropagated normally. CPU
dropout draws from one sequential stream, so the same calls in the same order give the same masks.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers.modeling_outputs import BaseModelOutput


def grads_of(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def hf_step(model, input_ids, attention_mask, labels, seed: int):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    return loss.detach(), grads_of(model)


def windowed_encoder_states(model, input_ids, attention_mask, window: int, group_windows: int | None):
    """Per-document concatenation of per-window HF encoder outputs (runs under the caller's grad mode)."""
    pad = model.config.pad_token_id
    windows = []  # (document, token ids of the window)
    for doc, (row, n) in enumerate(zip(input_ids, attention_mask.sum(1).tolist())):
        windows += [(doc, row[start : min(start + window, n)]) for start in range(0, n, window)]
    size = group_windows or len(windows)
    pieces: list[list[torch.Tensor]] = [[] for _ in range(input_ids.shape[0])]
    for first in range(0, len(windows), size):
        chunk = windows[first : first + size]
        ids = pad_sequence([w for _, w in chunk], batch_first=True, padding_value=pad)
        mask = pad_sequence([torch.ones_like(w) for _, w in chunk], batch_first=True)
        states = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        for row, (doc, w) in enumerate(chunk):
            pieces[doc].append(states[row, : len(w)])
    docs = [torch.cat(p) for p in pieces]
    fused_mask = pad_sequence([torch.ones(len(d), dtype=torch.long) for d in docs], batch_first=True)
    return pad_sequence(docs, batch_first=True), fused_mask


def windowed_hf_step(model, input_ids, attention_mask, labels, window: int, group_windows: int | None, seed: int):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    fused, fused_mask = windowed_encoder_states(model, input_ids, attention_mask, window, group_windows)
    loss = model(encoder_outputs=BaseModelOutput(last_hidden_state=fused), attention_mask=fused_mask, labels=labels).loss
    loss.backward()
    return loss.detach(), grads_of(model)


def assert_grads_match(grads, ref, rel: float = 1e-5, atol: float = 1e-6):
    """Global relative error over all parameters, then each parameter; gradients that are
    mathematically ~0 (attention key biases) pass on the absolute tolerance."""
    assert grads.keys() == ref.keys(), sorted(set(grads) ^ set(ref))
    num = sum(float((grads[k].double() - ref[k].double()).pow(2).sum()) for k in ref)
    den = sum(float(ref[k].double().pow(2).sum()) for k in ref)
    assert den > 0
    global_rel = (num / den) ** 0.5
    assert global_rel <= rel, f"global relative gradient error {global_rel:.3e} > {rel:.0e}"
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=100 * rel, atol=atol, msg=lambda m: f"{name}: {m}")
    return global_rel


def token_mean_hf_step(model, documents, window: int):
    """Plain-HF token-level mean loss over all documents' summary tokens and its gradient, as
    (loss, gradients) (each document its own forward; dropout must be off). ``documents``:
    (ids, labels) 1-row tensors."""
    model.zero_grad(set_to_none=True)
    total = sum(int((labels != -100).sum()) for _, labels in documents)
    loss = 0.0
    for ids, labels in documents:
        fused, fused_mask = windowed_encoder_states(model, ids, torch.ones_like(ids), window, None)
        logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=fused), attention_mask=fused_mask, labels=labels).logits
        loss = loss + torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    mean = loss / total
    mean.backward()
    return float(mean), grads_of(model)
