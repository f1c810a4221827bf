"""Length-aware, token-balanced batches and loading through datasets.load_dataset."""

import json
import random

import numpy as np
import pytest
from ds_helpers import single_rank_distributed
from launcher_helpers import make_corpus

from cached_ds.data import BatchPlan
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
    assert "has no split 'validation': no evaluation (name one with --eval_split)" in caplog.text
