"""Summarise whole documents and score them with ROUGE (rouge-score, F-measure × 100)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import regex  # Unicode properties (\p{L}, \p{M}); a dependency of transformers
import torch
from nltk.stem import porter  # rouge-score's own stemmer (nltk is its dependency)
from rouge_score import rouge_scorer
from rouge_score.tokenizers import Tokenizer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*")  # CJK full stops need no space after
# Chinese and Japanese are written without spaces: each Han or kana letter is a token
# (character-level ROUGE, as for LCSTS). Every other script's words are runs of letters, their
# combining marks (Devanagari and Arabic vowel signs) and digits; scripts written without spaces
# and not split here (Thai, Lao, Khmer) give one token per run.
_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}"
_TOKEN = regex.compile(rf"(?:(?![{_CJK}])[\p{{L}}\p{{M}}\p{{N}}])+|(?=[\p{{L}}\p{{N}}])[{_CJK}]")
_ASCII_WORD = regex.compile(r"[a-z0-9]+")
# Symbols and "other" numbers (™, ², ½, ①) separate words, as rouge-score's [^a-z0-9] does: NFKC
# would glue them on as letters and digits ("Microsoft™" -> "microsofttm", "km²" -> "km2").
_SEPARATOR = regex.compile(r"[\p{S}\p{No}]")


class UnicodeTokenizer(Tokenizer):
    """rouge-score's default tokenizer deletes every character outside [a-z0-9]: identical
    Chinese, Russian or Arabic texts score 0 and "Müller"/"Möller" match. This one keeps letters
    and marks of every script (NFKC-normalised, lower-cased; symbols separate words, as there)
    and gives the default's tokens on ASCII text and on text whose other characters are symbols,
    stemming as it does (Porter, English words over 3 characters) and no other word. Where they
    differ by design: non-ASCII letters (ligatures, accents) stay in their word."""

    def __init__(self, use_stemmer: bool = True):
        self._stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        tokens = _TOKEN.findall(unicodedata.normalize("NFKC", _SEPARATOR.sub(" ", text)).lower())
        if self._stemmer is None:
            return tokens
        return [self._stemmer.stem(t) if len(t) > 3 and _ASCII_WORD.fullmatch(t) else t for t in tokens]


def sentences_per_line(text: str) -> str:
    """rougeLsum scores summary-level LCS over newline-separated sentences; split on sentence-final
    punctuation instead of NLTK's punkt, which would need a data download."""
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references (got {len(predictions)} and {len(references)}), at least one")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=UnicodeTokenizer())
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(sentences_per_line(reference), sentences_per_line(prediction))
        for kind in ROUGE_TYPES:
            totals[kind] += scores[kind].fmeasure
    return {kind: 100.0 * total / len(predictions) for kind, total in totals.items()}


# The generation settings the launchers have flags for. A flag given wins; else the model's
# generation_config where it sets one (a fine-tuned summariser's length_penalty, min_length,
# num_beams: left to HF's generate, which applies them); else the launcher's default.
GENERATION_FLAGS = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty")
_MODEL_FIELDS = {"max_new_tokens": ("max_new_tokens", "max_length"), "min_new_tokens": ("min_new_tokens", "min_length")}


def check_generation_flags(given: dict) -> None:
    """The launchers' generation flags (unset ones are ``None``): beams and the longest summary at
    least 1, the shortest at least 0 and, where both are given, not past the longest."""
    for name, least in (("num_beams", 1), ("max_new_tokens", 1), ("min_new_tokens", 0)):
        if given.get(name) is not None and given[name] < least:
            raise ValueError(f"--{name} must be at least {least}, got {given[name]}")
    shortest, longest = given.get("min_new_tokens"), given.get("max_new_tokens")
    if None not in (shortest, longest) and shortest > longest:
        raise ValueError(f"--min_new_tokens {shortest} is more than --max_new_tokens {longest}")


def generation_settings(model, given: dict, defaults: dict) -> tuple[dict, list[tuple[int, str]]]:
    """(keywords for ``generate``, notes for the caller to log: (logging level, message)). The
    lengths are capped where a learned decoder's positions end (``families.max_new_tokens``)."""
    import logging

    from transformers import GenerationConfig

    from . import families

    config, plain = model.generation_config, GenerationConfig()
    kwargs, from_model = {}, {}
    for name in GENERATION_FLAGS:
        if given.get(name) is not None:
            kwargs[name] = given[name]
            continue
        own = {field: getattr(config, field, None) for field in _MODEL_FIELDS.get(name, (name,))}
        own = {field: value for field, value in own.items() if value is not None and value != getattr(plain, field, None)}
        if own:
            from_model.update(own)
        else:
            kwargs[name] = defaults[name]
    notes = []
    if "max_new_tokens" in kwargs:
        asked, said = kwargs["max_new_tokens"], f"--max_new_tokens {kwargs['max_new_tokens']}"
    else:  # the model's own: max_new_tokens, or max_length, which counts the start token
        asked = from_model.get("max_new_tokens") or from_model["max_length"] - 1
        said = "the model's generation_config (" + ", ".join(f"{k}={from_model[k]}" for k in ("max_new_tokens", "max_length") if k in from_model) + ")"
    capped = families.max_new_tokens(model, asked)
    if capped < asked:
        kwargs["max_new_tokens"] = capped
        notes.append((logging.WARNING, f"{said} reaches past this {model.config.model_type} decoder's "
                                       f"{families.decoder_positions(model)} positions: generating at most {capped}"))
    if "min_new_tokens" in kwargs and "max_new_tokens" in kwargs:
        kwargs["min_new_tokens"] = min(kwargs["min_new_tokens"], kwargs["max_new_tokens"])
    if from_model:
        notes.append((logging.INFO, "generating with the model's generation_config for "
                                    + ", ".join(f"{k}={v}" for k, v in from_model.items()) + " (a flag overrides each)"))
    return kwargs, notes


def shard(rank: int, world: int, count: int) -> tuple[list[int], list[int]]:
    """Which of ``count`` held-out documents rank ``rank`` of ``world`` summarises: its own
    (``rank``, ``rank + world``, ...), and the generate calls it makes, those first, then others'
    repeated up to ceil(count / world) calls: under ZeRO-3 every rank must make as many (their
    parameter gathers are collectives), a rank with no document of its own (fewer documents than
    ranks) too."""
    own = list(range(rank, count, world))
    calls = [i % count for i in range(rank, -(-count // world) * world, world)]
    return own, calls


@torch.no_grad()
def summarize(wrapped, tokenizer, documents: Sequence, batch_size: int = 1, progress=None, **generate_kwargs) -> list[str]:
    """Summaries of token-id documents of any length (CachED windows, HF ``generate``), read from
    ``documents`` one batch at a time."""
    was_training = wrapped.training
    wrapped.eval()
    pad = tokenizer.pad_token_id
    outputs = []
    for start in range(0, len(documents), batch_size):
        batch = documents[start : start + batch_size]
        longest = max(len(d) for d in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        for row, doc in enumerate(batch):
            ids[row, : len(doc)] = torch.as_tensor(doc)
        mask = (torch.arange(longest)[None, :] < torch.tensor([len(d) for d in batch])[:, None]).long()
        generated = wrapped.generate(ids, mask, **generate_kwargs)  # the document stays in host memory (``windows``)
        outputs += tokenizer.batch_decode(generated, skip_special_tokens=True)
        if progress is not None:
            progress.update(len(batch))
    wrapped.train(was_training)
    return [text.strip() for text in outputs]
