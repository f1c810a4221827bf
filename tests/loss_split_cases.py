"""Four documents of unequal lengths and unequal summary lengths, split into batches in different
ways for the loss-normalisation tests (1 rank in-process, 2 ranks in distributed_cases.py)."""

from tiny_models import random_batch

WINDOW = 16
LENGTHS, SUMMARIES = [40, 17, 63, 29], [3, 9, 5, 12]


def documents(pad: int):
    """(ids, labels) per document, unpadded."""
    return [random_batch([n], [m], pad, seed=70 + i)[0::2] for i, (n, m) in enumerate(zip(LENGTHS, SUMMARIES))]


def batch_of(docs, pad: int):
    from cached_ds.data import collate

    return collate([{"input_ids": ids[0].tolist(), "labels": labels[0].tolist()} for ids, labels in docs], pad)
