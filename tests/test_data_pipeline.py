"""Length-aware, token-balanced batches and loading through datasets.load_dataset."""

import json
import random
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import transformers as hf
from ds_helpers import single_rank_distributed
from launcher_helpers import launcher_env, make_corpus

from cached_ds.data import ROW, BatchPlan, load_split
from cached_ds.run_config import parse_args
from cached_ds.trainer import Trainer

LENGTHS = [random.Random(i).randint(200, 20_000) for i in range(96)]


def plan(world=2, micro=2, gas=3, seed=0):
    return BatchPlan(LENGTHS, world, micro, gas, seed)


def test_every_document_once_per_epoch_split_across_ranks():
    p = plan()
    ranks = [p.epoch(0, r) for r in range(2)]
    seen = [i for steps in ranks for step in steps for batch in step for i in batch]
    assert len(set(seen)) == len(seen) == p.steps_per_epoch * p.docs_per_step  # no document twice, none lost but the remainder
    assert all(len(step) == 3 and all(len(b) == 2 for b in step) for steps in ranks for step in steps)


def test_deterministic_under_seed_and_different_across_epochs():
    assert plan().epoch(0, 1) == plan().epoch(0, 1)
    assert plan().epoch(0, 1) != plan().epoch(1, 1)
    assert plan(seed=1).epoch(0, 1) != plan().epoch(0, 1)


def test_ranks_get_about_the_same_tokens_and_similar_lengths_share_a_batch():
    p = plan()
    per_rank = [[sum(LENGTHS[i] for b in step for i in b) for step in p.epoch(0, r)] for r in range(2)]
    imbalance = [abs(a - b) / max(a, b) for a, b in zip(*per_rank)]
    assert max(imbalance) < 0.25
    spread = [max(LENGTHS[i] for i in b) / min(LENGTHS[i] for i in b) for step in p.epoch(0, 0) for b in step]
    shuffled = random.Random(0).sample(range(96), 96)
    random_spread = [max(LENGTHS[shuffled[k]], LENGTHS[shuffled[k + 1]]) / min(LENGTHS[shuffled[k]], LENGTHS[shuffled[k + 1]]) for k in range(0, 96, 2)]
    assert sum(spread) / len(spread) < 0.5 * sum(random_spread) / len(random_spread)


def test_too_few_documents_for_one_step():
    with pytest.raises(ValueError, match="3 training documents are fewer than one optimizer step needs"):
        BatchPlan([10, 20, 30], 2, 1, 2, 0).check()


def test_dataset_flag_loads_a_local_dataset_folder(tmp_path):
    """--dataset goes through datasets.load_dataset; here on a folder with train/validation files."""
    single_rank_distributed()
    corpus = make_corpus(tmp_path / "corpus", documents=8)
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = [json.loads(line) for line in open(corpus["train_file"])]
    (folder / "train.jsonl").write_text("".join(json.dumps({"report": r["document"], "abstract": r["summary"]}) + "\n" for r in rows))
    (folder / "validation.jsonl").write_text("".join(json.dumps({"report": json.loads(l)["document"], "abstract": json.loads(l)["summary"]}) + "\n" for l in open(corpus["eval_file"])))
    trainer = Trainer(parse_args(["--deepspeed", "ds_configs/zero0.json", "--model", corpus["model"], "--dataset", str(folder),
                                  "--text_column", "report", "--summary_column", "abstract", "--window", "128",
                                  "--output_dir", str(tmp_path / "run")]))
    assert len(trainer.train_rows) == len(rows) and len(trainer.eval_rows) == 3
    assert all(r["num_tokens"] > 128 for r in trainer.train_rows), "whole documents, not truncated"
    # Rows stay in datasets' memory-mapped Arrow files and are read as arrays when used: as Python
    # lists every rank would hold about 36 bytes per token of the corpus.
    assert trainer.train_rows.cache_files and trainer.eval_rows.cache_files
    first = trainer.train_rows[0]
    assert isinstance(first["input_ids"], np.ndarray) and len(first["input_ids"]) == first["num_tokens"]
    assert len(first["labels"]) == first["num_label_tokens"]


def test_a_dataset_without_the_eval_split_says_so(tmp_path, caplog):
    """No evaluation is no silent choice: the warning names the split and the flag."""
    single_rank_distributed()
    corpus = make_corpus(tmp_path / "corpus", documents=8)
    folder = tmp_path / "only_train"
    folder.mkdir()
    (folder / "train.jsonl").write_text(open(corpus["train_file"]).read())
    with caplog.at_level("WARNING", logger="cached_ds"):
        trainer = Trainer(parse_args(["--deepspeed", "ds_configs/zero0.json", "--model", corpus["model"], "--dataset", str(folder),
                                      "--window", "128", "--output_dir", str(tmp_path / "run")]))
    assert trainer.eval_rows is None
    assert "has no split 'validation': no evaluation (name one with --eval_split; it has ['train'])" in caplog.text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), documents=8)


