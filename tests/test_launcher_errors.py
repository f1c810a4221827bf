"""Bad input to the launcher fails early with an error that names the field and the fix."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import transformers as hf
from ds_helpers import single_rank_distributed
from launcher_helpers import REPO, launcher_env, make_corpus, run_train

from cached_ds.data import check_utf8
from cached_ds.run_config import parse_args
from cached_ds.trainer import Trainer


@pytest.fixture(scope="module", autouse=True)
def distributed():
    single_rank_distributed()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), documents=8)


def shipped_config(name: str) -> dict:
    return json.loads((REPO / "ds_configs" / f"{name}.json").read_text())


def written(tmp_path, config: dict) -> Path:
    """``config`` as a JSON file to pass to --deepspeed."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    return path


def flags(corpus, tmp_path, *extra, config="ds_configs/zero0.json"):
    return ["--deepspeed", config, "--model", corpus["model"], "--train_file", corpus["train_file"], "--window", "128",
            "--output_dir", str(tmp_path / "run"), *extra]


def test_missing_config_is_one_clear_line(tmp_path):
    result = subprocess.run(["python", "launchers/train.py", "--deepspeed", str(tmp_path / "nope.json")], cwd=REPO,
                            env=launcher_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("train.py: error: DeepSpeed config")
    assert "Traceback" not in result.stderr


def test_invalid_json_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "train_batch_size": "auto",\n  "zero_optimization": {"stage": 2,,}\n}\n')
    with pytest.raises(ValueError, match=r"not valid JSON: .* at line 3, column \d+"):
        parse_args(["--deepspeed", str(bad)])


@pytest.mark.parametrize("name, key, value, message", [
    ("zero2", "windowz", 512, r"unknown keys \['windowz'\] in the \"cached\" section"),
    # the embedded default job (no data given) fixes its window
    ("zero3", "window", 64, r'sets "cached.window": 64, but the window is fixed by the embedded default job \(128\)'),
], ids=["unknown-key", "embedded-window"])
def test_cached_section_refused_at_parse_time(tmp_path, name, key, value, message):
    config = shipped_config(name)
    config["cached"][key] = value
    with pytest.raises(ValueError, match=message):
        parse_args(["--deepspeed", str(written(tmp_path, config))])


def test_inconsistent_train_batch_size(tmp_path, corpus):
    config = shipped_config("zero0")
    config["train_batch_size"] = 7
    path = written(tmp_path, config)
    with pytest.raises(ValueError, match=r"train_batch_size=7 but .* = 2 × 1 × 1 = 2; set train_batch_size to \"auto\""):
        Trainer(parse_args(flags(corpus, tmp_path, "--micro_batch_size", "2", config=str(path))))


def test_unknown_text_column_lists_the_available_ones(tmp_path, corpus):
    with pytest.raises(ValueError, match=r"--text_column 'report' is not a column .* available columns: \['document', 'summary'\]"):
        Trainer(parse_args(flags(corpus, tmp_path, "--text_column", "report")))


def test_empty_documents_are_skipped_and_counted(tmp_path, corpus, caplog):
    rows = [json.loads(line) for line in open(corpus["train_file"])]
    rows[1]["document"], rows[4]["summary"] = "   ", ""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = flags(corpus, tmp_path)
    args[args.index("--train_file") + 1] = str(path)
    with caplog.at_level("WARNING", logger="cached_ds"):
        trainer = Trainer(parse_args(args))
    assert len(trainer.train_rows) == len(rows) - 2
    assert "skipped 2 train documents with an empty text or summary" in caplog.text


def test_non_utf8_line_names_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"document": "fine", "summary": "ok"}\n{"document": "caf\xe9", "summary": "x"}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl: line 2 is not valid UTF-8 \(byte 0xe9 at column 18\); re-encode"):
        check_utf8(path)


