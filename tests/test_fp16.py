"""fp16 (GPUs without bf16: V100, T4): DeepSpeed's dynamic loss scaling around the CachED step.

DeepSpeed's CPU accelerator reports no fp16 (``cpu_accelerator.py``: ``is_fp16_supported``
returns None) and the engine's sanity check refuses fp16 on it. What fp16 training runs, the
loss scaler, the fp16 ZeRO optimizers and their overflow checks, is device-independent torch
code, so these tests lift that one capability check (``fp16_on_cpu``) and run it for real."""

import copy
import json

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput
from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
from ds_helpers import resolved_config, single_rank_distributed
from launcher_helpers import make_corpus
from reference import windowed_encoder_states, windowed_hf_step
from test_mixed_precision import relative_error
from tiny_models import make_model, random_batch

from cached_ds.deepspeed_engine import initialize
from cached_ds.run_config import parse_args
from cached_ds.trainer import Trainer

WINDOW, SCALE = 16, 256


@pytest.fixture
def fp16_on_cpu():
    single_rank_distributed()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CPU_Accelerator, "is_fp16_supported", lambda self: True)
        patch.setattr(CPU_Accelerator, "supported_dtypes", lambda self: [torch.float32, torch.bfloat16, torch.float16])
        yield


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_fp16_gradients_carry_the_loss_scale_and_are_as_accurate_as_plain_hf(fp16_on_cpu, config):
    """The gradient cache holds scaled gradients and the encoder's re-run pushes them on: every
    gradient is SCALE × the fp32 reference's up to fp16 rounding (a cache scaled twice or not at
    all is off by 255×), no worse than plain HF's own fp16 gradients."""
    from ds_helpers import reduced_grad

    model = make_model("bart", dropout=0.0)
    ids, mask, labels = random_batch([8 * WINDOW, 5 * WINDOW + 3], [12, 7], model.config.pad_token_id, seed=5)
    _, fp32_ref = windowed_hf_step(copy.deepcopy(model), ids, mask, labels, WINDOW, 2, seed=0)
    half = copy.deepcopy(model).half()  # the precision's own error: plain HF in fp16, the same loss scale
    torch.manual_seed(0)
    fused, fused_mask = windowed_encoder_states(half, ids, mask, WINDOW, 2)
    (half(encoder_outputs=BaseModelOutput(last_hidden_state=fused), attention_mask=fused_mask, labels=labels).loss * SCALE).backward()
    hf_error = relative_error({k: p.grad.float() / SCALE for k, p in half.named_parameters() if p.grad is not None}, fp32_ref)
    cfg = resolved_config(config, micro=2, cached={"window": WINDOW, "group_windows": 2, "group_tokens": None})
    cfg["fp16"] = {"enabled": True, "loss_scale": SCALE}
    engine, *_ = initialize(model, cfg)
    engine.backward(engine(ids, mask, labels=labels).loss)
    assert {p.dtype for p in engine.module.parameters()} == {torch.float16}
    grads = {n: reduced_grad(p).float() / SCALE for n, p in engine.module.model.named_parameters() if n in fp32_ref}
    assert hf_error > 1e-4, "fp16 really ran"
    assert relative_error(grads, fp32_ref) <= 1.1 * hf_error
    engine.step()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), documents=8)


def test_fp16_flag_trains_with_dynamic_loss_scaling_and_logs_skipped_steps(fp16_on_cpu, tmp_path, corpus):
    """--fp16 for a config without an fp16 section (the shipped ones): the run trains in fp16.
    From 2^20 the scale overflows and halves until the gradients fit; those steps are skipped
    (no update, said in metrics.jsonl), the later ones train."""
    config = json.loads(open("ds_configs/zero2.json").read())
    config["fp16"] = {"enabled": "auto", "initial_scale_power": 20}
    (tmp_path / "fp16.json").write_text(json.dumps(config))
    plain = tmp_path / "plain.json"
    plain.write_text(open("ds_configs/zero2.json").read())
    for name, steps in (("fp16.json", 10), ("plain.json", 1)):
        out = tmp_path / f"run-{name}"
        trainer = Trainer(parse_args(["--deepspeed", str(tmp_path / name), "--fp16", "--model", corpus["model"], "--train_file",
                                      corpus["train_file"], "--window", "128", "--output_dir", str(out), "--max_steps", str(steps)]))
        assert trainer.engine.fp16_enabled() and {p.dtype for p in trainer.engine.module.parameters()} == {torch.float16}
        trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run-fp16.json" / "metrics.jsonl").read_text().splitlines()]
    skipped, scales = [r["skipped"] for r in rows], [r["loss_scale"] for r in rows]
    assert skipped[0] and not skipped[-1] and skipped == sorted(skipped, reverse=True)
    assert scales[0] == 2.0**20 and scales == sorted(scales, reverse=True) and scales[skipped.index(False)] < 2.0**20
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


@pytest.mark.parametrize("fp16_section, flags, message", [
    (None, ["--fp16", "--bf16", "true"], "fp16 and bf16 are both on, fp16 by --fp16 and bf16 by --bf16 true"),
    ({"enabled": True}, ["--bf16", "true"], "fp16 and bf16 are both on, fp16 by 'CONFIG' (\"fp16\": {\"enabled\": true})"),
    ({"enabled": False}, ["--fp16"], 'sets fp16.enabled=false but --fp16 is on; set it to "auto" there'),
    (None, ["--fp16"], "fp16 needs a GPU: DeepSpeed's cpu accelerator has none"),
], ids=["both-flags", "config-and-flag", "flag-against-config", "cpu"])
def test_fp16_conflicts_and_a_device_without_fp16_are_refused_at_parse_time(tmp_path, corpus, fp16_section, flags, message):
    import re

    config = json.loads(open("ds_configs/zero2.json").read())
    if fp16_section is not None:
        config["fp16"] = fp16_section
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(message.replace("CONFIG", str(path)))):
        parse_args(["--deepspeed", str(path), "--model", corpus["model"], "--train_file", corpus["train_file"], *flags])


def test_bf16_flag_for_a_config_without_a_bf16_section_trains_in_bf16(tmp_path, corpus):
    """--bf16 true used to fill only a "bf16" section's "auto": without one it ran in fp32."""
    config = json.loads(open("ds_configs/zero2.json").read())
    del config["bf16"]
    (tmp_path / "no_bf16.json").write_text(json.dumps(config))
    trainer = Trainer(parse_args(["--deepspeed", str(tmp_path / "no_bf16.json"), "--bf16", "true", "--model", corpus["model"],
                                  "--train_file", corpus["train_file"], "--window", "128", "--output_dir", str(tmp_path / "run")]))
    assert trainer.engine.bfloat16_enabled() and {p.dtype for p in trainer.engine.module.parameters()} == {torch.bfloat16}


def test_fp16_under_zero_stage_0_warns_that_the_export_holds_fp16_weights(fp16_on_cpu, tmp_path, corpus, caplog):
    with caplog.at_level("WARNING", logger="cached_ds"):
        trainer = Trainer(parse_args(["--deepspeed", "ds_configs/zero0.json", "--fp16", "--model", corpus["model"], "--train_file",
                                      corpus["train_file"], "--window", "128", "--output_dir", str(tmp_path / "run")]))
    assert trainer.engine.fp16_enabled()
    assert "fp16 under ZeRO stage 0: DeepSpeed's fp32 master weights there are not in what it saves for export" in caplog.text