def trainer_for(corpus, tmp_path, *flags):
    single_rank_distributed()
    return Trainer(parse_args(["--deepspeed", "ds_configs/zero0.json", "--model", corpus["model"], "--window", "128",
                               "--micro_batch_size", "2", "--max_new_tokens", "4", "--output_dir", str(tmp_path / "run"), *flags]))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def test_csv_summaries_na_none_and_numbers_are_text(tmp_path):
    """pandas reads "NA"/"None" as missing and an all-digit column as int64: the documents were
    dropped as empty, or failed in the tokenizer. They are the text they say."""
    path = tmp_path / "d.csv"
    path.write_text("document,summary\nfirst doc,NA\nsecond doc,None\nthird doc,\n")
    dataset = load_split(parse_args(["--deepspeed", "ds_configs/zero0.json", "--train_file", str(path), "--model", "tiny-bart"]).data, "train")
    assert dataset["summary"] == ["NA", "None", ""]  # the empty one is skipped later as empty
    years = tmp_path / "years.csv"
    years.write_text("document,summary\nthe year it began,1999\nthe year after,2000\n")
    args = parse_args(["--deepspeed", "ds_configs/zero0.json", "--train_file", str(years), "--model", "tiny-bart"]).data
    from cached_ds.data import check_columns
    assert check_columns(load_split(args, "train"), args, "train")["summary"] == ["1999", "2000"]
    # read a few rows at a time (memory), a column's type is still the file's, not one chunk's
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("id,document,summary\n" + "".join(f"{i if i < 30 else f'doc-{i}'},text {i},sum {i}\n" for i in range(40)))
    args = parse_args(["--deepspeed", "ds_configs/zero0.json", "--train_file", str(mixed), "--model", "tiny-bart"]).data
    assert load_split(args, "train")["id"][-1] == "doc-39"
    # Excel's "CSV UTF-8" starts with a byte-order mark, which is not part of the first column's name
    marked = tmp_path / "excel.csv"
    marked.write_text("\ufeffdocument,summary\nنص طويل,ملخص\n", encoding="utf-8")
    args = parse_args(["--deepspeed", "ds_configs/zero0.json", "--train_file", str(marked), "--model", "tiny-bart"]).data
    assert check_columns(load_split(args, "train"), args, "train")["document"] == ["نص طويل"]


def test_columns_that_are_not_text_are_named(tmp_path):
    from cached_ds.data import check_columns, drop_empty
    lists = write_jsonl(tmp_path / "l.jsonl", [{"document": "a b", "summary": ["one.", "two."]}])
    args = parse_args(["--deepspeed", "ds_configs/zero0.json", "--train_file", lists, "--model", "tiny-bart"]).data
    with pytest.raises(ValueError, match="--summary_column 'summary' of the train data holds lists"):
        check_columns(load_split(args, "train"), args, "train")
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"document": "a b", "summary": "fine"}, {"document": "c", "summary": {"x": 1}}])
    args = parse_args(["--deepspeed", "ds_configs/zero0.json", "--train_file", mixed, "--model", "tiny-bart"]).data
    with pytest.raises(ValueError, match=r"row 1 of --summary_column 'summary' holds dict"):
        drop_empty(check_columns(load_split(args, "train"), args, "train"), args)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl is empty: no documents"):
        load_split(parse_args(["--deepspeed", "ds_configs/zero0.json", "--train_file", str(tmp_path / "empty.jsonl"), "--model", "tiny-bart"]).data, "train")


