"""Documents for training and evaluation: loading, checks, tokenisation, length-aware batching.

Sources are never truncated unless ``--max_source_tokens`` asks for it (ablations). Every rank
gets about the same number of tokens per step, deterministically under the seed, so a resumed run
sees the same batches in the same order.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from .run_config import DataArgs

logger = logging.getLogger("cached_ds")

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def check_utf8(path: str | Path) -> None:
    """datasets' own error for a bad byte names neither file nor line; this one does."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}: line {number} is not valid UTF-8 (byte {line[error.start]:#04x} at column {error.start + 1}); re-encode the file as UTF-8") from None


def load_split(args: DataArgs, split: str) -> datasets.Dataset | None:
    """The ``train`` or ``eval`` documents from ``--dataset`` or ``--train_file/--eval_file``."""
    if args.dataset:
        name = args.train_split if split == "train" else args.eval_split
        try:
            return datasets.load_dataset(args.dataset, args.dataset_config, split=name)
        except ValueError as error:
            if split == "eval" and "split" in str(error).lower():
                logger.warning("%s has no split %r: no evaluation (name one with --eval_split)", args.dataset, name)
                return None
            raise
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
    return datasets.load_dataset(FILE_BUILDERS[suffix], data_files=str(path), split="train")


def check_columns(dataset: datasets.Dataset, args: DataArgs, where: str) -> None:
    for flag, column in (("--text_column", args.text_column), ("--summary_column", args.summary_column)):
        if column not in dataset.column_names:
            raise ValueError(f"{flag} {column!r} is not a column of the {where} data; available columns: {dataset.column_names}")


def drop_empty(dataset: datasets.Dataset, args: DataArgs) -> tuple[datasets.Dataset, int]:
    """Documents or summaries that are empty (or only whitespace) are skipped and counted."""
    def keep(row):
        return bool((row[args.text_column] or "").strip()) and bool((row[args.summary_column] or "").strip())

    kept = dataset.filter(keep)
    return kept, len(dataset) - len(kept)


def tokenize(dataset: datasets.Dataset, tokenizer, args: DataArgs) -> datasets.Dataset:
    """``input_ids``, ``labels``, ``num_tokens``, ``num_label_tokens`` and the summary's own text
    (``reference``, what ROUGE is scored against: decoding ``labels`` would score against the
    tokenizer's round trip, without what it maps to unknown or truncates) per document, computed
    once by ``datasets.map`` (cached on disk by the dataset's fingerprint). Returned in numpy
    format: rows are read from the Arrow file when used, as arrays. Held as Python lists every
    rank would keep about 36 bytes per token in memory: 180 GB for 5G tokens of long documents."""
    def encode(batch):
        sources = tokenizer(batch[args.text_column], truncation=args.max_source_tokens is not None, max_length=args.max_source_tokens)
        targets = tokenizer(text_target=batch[args.summary_column], truncation=args.max_target_tokens is not None, max_length=args.max_target_tokens)
        return {"input_ids": sources["input_ids"], "labels": targets["input_ids"],
                "num_tokens": [len(ids) for ids in sources["input_ids"]],
                "num_label_tokens": [len(ids) for ids in targets["input_ids"]],
                "reference": [text.strip() for text in batch[args.summary_column]]}

    encoded = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenizing")
    return encoded.with_format("numpy")


def lengths(dataset: datasets.Dataset, column: str = "num_tokens") -> list[int]:
    """A tokenized dataset's per-document counts (``num_tokens``, ``num_label_tokens``), read
    from that column alone."""
    return dataset[column][:].tolist()


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
