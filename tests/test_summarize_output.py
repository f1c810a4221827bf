"""launchers/summarize.py keeps the input's fields: the generated text goes to its own field."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launcher_helpers import REPO, launcher_env, make_corpus

from cached_ds.model import CACHED_CONFIG_FILE

sys.path.insert(0, str(REPO / "launchers"))
from summarize import model_files  # noqa: E402  (launchers/summarize.py)


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


def recorded_settings(model) -> dict:
    """What summarize() below records for ``model`` (launchers/summarize.py's sidecar)."""
    return {"model": str(model.resolve()), "model_files": model_files(model), "dtype": "fp32", "num_beams": 1, "max_new_tokens": 4,
            "min_new_tokens": None, "length_penalty": None, "text_column": "document", "output_column": "prediction",
            "source_prefix": None, "max_source_tokens": None}


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

    longer = tmp_path / "longer.jsonl"  # --min_new_tokens, as the training run's evaluation takes it
    assert summarize(model, docs, longer, "--min_new_tokens", "4").returncode == 0
    assert all(json.loads(line)["prediction"].strip() for line in longer.read_text().splitlines())
    refused = summarize(model, docs, tmp_path / "no.jsonl", "--min_new_tokens", "5")
    assert refused.returncode == 1 and "--min_new_tokens 5 is more than --max_new_tokens 4" in refused.stderr


def test_an_output_column_the_input_has_is_refused(tmp_path, exported):
    model, eval_file = exported
    docs = tmp_path / "docs.jsonl"
    docs.write_text(Path(eval_file).read_text().splitlines()[0] + "\n")
    result = summarize(model, docs, tmp_path / "out.jsonl", "--output_column", "summary")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "already have a 'summary' field, which the generated summary would overwrite; pass another --output_column" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_unicode_line_separators_empty_and_non_text_documents(tmp_path, exported):
    """Raw U+2028/U+0085 inside JSON strings are valid JSON (json.dumps(..., ensure_ascii=False)
    writes them); text is written as text, not \\u escapes; an empty document gets an empty
    summary; a non-text one is refused by line."""
    model, _ = exported
    docs = tmp_path / "docs.jsonl"
    rows = [{"document": "the color is red .\u2028second line\u0085 北京"}, {"document": "  "}]
    docs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = summarize(model, docs, out)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert "北京" in text and "\\u5317" not in text
    written = [json.loads(line) for line in text.split("\n") if line]
    assert [r["document"] for r in written] == [r["document"] for r in rows]
    assert written[1]["prediction"] == "" and "lines [2] have an empty 'document'" in result.stderr
    docs.write_text('{"document": "fine"}\n{"document": 5}\n{"document": null}\n')
    result = summarize(model, docs, tmp_path / "bad.jsonl")
    assert result.returncode == 1 and "lines [2, 3] hold no text in 'document'" in result.stderr and "Traceback" not in result.stderr


def test_an_interrupted_run_continues_where_it_stopped(tmp_path, exported):
    """Summaries go to <output>.partial as they are made; the same command keeps the complete
    lines (a line cut by the interruption, here inside a character, is dropped) and summarises
    only the rest. Other settings or another input are refused, not mixed in."""
    model, eval_file = exported
    inputs = [json.loads(line) for line in Path(eval_file).read_text().splitlines()][:3]
    inputs[1]["document"] = "北京 " + inputs[1]["document"]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in inputs), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    partial, sidecar = tmp_path / "out.jsonl.partial", tmp_path / "out.jsonl.partial.json"
    settings = recorded_settings(model)
    second = json.dumps({**inputs[1], "prediction": "x"}, ensure_ascii=False).encode("utf-8")
    cut = second[: second.index("北".encode("utf-8")) + 1]  # inside the character's three bytes
    partial.write_bytes((json.dumps({**inputs[0], "prediction": "written before"}) + "\n").encode("utf-8") + cut)
    sidecar.write_text(json.dumps(settings))
    other = summarize(model, docs, out, "--num_beams", "2")
    assert other.returncode == 1 and "out.jsonl.partial was written with other settings (num_beams)" in other.stderr
    other = summarize(model, docs, out, "--output_column", "generated")  # its lines are not what this input gives
    assert other.returncode == 1 and "out.jsonl.partial was written with other settings (output_column)" in other.stderr
    result = summarize(model, docs, out)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["document"] for r in rows] == [r["document"] for r in inputs]
    assert rows[0]["prediction"] == "written before" and rows[1]["prediction"] != "written before"
    assert "1 of 3 documents were summarised before" in result.stderr
    assert not partial.exists() and not sidecar.exists()

    partial.write_text(json.dumps({"document": "another input", "prediction": "x"}) + "\n")
    sidecar.write_text(json.dumps(settings))
    result = summarize(model, docs, out)
    assert result.returncode == 1 and "out.jsonl.partial holds summaries of other documents" in result.stderr
    assert "delete it to start over" in result.stderr


