"""litgpt-style: whole launcher recipes on CPU with tiny configs, asserting on files and logs."""

import json
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import transformers as hf
from launcher_helpers import REPO, launcher_env, make_corpus, metrics, run_train

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gib", "doc_tokens"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def data_flags(corpus):
    return ["--model", corpus["model"], "--train_file", corpus["train_file"], "--eval_file", corpus["eval_file"],
            "--window", "128", "--micro_batch_size", "2", "--max_new_tokens", "8", "--seed", "3"]


def test_embedded_smoke_preset_on_two_ranks(tmp_path):
    out = tmp_path / "run"
    result = run_train("--deepspeed", "ds_configs/zero3.json", "--preset", "smoke", "--output_dir", str(out), ranks=2)
    resolved = (out / "ds_config.json").read_text()
    assert '"auto"' not in resolved and json.loads(resolved)["train_batch_size"] == 2 * 2
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(METRIC_KEYS <= r.keys() for r in rows)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000004"
    assert list((out / "tensorboard").rglob("events.out.tfevents.*")) and list((out / "csv").rglob("*.csv"))
    scores = json.loads((out / "eval_results.json").read_text())
    assert {"rouge1", "rouge2", "rougeL", "rougeLsum", "truncated"} <= scores.keys()
    assert "truncated to the first 128 tokens" in result.stdout and "CachED lead" in result.stdout
    exported = out / "exported"
    model = hf.AutoModelForSeq2SeqLM.from_pretrained(exported)
    assert hf.AutoTokenizer.from_pretrained(exported).pad_token_id == model.config.pad_token_id
    assert json.loads((exported / "cached_config.json").read_text())["window"] == 128
    for line in (out / "predictions_final.jsonl").read_text().splitlines():
        assert {"prediction", "reference"} <= json.loads(line).keys()


def test_zero3_evaluation_with_fewer_documents_than_ranks(tmp_path, corpus):
    """A rank with no eval document of its own still runs every generate call: under ZeRO-3 their
    parameter gathers are collectives (it used to skip them, and the other rank waited forever)."""
    out = tmp_path / "run"
    run_train("--deepspeed", "ds_configs/zero3.json", "--output_dir", str(out), "--max_steps", "1", "--max_eval_documents", "1",
              *data_flags(corpus), ranks=2, timeout=300)
    [line] = (out / "predictions_final.jsonl").read_text().splitlines()
    assert json.loads(line)["index"] == 0


def test_zero3_trains_on_after_intermediate_evaluations(tmp_path, corpus):
    """The shipped ZeRO-3 config with --eval_steps: generation left ZeRO-3 prefetches in flight for
    decoder parameters the next step pinned, which ZeRO-3 then released anyway: the first backward
    after an evaluation failed ("size of tensor a (0) must match")."""
    out = tmp_path / "run"
    run_train("--deepspeed", "ds_configs/zero3.json", *data_flags(corpus), "--output_dir", str(out), "--max_steps", "3",
              "--eval_steps", "1", "--save_steps", "10", "--max_eval_documents", "2")
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert all((out / f"eval_results_{name}.json").is_file() for name in ("step1", "step2", "final"))


def test_rouge_is_scored_against_the_summaries_own_text(tmp_path, corpus):
    """The references in predictions (and ROUGE) are the eval file's summaries as written, not
    their labels decoded back: with --max_target_tokens 4 the labels hold only a summary's start."""
    out = tmp_path / "run"
    run_train("--deepspeed", "ds_configs/zero0.json", "--output_dir", str(out), "--max_steps", "1", "--max_eval_documents", "2",
              "--max_target_tokens", "4", *data_flags(corpus))
    summaries = [json.loads(line)["summary"].strip() for line in open(corpus["eval_file"])]
    lines = [json.loads(line) for line in (out / "predictions_final.jsonl").read_text().splitlines()]
    assert [(line["index"], line["reference"]) for line in lines] == [(0, summaries[0]), (1, summaries[1])]
    assert all(len(summary.split()) > 4 for summary in summaries[:2])  # longer than 4 tokens could hold


