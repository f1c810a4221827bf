"""bf16: under ``torch.autocast`` and with bf16 parameters, CachED is as accurate as plain HF
at the same precision (both measured against the fp32 reference)."""

import contextlib

import pytest
import torch
from reference import grads_of, windowed_hf_step
from tiny_models import make_model, random_batch

from cached_ds import CachedConfig, CachedSeq2Seq

WINDOW = 16


def relative_error(grads, ref) -> float:
    num = sum(float((grads[k].double() - ref[k].double()).pow(2).sum()) for k in ref)
    return (num / sum(float(ref[k].double().pow(2).sum()) for k in ref)) ** 0.5


@pytest.mark.parametrize("family", ["bart", "t5"])
@pytest.mark.parametrize("precision", ["autocast", "bf16-params"])
def test_bf16_as_accurate_as_plain_hf(family, precision):
    model = make_model(family)
    ids, mask, labels = random_batch([6 * WINDOW + 3], [8], model.config.pad_token_id)
    _, fp32_ref = windowed_hf_step(model, ids, mask, labels, WINDOW, 1, seed=3)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast" else contextlib.nullcontext()
    if precision == "bf16-params":
        model.to(torch.bfloat16)

    with autocast:
        _, low_ref = windowed_hf_step(model, ids, mask, labels, WINDOW, 1, seed=3)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=1))(ids, mask, labels=labels).loss
    loss.backward()
    grads = grads_of(model)

    assert all(g.dtype == p.dtype for g, p in zip(grads.values(), model.parameters()))
    hf_error = relative_error(low_ref, fp32_ref)
    assert hf_error > 1e-4, "bf16 really ran"
    assert relative_error(grads, fp32_ref) <= 1.1 * hf_error
    assert relative_error(grads, low_ref) <= 0.5 * hf_error