def test_decoder_only_model(tmp_path, corpus):
    gpt2 = tmp_path / "gpt2"
    hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300)).save_pretrained(gpt2)
    args = flags(corpus, tmp_path, "--tokenizer", corpus["model"])
    args[args.index("--model") + 1] = str(gpt2)
    with pytest.raises(ValueError, match="is a gpt2 model, not an encoder–decoder"):
        Trainer(parse_args(args))


def test_resume_without_checkpoint(tmp_path, corpus):
    with pytest.raises(ValueError, match=r"--resume: no complete checkpoint in .*checkpoints; run without --resume"):
        Trainer(parse_args(flags(corpus, tmp_path, "--resume", "--max_steps", "1"))).train()


def test_embedded_default_refusing_a_resume_writes_nothing(tmp_path):
    """The embedded job generates its corpus and model first: a refused --resume used to leave
    them behind in a folder it then refused to use."""
    from cached_ds.embedded import train_embedded_default

    single_rank_distributed()
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--resume: no complete checkpoint in .*checkpoints; run without --resume"):
        train_embedded_default(parse_args(["--deepspeed", "ds_configs/zero0.json", "--preset", "smoke", "--resume",
                                           "--output_dir", str(out)]))
    assert not out.exists() or not any(out.rglob("*"))


