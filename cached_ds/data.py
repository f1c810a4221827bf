"""Documents for training and evaluation: loading, checks, tokenisation, length-aware batching.

Sources are never truncated unless ``--max_source_tokens`` asks for it (ablations). Every rank
gets about the same number of tokens per step, deterministically under the seed, so a resumed run
sees the same batches in the same order.
"""

from __future__ import annotations

import csv
import inspect
import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from .distributed import rank
from .long_text import token_ids_of_each
from .run_config import DataArgs

logger = logging.getLogger("cached_ds")

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
DOCUMENTS_AT_ONCE = 16  # rows datasets reads, filters and tokenizes at a time (its default, 1000-10000, holds them all)


def check_utf8(path: str | Path) -> None:
    """datasets' own error for a bad byte names neither file nor line, and for an empty file is a
    bare StopIteration; these name the file (read line by line: a corpus may not fit in memory)."""
    blank = True
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}: line {number} is not valid UTF-8 (byte {line[error.start]:#04x} at column {error.start + 1}); re-encode the file as UTF-8") from None
            blank = blank and not line.strip()
    if blank:
        raise ValueError(f"{path} is empty: no documents")


ROW = "_cached_ds_row"  # each document's row in its file or split, carried to the predictions (a name no data uses)
# list-valued features (datasets 4 added List; 3.x has Sequence and LargeList)
_LISTS = tuple(getattr(datasets, name) for name in ("List", "LargeList", "Sequence") if inspect.isclass(getattr(datasets, name, None)))


def load_split(args: DataArgs, split: str) -> datasets.Dataset | None:
    """The ``train`` or ``eval`` documents from ``--dataset`` or ``--train_file/--eval_file``."""
    if args.dataset:
        return _load_dataset_split(args, split)
    path = args.train_file if split == "train" else args.eval_file
    if path is None:
        return None
    suffix = Path(path).suffix.lower()
    if suffix not in FILE_BUILDERS:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {sorted(FILE_BUILDERS)}")
    if not Path(path).is_file():
        raise ValueError(f"{path} does not exist")
    if suffix != ".parquet":
        check_utf8(path)
    # csv: pandas would read a summary "NA" or "None" as missing (and skip its document as empty),
    # and guesses each chunk's column types on its own (a column of ids "1", "2", ... "doc-31" then
    # fails in its second chunk): every column is read as the text it is
    options = {"keep_default_na": False, "chunksize": DOCUMENTS_AT_ONCE, **_csv_as_text(path)} if suffix == ".csv" else {}
    return datasets.load_dataset(FILE_BUILDERS[suffix], data_files=str(path), split="train", **options)


def _csv_as_text(path) -> dict:
    """datasets' ``features`` reading every column of the csv at ``path`` as text, or none where
    its header has names pandas would rename (empty or repeated)."""
    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first name; pandas drops it
    with open(path, newline="", encoding="utf-8-sig") as handle:
        header = next(csv.reader(handle), [])
    if not header or "" in header or len(set(header)) < len(header):
        return {}
    return {"features": datasets.Features({name: datasets.Value("string") for name in header})}


def _load_dataset_split(args: DataArgs, split: str) -> datasets.Dataset | None:
    """``--dataset``: a hub id or a local folder of data files (``datasets.load_dataset``), or a
    folder written by ``save_to_disk`` (``datasets.load_from_disk``: load_dataset refuses those)."""
    name = args.train_split if split == "train" else args.eval_split
    flag = "--train_split" if split == "train" else "--eval_split"
    folder = Path(args.dataset)
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        saved = datasets.load_from_disk(str(folder))
        if isinstance(saved, datasets.Dataset):  # one saved split: the training documents
            if split == "train":
                return saved
            if rank() == 0:
                logger.warning("%s holds one split (saved as a Dataset), used for training: no evaluation", args.dataset)
            return None
        available = list(saved)
        if name in saved:
            return saved[name]
    else:
        try:
            return datasets.load_dataset(args.dataset, args.dataset_config, split=name)
        except ValueError as error:
            if "split" not in str(error).lower():
                raise
            available = _split_names(args)
    if split == "eval":
        if rank() == 0:
            logger.warning("%s has no split %r: no evaluation (name one with %s; it has %s)", args.dataset, name, flag, available)
        return None
    raise ValueError(f"--dataset {args.dataset} has no split {name!r}; it has {available}: name one with {flag}")


def _split_names(args: DataArgs) -> list[str] | str:
    try:
        return datasets.get_dataset_split_names(args.dataset, args.dataset_config)
    except Exception:  # only for the message
        return "no split this check could list"


def _text_columns(args: DataArgs) -> tuple[tuple[str, str], ...]:
    """(flag, column) of the document and of its summary."""
    return ("--text_column", args.text_column), ("--summary_column", args.summary_column)


def check_columns(dataset: datasets.Dataset, args: DataArgs, where: str) -> datasets.Dataset:
    """The text and summary columns exist and hold text; all-number columns (a csv of years,
    JSON numbers) are read as their text."""
    for flag, column in _text_columns(args):
        if column not in dataset.column_names:
            raise ValueError(f"{flag} {column!r} is not a column of the {where} data; available columns: {dataset.column_names}")
        feature = dataset.features[column]
        if isinstance(feature, datasets.Value) and feature.dtype not in ("string", "large_string"):
            if feature.dtype.startswith(("int", "uint", "float")):
                dataset = dataset.cast_column(column, datasets.Value("string"))
                continue
            raise ValueError(f"{flag} {column!r} of the {where} data holds {feature.dtype} values, not text")
        if isinstance(feature, _LISTS):
            raise ValueError(f"{flag} {column!r} of the {where} data holds lists (e.g. of sentences), not text; join each "
                             "into one string first")
    return dataset


def drop_empty(dataset: datasets.Dataset, args: DataArgs) -> tuple[datasets.Dataset, int]:
    """Documents or summaries that are empty (or only whitespace) are skipped and counted. Each
    kept one keeps its row number (``ROW``), so predictions can be joined back to the file."""
    def keep(text, summary, index):
        for (flag, column), value in zip(_text_columns(args), (text, summary)):
            if value is not None and not isinstance(value, str):  # mixed JSON types reach here as objects
                raise ValueError(f"row {index} of {flag} {column!r} holds {type(value).__name__} {str(value)[:40]!r}, not text")
        return bool((text or "").strip()) and bool((summary or "").strip())

    dataset = dataset.add_column(ROW, list(range(len(dataset))))
    kept = dataset.filter(keep, input_columns=[args.text_column, args.summary_column], with_indices=True,
                          batch_size=DOCUMENTS_AT_ONCE, writer_batch_size=DOCUMENTS_AT_ONCE, num_proc=_workers(args, dataset))
    return kept, len(dataset) - len(kept)


# datasets.map and .filter write into tempfile.NamedTemporaryFile's "tmp" + 8 characters beside the
# dataset's cache files and rename it when done (arrow_dataset.py): a job killed midway (preempted,
# out of time) leaves it behind, as large as the work it had done.
PARTIAL_FILE = re.compile(r"tmp[a-z0-9_]{8}")
STALE_AFTER_S = 3600  # a live map writes every DOCUMENTS_AT_ONCE documents; another job's may be running


def remove_stale_partial_files(dataset: datasets.Dataset, stale_after_s: float = STALE_AFTER_S) -> int:
    """Deletes the partial files killed maps left in the dataset's cache folders under datasets'
    cache (not a ``save_to_disk`` folder of the user's), those nothing has written for
    ``stale_after_s`` (another job on the same data may be tokenizing now); a file it may not
    delete (a shared, read-only cache) stays. Returns the bytes freed (rank 0 logs them)."""
    freed, now = 0, time.time()
    cache = Path(datasets.config.HF_DATASETS_CACHE).resolve()
    for folder in {Path(f["filename"]).parent.resolve() for f in dataset.cache_files}:
        if not folder.is_relative_to(cache):
            continue
        for path in folder.iterdir():
            try:
                stat = path.stat()
                if PARTIAL_FILE.fullmatch(path.name) and path.is_file() and now - stat.st_mtime > stale_after_s:
                    path.unlink()
                    freed += stat.st_size
            except OSError:  # removed by another rank or job first, or not ours to remove
                continue
    if freed and rank() == 0:
        logger.info("removed %.1f MB of partial files that killed runs left in the datasets cache", freed / 1e6)
    return freed


def tokenize(dataset: datasets.Dataset, tokenizer, args: DataArgs) -> datasets.Dataset:
    """``input_ids``, ``labels``, ``num_tokens``, ``num_label_tokens`` and the summary's own text
    (``reference``, what ROUGE is scored against: decoding ``labels`` would score against the
    tokenizer's round trip, without what it maps to unknown or truncates) per document, computed
    once by ``datasets.map`` (cached on disk by the dataset's fingerprint). Returned in numpy
    format: rows are read from the Arrow file when used, as arrays. Held as Python lists every
    rank would keep about 36 bytes per token in memory: 180 GB for 5G tokens of long documents."""
    prefix = args.source_prefix or ""

    def encode(batch):
        sources = token_ids_of_each(tokenizer, [prefix + text for text in batch[args.text_column]], args.max_source_tokens)
        targets = tokenizer(text_target=batch[args.summary_column], truncation=args.max_target_tokens is not None, max_length=args.max_target_tokens)
        return {"input_ids": sources, "labels": [np.asarray(ids, dtype=np.int32) for ids in targets["input_ids"]],
                "num_tokens": [len(ids) for ids in sources],
                "num_label_tokens": [len(ids) for ids in targets["input_ids"]],
                "reference": [text.strip() for text in batch[args.summary_column]],
                **({ROW: batch[ROW]} if ROW in batch else {})}

    # A few documents per batch, written out per batch: datasets' default holds 1000 whole
    # documents in memory at once (hundreds of GB for 1000 books of millions of tokens).
    # With workers, each one's contiguous share is its own cache file, reused by a rerun.
    encoded = dataset.map(encode, batched=True, batch_size=DOCUMENTS_AT_ONCE, writer_batch_size=DOCUMENTS_AT_ONCE,
                          remove_columns=dataset.column_names, desc="tokenizing", num_proc=_workers(args, dataset))
    return encoded.with_format("numpy")


def _workers(args: DataArgs, dataset: datasets.Dataset) -> int | None:
    """``--preprocessing_num_workers``, at most one per document (datasets refuses more)."""
    workers = args.preprocessing_num_workers
    return min(workers, len(dataset)) if workers and workers > 1 and len(dataset) > 1 else None


def check_ends_with_eos(dataset: datasets.Dataset, tokenizer, sample: int = 64) -> None:
    """A summary must end with the end-of-sequence token, or the model never learns to stop and
    every generated summary runs to ``--max_new_tokens``. HF's seq2seq tokenizers append it; a
    hand-built tokenizer without a post-processor does not. Warns (rank 0) naming the fix."""
    eos = tokenizer.eos_token_id
    rows = dataset.select(range(min(sample, len(dataset))))["labels"]
    # last, or before a language code (mBART's labels end [..., eos, lang])
    missing = sum(1 for labels in rows if eos is None or eos not in [int(i) for i in labels[-2:]])
    if missing:
        logger.warning("%d of the first %d tokenized summaries do not end with the tokenizer's end-of-sequence token (%s): "
                       "the model will not learn to stop; use a tokenizer that appends it (its post-processor: HF's "
                       "BART/T5/PEGASUS tokenizers do)", missing, len(rows), tokenizer.eos_token)


def check_known_tokens(dataset: datasets.Dataset, tokenizer, sample: int = 8, share: float = 0.05) -> None:
    """Warns (rank 0) when the first documents are more than ``share`` unknown tokens: a tokenizer
    that does not cover their script (an English T5 vocabulary on Chinese) trains on ``<unk>``."""
    unknown = tokenizer.unk_token_id
    if unknown is None or not len(dataset):
        return
    ids = np.concatenate([row[:10_000] for row in dataset.select(range(min(sample, len(dataset))))["input_ids"]])
    unknown_share = (ids == unknown).mean() if len(ids) else 0.0
    if unknown_share > share:
        logger.warning("%.0f%% of the first documents' tokens are the tokenizer's unknown token %s: it does not cover their "
                       "language or script, and the model would learn from %s; use a tokenizer that does (--tokenizer, "
                       "or a multilingual model)", 100 * unknown_share, tokenizer.unk_token, tokenizer.unk_token)


def lengths(dataset: datasets.Dataset, column: str = "num_tokens") -> list[int]:
    """A tokenized dataset's per-document counts (``num_tokens``, ``num_label_tokens``), read
    from that column alone."""
    return dataset[column][:].tolist()


class ColumnOf(Sequence):
    """``dataset[i][column]`` for the rows ``indices``, each read when indexed: evaluation holds
    one document at a time, not all of a rank's (16 bytes per token as int64 rows)."""

    def __init__(self, dataset: datasets.Dataset, indices: list[int], column: str):
        self.dataset, self.indices, self.column = dataset, indices, column

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return [self.dataset[i][self.column] for i in self.indices[item]]
        return self.dataset[self.indices[item]][self.column]


def collate(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` and -100-padded ``labels``."""
    longest, longest_label = max(len(r["input_ids"]) for r in rows), max(len(r["labels"]) for r in rows)
    ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), longest_label), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row["input_ids"])] = torch.as_tensor(row["input_ids"])
        labels[i, : len(row["labels"])] = torch.as_tensor(row["labels"])
    mask = (torch.arange(longest)[None, :] < torch.tensor([len(r["input_ids"]) for r in rows])[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass(frozen=True)
class BatchPlan:
    """Which documents each rank reads at each optimizer step of an epoch."""

    lengths: list[int]
    world_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    seed: int

    @property
    def docs_per_step(self) -> int:
        return self.world_size * self.micro_batch_size * self.gradient_accumulation_steps

    @property
    def steps_per_epoch(self) -> int:
        return len(self.lengths) // self.docs_per_step

    def check(self) -> None:
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.lengths)} training documents are fewer than one optimizer step needs "
                f"(world {self.world_size} × micro-batch {self.micro_batch_size} × accumulation {self.gradient_accumulation_steps}); "
                "add documents or lower --micro_batch_size/--gradient_accumulation_steps"
            )

    def epoch(self, epoch: int, rank: int) -> list[list[list[int]]]:
        """For each step: this rank's micro-batches (lists of document indices).

        Documents are shuffled, sorted by length within windows of 16 steps (similar lengths share
        a micro-batch: little padding), and each step's micro-batches are dealt to ranks longest
        first, each to the rank with the fewest tokens so far (balanced ranks)."""
        rng = random.Random(self.seed * 100_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        order = order[: self.steps_per_epoch * self.docs_per_step]
        span = 16 * self.docs_per_step
        order = [i for start in range(0, len(order), span) for i in sorted(order[start : start + span], key=self.lengths.__getitem__)]
        steps = [order[s : s + self.docs_per_step] for s in range(0, len(order), self.docs_per_step)]
        rng.shuffle(steps)
        return [self._deal(step)[rank] for step in steps]

    def _deal(self, docs: list[int]) -> list[list[list[int]]]:
        micro = [docs[i : i + self.micro_batch_size] for i in range(0, len(docs), self.micro_batch_size)]
        micro.sort(key=lambda batch: -sum(self.lengths[i] for i in batch))
        ranks: list[list[list[int]]] = [[] for _ in range(self.world_size)]
        tokens = [0] * self.world_size
        for batch in micro:
            open_ranks = [r for r in range(self.world_size) if len(ranks[r]) < self.gradient_accumulation_steps]
            r = min(open_ranks, key=lambda k: (tokens[k], k))
            ranks[r].append(batch)
            tokens[r] += sum(self.lengths[i] for i in batch)
        return ranks
