"""save_checkpoint/load_checkpoint round trips, and export to an HF folder."""

import copy
import json

import pytest
import torch
import transformers as hf
from ds_helpers import resolved_config, single_rank_distributed
from tiny_models import make_model, random_batch

from cached_ds.deepspeed_engine import export_hf, initialize
from cached_ds.model import CACHED_CONFIG_FILE

WINDOW = 16
CACHED = {"window": WINDOW, "group_windows": 2, "group_tokens": None}


@pytest.fixture(scope="module", autouse=True)
def distributed():
    single_rank_distributed()


def step(engine, batch, seed):
    """One training step; returns its loss and the full gradients before the update."""
    from ds_helpers import reduced_grad

    torch.manual_seed(seed)
    loss = engine(*batch[:2], labels=batch[2]).loss
    engine.backward(loss)
    grads = {n: reduced_grad(p).clone() for n, p in engine.module.model.named_parameters()}
    engine.step()
    return loss.item(), grads


def full_weights(engine, stage_config):
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: (p.detach() if stage_config == "zero0" else safe_get_full_fp32_param(p)).clone()
            for n, p in engine.module.model.named_parameters()}


@pytest.mark.parametrize("stage_config", ["zero0", "zero2", "zero3"])
def test_checkpoint_round_trip_and_hf_export(stage_config, tmp_path):
    model = make_model("bart")
    batches = [random_batch([3 * WINDOW + i], [6], model.config.pad_token_id, seed=60 + i) for i in range(3)]
    config = resolved_config(stage_config, cached=CACHED)

    engine, *_ = initialize(copy.deepcopy(model), config)
    step(engine, batches[0], seed=1)
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    loss, grads = step(engine, batches[1], seed=2)

    fresh = make_model("bart", seed=99)  # different weights: everything must come from the checkpoint
    resumed, *_ = initialize(fresh, config)
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    resumed_loss, resumed_grads = step(resumed, batches[1], seed=2)
    assert resumed_loss == loss
    for name in grads:
        assert torch.equal(resumed_grads[name], grads[name]), name

    resumed.save_checkpoint(str(tmp_path / "ckpt"))
    exported = export_hf(resumed, tmp_path / "ckpt", tmp_path / "hf")
    loaded = hf.BartForConditionalGeneration.from_pretrained(exported)
    weights = full_weights(resumed, stage_config)
    for name, p in loaded.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name
    settings = json.loads((exported / CACHED_CONFIG_FILE).read_text())
    assert settings["window"] == WINDOW and settings["group_windows"] == 2