def test_summarize_exported_model(tmp_path, corpus):
    out = tmp_path / "run"
    run_train("--deepspeed", "ds_configs/zero0.json", "--output_dir", str(out), "--max_steps", "2", "--source_prefix", "summarize: ",
              *data_flags(corpus))
    assert json.loads((out / "exported" / "config.json").read_text())["prefix"] == "summarize: "
    docs = tmp_path / "docs.jsonl"
    long_doc = " ".join(json.loads(line)["document"] for line in open(corpus["eval_file"]))  # many windows
    docs.write_text(json.dumps({"id": 1, "document": long_doc}) + "\n" + json.dumps({"id": 2, "document": "the color is red ."}) + "\n")
    summaries = tmp_path / "out.jsonl"
    result = subprocess.run(["python", "launchers/summarize.py", "--model", str(out / "exported"), "--input", str(docs),
                             "--output", str(summaries), "--num_beams", "2", "--max_new_tokens", "6"],
                            cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in summaries.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2] and all(isinstance(r["prediction"], str) for r in rows)
    assert "summarising" in result.stderr and "documents start with 'summarize: ' (the model's prefix)" in result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"document": "fine"}\n{"document": "cut off\n')
    failed = subprocess.run(["python", "launchers/summarize.py", "--model", str(out / "exported"), "--input", str(bad),
                             "--output", str(tmp_path / "x.jsonl")], cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "bad.jsonl: line 2 is not valid JSON" in failed.stderr and "Traceback" not in failed.stderr


def curve(out):
    return [(r["step"], r["loss"]) for r in metrics(out)]


def assert_same_curve(resumed, uninterrupted):
    """Same steps, same losses. Not bit-for-bit with the shipped configs on CPU: DeepSpeed's CPU
    Adam (csrc/includes/cpu_adam.h, IncrementStep) keeps beta^t as a running float product in a
    process that counts from step 1, but takes pow(beta, t) in one that resumes at step t, an ulp
    apart; seen: 2e-7 relative after the resume. torch's Adam is bit-identical (test below)."""
    assert [s for s, _ in resumed] == [s for s, _ in uninterrupted]
    assert [l for _, l in resumed] == pytest.approx([l for _, l in uninterrupted], rel=1e-6, abs=0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_train("--deepspeed", "ds_configs/zero2.json", "--output_dir", str(out), "--max_steps", "6", "--save_steps", "2", *data_flags(corpus))
    return curve(out)


def test_resume_after_sigkill_during_training(tmp_path, corpus, uninterrupted):
    """Killed in the middle of step 3, after its backward and before its optimizer step (a
    signal sent from outside once 3 steps were logged raced a run that now ends 0.2 s later):
    the run resumes from step 2's checkpoint and retraces the uninterrupted curve."""
    out = tmp_path / "run"
    flags = ["--deepspeed", "ds_configs/zero2.json", "--output_dir", str(out), "--max_steps", "6", "--save_steps", "2", *data_flags(corpus)]
    crashed = run_train(*flags, check=False, CACHED_DS_FAULT="kill_mid_step@3")
    assert crashed.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000002"
    assert [r["step"] for r in metrics(out)] == [1, 2]
    run_train(*flags, "--resume")
    assert_same_curve(curve(out), uninterrupted)


@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_saves_a_checkpoint_and_a_requeue_continues_from_it(tmp_path, corpus, ranks):
    """As SLURM preempts: SIGTERM mid-run (to torchrun, which passes it on, with 2 ranks). The run
    finishes its step, checkpoints it, says so and exits 143 (torchrun: 1); the same command with
    --resume auto continues from that step, no row twice."""
    import time

    from launcher_helpers import train_command

    out = tmp_path / "run"
    flags = ["--deepspeed", "ds_configs/zero2.json", "--output_dir", str(out), "--max_steps", "40", "--save_steps", "1000",
             "--resume", "auto", *data_flags(corpus)]
    run = subprocess.Popen(train_command(*flags, ranks=ranks), cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= 2):
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == (128 + signal.SIGTERM if ranks == 1 else 1), stderr[-3000:]
    stopped = metrics(out)[-1]["step"]
    assert stopped < 40 and f"stopped by SIGTERM after step {stopped}" in stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{stopped:08d}"
    run_train(*flags, ranks=ranks)
    assert [r["step"] for r in metrics(out)] == list(range(1, 41))


def test_an_export_stopped_midway_leaves_no_folder_that_looks_complete(tmp_path, corpus):
    out = tmp_path / "run"
    flags = ["--deepspeed", "ds_configs/zero2.json", "--output_dir", str(out), "--max_steps", "2", "--max_eval_documents", "1",
             "--resume", "auto", *data_flags(corpus)]
    crashed = run_train(*flags, check=False, CACHED_DS_FAULT="kill_during_export@0")
    assert crashed.returncode == -signal.SIGKILL and not (out / "exported").exists()
    run_train(*flags)
    assert (out / "exported" / "config.json").is_file() and hf.AutoTokenizer.from_pretrained(out / "exported")
    assert not (out / "exported.partial").exists() and not (out / "exported.old").exists()


def test_a_requeued_finished_run_says_so_and_redoes_nothing(tmp_path, corpus):
    out, train_file = tmp_path / "run", tmp_path / "train.jsonl"
    documents = Path(corpus["train_file"]).read_text()
    train_file.write_text(documents)
    flags = ["--deepspeed", "ds_configs/zero2.json", "--output_dir", str(out), "--max_steps", "2", "--max_eval_documents", "1",
             "--resume", "auto", *data_flags({**corpus, "train_file": str(train_file)})]
    run_train(*flags)
    exported = (out / "exported" / "model.safetensors").stat().st_mtime_ns
    train_file.write_text("not JSON: the requeue must not read the data, let alone build the engine\n")
    again = run_train(*flags)
    assert "the run was already complete at step 2" in again.stderr
    train_file.write_text(documents)
    assert (out / "exported" / "model.safetensors").stat().st_mtime_ns == exported
    other = run_train(*flags, "--num_beams", "2")  # other evaluation settings: evaluated again
    assert "already complete" not in other.stderr and (out / "exported" / "model.safetensors").stat().st_mtime_ns != exported
    longer = run_train(*flags[:5], "4", *flags[6:])  # a larger --max_steps continues the run
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert json.loads((out / "run_complete.json").read_text())["step"] == 4 and "already complete" not in longer.stderr


def test_an_evaluation_stopped_midway_is_redone_on_resume(tmp_path, corpus):
    """Killed during the step-2 evaluation, with a checkpoint due at step 2: the requeued run
    starts before that evaluation and does it (the checkpoint used to be saved first, and the
    requeued run started after the evaluation, which was never written)."""
    out = tmp_path / "run"
    flags = ["--deepspeed", "ds_configs/zero2.json", "--output_dir", str(out), "--max_steps", "3", "--save_steps", "2",
             "--eval_steps", "2", "--max_eval_documents", "2", *data_flags(corpus)]
    crashed = run_train(*flags, check=False, CACHED_DS_FAULT="kill_during_eval@2")
    assert crashed.returncode == -signal.SIGKILL and not (out / "eval_results_step2.json").exists()
    run_train(*flags, "--resume", "auto")  # as a requeued job does: here from the start, no checkpoint was due yet
    assert (out / "eval_results_step2.json").is_file() and [r["step"] for r in metrics(out)] == [1, 2, 3]


def test_bf16_resume_with_torchs_adam_is_bit_identical(tmp_path, corpus):
    """bf16 under ZeRO-2 with torch's AdamW: the resumed curve equals the uninterrupted one bit for
    bit, so the checkpoint restores everything a step reads (fp32 master weights, Adam moments, the
    schedule, data order, dropout RNG); an ulp in the master weights would show here, bf16 rounding
    turns it into ~1e-4 of loss."""
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config["optimizer"]["params"]["torch_adam"] = True
    (tmp_path / "zero2_torch_adam.json").write_text(json.dumps(config))
    flags = ["--deepspeed", str(tmp_path / "zero2_torch_adam.json"), "--max_steps", "4", "--save_steps", "2", "--bf16", "true",
             "--lr", "1e-3", *data_flags(corpus)]
    run_train(*flags, "--output_dir", str(tmp_path / "whole"))
    crashed = run_train(*flags, "--output_dir", str(tmp_path / "resumed"), check=False, CACHED_DS_FAULT="kill_mid_step@3")
    assert crashed.returncode == -signal.SIGKILL
    run_train(*flags, "--output_dir", str(tmp_path / "resumed"), "--resume")
    whole, resumed = metrics(tmp_path / "whole"), metrics(tmp_path / "resumed")
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in resumed] == [(r["step"], r["loss"], r["grad_norm"]) for r in whole]
    assert len({r["loss"] for r in whole}) == 4


def test_resume_after_sigkill_during_checkpoint_write(tmp_path, corpus, uninterrupted):
    out = tmp_path / "run"
    flags = ["--deepspeed", "ds_configs/zero2.json", "--output_dir", str(out), "--max_steps", "6", "--save_steps", "2", *data_flags(corpus)]
    crashed = run_train(*flags, check=False, CACHED_DS_FAULT="kill_during_save@4")
    assert crashed.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000002", "the half-written step 4 was never published"
    assert (out / "checkpoints" / ".staging" / "step00000004").is_dir()
    run_train(*flags, "--resume")
    assert_same_curve(curve(out), uninterrupted)
    assert not (out / "checkpoints" / ".staging").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
    out = tmp_path / "run"
    flags = ["--deepspeed", "ds_configs/zero2.json", "--output_dir", str(out), "--max_steps", "6", "--save_steps", "2", *data_flags(corpus)]
    result = run_train(*flags, check=False, CACHED_DS_FAULT="nan_loss@3")
    assert result.returncode != 0
    assert "loss is not finite at step 3" in result.stderr and "step00000002" in result.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000002"
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_out_of_memory_names_the_document_and_the_settings_that_fit_longer_ones(tmp_path, corpus):
    """A device out of memory mid-run (injected: CPU has no device allocator) is raised as
    torch's OutOfMemoryError, its first line kept, with the step, the longest document in it and
    the settings that shrink what grows with a document, those not already on."""
    out = tmp_path / "run"
    flags = ["--deepspeed", "ds_configs/zero2.json", "--output_dir", str(out), "--max_steps", "4", "--save_steps", "1", *data_flags(corpus)]
    result = run_train(*flags, check=False, CACHED_DS_FAULT="out_of_memory@2")
    assert result.returncode != 0
    assert "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (injected)" in result.stderr
    longest = re.search(r"step 2 on rank 0 ran out of device memory \(peak [\d.]+ GiB\); its longest document here has ([\d,]+) tokens",
                        result.stderr)
    assert longest and int(longest.group(1).replace(",", "")) > 0, result.stderr[-2000:]
    for setting in ('"cross_attention_block": 65536', '"group_tokens" (now 16,384) smaller', '"decoder_gradient_checkpointing": true',
                    "--max_source_tokens"):
        assert setting in result.stderr
    assert '"keep_graphs_bytes"' not in result.stderr and "offload_gradient_cache" not in result.stderr  # off, or not yet useful
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000001"


def test_out_of_memory_advice_follows_the_settings_in_use():
    """Only settings that are off and that the mode takes are advised, under their own names:
    full mode is pointed to CachED and gets no CachED-only setting; a run grouping by windows is
    told to lower group_windows (group_tokens beside it is refused)."""
    from cached_ds.config import CachedConfig
    from cached_ds.trainer import out_of_memory_advice

    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    def advice(**settings):
        return out_of_memory_advice(error, CachedConfig(**settings), 1_000_000, 7)

    full = advice(mode="full", cross_attention_block=8192)
    assert full.splitlines()[0] == str(error) and '"mode": "cached"' in full and "1,000,000 tokens" in full
    assert not any(name in full for name in ("offload_", "group_", "keep_graphs_bytes", '"cross_attention_block"'))
    assert '"group_tokens" (now 16,384) smaller' in advice()  # the default
    assert '"group_windows" (now 4) smaller' in advice(group_windows=4) and '"group_tokens"' not in advice(group_windows=4)
    assert 'remove "group_windows"' in advice(group_windows="all")
    streaming = advice(cross_attention_block=8192, keep_graphs_bytes=2**30, decoder_gradient_checkpointing=True,
                       offload_gradient_cache=True)
    assert '"cross_attention_block"' not in streaming and '"mode"' not in streaming and "decoder_gradient_checkpointing" not in streaming
    assert '"offload_encoder_states": true' in streaming and '"offload_gradient_cache": true' not in streaming
    assert '"keep_graphs_bytes" (now 1,073,741,824) lower' in streaming


def test_exported_weights_equal_the_trained_ones(tmp_path, corpus):
    """zero_to_fp32 export under ZeRO-3 equals the fp32 weights the engine ended with."""
    out = tmp_path / "run"
    run_train("--deepspeed", "ds_configs/zero3.json", "--output_dir", str(out), "--max_steps", "3", *data_flags(corpus))
    assert all(r["lr"] > 0 for r in metrics(out)), "no warm-up: every step trains, the first one too"
    exported = hf.AutoModelForSeq2SeqLM.from_pretrained(out / "exported")
    initial = hf.AutoModelForSeq2SeqLM.from_pretrained(corpus["model"])
    changed = [n for (n, p), (_, q) in zip(exported.named_parameters(), initial.named_parameters()) if not torch.equal(p, q)]
    assert len(changed) > 0.9 * len(list(exported.parameters())), "training moved the weights and the export has them"
