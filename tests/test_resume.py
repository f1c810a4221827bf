"""Resuming, refusing and starting over: the launcher run for real (subprocess, CPU, tiny model),
and CheckpointStore on a real DeepSpeed engine. Each test here failed before its fix."""

import csv
import json
import shutil
import signal
from pathlib import Path

import pytest
from ds_helpers import resolved_config, single_rank_distributed
from launcher_helpers import REPO, make_corpus, metrics, run_train
from tiny_models import make_model

from cached_ds.checkpoints import SIDECAR, CheckpointStore
from cached_ds.deepspeed_engine import initialize
from cached_ds.run_config import parse_args
from cached_ds.trainer import Trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), documents=8)


def data_flags(corpus, out, *extra, config="ds_configs/zero2.json"):
    return ["--deepspeed", config, "--output_dir", str(out), "--model", corpus["model"], "--train_file", corpus["train_file"],
            "--window", "128", "--micro_batch_size", "2", "--seed", "3", *extra]


def csv_steps(out, name):
    [table] = (out / "csv").rglob(name)
    rows = list(csv.reader(table.read_text().splitlines()))
    assert rows[0][0] == "step" and all(row[0] != "step" for row in rows[1:]), rows  # one header
    return [float(row[0]) for row in rows[1:]]


def test_resume_with_another_zero_stage_is_refused_before_deepspeed_loads(tmp_path, corpus):
    """Saved under ZeRO-3, resumed under ZeRO-2: DeepSpeed's own failure was a bare
    ``assert len(self.ckpt_list) > 0``; resume.json is read first and names the flag and fix."""
    out = tmp_path / "run"
    run_train(*data_flags(corpus, out, "--max_steps", "1", config="ds_configs/zero3.json"))
    sidecar = json.loads((out / "checkpoints" / "step00000001" / SIDECAR).read_text())
    assert sidecar["zero_stage"] == 3 and sidecar["world_size"] == 1 and sidecar["data_plan"]["micro_batch_size"] == 2
    written = (out / "ds_config.json").read_text()
    refused = run_train(*data_flags(corpus, out, "--max_steps", "2", "--resume", config="ds_configs/zero2.json"), check=False)
    assert refused.returncode != 0
    assert ("--deepspeed: the checkpoint was written by ZeRO stage 3, this run is stage 2 (ds_configs/zero2.json); "
            "resume with the same config, or start over in a new --output_dir") in refused.stderr, refused.stderr[-3000:]
    assert "AssertionError" not in refused.stderr and "Traceback" not in refused.stderr
    assert (out / "ds_config.json").read_text() == written  # refused before anything was written


def test_resume_with_a_new_lr_applies_it_and_trims_the_csv_monitor(tmp_path, corpus):
    """Killed in step 4 (steps 1-3 logged, step 2 saved), resumed with another --lr: steps 3 and
    4 run at the new peak times the linear decay's factor (it used to keep the old rate), and the
    csv monitor's step-3 rows from before the crash are gone (no step twice, one header)."""
    out = tmp_path / "run"
    flags = data_flags(corpus, out, "--max_steps", "4", "--save_steps", "2", "--lr", "3e-3")
    crashed = run_train(*flags, check=False, CACHED_DS_FAULT="kill_mid_step@4")
    assert crashed.returncode == -signal.SIGKILL
    assert [r["step"] for r in metrics(out)] == [1, 2, 3] and csv_steps(out, "train_loss.csv") == [1, 2, 3]
    resumed = run_train(*data_flags(corpus, out, "--max_steps", "4", "--save_steps", "2", "--lr", "1e-3", "--resume"))
    assert "resuming with --lr 0.001 (the checkpoint's run used 0.003)" in resumed.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx([3e-3, 3e-3 * 3 / 4, 1e-3 * 2 / 4, 1e-3 * 1 / 4], rel=1e-12)
    assert csv_steps(out, "train_loss.csv") == [1, 2, 3, 4] and csv_steps(out, "train_lr.csv") == [1, 2, 3, 4]
    assert csv_steps(out, "Train_Samples_lr.csv") == [2, 4, 6, 8]  # DeepSpeed's own: samples, 2 a step
    assert json.loads((out / "checkpoints" / "step00000004" / SIDECAR).read_text())["lr"] == 1e-3


