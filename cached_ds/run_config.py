"""Typed settings of a training run and the command line that fills them.

Each component owns a small dataclass with validation (model, data, cached, optimisation, eval,
logging, checkpointing); ``parse_args`` builds them from flags whose ``--help`` text is the
field's documentation.

    python launchers/train.py --help
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_type_hints

PRESETS = ("default", "smoke")


@dataclass
class ModelArgs:
    model: str | None = field(default=None, metadata={"help": "HF model id or local directory (from_pretrained), or a shipped config name for random init (tiny-bart, bart-large, long-t5-tglobal-large, ...); required with --train_file/--dataset; with neither (and no --model) the embedded default job trains its own tiny BART"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer id or directory; default: the model's"})
    lang: str | None = field(default=None, metadata={"help": "language code of the documents and summaries for a multilingual tokenizer (mBART, mBART-50, M2M100, NLLB; e.g. de_DE, deu_Latn): its src_lang and tgt_lang, and mBART-cc25's decoder start (default: the languages the tokenizer was saved with)"})
    forced_bos_token: str | None = field(default=None, metadata={"help": "token every generated summary starts with (mBART-50, M2M100, NLLB: the summaries' language code, e.g. de_DE), kept in the exported model's generation config"})


@dataclass
class DataArgs:
    dataset: str | None = field(default=None, metadata={"help": "datasets.load_dataset name (e.g. ccdv/govreport-summarization)"})
    dataset_config: str | None = field(default=None, metadata={"help": "dataset configuration name"})
    train_file: str | None = field(default=None, metadata={"help": "training documents: .jsonl, .json, .parquet or .csv"})
    eval_file: str | None = field(default=None, metadata={"help": "held-out documents, same formats"})
    train_split: str = field(default="train", metadata={"help": "split of --dataset to train on"})
    eval_split: str = field(default="validation", metadata={"help": "split of --dataset to evaluate on"})
    text_column: str = field(default="document", metadata={"help": "column holding the source documents"})
    summary_column: str = field(default="summary", metadata={"help": "column holding the reference summaries"})
    max_source_tokens: int | None = field(default=None, metadata={"help": "truncate sources to this many tokens (ablations only; default: whole documents)"})
    max_target_tokens: int | None = field(default=None, metadata={"help": "truncate summaries to this many tokens (default: none)"})
    max_eval_documents: int | None = field(default=None, metadata={"help": "evaluate on at most this many documents (default: all)"})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "processes that read and tokenize the documents (datasets' num_proc; default: one). Each one's share is cached when done, so a run stopped during tokenization redoes only the unfinished shares"})
    source_prefix: str | None = field(default=None, metadata={"help": "text put before every document, as HF's run_summarization.py (T5: 'summarize: '); kept in the exported model's config (prefix), which summarize.py applies"})

    def validate(self) -> None:
        if self.dataset and (self.train_file or self.eval_file):
            raise ValueError("give either --dataset or --train_file/--eval_file, not both")
        if self.eval_file and not self.train_file:
            raise ValueError("--eval_file needs --train_file")
        for name in ("max_source_tokens", "max_target_tokens", "max_eval_documents", "preprocessing_num_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value}")


@dataclass
class CachedArgs:
    window: int | None = field(default=None, metadata={"help": "tokens per encoder window (default: the config's \"cached\" section, else the model's learned positions (BART: 1024), or 4096 for LongT5 and 512 for T5; the embedded default job fixes it at 128)"})
    group_tokens: int | None = field(default=None, metadata={"help": "tokens per re-encoded window group (default: the config's \"cached\" section, else 16384)"})


@dataclass
class OptimArgs:
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate (fills \"auto\" in the DeepSpeed optimizer/scheduler)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=0, metadata={"help": "learning-rate warm-up steps, linear from 0 (0: the peak from the first step)"})
    lr_decay: bool = field(default=True, metadata={"help": "after warm-up, decay the rate linearly to 0 at the last step; false: keep it constant. Both replace the config's WarmupLR/WarmupDecayLR (HF's schedules: DeepSpeed's lose the first two steps); a WarmupCosineLR section runs HF's cosine to its cos_min_ratio instead"})
    micro_batch_size: int = field(default=1, metadata={"help": "documents per rank per micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps to train (default: --epochs worth)"})
    epochs: int = field(default=1, metadata={"help": "passes over the training documents when --max_steps is not set"})
    seed: int = field(default=42, metadata={"help": "seed of model init, data order and dropout"})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 training (default: on where the GPU computes it natively, Ampere or newer, unless --fp16)"})
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision with DeepSpeed's dynamic loss scaling, for GPUs "
                                                        "without bf16 (V100, T4); fills \"fp16.enabled\": \"auto\""})

    def validate(self) -> None:
        for name in ("micro_batch_size", "gradient_accumulation_steps", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max_steps must be at least 1, got {self.max_steps}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")


@dataclass
class EvalArgs:
    eval_steps: int | None = field(default=None, metadata={"help": "evaluate every N steps (default: at the end only)"})
    num_beams: int | None = field(default=None, metadata={"help": "beam width for summarisation (default: the model's generation_config, else 1)"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "longest generated summary (default: the model's generation_config, else 128)"})
    min_new_tokens: int | None = field(default=None, metadata={"help": "shortest generated summary (default: the model's generation_config, else 0)"})
    length_penalty: float | None = field(default=None, metadata={"help": "beam-search length penalty (default: the model's generation_config, else 1.0)"})

    def validate(self) -> None:
        from .evaluation import GENERATION_FLAGS, check_generation_flags

        check_generation_flags({name: getattr(self, name) for name in GENERATION_FLAGS})  # as summarize.py's
        _at_least(self, 0, "eval_steps", optional=True)  # 0: at the end only, as unset


# The evaluation's generation where neither a flag nor the model's generation_config sets one
EVAL_DEFAULTS = {"num_beams": 1, "max_new_tokens": 128, "min_new_tokens": 0, "length_penalty": 1.0}


@dataclass
class LoggingArgs:
    logging_steps: int = field(default=1, metadata={"help": "write metrics every N steps"})
    tensorboard: bool = field(default=True, metadata={"help": "DeepSpeed tensorboard monitor under <output_dir>/tensorboard"})
    csv: bool = field(default=True, metadata={"help": "DeepSpeed csv_monitor under <output_dir>/csv"})

    def validate(self) -> None:
        _at_least(self, 1, "logging_steps")


def _resume_mode(text: str) -> bool | str:
    """``--resume`` values: a boolean, or ``auto``."""
    if text.lower() == "auto":
        return "auto"
    try:
        return _boolean(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected true, false or auto, got {text!r}") from None


@dataclass
class CheckpointArgs:
    output_dir: str = field(default="outputs/run", metadata={"help": "where the resolved config, metrics, checkpoints, export and eval go"})
    save_steps: int | None = field(default=None, metadata={"help": "save a checkpoint every N steps (default: at the end only)"})
    resume: bool | str = field(default=False, metadata={"help": "continue from the latest checkpoint in <output_dir>/checkpoints (bare --resume: one must be there); auto: continue when a complete checkpoint is there, else start fresh (one command line for a first start and a requeue)", "type": _resume_mode})
    keep_checkpoints: int = field(default=2, metadata={"help": "published checkpoints to keep"})

    def validate(self) -> None:
        _at_least(self, 1, "keep_checkpoints")  # 0 would delete the checkpoint just written
        _at_least(self, 0, "save_steps", optional=True)  # 0: at the end only, as unset
        if self.resume not in (True, False, "auto"):
            raise ValueError(f"--resume takes true, false or auto, got {self.resume!r}")


@dataclass
class RunConfig:
    deepspeed: str
    preset: str = "default"
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    cached: CachedArgs = field(default_factory=CachedArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    # "section.name" of each flag given on the command line (parse_args fills it), so that a flag
    # set to its default value still counts as chosen; see ``user_set``.
    explicit: frozenset = field(default=frozenset(), repr=False, compare=False)

    def user_set(self, section: str, name: str) -> bool:
        """The user chose ``--name``: given on the command line, or different from its default."""
        if f"{section}.{name}" in self.explicit:
            return True
        default = next(f.default for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
        return getattr(getattr(self, section), name) != default

    @property
    def embedded(self) -> bool:
        """No model and no data given: train the embedded default (generated task, tiny BART)."""
        d = self.data
        return self.model.model is None and not (d.dataset or d.train_file)

    @property
    def output_dir(self) -> Path:
        return Path(self.checkpoint.output_dir)

    def validate(self) -> None:
        from .deepspeed_engine import EngineSettings
        from .ds_config import FLAG_FIELDS, check_against_flags, check_precision, load_config
        from .ds_schema import check_sections, check_top_level

        ds_config = load_config(self.deepspeed)  # bad path or JSON: fail now, before data and model
        EngineSettings.from_section(ds_config.get("cached"))  # unknown "cached" keys
        source = repr(str(self.deepspeed))
        check_sections(ds_config, source)  # DeepSpeed's own schema: zero_optimization, bf16, fp16
        for warning in check_top_level(ds_config, source):  # near-misses of its settings: errors
            if os.environ.get("RANK", "0") == "0":  # every rank parses; one says it
                logging.getLogger("cached_ds").warning(warning)
        flags = [(s, n) for _, s, n, _ in FLAG_FIELDS] + [("optim", "lr_decay")]
        given = {(s, n): getattr(getattr(self, s), n) for s, n in flags if self.user_set(s, n)}
        check_against_flags(ds_config, given, source)
        check_precision(ds_config, fp16=self.optim.fp16, bf16=self.optim.bf16, source=source)
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {PRESETS}, got {self.preset!r}")
        given = "--dataset" if self.data.dataset else "--train_file" if self.data.train_file else None
        if given and self.model.model is None:
            from .model_zoo import shipped_configs

            raise ValueError(f"{given} needs --model: an HF id (e.g. facebook/bart-large), a directory written by save_pretrained, "
                             f"or a shipped config for random init ({', '.join(shipped_configs())}); "
                             "the embedded tiny BART only trains on its own generated data (no --train_file/--dataset)")
        if not self.embedded and not given:
            raise ValueError("no training data: pass --dataset NAME or --train_file FILE (or neither, with no --model, for the embedded default)")
        if self.model.model is not None:
            from .model_zoo import check_model_name

            check_model_name(self.model.model)  # before the tokenizer: its hub error would hide this one
        if self.embedded:
            from .embedded import refuse_fixed_flags

            refuse_fixed_flags(self, ds_config)
        for section in (self.data, self.optim, self.eval, self.logging, self.checkpoint):
            section.validate()


def _at_least(section, minimum: int, *names: str, optional: bool = False) -> None:
    """Each named flag is an integer of at least ``minimum`` (or unset, where ``optional``)."""
    for name in names:
        value = getattr(section, name)
        if value is None and optional:
            continue
        if value is None or value < minimum:
            raise ValueError(f"--{name} must be at least {minimum}, got {value}")


SECTIONS = {"model": ModelArgs, "data": DataArgs, "cached": CachedArgs, "optim": OptimArgs, "eval": EvalArgs,
            "logging": LoggingArgs, "checkpoint": CheckpointArgs}


def _flag_type(hint):
    """argparse type for a dataclass field's annotation (``int | None`` -> int; bools take true/false)."""
    text = str(hint)
    if "bool" in text:
        return _boolean
    for kind in (int, float, str):
        if kind.__name__ in text:
            return kind
    return str


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after a flag's help, unless there is no default to show (``None``: the
    help says what happens then) or the help already names it."""

    def _get_help_string(self, action):
        if action.default is None or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a Hugging Face encoder–decoder on whole long documents with CachED inside DeepSpeed.",
        formatter_class=_DefaultsHelp,
    )
    parser.add_argument("--deepspeed", required=True, metavar="PATH", help="DeepSpeed JSON config (HF-style: takes the path), e.g. ds_configs/zero3.json")
    parser.add_argument("--preset", default="default", choices=PRESETS, help="size of the embedded default run (smoke: seconds, for tests)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; ranks are read from the environment")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = _flag_type(hints[f.name])
            extra = {"nargs": "?", "const": True} if kind is _boolean else {}  # bare --resume means true
            kind = f.metadata.get("type", kind)  # a field's own parser (--resume)
            group.add_argument(f"--{f.name}", dest=f"{section}.{f.name}", type=kind, default=f.default,
                               help=f.metadata.get("help", ""), metavar=f.name.upper(), **extra)
    return parser


def parse_args(argv: list[str] | None = None) -> RunConfig:
    namespace = vars(build_parser().parse_args(argv))
    sections = {name: cls(**{f.name: namespace[f"{name}.{f.name}"] for f in dataclasses.fields(cls)}) for name, cls in SECTIONS.items()}
    config = RunConfig(deepspeed=namespace["deepspeed"], preset=namespace["preset"], explicit=_given_flags(argv), **sections)
    config.validate()
    return config


def _given_flags(argv: list[str] | None) -> frozenset:
    """The dests of the flags on the command line, whatever their values (the same parser with
    every default suppressed: only given flags land in the namespace)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return frozenset(vars(parser.parse_known_args(argv)[0]))
