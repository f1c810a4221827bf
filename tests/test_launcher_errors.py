"""Bad input to the launcher fails early with an error that names the field and the fix."""

import json
import subprocess

import pytest
import transformers as hf
from ds_helpers import single_rank_distributed
from launcher_helpers import REPO, launcher_env, make_corpus

from cached_ds.data import check_utf8
from cached_ds.run_config import parse_args
from cached_ds.trainer import Trainer


@pytest.fixture(scope="module", autouse=True)
def distributed():
    single_rank_distributed()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), documents=8)


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


def test_unknown_cached_key(tmp_path):
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config["cached"]["windowz"] = 512
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unknown keys \['windowz'\] in the \"cached\" section"):
        parse_args(["--deepspeed", str(path)])


def test_inconsistent_train_batch_size(tmp_path, corpus):
    config = json.loads((REPO / "ds_configs" / "zero0.json").read_text())
    config["train_batch_size"] = 7
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
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


def test_model_without_data():
    with pytest.raises(ValueError, match=r"no training data: pass --dataset NAME or --train_file FILE"):
        parse_args(["--deepspeed", "ds_configs/zero0.json", "--model", "tiny-bart"])
