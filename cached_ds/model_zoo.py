"""Models for a run: a Hugging Face id or directory (``from_pretrained``), or a shipped config name
(``cached_ds/model_configs/<name>.json``: real architecture shapes, random init) for benchmarks
and the embedded default."""

from __future__ import annotations

import json
from pathlib import Path

import transformers as hf

from .families import require_encoder_decoder

CONFIG_DIR = Path(__file__).parent / "model_configs"


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def model_config(name: str, **overrides) -> hf.PretrainedConfig:
    values = {**json.loads((CONFIG_DIR / f"{name}.json").read_text()), **overrides}
    return hf.AutoConfig.for_model(**values)


def check_model_name(name_or_path: str) -> None:
    """Fail now, before a tokenizer or data is loaded, on a ``--model`` that can be none of a
    shipped config, a local directory or an HF id (``org/name``; the hub itself is asked later)."""
    if name_or_path in shipped_configs():
        return
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--model {name_or_path!r} is a file; pass the directory holding config.json (save_pretrained's folder)")
        return
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    if looks_local:
        raise ValueError(f"--model {name_or_path!r}: no such directory (a local model is a folder written by save_pretrained)")
    if "/" not in name_or_path:
        raise ValueError(f"--model {name_or_path!r} is neither a local directory nor a shipped config ({', '.join(shipped_configs())}) nor an HF id (org/name)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "*.model", "*.spm", "vocab.*", "merges.txt")


def load_tokenizer(name_or_path: str, fix: str = "pass --tokenizer ID_OR_DIR"):
    """``AutoTokenizer.from_pretrained``, refusing a local folder without tokenizer files: from a
    folder with only a config and weights, transformers 5 builds an empty tokenizer of the config's
    class (tens of tokens), and every document would become unknown tokens. ``fix``: what the
    caller's user can do instead."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir() and not any(any(folder.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise ValueError(f"{name_or_path} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); {fix}, or save the "
                         "tokenizer the model was trained with there (tokenizer.save_pretrained)")
    try:
        return hf.AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a tokenizer from {name_or_path!r} ({error}); {fix}") from None


def load_model(name_or_path: str, tokenizer=None, **config_overrides) -> hf.PreTrainedModel:
    """A seq2seq LM; random-init configs get the tokenizer's vocabulary size and special ids."""
    if name_or_path in shipped_configs():
        if tokenizer is not None:
            family = json.loads((CONFIG_DIR / f"{name_or_path}.json").read_text())["model_type"]
            config_overrides = {**_special_ids(tokenizer, family), "vocab_size": len(tokenizer), **config_overrides}
        model = hf.AutoModelForSeq2SeqLM.from_config(model_config(name_or_path, **config_overrides))
    else:
        check_model_name(name_or_path)
        config = hf.AutoConfig.from_pretrained(name_or_path)
        if not getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"--model {name_or_path!r} is a {config.model_type} model, not an encoder–decoder (config.is_encoder_decoder=False); use BART, mBART, PEGASUS, T5 or LongT5")
        model = hf.AutoModelForSeq2SeqLM.from_pretrained(name_or_path, **config_overrides)
    require_encoder_decoder(model)
    return model


def _special_ids(tokenizer, family: str) -> dict:
    """The tokenizer's ids in the model config. T5-style models start decoding from pad,
    BART-style ones from eos (and force eos last)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids = {"pad_token_id": pad, "eos_token_id": eos, "bos_token_id": tokenizer.bos_token_id}
    if family in ("t5", "longt5", "mt5", "umt5"):
        ids["decoder_start_token_id"] = pad
    else:
        ids.update(decoder_start_token_id=eos, forced_eos_token_id=eos)
    return {k: v for k, v in ids.items() if v is not None}
