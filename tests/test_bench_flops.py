"""bench/flops.py's model-FLOP formula against torch's own count of the same step.

FlopCounterMode counts every matrix product of one ``full``-mode forward + backward (eager
attention, so the attention products are counted too); the formula must agree within 5%: the
rest is what it leaves out on purpose (layer norms, LongT5's global-token aggregation)."""

import sys
from pathlib import Path

import pytest
import torch
import transformers as hf
from torch.utils.flop_counter import FlopCounterMode

from cached_ds import CachedConfig, CachedSeq2Seq
from cached_ds.model_zoo import model_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from flops import step_flops  # noqa: E402

WINDOW, TOKENS, TARGETS = 256, 1024, 64


@pytest.mark.parametrize("name", ["tiny-bart", "tiny-long-t5"])
def test_formula_matches_counted_flops(name):
    config = model_config(name)
    config._attn_implementation = "eager"  # sdpa's CPU kernel is invisible to FlopCounterMode
    torch.manual_seed(0)
    model = hf.AutoModelForSeq2SeqLM.from_config(config).train()
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, mode="full", group_windows="all"))
    ids = torch.randint(4, config.vocab_size, (1, TOKENS))
    labels = torch.randint(4, config.vocab_size, (1, TARGETS))
    with FlopCounterMode(display=False) as counter:
        wrapped(ids, torch.ones_like(ids), labels=labels).loss.backward()
    ratio = counter.get_total_flops() / step_flops(model, TOKENS, TARGETS, WINDOW)
    assert 0.95 <= ratio <= 1.05, ratio