def test_dataset_saved_with_save_to_disk(tmp_path, corpus):
    """load_dataset refuses save_to_disk folders ("use load_from_disk"); --dataset takes both kinds."""
    rows = [json.loads(line) for line in open(corpus["train_file"])]
    evals = [json.loads(line) for line in open(corpus["eval_file"])]
    train, evaluation = datasets.Dataset.from_list(rows), datasets.Dataset.from_list(evals)
    datasets.DatasetDict({"train": train, "validation": evaluation}).save_to_disk(str(tmp_path / "dict"))
    trainer = trainer_for(corpus, tmp_path / "a", "--dataset", str(tmp_path / "dict"))
    assert len(trainer.train_rows) == len(rows) and len(trainer.eval_rows) == len(evals)
    train.save_to_disk(str(tmp_path / "one"))
    trainer = trainer_for(corpus, tmp_path / "b", "--dataset", str(tmp_path / "one"))
    assert len(trainer.train_rows) == len(rows) and trainer.eval_rows is None
    with pytest.raises(ValueError, match=r"has no split 'training'; it has \['train', 'validation'\]: name one with --train_split"):
        trainer_for(corpus, tmp_path / "c", "--dataset", str(tmp_path / "dict"), "--train_split", "training")
    folder = tmp_path / "files"
    folder.mkdir()
    write_jsonl(folder / "validation.jsonl", evals)  # a data folder without a train file
    with pytest.raises(ValueError, match=r"has no split 'train'; it has \['validation'\]: name one with --train_split"):
        trainer_for(corpus, tmp_path / "d", "--dataset", str(folder))


def test_predictions_name_each_documents_row_in_the_eval_file(tmp_path, corpus):
    """An empty eval row is skipped; the predictions' "index" is still the file's row, so they
    join back to it. Each evaluation's ROUGE is a file of its own (the step ones were only logged)."""
    evals = [json.loads(line) for line in open(corpus["eval_file"])]
    path = write_jsonl(tmp_path / "eval.jsonl", [{"document": "   ", "summary": "nothing"}, *evals])
    trainer = trainer_for(corpus, tmp_path, "--train_file", corpus["train_file"], "--eval_file", path)
    assert list(trainer.eval_rows[ROW]) == [1, 2, 3]
    scores = trainer.evaluate("step1")
    lines = [json.loads(line) for line in (tmp_path / "run" / "predictions_step1.jsonl").read_text().splitlines()]
    assert [(line["index"], line["reference"]) for line in lines] == [(i + 1, evals[i]["summary"].strip()) for i in range(3)]
    assert json.loads((tmp_path / "run" / "eval_results_step1.json").read_text()) == scores
    assert not (tmp_path / "run" / "eval_results.json").exists()  # the final evaluation's name
    assert not list((tmp_path / "run").glob("*.tmp"))


def saved_tokenizer(corpus, folder, change):
    """The corpus's tokenizer rebuilt as a plain fast tokenizer (its tokenizer.json), changed."""
    original = hf.AutoTokenizer.from_pretrained(corpus["model"])
    backend = original.backend_tokenizer
    tokens = {"eos_token": original.eos_token, "pad_token": original.pad_token, "unk_token": original.unk_token}
    tokenizer = hf.PreTrainedTokenizerFast(tokenizer_object=change(backend, tokens) or backend, **tokens)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_tokenizer_that_appends_no_eos_is_warned_about(tmp_path, corpus, caplog):
    def no_post_processor(backend, tokens):
        backend.post_processor = None

    tokenizer = saved_tokenizer(corpus, tmp_path / "tok", no_post_processor)
    with caplog.at_level("WARNING", logger="cached_ds"):
        trainer_for(corpus, tmp_path, "--train_file", corpus["train_file"], "--tokenizer", tokenizer)
    assert "8 of the first 8 tokenized summaries do not end with the tokenizer's end-of-sequence token" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cached_ds"):
        trainer_for(corpus, tmp_path / "own", "--train_file", corpus["train_file"])
    assert "end-of-sequence" not in caplog.text  # the corpus's own tokenizer appends it

    def eos_then_language_code(backend, tokens):  # mBART's labels end [..., eos, lang_code]
        from tokenizers.processors import TemplateProcessing
        eos, code = tokens["eos_token"], tokens["unk_token"]  # any special token stands in for a language code
        backend.post_processor = TemplateProcessing(single=f"$A {eos} {code}", special_tokens=[
            (eos, backend.token_to_id(eos)), (code, backend.token_to_id(code))])

    tokenizer = saved_tokenizer(corpus, tmp_path / "mbart_like", eos_then_language_code)
    caplog.clear()
    with caplog.at_level("WARNING", logger="cached_ds"):
        trainer = trainer_for(corpus, tmp_path / "mbart", "--train_file", corpus["train_file"], "--tokenizer", tokenizer)
    assert [int(i) for i in trainer.train_rows[0]["labels"][-2:]] == [trainer.tokenizer.eos_token_id, trainer.tokenizer.unk_token_id]
    assert "end-of-sequence" not in caplog.text