@pytest.mark.parametrize("launch, message", [
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, "launched by MPI (OMPI_COMM_WORLD_SIZE=2) without RANK/WORLD_SIZE"),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}, "started by srun as one of 2 tasks (SLURM_STEP_NUM_TASKS) without RANK/WORLD_SIZE"),
], ids=["mpirun", "srun"])
def test_a_launch_without_rank_variables_is_not_run_as_one_rank_per_process(tmp_path, launch, message):
    """mpirun / deepspeed --launcher openmpi set OMPI_COMM_WORLD_SIZE, and ``srun --ntasks N``
    without torchrun or an MPI plugin SLURM's own variables, not RANK: filling in the one-rank
    defaults made each of the N processes train alone (on GPU 0, into one output_dir), silently.
    MPI without mpi4py, with which DeepSpeed would discover the ranks, and srun stop saying so."""
    env = {k: v for k, v in launcher_env().items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    result = subprocess.run(["python", "launchers/train.py", "--deepspeed", "ds_configs/zero0.json", "--preset", "smoke",
                             "--output_dir", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**env, **launch})
    assert result.returncode == 1, result.stderr[-2000:]
    assert message in result.stderr
    assert not (tmp_path / "run").exists()


def test_model_without_data():
    with pytest.raises(ValueError, match=r"no training data: pass --dataset NAME or --train_file FILE"):
        parse_args(["--deepspeed", "ds_configs/zero0.json", "--model", "tiny-bart"])


@pytest.mark.parametrize("extra, message", [
    (["--keep_checkpoints", "0"], "--keep_checkpoints must be at least 1, got 0"),  # would delete the checkpoint just saved
    (["--logging_steps", "0"], "--logging_steps must be at least 1, got 0"),
    (["--num_beams", "0"], "--num_beams must be at least 1, got 0"),
    (["--save_steps", "-2"], "--save_steps must be at least 0, got -2"),
    (["--min_new_tokens", "9", "--max_new_tokens", "8"], "--min_new_tokens 9 is more than --max_new_tokens 8"),
    (["--preprocessing_num_workers", "0"], "--preprocessing_num_workers must be a positive integer, got 0"),
])
def test_bad_run_flags_name_the_flag(tmp_path, corpus, extra, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_args(flags(corpus, tmp_path, *extra))


def test_config_gradient_accumulation_must_be_the_flags(tmp_path, corpus):
    """The data plan follows --gradient_accumulation_steps; a different number in the config made
    the engine step at other boundaries (half the optimizer steps, the schedule at half speed)."""
    config = shipped_config("zero0")
    config["gradient_accumulation_steps"] = 2
    path = written(tmp_path, config)
    with pytest.raises(ValueError, match=r'sets gradient_accumulation_steps=2 but --gradient_accumulation_steps is 1 .*'
                                         r'set gradient_accumulation_steps to "auto" there, or pass --gradient_accumulation_steps 2'):
        Trainer(parse_args(flags(corpus, tmp_path, config=str(path))))


def test_summary_longer_than_the_decoders_positions(tmp_path, corpus):
    limit = hf.AutoConfig.from_pretrained(corpus["model"]).max_position_embeddings
    rows = [json.loads(line) for line in open(corpus["train_file"])]
    rows[2]["summary"] = " ".join(["word"] * (limit + 20))
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = flags(corpus, tmp_path)
    args[args.index("--train_file") + 1] = str(path)
    with pytest.raises(ValueError, match=rf"a reference summary has \d+ tokens but this bart decoder has {limit} positions; "
                                         rf"pass --max_target_tokens {limit}"):
        Trainer(parse_args(args))
    assert Trainer(parse_args([*args, "--max_target_tokens", str(limit)])).train_rows


def test_generation_is_capped_at_the_decoders_positions(tmp_path, corpus, caplog):
    """The start token takes a position, so at most limit - 1 new tokens fit (more would fail at
    evaluation, after the whole training run)."""
    limit = hf.AutoConfig.from_pretrained(corpus["model"]).max_position_embeddings
    with caplog.at_level("WARNING", logger="cached_ds"):
        trainer = Trainer(parse_args(flags(corpus, tmp_path, "--eval_file", corpus["eval_file"], "--max_new_tokens", str(limit))))
    assert trainer.generation["max_new_tokens"] == limit - 1
    assert f"--max_new_tokens {limit} reaches past this bart decoder's {limit} positions: generating at most {limit - 1}" in caplog.text
    # the same from the model's own generation_config: at the start, not at the first evaluation
    import shutil

    shutil.copytree(corpus["model"], tmp_path / "model")
    hf.GenerationConfig(max_length=limit + 50, decoder_start_token_id=2, eos_token_id=2, pad_token_id=1).save_pretrained(tmp_path / "model")
    with caplog.at_level("WARNING", logger="cached_ds"):
        trainer = Trainer(parse_args(flags({**corpus, "model": str(tmp_path / "model")}, tmp_path / "other", "--eval_file", corpus["eval_file"])))
    assert trainer.generation["max_new_tokens"] == limit - 1
    assert f"the model's generation_config (max_length={limit + 50}) reaches past this bart decoder's {limit} positions" in caplog.text


def test_a_fresh_run_refuses_an_earlier_runs_checkpoints(tmp_path, corpus):
    """Without --resume, an earlier run's "latest" would be exported instead of this run's
    weights, and pruning by step would delete this run's newer-named checkpoints."""
    Trainer(parse_args(flags(corpus, tmp_path, "--max_steps", "1"))).train()
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(latest: step00000001\); pass --resume to "
                                         r"continue it, or a new --output_dir"):
        Trainer(parse_args(flags(corpus, tmp_path, "--max_steps", "2"))).train()


def test_resume_refuses_another_batch_plan(tmp_path, corpus):
    """The saved place in an epoch only means something in the order it was saved in: resumed
    with another micro-batch size or seed, some documents would be trained twice, others skipped."""
    Trainer(parse_args(flags(corpus, tmp_path, "--max_steps", "1", "--micro_batch_size", "2"))).train()
    with pytest.raises(ValueError, match=r"--resume: the checkpoint's data order was made with other settings "
                                         r"\(--micro_batch_size 2 then, 1 now; --seed 42 then, 7 now\); resume with the same ones"):
        Trainer(parse_args(flags(corpus, tmp_path, "--max_steps", "2", "--resume", "--seed", "7"))).train()
    Trainer(parse_args(flags(corpus, tmp_path, "--max_steps", "2", "--resume", "--micro_batch_size", "2"))).train()  # the same plan resumes


def test_the_documents_an_epoch_leaves_out_are_reported(tmp_path, corpus, caplog):
    with caplog.at_level("WARNING", logger="cached_ds"):
        Trainer(parse_args(flags(corpus, tmp_path, "--micro_batch_size", "3")))
    assert "each epoch leaves out 2 of 8 training documents (a step takes 3" in caplog.text


def test_help_names_each_default_once_and_never_none():
    """``--help`` adds argparse's ``(default: X)`` only where the help text does not already say
    the default; a flag left unset (None) says in words what happens instead."""
    from cached_ds.run_config import build_parser

    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        shown = formatter._get_help_string(action) or ""
        assert "(default: None)" not in shown and shown.count("default:") <= 1, shown
    text = " ".join(parser.format_help().split())
    assert "--lr LR peak learning rate" in text and "(default: 0.0003)" in text
    assert "(default: none) (default: None)" not in text


# ---- errors after parsing: one line from the launcher, on one rank or two -------------------------

def _assert_one_line_error(result, message):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert any(line.startswith("train.py: error: ") and message in line for line in lines), result.stderr[-3000:]


@pytest.mark.parametrize("case, message", [
    ("txt", "docs.txt"),  # data_lib refuses the extension once the run has started
    ("column", "--text_column 'report' is not a column"),
])
def test_run_errors_are_one_line_without_traceback(tmp_path, corpus, case, message):
    """Errors raised by the run itself (data, model, earlier run) used to print 5-6 frames of
    "[rank0]:" traceback above their message."""
    args = flags(corpus, tmp_path, "--max_steps", "1")
    if case == "txt":
        txt = tmp_path / "docs.txt"
        txt.write_text(Path(corpus["train_file"]).read_text())
        args[args.index("--train_file") + 1] = str(txt)
    else:
        args += ["--text_column", "report"]
    result = run_train(*args, check=False, timeout=300)
    _assert_one_line_error(result, message)
    assert result.stderr.strip().splitlines()[-1].startswith("train.py: error: ")


def test_run_error_on_two_ranks_ends_the_run(tmp_path, corpus):
    """A failing rank ends its process at once (torchrun then stops the others, which wait for
    it in a barrier here): no hang, and no traceback from train.py on either rank (torchrun's own
    ChildFailedError report follows, as for any failed worker)."""
    result = run_train(*flags(corpus, tmp_path, "--max_steps", "1", "--text_column", "report"), ranks=2, check=False, timeout=300)
    assert result.returncode != 0
    assert "train.py: error: --text_column 'report' is not a column" in result.stderr
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr, result.stderr[-3000:]
    assert 'launchers/train.py", line' not in result.stderr, result.stderr[-3000:]


def test_only_errors_cached_ds_raises_are_shortened():
    """A ValueError from torch, HF or a builtin is more likely a bug than a message: it keeps its
    traceback (``raised_here`` is False); ours are one line."""
    import importlib.util

    import torch
    import torch.nn.functional as F

    from cached_ds import CachedConfig

    spec = importlib.util.spec_from_file_location("train_launcher", REPO / "launchers" / "train.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    raised = []
    for cause in (lambda: CachedConfig(window=0), lambda: int("x"), lambda: F.cross_entropy(torch.randn(2, 3), torch.tensor([0]))):
        try:
            cause()
        except ValueError as error:
            raised.append(launcher.raised_here(error))
    assert raised == [True, False, False]


def test_traceback_on_request(tmp_path, corpus):
    result = run_train(*flags(corpus, tmp_path, "--max_steps", "1", "--text_column", "report"), check=False, timeout=300,
                       CACHED_DS_TRACEBACK="1")
    assert result.returncode == 1 and "Traceback" in result.stderr and "train.py: error: --text_column" in result.stderr


# ---- the DeepSpeed config's schema, checked before anything is built ------------------------------

def _config_with(tmp_path, **zero):
    config = shipped_config("zero3")
    config["zero_optimization"].update(zero)
    path = written(tmp_path, config)
    return path


def test_zero_stage_out_of_range_names_the_field(tmp_path):
    path = _config_with(tmp_path, stage=5)
    with pytest.raises(ValueError, match=r'"zero_optimization.stage" is 5: must be one of 0, 1, 2, 3$'):
        parse_args(["--deepspeed", str(path)])  # at parse time: before data generation and the model


def test_zero_key_typo_suggests_the_key_and_lists_every_error(tmp_path):
    path = _config_with(tmp_path, stage3_prefech_bucket_size=5, offload_param={"device": "gpu"})
    with pytest.raises(ValueError) as raised:
        parse_args(["--deepspeed", str(path), "--model", "tiny-bart", "--train_file", "x.jsonl"])
    lines = str(raised.value).splitlines()
    assert lines[0] == f"{str(path)!r} has 2 invalid DeepSpeed settings:"
    assert sorted(line.strip() for line in lines[1:]) == sorted([
        '"zero_optimization.offload_param.device" is \'gpu\': must be one of \'none\', \'cpu\', \'nvme\'',
        ('"zero_optimization.stage3_prefech_bucket_size" is not a DeepSpeed setting in zero_optimization; '
         "did you mean 'stage3_prefetch_bucket_size'? (value 5)"),
    ])


def test_schema_error_from_the_launcher_is_brief(tmp_path):
    path = _config_with(tmp_path, stage=5)
    result = subprocess.run(["python", "launchers/train.py", "--deepspeed", str(path)], cwd=REPO, env=launcher_env(),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-2:] == [f"train.py: error: {str(path)!r} has 1 invalid DeepSpeed setting:",
                                                       '  "zero_optimization.stage" is 5: must be one of 0, 1, 2, 3']


def test_initialize_names_the_field_of_a_deepspeed_schema_error():
    """A section DeepSpeed checks inside deepspeed.initialize ("compile" here) gives the same
    one-line-per-field error rather than pydantic's."""
    from tiny_models import make_model

    from cached_ds.deepspeed_engine import initialize

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 0},
              "compile": {"deepcompile": "maybe"}}
    with pytest.raises(ValueError, match=r'the DeepSpeed config has 1 invalid DeepSpeed setting:\n  "compile.deepcompile" is '
                                         r"'maybe': must be a valid boolean"):
        initialize(make_model("bart"), config)


