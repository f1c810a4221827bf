"""Language codes of multilingual models (mBART, mBART-50, M2M100, NLLB), set as HF's
``run_summarization.py`` sets them.

    deepspeed launchers/train.py --deepspeed ds_configs/zero3.json --model facebook/mbart-large-50 \\
        --train_file de.jsonl --lang de_DE --forced_bos_token de_DE

A multilingual tokenizer tags every source and summary with a language code (mBART-50, NLLB: in
front; mBART-cc25: after the end token), its ``src_lang``/``tgt_lang``, which default to English
on a tokenizer saved without them. ``--lang`` sets both. mBART's decoder starts from the
summary's last token in training (its ``shift_tokens_right``): for mBART-cc25 that is the
language code, so generation must start there too (``decoder_start_token_id``, which its hub
config lacks). mBART-50, M2M100 and NLLB are made to begin every summary with the target code by
``forced_bos_token_id`` (``--forced_bos_token``). Both go into the model's generation config,
which the exported model keeps.
"""

from __future__ import annotations

import transformers as hf

MULTILINGUAL = ("MBartTokenizer", "MBart50Tokenizer", "M2M100Tokenizer", "NllbTokenizer")


def multilingual(tokenizer) -> bool:
    return type(tokenizer).__name__.removesuffix("Fast") in MULTILINGUAL


def set_language(tokenizer, lang: str | None) -> str | None:
    """``--lang``: the tokenizer's ``src_lang`` and ``tgt_lang``. Returns a warning to log when
    a multilingual tokenizer is left on the languages it was saved with (English by default)."""
    name = type(tokenizer).__name__
    if lang is None:
        if not multilingual(tokenizer):
            return None
        source = getattr(tokenizer, "src_lang", None)
        target = getattr(tokenizer, "tgt_lang", None) or source  # HF tags summaries with src_lang where tgt_lang is unset
        return (f"the {name} tokenizer tags documents as {source} and summaries as {target} (the languages it was saved "
                "with); pass --lang CODE (e.g. de_DE, deu_Latn) if yours are others")
    if not multilingual(tokenizer):
        raise ValueError(f"--lang is for multilingual tokenizers ({', '.join(MULTILINGUAL)}); {name} has no language codes: "
                         "remove --lang")
    _token_id(tokenizer, lang, "--lang")
    tokenizer.src_lang = lang
    tokenizer.tgt_lang = lang
    return None


def set_generation_start(model: hf.PreTrainedModel, tokenizer, forced_bos_token: str | None) -> None:
    """mBART-cc25's decoder start (where its config has none) and ``--forced_bos_token``, into
    ``model.generation_config``."""
    generation = model.generation_config
    cc25 = type(tokenizer).__name__.removesuffix("Fast") == "MBartTokenizer"
    if cc25 and generation.decoder_start_token_id is None and model.config.decoder_start_token_id is None:
        # the token training starts the decoder from: the last of a tokenized summary, its language code
        generation.decoder_start_token_id = tokenizer(text_target="x")["input_ids"][-1]
    if forced_bos_token is not None:
        generation.forced_bos_token_id = _token_id(tokenizer, forced_bos_token, "--forced_bos_token")


def _token_id(tokenizer, code: str, flag: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(code)
    if token_id is None or token_id == tokenizer.unk_token_id:
        known = list(getattr(tokenizer, "lang_code_to_id", None) or []) or [
            token for token in getattr(tokenizer, "extra_special_tokens", None) or [] if isinstance(token, str) and "_" in token]
        examples = f" (it has e.g. {', '.join(known[:4])})" if known else ""
        raise ValueError(f"{flag} {code!r} is not a token of the {type(tokenizer).__name__} tokenizer{examples}; "
                         "give one of its language codes")
    return token_id