def test_tokenizer_without_pad_or_with_too_many_tokens(tmp_path, corpus, caplog):
    def no_pad(backend, tokens):
        tokens.pop("pad_token")

    tokenizer = saved_tokenizer(corpus, tmp_path / "nopad", no_pad)
    assert hf.AutoTokenizer.from_pretrained(tokenizer).pad_token_id is None
    with caplog.at_level("WARNING", logger="cached_ds"):
        trainer = trainer_for(corpus, tmp_path / "a", "--train_file", corpus["train_file"], "--tokenizer", tokenizer)
    assert trainer.tokenizer.pad_token_id == trainer.model.config.pad_token_id == 0
    assert "padding with the model's pad_token_id 0" in caplog.text

    def more_tokens(backend, tokens):
        backend.add_tokens([f"extra{i}" for i in range(100)])

    tokenizer = saved_tokenizer(corpus, tmp_path / "big", more_tokens)
    size = len(hf.AutoTokenizer.from_pretrained(tokenizer))  # sentencepiece's trained vocabulary differs by version
    with pytest.raises(ValueError, match=rf"has {size} tokens but the model embeds {size - 100}; pass the model's own tokenizer"):
        trainer_for(corpus, tmp_path / "b", "--train_file", corpus["train_file"], "--tokenizer", tokenizer)


def test_a_pretrained_model_fine_tunes_in_training_mode(tmp_path, corpus):
    """HF's from_pretrained returns eval mode: the run must switch dropout on itself, or every
    fine-tuning step would run without it."""
    trainer = trainer_for(corpus, tmp_path, "--train_file", corpus["train_file"])
    assert all(module.training for module in trainer.engine.module.modules())


TOKENIZE_SCRIPT = """
import json, sys
import transformers as hf
from cached_ds import data
from cached_ds.run_config import DataArgs
args = DataArgs(train_file=sys.argv[1], preprocessing_num_workers=int(sys.argv[3]) or None)
dataset, _ = data.drop_empty(data.check_columns(data.load_split(args, "train"), args, "train"), args)
rows = data.tokenize(dataset, hf.AutoTokenizer.from_pretrained(sys.argv[2]), args)
print(json.dumps([[int(r[data.ROW]), r["input_ids"].tolist(), r["labels"].tolist()] for r in rows]))
"""


def test_tokenizing_workers_give_the_same_rows_and_a_rerun_redoes_only_a_missing_share(tmp_path, corpus):
    """--preprocessing_num_workers: the rows of one process, and each worker's share cached on its
    own, so a run stopped during tokenization (a share not written) redoes only that share, in a
    new process as a requeued job is."""
    train_file = tmp_path / "train.jsonl"
    train_file.write_text(Path(corpus["train_file"]).read_text())
    env = launcher_env(HF_DATASETS_CACHE=str(tmp_path / "cache"))

    def tokenized(workers: int) -> list:
        run = subprocess.run([sys.executable, "-c", TOKENIZE_SCRIPT, str(train_file), corpus["model"], str(workers)],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout.splitlines()[-1])

    one = tokenized(1)
    assert len(one) == 8 and tokenized(3) == one
    shares = sorted((tmp_path / "cache").rglob("cache-*_of_00003.arrow"), key=lambda f: f.stat().st_mtime_ns)
    assert len(shares) == 6  # the empty-document filter's and the tokenizer's, 3 each
    lost, kept = shares[-1], shares[:-1]  # the tokenizer's last share, as if its worker was killed
    lost.unlink()
    written = {f: f.stat().st_mtime_ns for f in kept}
    assert tokenized(3) == one
    assert lost.is_file() and all(f.stat().st_mtime_ns == t for f, t in written.items())


SLOW_MAP_SCRIPT = """
import sys, time
from cached_ds import data
from cached_ds.run_config import DataArgs
dataset = data.load_split(DataArgs(train_file=sys.argv[1]), "train")
if sys.argv[2] == "map":  # one row at a time, slowly: killed midway, as a preempted job is
    dataset.map(lambda row: (time.sleep(0.5), row)[1], writer_batch_size=1)
else:
    print(data.remove_stale_partial_files(dataset))
"""