def test_deepspeed_directory_is_not_called_missing(tmp_path):
    with pytest.raises(ValueError, match=r"is a directory; --deepspeed takes a JSON file"):
        parse_args(["--deepspeed", str(tmp_path)])


# ---- --model with data, checked before the tokenizer --------------------------------------------

def test_data_without_model_is_refused_at_parse_time(corpus):
    with pytest.raises(ValueError, match=r"^--train_file needs --model: an HF id"):
        parse_args(["--deepspeed", "ds_configs/zero0.json", "--train_file", corpus["train_file"]])


@pytest.mark.parametrize("name, message", [
    ("not-a-model", "--model 'not-a-model' is neither a local directory nor a shipped config"),
    ("./no/such/dir", "--model './no/such/dir': no such directory"),
])
def test_bad_model_name_is_refused_before_the_tokenizer(corpus, name, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_args(["--deepspeed", "ds_configs/zero0.json", "--train_file", corpus["train_file"], "--model", name])


# ---- the embedded default job refuses the flags it fixes ----------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--window", "64"], "--window is fixed by the embedded default job (128); give --train_file/--dataset and --model to choose it"),
    (["--text_column", "report"], "--text_column is fixed by the embedded default job"),
    (["--max_source_tokens", "64"], "--max_source_tokens is fixed by the embedded default job"),
])
def test_embedded_default_refuses_flags_it_fixes(extra, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_args(["--deepspeed", "ds_configs/zero3.json", *extra])


def test_embedded_default_takes_the_values_it_fixes():
    """Given at the value the job fixes anyway (as a config's "cached.window": 128 is taken)."""
    run = parse_args(["--deepspeed", "ds_configs/zero3.json", "--window", "128", "--text_column", "document"])
    assert run.embedded and run.cached.window == 128




def test_embedded_default_honours_the_optimisation_flags_given(tmp_path):
    """--lr 3e-4 and --lr_decay true are the flags' defaults: the preset used to replace them
    (3e-3, constant) as if they had not been given."""
    from cached_ds.embedded import PRESETS, _with_preset

    preset = PRESETS["smoke"]
    given = _with_preset(parse_args(["--deepspeed", "ds_configs/zero3.json", "--lr", "3e-4", "--lr_decay", "true",
                                     "--max_new_tokens", "128", "--max_eval_documents", "2"]), preset, tmp_path)
    assert (given.optim.lr, given.optim.lr_decay, given.eval.max_new_tokens, given.data.max_eval_documents) == (3e-4, True, 128, 2)
    assert given.optim.max_steps == preset.steps and given.cached.window == preset.window  # not given: the preset's
    left = _with_preset(parse_args(["--deepspeed", "ds_configs/zero3.json"]), preset, tmp_path)
    assert (left.optim.lr, left.optim.lr_decay, left.eval.max_new_tokens) == (preset.lr, False, preset.max_new_tokens)


def _edited(name: str, change) -> dict:
    config = shipped_config(name)
    change(config)
    return config


@pytest.mark.parametrize("change, extra, message", [
    # DeepSpeed ignores unknown keys: this one left the run without clipping at all
    (lambda c: c.update(gradient_cliping=c.pop("gradient_clipping")), [], 'did you mean "gradient_clipping"?'),
    (lambda c: c.update(optimiser=c.pop("optimizer")), [], 'did you mean "optimizer"?'),
    (lambda c: c.pop("optimizer"), [], 'has no "optimizer" section, and train.py builds no optimizer of its own'),
    # a flag the user gave lost to the config's number without a word
    (lambda c: c["optimizer"]["params"].update(lr=1e-4), ["--lr", "1e-3"],
     'sets optimizer.params.lr=0.0001 but --lr is 0.001; set it to "auto" there'),
    (lambda c: c.update(gradient_clipping=0.5), ["--max_grad_norm", "2"], "sets gradient_clipping=0.5 but --max_grad_norm is 2.0"),
    # the launcher runs these as HF's schedule from its flags: their numbers were ignored
    (lambda c: c["scheduler"]["params"].update(warmup_num_steps=2, warmup_min_lr=1e-5), [],
     "scheduler.params {'warmup_min_lr': 1e-05, 'warmup_num_steps': 2} would be ignored"),
    (lambda c: c["scheduler"].update(type="WarmupCosineLR", params={"warmup_num_steps": "auto", "warmup_type": "log"}), [],
     "scheduler.params {'warmup_type': 'log'} would be ignored"),
    (lambda c: c["scheduler"].update(type="WarmupCosineLR", params={"cos_min_ratio": 2}), [],
     "cos_min_ratio is the final rate's share of --lr, a number from 0 to 1; got 2"),
    (lambda c: c["scheduler"].update(type="WarmupCosineLR", params={}), ["--lr_decay", "false"],
     "has a WarmupCosineLR scheduler, which decays the rate, but --lr_decay is false"),
    (lambda c: c.update(steps_per_print="auto"), [], "has \"auto\" in ['steps_per_print'], which train.py does not fill"),
    (lambda c: c.update(data_efficiency={"enabled": True}), [], '"data_efficiency" works through DeepSpeed\'s own dataloader'),
    (lambda c: c.update(wandb={"enabled": True}), [], '"wandb" is enabled but its package is not installed: pip install wandb'),
], ids=["clipping-typo", "optimizer-typo", "no-optimizer", "lr-flag", "clipping-flag", "scheduler-numbers", "cosine-numbers", "cosine-ratio", "cosine-no-decay", "auto-not-filled",
        "data-efficiency", "wandb-missing"])
def test_config_settings_the_run_would_ignore_are_refused_at_parse_time(tmp_path, corpus, change, extra, message):
    config = written(tmp_path, _edited("zero2", change))
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_args(flags(corpus, tmp_path, *extra, config=str(config)))


def test_unknown_settings_far_from_any_are_warned_about_and_hf_autos_are_filled(tmp_path, corpus, caplog):
    from cached_ds.ds_config import auto_values, resolve_auto

    config = _edited("zero2", lambda c: c.update(my_note="tuned on 8 GPUs"))
    config["optimizer"]["params"].update(betas="auto", eps="auto")  # HF's documented ZeRO configs
    config["fp16"] = {"enabled": "auto"}
    with caplog.at_level("WARNING", logger="cached_ds"):
        parse_args(flags(corpus, tmp_path, config=str(written(tmp_path, config))))
    assert '"my_note" is not a setting this DeepSpeed version reads; it is ignored' in caplog.text
    values = auto_values(micro_batch_size=1, gradient_accumulation_steps=1, world_size=1, lr=1e-3, weight_decay=0.0, warmup_steps=0,
                         total_steps=10, max_grad_norm=1.0, bf16=False, hidden_size=16)
    resolved = resolve_auto(config, values)
    assert resolved["optimizer"]["params"]["betas"] == [0.9, 0.999] and resolved["optimizer"]["params"]["eps"] == 1e-8
    assert resolved["fp16"] == {"enabled": False}


def test_a_config_with_only_train_batch_size_says_what_to_add(tmp_path, corpus):
    from cached_ds.ds_config import check_batch_sizes

    with pytest.raises(ValueError, match=re.escape('does not set train_micro_batch_size_per_gpu; add "train_micro_batch_size_per_gpu": '
                                                   '"auto" there (--micro_batch_size, 2, fills it')):
        check_batch_sizes({"train_batch_size": 2, "gradient_accumulation_steps": 1}, 1, 2, 1)


def test_bf16_with_deepspeeds_bf16_optimizer_exports_and_the_comms_logger_reports(tmp_path, corpus, capsys):
    """bf16 + data_types.grad_accum_dtype fp32 under ZeRO-1 runs DeepSpeed's BF16_Optimizer, whose
    checkpoints zero_to_fp32 does not read: the export failed after the whole run had trained."""
    config = _edited("zero1", lambda c: c.update(data_types={"grad_accum_dtype": "fp32"}, comms_logger={"enabled": True}))
    config["bf16"] = {"enabled": True}
    run = parse_args(flags(corpus, tmp_path, "--max_steps", "1", "--max_eval_documents", "1", "--max_new_tokens", "4",
                           config=str(written(tmp_path, config))))
    trainer = Trainer(run)
    assert type(trainer.engine.optimizer).__name__ == "BF16_Optimizer"
    trainer.train()
    assert hf.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run" / "exported") is not None
    assert "Comm. Op" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--max_steps", "0"], "--max_steps must be at least 1, got 0"),  # `max_steps or epochs × ...` would train whole epochs
    (["--lr", "0"], "--lr must be positive, got 0.0"),
    (["--micro_batch_size", "0"], "--micro_batch_size must be at least 1, got 0"),
])
def test_run_flags_at_their_bound_are_refused(tmp_path, corpus, extra, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_args(flags(corpus, tmp_path, *extra))


def test_train_batch_size_is_checked_against_the_world_size():
    """DeepSpeed asserts train_batch_size = micro × GAS × world: a config written for one rank,
    run on two, gets the launcher's message naming the product, not DeepSpeed's bare assertion."""
    from cached_ds.ds_config import check_batch_sizes

    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3, "train_batch_size": 6}
    check_batch_sizes(config, world_size=1)
    with pytest.raises(ValueError, match=r"train_batch_size=6 but .* = 2 × 3 × 2 = 12"):
        check_batch_sizes(config, world_size=2)


def test_min_new_tokens_zero_is_a_valid_flag():
    """--min_new_tokens 0 cancels a model's own min_length (its generation_config); only below 0
    is refused, and --max_new_tokens below 1."""
    from cached_ds.evaluation import check_generation_flags

    check_generation_flags({"num_beams": 1, "max_new_tokens": 4, "min_new_tokens": 0})
    with pytest.raises(ValueError, match="--min_new_tokens must be at least 0, got -1"):
        check_generation_flags({"min_new_tokens": -1})
    with pytest.raises(ValueError, match="--max_new_tokens must be at least 1, got 0"):
        check_generation_flags({"max_new_tokens": 0})