def test_resume_auto_starts_fresh_then_resumes_and_a_fresh_start_clears_a_crashed_runs_metrics(tmp_path, corpus):
    """One command line for a first start and a requeue. A run killed before its first checkpoint
    leaves metrics but nothing to resume: the next start is fresh and used to append to them
    (steps 1, 2, 1, 2, 3, 4); it now clears metrics.jsonl, csv/ and tensorboard/ first."""
    out = tmp_path / "run"
    flags = data_flags(corpus, out, "--max_steps", "4", "--resume", "auto")
    crashed = run_train(*flags, check=False, CACHED_DS_FAULT="kill_mid_step@3")
    assert crashed.returncode == -signal.SIGKILL
    assert not (out / "checkpoints" / "latest").exists() and [r["step"] for r in metrics(out)] == [1, 2]
    fresh = run_train(*flags)
    assert "--resume auto: no checkpoint yet, starting fresh" in fresh.stderr
    assert "starting fresh: removed metrics.jsonl, csv, tensorboard of an earlier run that left no checkpoint" in fresh.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4] and csv_steps(out, "train_loss.csv") == [1, 2, 3, 4]
    assert len(list((out / "tensorboard").rglob("events.out.tfevents.*"))) == 1
    again = run_train(*flags)  # a requeue after the end: finds step 4 complete, loads and trains nothing
    assert "--resume auto: resuming from step00000004" in again.stderr and "the run was already complete at step 4" in again.stderr
    assert "resumed from step" not in again.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


# ---- in-process: refusals before anything is written, CheckpointStore pruning ------------------

@pytest.fixture(scope="module")
def distributed():
    single_rank_distributed()


def in_process_flags(corpus, out, *extra, config="ds_configs/zero0.json"):
    return ["--deepspeed", str(config), "--model", corpus["model"], "--train_file", corpus["train_file"], "--window", "128",
            "--output_dir", str(out), *extra]


def test_refused_runs_leave_the_earlier_runs_files_as_they_were(tmp_path, corpus, distributed):
    """Refused for an earlier run's checkpoints (no --resume), or --resume with nothing to resume:
    refused before the model and engine are built, so ds_config.json and tensorboard/ are the
    earlier run's (_build_engine used to rewrite the one and add an event file to the other)."""
    out = tmp_path / "run"
    Trainer(parse_args(in_process_flags(corpus, out, "--max_steps", "1"))).train()
    written = (out / "ds_config.json").read_text()
    events = sorted((out / "tensorboard").rglob("*"))
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(latest: step00000001\); pass --resume"):
        Trainer(parse_args(in_process_flags(corpus, out, "--max_steps", "2", "--lr", "1e-3"))).train()
    assert (out / "ds_config.json").read_text() == written and sorted((out / "tensorboard").rglob("*")) == events
    assert [r["step"] for r in metrics(out)] == [1]
    empty = tmp_path / "empty"
    with pytest.raises(ValueError, match=r"--resume: no complete checkpoint in .*; run without --resume to start fresh"):
        Trainer(parse_args(in_process_flags(corpus, empty, "--max_steps", "1", "--resume"))).train()
    assert not (empty / "ds_config.json").exists() and not (empty / "tensorboard").exists()


def test_a_new_lr_is_refused_where_the_configs_deepspeed_scheduler_sets_the_rate(tmp_path, corpus, distributed):
    """LRRangeTest (not one the launcher replaces with HF's schedule) restores its own state:
    another --lr would be written to ds_config.json and ignored."""
    config = json.loads((REPO / "ds_configs" / "zero0.json").read_text())
    config["scheduler"] = {"type": "LRRangeTest", "params": {"lr_range_test_min_lr": 1e-3, "lr_range_test_step_size": 1,
                                                             "lr_range_test_step_rate": 0.5}}
    path = tmp_path / "cosine.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "run"
    Trainer(parse_args(in_process_flags(corpus, out, "--max_steps", "1", "--lr", "1e-3", config=path))).train()
    written = (out / "ds_config.json").read_text()
    with pytest.raises(ValueError, match=r"--lr: the checkpoint's run used 0.001, this run 0.002, and the config's LRRangeTest "
                                         r"scheduler restores its own rate from the checkpoint; resume with --lr 0.001"):
        Trainer(parse_args(in_process_flags(corpus, out, "--max_steps", "2", "--lr", "2e-3", "--resume", config=path))).train()
    assert (out / "ds_config.json").read_text() == written
    Trainer(parse_args(in_process_flags(corpus, out, "--max_steps", "2", "--lr", "1e-3", "--resume", config=path))).train()
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_pruning_never_deletes_the_checkpoint_latest_names(tmp_path, distributed):
    """A crash between renaming a step folder into place and replacing ``latest`` leaves a newer,
    unpublished folder. Pruning by name with keep=1 used to keep that orphan and delete the
    checkpoint ``latest`` names; now it prunes only what is older than the tag just published,
    and the next start removes the orphan."""
    engine, *_ = initialize(make_model("bart"), resolved_config("zero0"))
    store = CheckpointStore(tmp_path, keep=1)
    store.save(engine, 1, {"step": 1}, {"zero_stage": 0})
    orphan = store.root / "step00000009"  # published-looking, never named by latest
    shutil.copytree(store.root / "step00000001", orphan)
    store.save(engine, 2, {"step": 2}, {"zero_stage": 0})
    assert store.latest() == "step00000002"
    assert not (store.root / "step00000001").exists()  # older than the one just published: pruned
    store.discard_partial()  # the next start
    assert not orphan.exists() and sorted(p.name for p in store.root.iterdir()) == ["latest", "step00000002"]
    checked = []
    assert store.load(engine, check=checked.append)["step"] == 2
    assert [saved["step"] for saved in checked] == [2]  # resume.json, read before DeepSpeed's files
    # Without "latest" (a copied or damaged folder) nothing is known to be unpublished: kept.
    (store.root / "latest").unlink()
    store.discard_partial()
    assert (store.root / "step00000002").is_dir() and store.latest() is None