def test_messages_name_the_lines_of_the_file(tmp_path, exported):
    """Blank lines are skipped, not counted away: a problem is reported at its line in the file."""
    model, _ = exported
    docs = tmp_path / "docs.jsonl"
    docs.write_text('\n{"document": "fine"}\n\n{"text": "no document field"}\n')
    result = summarize(model, docs, tmp_path / "out.jsonl")
    assert result.returncode == 1 and "lines [4] have no 'document' field" in result.stderr


def test_wrong_model_folder_and_a_summary_past_the_positions(tmp_path, exported):
    model, eval_file = exported
    docs = tmp_path / "docs.jsonl"
    docs.write_text(Path(eval_file).read_text().splitlines()[0] + "\n")
    missing = summarize(model, tmp_path / "nope.jsonl", tmp_path / "out.jsonl")
    assert missing.returncode == 1 and f"--input {tmp_path / 'nope.jsonl'}: no such file" in missing.stderr
    assert "Traceback" not in missing.stderr
    missing = summarize(tmp_path / "no-model", docs, tmp_path / "out.jsonl")
    assert missing.returncode == 1 and f"--model {tmp_path / 'no-model'}: no such folder" in missing.stderr
    assert "Traceback" not in missing.stderr
    result = summarize(tmp_path, docs, tmp_path / "out.jsonl")  # a folder without the export's files
    assert result.returncode == 1 and "cached_config.json is missing: give a folder written by CachedSeq2Seq.save_pretrained or export_hf" in result.stderr
    positions = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    result = summarize(model, docs, tmp_path / "out.jsonl", "--max_new_tokens", str(positions + 50))
    assert result.returncode == 0, result.stderr[-3000:]  # it used to fail with an index error
    assert f"--max_new_tokens {positions + 50} reaches past this bart decoder's {positions} positions: generating at most {positions - 1}" in result.stderr


def test_a_saved_wrapper_without_its_tokenizer_is_refused(tmp_path, exported):
    """CachedSeq2Seq.save_pretrained writes no tokenizer; transformers 5 then builds an empty one
    from the config, and every document was summarised from unknown tokens, exit status 0."""
    model, eval_file = exported
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors", CACHED_CONFIG_FILE):
        (bare / name).write_bytes((model / name).read_bytes())
    docs = tmp_path / "docs.jsonl"
    docs.write_text(Path(eval_file).read_text().splitlines()[0] + "\n")
    result = summarize(bare, docs, tmp_path / "out.jsonl")
    assert result.returncode == 1 and f"{bare} holds no tokenizer files" in result.stderr
    assert "give --model the folder train.py exported (<output_dir>/exported)" in result.stderr


