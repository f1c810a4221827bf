"""Token ids of very long texts (books, transcripts) with host memory flat in their length.

One call of a fast tokenizer on a whole 4M-token document peaks at about 400 bytes per token
(its per-token ``Encoding`` objects, offsets, the attention mask, Python ints): 6 GB for a
16M-token book. Here a long text is tokenized in pieces cut before a single space between two
non-space characters, where every tokenizer this toolkit meets splits anyway (byte-level BPE's
pre-tokenizer attaches the space to the next word; SentencePiece's Metaspace turns it into the
next piece's ``▁``), and the ids are gathered as int32. The tokenizer's own special tokens (BOS,
EOS, mBART's language code) are added once, as its post-processor would, and truncation keeps
them, as HF's does. A text with no such space in a piece's reach (CJK, one giant token run) is
not cut there.

    ids = token_ids(tokenizer, text)                  # np.int32, == tokenizer(text)["input_ids"]
    ids = token_ids(tokenizer, text, max_length=4096)
"""

from __future__ import annotations

import numpy as np

PIECE_CHARS = 1 << 18  # ~100K tokens: a piece's own peak is ~40 MB


def token_ids(tokenizer, text: str, max_length: int | None = None, piece_chars: int = PIECE_CHARS) -> np.ndarray:
    """``tokenizer(text, truncation=max_length is not None, max_length=max_length)["input_ids"]``
    as int32, in pieces of about ``piece_chars`` characters when the text is longer than two."""
    if _long(text, piece_chars):
        prefix, suffix = special_tokens_around(tokenizer)
        # pieces give HF's ids unless it truncates from the left, or the special tokens alone fill
        # max_length (HF then leaves the text whole): HF's own call there
        if max_length is None or (getattr(tokenizer, "truncation_side", "right") == "right" and max_length > len(prefix) + len(suffix)):
            return _in_pieces(tokenizer, text, max_length, piece_chars, prefix, suffix)
    return np.asarray(tokenizer(text, truncation=max_length is not None, max_length=max_length)["input_ids"], dtype=np.int32)


def _long(text: str, piece_chars: int = PIECE_CHARS) -> bool:
    return len(text) > 2 * piece_chars


def _in_pieces(tokenizer, text: str, max_length: int | None, piece_chars: int, prefix: list[int], suffix: list[int]) -> np.ndarray:
    budget = None if max_length is None else max_length - len(prefix) - len(suffix)
    pieces, count = [], 0
    for piece in split_between_words(text, piece_chars):
        ids = np.asarray(tokenizer(piece, add_special_tokens=False)["input_ids"], dtype=np.int32)
        pieces.append(ids)
        count += len(ids)
        if budget is not None and count >= budget:
            break
    body = np.concatenate(pieces)[:budget]
    return np.concatenate([np.asarray(prefix, dtype=np.int32), body, np.asarray(suffix, dtype=np.int32)])


def token_ids_of_each(tokenizer, texts: list[str], max_length: int | None = None) -> list[np.ndarray]:
    """``token_ids`` of every text: the short ones in one batched call (the tokenizer's threads),
    the long ones in pieces."""
    out: list[np.ndarray | None] = [None] * len(texts)
    short = [i for i, text in enumerate(texts) if not _long(text)]
    if short:
        encoded = tokenizer([texts[i] for i in short], truncation=max_length is not None, max_length=max_length)["input_ids"]
        for i, ids in zip(short, encoded):
            out[i] = np.asarray(ids, dtype=np.int32)
    for i, text in enumerate(texts):
        if out[i] is None:
            out[i] = token_ids(tokenizer, text, max_length)
    return out


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's post-processor puts before and after a text's own."""
    probe = "a"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise ValueError(f"cannot tell this tokenizer's special tokens apart: {probe!r} is {bare} alone and {full} with them")


def split_between_words(text: str, piece_chars: int):
    """Pieces of ``text`` of about ``piece_chars`` characters, each after the first starting at a
    single space that sits between two non-space characters."""
    start = 0
    while len(text) - start > 2 * piece_chars:
        cut = _cut_before(text, start + piece_chars, start + 2 * piece_chars)
        if cut is None:  # nowhere safe in reach: this piece runs on to the next safe space
            cut = _cut_before(text, start + 2 * piece_chars, len(text))
            if cut is None:
                break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _cut_before(text: str, lo: int, hi: int) -> int | None:
    """The first index in [lo, hi) of a space between two non-space characters, or None."""
    position = text.find(" ", lo, hi)
    while position != -1:
        if 0 < position < len(text) - 1 and not text[position - 1].isspace() and not text[position + 1].isspace():
            return position
        position = text.find(" ", position + 1, hi)
    return None
