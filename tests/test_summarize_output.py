"""launchers/summarize.py keeps the input's fields: the generated text goes to its own field."""

import json
import subprocess
from pathlib import Path

import pytest
from launcher_helpers import REPO, launcher_env, make_corpus

from cached_ds.deepspeed_engine import CACHED_CONFIG_FILE


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A folder as launchers/train.py exports it: the saved tiny BART, its tokenizer and the
    windows (no training needed to check what the summariser writes)."""
    root = tmp_path_factory.mktemp("exported")
    corpus = make_corpus(root, documents=4)
    (root / "model" / CACHED_CONFIG_FILE).write_text(json.dumps({"window": 128}) + "\n")
    return root / "model", corpus["eval_file"]


def summarize(model, docs, out, *extra):
    return subprocess.run(["python", "launchers/summarize.py", "--model", str(model), "--input", str(docs), "--output", str(out),
                           "--num_beams", "1", "--max_new_tokens", "4", "--device", "cpu", *extra],
                          cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=300, check=False)


def test_training_format_input_keeps_its_reference_summary(tmp_path, exported):
    model, eval_file = exported
    inputs = [json.loads(line) for line in Path(eval_file).read_text().splitlines()][:2]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(r) + "\n" for r in inputs))
    out = tmp_path / "out.jsonl"
    result = summarize(model, docs, out)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["summary"] for r in rows] == [r["summary"] for r in inputs]  # the references, untouched
    assert [r["document"] for r in rows] == [r["document"] for r in inputs]
    assert all(isinstance(r["prediction"], str) for r in rows)

    named = tmp_path / "named.jsonl"
    assert summarize(model, docs, named, "--output_column", "generated").returncode == 0
    rows = [json.loads(line) for line in named.read_text().splitlines()]
    assert all(isinstance(r["generated"], str) and "prediction" not in r for r in rows)


def test_an_output_column_the_input_has_is_refused(tmp_path, exported):
    model, eval_file = exported
    docs = tmp_path / "docs.jsonl"
    docs.write_text(Path(eval_file).read_text().splitlines()[0] + "\n")
    result = summarize(model, docs, tmp_path / "out.jsonl", "--output_column", "summary")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "already have a 'summary' field, which the generated summary would overwrite; pass another --output_column" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()