def test_partial_files_a_killed_tokenization_left_are_removed_once_stale(tmp_path, corpus):
    """datasets.map writes a tmp* file beside the cache and renames it when done: a job killed
    midway leaves it, as large as the work done. The next run removes it, once nothing has
    written it for an hour (another job on the same data may be tokenizing right now)."""
    import os
    import signal
    import time

    train_file = tmp_path / "train.jsonl"
    train_file.write_text(Path(corpus["train_file"]).read_text())
    env = launcher_env(HF_DATASETS_CACHE=str(tmp_path / "cache"))

    def partial_files():
        return [f for f in (tmp_path / "cache").rglob("tmp*") if f.is_file()]

    run = subprocess.Popen([sys.executable, "-c", SLOW_MAP_SCRIPT, str(train_file), "map"], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not [f for f in partial_files() if f.stat().st_size]:
        time.sleep(0.1)
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=60)
    [partial] = partial_files()

    def cleaned() -> int:
        done = subprocess.run([sys.executable, "-c", SLOW_MAP_SCRIPT, str(train_file), "clean"], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return int(done.stdout.split()[-1])

    assert cleaned() == 0 and partial.is_file(), "written seconds ago: perhaps another job's live map"
    size, hour_ago = partial.stat().st_size, time.time() - 3601
    os.utime(partial, (hour_ago, hour_ago))
    assert cleaned() == size > 0 and not partial.exists()
    assert list((tmp_path / "cache").rglob("*.arrow")), "the dataset's own cache stays"

    from cached_ds.data import remove_stale_partial_files  # a save_to_disk folder is the user's, not the cache

    datasets.Dataset.from_dict({"document": ["a b"], "summary": ["a"]}).save_to_disk(tmp_path / "saved")
    theirs = tmp_path / "saved" / "tmpabcdefgh"
    theirs.write_bytes(b"not ours")
    os.utime(theirs, (hour_ago, hour_ago))
    assert remove_stale_partial_files(datasets.load_from_disk(str(tmp_path / "saved"))) == 0 and theirs.exists()


def test_source_prefix_starts_every_document_and_goes_into_the_exported_config(tmp_path, corpus, caplog):
    """--source_prefix (HF's run_summarization.py; T5's "summarize: "): every document's ids are
    the tokenizer's for prefix + text, and the model's config keeps it (HF's ``prefix``) for
    summarize.py. Without the flag, a model whose config expects one gets a warning, and the
    config no longer claims it."""
    tokenizer = hf.AutoTokenizer.from_pretrained(corpus["model"])
    trainer = trainer_for(corpus, tmp_path, "--train_file", corpus["train_file"], "--source_prefix", "summarize: ")
    documents = [json.loads(line)["document"] for line in open(corpus["train_file"])]
    for row in trainer.train_rows:
        assert row["input_ids"].tolist() == tokenizer("summarize: " + documents[int(row[ROW])])["input_ids"]
    assert trainer.model.config.prefix == "summarize: "

    pretrained = tmp_path / "t5-like"
    hf.AutoModelForSeq2SeqLM.from_pretrained(corpus["model"]).save_pretrained(pretrained)
    tokenizer.save_pretrained(pretrained)
    config = json.loads((pretrained / "config.json").read_text())
    config["task_specific_params"] = {"summarization": {"prefix": "summarize: "}}
    (pretrained / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="cached_ds"):
        plain = trainer_for({**corpus, "model": str(pretrained)}, tmp_path / "plain", "--train_file", corpus["train_file"])
    assert "the model expects documents to start with 'summarize: ' (its config), but --source_prefix is not set" in caplog.text
    assert plain.train_rows[0]["input_ids"].tolist() == tokenizer(documents[int(plain.train_rows[0][ROW])])["input_ids"]
    assert plain.model.config.prefix is None


@pytest.mark.parametrize("world, micro, gas", [(2, 1, 2), (2, 1, 3), (3, 2, 2), (4, 1, 4)])
@pytest.mark.parametrize("seed", range(3))
def test_every_rank_runs_exactly_gas_micro_batches_with_skewed_lengths(world, micro, gas, seed):
    """Every rank gets exactly gradient_accumulation_steps micro-batches of micro_batch_size
    documents in every step, also when one document in about eight dwarfs the others (the
    token-greedy dealing must not give a light rank an extra micro-batch: ranks would then run
    different numbers of backward passes). Lengths this uneven were never tried before."""
    rng = random.Random(seed)
    lengths = [rng.choice([100_000] + [rng.randint(10, 50)] * 7) for _ in range(world * micro * gas * 6)]
    plan = BatchPlan(lengths, world, micro, gas, seed)
    epochs = [plan.epoch(0, r) for r in range(world)]
    for r, steps in enumerate(epochs):
        assert len(steps) == plan.steps_per_epoch
        for step in steps:
            assert len(step) == gas, (r, step)
            assert all(len(batch) == micro for batch in step)
    seen = [i for steps in epochs for step in steps for batch in step for i in batch]
    assert len(seen) == len(set(seen)) == plan.steps_per_epoch * plan.docs_per_step