def test_a_multi_process_launch_is_refused_before_writing(tmp_path, exported):
    """Under torchrun or the deepspeed launcher every process would summarise every document into
    the same .partial file, then all but one crash renaming it."""
    model, eval_file = exported
    out = tmp_path / "out.jsonl"
    result = subprocess.run(["python", "launchers/summarize.py", "--model", str(model), "--input", str(eval_file), "--output", str(out)],
                            cwd=REPO, env={**launcher_env(), "WORLD_SIZE": "2", "RANK": "1"}, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "summarize.py runs as one process, but this launch has WORLD_SIZE=2" in result.stderr
    assert not list(tmp_path.glob("out.jsonl*"))


def test_the_input_is_read_one_document_at_a_time(tmp_path):
    """Checking a file of long documents holds one at a time (Python's allocations, traced), not
    the whole file: a corpus of books need not fit in memory."""
    import importlib.util
    import tracemalloc
    from argparse import Namespace

    spec = importlib.util.spec_from_file_location("summarize_launcher", REPO / "launchers" / "summarize.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    docs = tmp_path / "books.jsonl"
    with docs.open("w") as handle:
        for i in range(40):
            handle.write(json.dumps({"document": f"word{i} " * 100_000 if i % 7 else " "}) + "\n\n")  # ~0.6 MB each
    assert docs.stat().st_size > 20 * 2**20
    tracemalloc.start()
    lines = launcher.JsonLines(docs)
    empty = launcher.check_records(lines, Namespace(input=docs, text_column="document", output_column="prediction"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(lines) == 40 and empty == [2 * i + 1 for i in range(0, 40, 7)]  # the blank lines between are skipped
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB held to check a {docs.stat().st_size / 2**20:.0f} MiB file"


def test_a_run_is_not_continued_with_another_model_saved_into_its_folder(tmp_path, exported):
    """A run of train.py into the same --output_dir saves other weights into exported/: the
    interrupted summaries of the old ones must not be continued with the new ones."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(exported[0], model)
    docs = tmp_path / "docs.jsonl"
    docs.write_text(Path(exported[1]).read_text())
    out = tmp_path / "out.jsonl"
    partial, sidecar = tmp_path / "out.jsonl.partial", tmp_path / "out.jsonl.partial.json"
    assert summarize(model, docs, out).returncode == 0
    out.rename(partial)  # as if interrupted after every line
    sidecar.write_text(json.dumps(recorded_settings(model)))
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # copied without its time: the same model, continued
    assert summarize(model, docs, out).returncode == 0
    out.rename(partial)
    sidecar.write_text(json.dumps(recorded_settings(model)))
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # other weights of the same size, saved into the folder since
    weights.write_bytes(bytes(data))
    result = summarize(model, docs, out)
    assert result.returncode == 1 and "out.jsonl.partial was written with other settings (model_files)" in result.stderr
    sidecar.write_text(json.dumps({"model": str(model.resolve()), "num_beams": 1}))  # as summarize.py recorded them before
    result = summarize(model, docs, out)
    assert result.returncode == 1 and "written by an earlier version of summarize.py" in result.stderr


def test_generation_follows_the_models_generation_config_unless_a_flag_is_given(tmp_path, exported):
    """A fine-tuned summariser's generation_config (bart-large-cnn: length_penalty 2, min_length
    56, no_repeat_ngram_size 3...) is HF's generate's own default: the flags' defaults used to
    override it without a word (--min_new_tokens 0 cancelled its min_length)."""
    import shutil

    import transformers as hf

    model = tmp_path / "model"
    shutil.copytree(exported[0], model)
    hf.GenerationConfig(min_length=9, max_length=12, length_penalty=2.0, num_beams=2, decoder_start_token_id=2,
                        bos_token_id=0, eos_token_id=2, pad_token_id=1).save_pretrained(model)
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"document": " ".join(json.loads(Path(exported[1]).read_text().splitlines()[0])["document"].split()[:40])}) + "\n")
    run = subprocess.run(["python", "launchers/summarize.py", "--model", str(model), "--input", str(docs), "--output",
                          str(tmp_path / "out.jsonl"), "--device", "cpu"], cwd=REPO, env=launcher_env(), capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert ("generating with the model's generation_config for num_beams=2, max_length=12, min_length=9, length_penalty=2.0 "
            "(a flag overrides each)") in run.stderr
    tokenizer = hf.AutoTokenizer.from_pretrained(model)
    [row] = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = hf.AutoModelForSeq2SeqLM.from_pretrained(model).generate(**tokenizer(row["document"], return_tensors="pt"))
    assert row["prediction"] == tokenizer.decode(expected[0], skip_special_tokens=True).strip()  # one window: HF's own
    assert 9 <= expected.shape[1] <= 12