def test_a_crash_while_latest_is_written_leaves_the_previous_checkpoint_named(tmp_path, distributed, monkeypatch):
    """Publishing a checkpoint rewrites ``latest``, a file of one line. A crash in the middle of
    that write (the file opened and cut, its line not yet there) must leave the previous
    checkpoint named: ``latest`` is written aside and swapped in whole. Written in place, it was
    left empty, and ``--resume auto`` would have started the run over."""
    engine, *_ = initialize(make_model("bart"), resolved_config("zero0"))
    store = CheckpointStore(tmp_path, keep=2)
    store.save(engine, 1, {"step": 1}, {"zero_stage": 0})
    write_text = Path.write_text

    def cut_short(path, text, *args, **kwargs):  # a crash halfway through writing the marker
        if path.name.startswith("latest"):
            path.open("w").close()
            raise OSError("crashed while writing " + path.name)
        return write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", cut_short)
    with pytest.raises(OSError, match="crashed while writing"):
        store.save(engine, 2, {"step": 2}, {"zero_stage": 0})
    monkeypatch.undo()
    restarted = CheckpointStore(tmp_path, keep=2)
    restarted.discard_partial()  # the next start: the unpublished step 2 goes
    assert restarted.latest() == "step00000001"
    assert restarted.load(engine)["step"] == 1


def test_a_fresh_start_clears_only_logs_of_this_launcher(tmp_path):
    """Logs of an earlier run that left no checkpoint go (its ds_config.json marks the folder as
    this launcher's); a folder it never wrote to keeps its tensorboard/ and metrics.jsonl."""
    from cached_ds.run_outputs import clear_earlier_outputs

    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    clear_earlier_outputs(tmp_path)
    assert (tmp_path / "tensorboard").is_dir() and (tmp_path / "metrics.jsonl").is_file()
    (tmp_path / "ds_config.json").write_text("{}\n")
    clear_earlier_outputs(tmp_path)
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_a_checkpoint_of_deepspeeds_own_cosine_schedule_is_refused_naming_why():
    """Before WarmupCosineLR ran as HF's schedule, its checkpoints held DeepSpeed's scheduler state;
    'resume with the same config' could not be followed (the same config now means HF's)."""
    from cached_ds.resume import ResumeState

    state = ResumeState(zero_stage=2, world_size=1, data_plan={}, lr=1e-3, lr_schedule="ours", config_path="c.json")
    with pytest.raises(ValueError, match="set by DeepSpeed's WarmupCosineLR, which this version runs as HF's schedule instead"):
        state.check({"lr_schedule": "WarmupCosineLR"})
    with pytest.raises(ValueError, match="set by DeepSpeed's OneCycle scheduler, this run's by the launcher's warm-up schedule"):
        state.check({"lr_schedule": "OneCycle"})


RESUMED_PLAN = {"ranks": 2, "micro_batch_size": 1, "gradient_accumulation_steps": 4, "seed": 3, "documents": 100}


def resume_state(lr_schedule="ours", lr=1e-3, **plan):
    from cached_ds.resume import ResumeState

    return ResumeState(zero_stage=2, world_size=2, data_plan={**RESUMED_PLAN, **plan}, lr=lr, lr_schedule=lr_schedule,
                       config_path="c.json")


@pytest.mark.parametrize("schedule", ["ours", "none"])
def test_a_new_lr_is_accepted_where_the_launcher_sets_the_rate_or_nothing_does(schedule):
    """apply_new_lr applies a new --lr for the launcher's schedule and for no scheduler at all:
    the check lets both through (refusing "none" passed every test before: mutation testing)."""
    resume_state(schedule, lr=2e-3).check({"zero_stage": 2, "world_size": 2, "lr": 1e-3, "lr_schedule": schedule,
                                           "data_plan": RESUMED_PLAN})


@pytest.mark.parametrize("key, value", [("documents", 101), ("seed", 4), ("micro_batch_size", 2),
                                        ("gradient_accumulation_steps", 2), ("ranks", 1)])
def test_each_data_plan_setting_that_changed_is_refused(key, value):
    """The document order depends on every one of them; a changed training set (documents) too."""
    with pytest.raises(ValueError, match="the checkpoint's data order was made with other settings"):
        resume_state(**{key: value}).check({"data_plan": RESUMED_PLAN})
