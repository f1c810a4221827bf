"""Every summary token weighs the same however the global batch is split: one big batch and
GAS 2 on one rank (here) and GAS 1 on 2 ranks (test_engine_two_ranks.py) all give the gradient of
the token-level mean over all documents, computed from plain HF calls; and the step reports
that mean as its loss."""

import pytest
from ds_helpers import resolved_config, single_rank_distributed
from loss_split_cases import WINDOW, batch_of, documents
from reference import assert_grads_match, token_mean_hf_step
from tiny_models import make_model

from cached_ds.deepspeed_engine import initialize
from cached_ds.trainer import train_step


@pytest.fixture(scope="module", autouse=True)
def distributed():
    single_rank_distributed()


@pytest.mark.parametrize("micro, gas", [(4, 1), (2, 2), (1, 4)], ids=["one-batch", "gas2", "gas4"])
def test_split_does_not_change_the_gradient(micro, gas):
    from ds_helpers import reduced_grad

    model = make_model("bart", dropout=0.0)
    pad = model.config.pad_token_id
    docs = documents(pad)
    ref_loss, ref = token_mean_hf_step(model, docs, WINDOW)
    model.zero_grad(set_to_none=True)
    engine, *_ = initialize(model, resolved_config("zero2", micro=micro, gas=gas, cached={"window": WINDOW}))
    batches = [batch_of(docs[i : i + micro], pad) for i in range(0, len(docs), micro)]
    summed, label_tokens, doc_tokens, _ = train_step(engine, batches, optimizer_step=False)
    assert engine.is_gradient_accumulation_boundary()
    # what metrics.jsonl logs as "loss" (summed / label_tokens) and "doc_tokens"
    assert summed / label_tokens == pytest.approx(ref_loss, rel=1e-6)
    assert doc_tokens == sum(ids.numel() for ids, _ in docs)
    assert_grads_match({n: reduced_grad(p) for n, p in engine.module.model.named_parameters()}, ref)
