"""The launcher's learning-rate schedule: HF's linear/constant schedules with warm-up, through
the DeepSpeed engine and into metrics.jsonl, against the same schedule on a plain torch optimizer."""

import json

import pytest
import torch
import transformers as hf
from ds_helpers import single_rank_distributed
from launcher_helpers import make_corpus

from cached_ds.run_config import parse_args
from cached_ds.trainer import Trainer

STEPS, LR = 5, 1e-3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    single_rank_distributed()
    return make_corpus(tmp_path_factory.mktemp("corpus"), documents=8)


def reference_rates(warmup: int, decay: bool | str) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    if decay == "cosine":
        schedule = hf.get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=STEPS,
                                                                  min_lr_rate=0.1)
    elif decay:
        schedule = hf.get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=STEPS)
    else:
        schedule = hf.get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)
    rates = []
    for _ in range(STEPS):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


@pytest.mark.parametrize("warmup, decay", [(0, True), (2, True), (2, False)])
def test_each_step_runs_at_the_scheduled_rate(tmp_path, corpus, warmup, decay):
    """DeepSpeed's WarmupLR/WarmupDecayLR (the shipped configs' section) ran the first two steps at
    rate 0 whatever the warm-up; with no warm-up the first step now runs at the peak."""
    out = tmp_path / "run"
    Trainer(parse_args(["--deepspeed", "ds_configs/zero2.json", "--model", corpus["model"], "--train_file", corpus["train_file"],
                        "--window", "128", "--output_dir", str(out), "--max_steps", str(STEPS), "--lr", str(LR),
                        "--warmup_steps", str(warmup), "--lr_decay", str(decay).lower()])).train()
    rates = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rates == pytest.approx(reference_rates(warmup, decay), rel=1e-12, abs=0)
    if warmup == 0:
        assert rates[0] == LR


def test_a_warmup_cosine_section_runs_hfs_cosine_from_the_flags(tmp_path, corpus):
    """DeepSpeed's WarmupCosineLR ran steps 1 and 2 at rate 0 as its siblings do, and refused the
    flags' default warm-up of 0 ("warmup_num_steps must be a positive integer"); the run now
    follows HF's cosine with warm-up, down to cos_min_ratio x --lr."""
    config = json.loads(open("ds_configs/zero2.json").read())
    config["scheduler"] = {"type": "WarmupCosineLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto", "cos_min_ratio": 0.1}}
    (tmp_path / "cosine.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    Trainer(parse_args(["--deepspeed", str(tmp_path / "cosine.json"), "--model", corpus["model"], "--train_file", corpus["train_file"],
                        "--window", "128", "--output_dir", str(out), "--max_steps", str(STEPS), "--lr", str(LR)])).train()
    rates = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rates == pytest.approx(reference_rates(0, "cosine"), rel=1e-12, abs=0)
    assert rates[0] == LR and LR * 0.1 < rates[-1] < rates[-2] < LR
