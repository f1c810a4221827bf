"""The embedded default: what ``deepspeed launchers/train.py --deepspeed ds_configs/zero3.json``
trains when given no model and no data.

It generates a long-document summarisation task whose answer needs the whole document
(``synthetic.py``: facts planted past the first encoder window), trains a sentencepiece tokenizer
on it and a tiny random BART, then runs the same training twice with the same seed, steps and
model: CachED on whole documents, and the baseline on documents truncated to the first window.
Both are evaluated with ROUGE on held-out documents and printed side by side; the baseline's
scores go under ``"truncated"`` in ``eval_results.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import transformers as hf

from . import synthetic
from .checkpoints import CheckpointStore
from .distributed import barrier, rank
from .resume import choose_checkpoint
from .evaluation import ROUGE_TYPES
from .run_config import CachedArgs, DataArgs, ModelArgs, RunConfig
from .run_outputs import write_atomic


@dataclass(frozen=True)
class Preset:
    train_documents: int
    eval_documents: int
    document_words: int
    window: int
    steps: int
    micro_batch_size: int
    lr: float
    warmup_steps: int
    vocab_size: int
    max_new_tokens: int
    mentions: int = 4  # each fact stated this many times: a stronger signal for a model trained in minutes
    encoder_layers: int = 1
    init_std: float = 0.125


# Measured on 2 CPU cores (about 58 s in all, at 1007638): CachED 96.2 vs truncated 16.7 ROUGE-2 with 1024-word
# documents (8+ windows of 128 tokens), 300 steps of 8 at a constant rate after warm-up; with the
# rate decayed to 0 CachED learned markedly less in the same steps. (67.4 before zero3.json kept the
# encoder gathered: the same exact gradients, summed in another order, took another path.)
PRESETS = {
    "default": Preset(train_documents=512, eval_documents=24, document_words=1024, window=128, steps=300,
                      micro_batch_size=8, lr=3e-3, warmup_steps=30, vocab_size=512, max_new_tokens=48),
    "smoke": Preset(train_documents=24, eval_documents=4, document_words=600, window=128, steps=4,
                    micro_batch_size=2, lr=3e-3, warmup_steps=0, vocab_size=256, max_new_tokens=12),
}


def _prepare(data_dir: Path, preset: Preset, seed: int) -> None:
    """Documents, tokenizer and the randomly initialised model, written once by rank 0."""
    if (data_dir / "model" / "config.json").is_file():
        return  # a resumed or repeated run reuses them
    shape = dict(doc_words=preset.document_words, window=preset.window, mentions=preset.mentions)
    train = synthetic.make_documents(preset.train_documents, seed=seed, **shape)
    held_out = synthetic.make_documents(preset.eval_documents, seed=seed + 1, **shape)
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train), ("eval", held_out)):
        with (data_dir / f"{name}.jsonl").open("w") as handle:
            for r in records:
                handle.write(json.dumps({"document": r["document"], "summary": r["summary"]}) + "\n")
    texts = [r["document"] for r in train] + [r["summary"] for r in train]
    tokenizer = synthetic.train_tokenizer(texts, str(data_dir / "model"), vocab_size=preset.vocab_size)
    hf.set_seed(seed)
    config = synthetic.tiny_bart_config(tokenizer, window=preset.window, ffn_dim=128, init_std=preset.init_std)
    config.encoder_layers = preset.encoder_layers
    model = hf.BartForConditionalGeneration(config)
    model.save_pretrained(data_dir / "model")
    tokenizer.save_pretrained(data_dir / "model")


# Flags the embedded job fixes itself (its generated data, tokenizer and window, and the truncated
# baseline's cut at one window): given on the command line they would be ignored, so they are
# refused (``refuse_fixed_flags``). The optimisation flags, --max_new_tokens, --max_target_tokens,
# --max_eval_documents and --group_tokens are the user's to choose and are honoured.
FIXED_FLAGS = (("cached", "window"), ("model", "tokenizer"), ("data", "text_column"), ("data", "summary_column"),
               ("data", "dataset_config"), ("data", "train_split"), ("data", "eval_split"), ("data", "max_source_tokens"))


def _fixed_value(name: str, preset: Preset) -> str:
    return {"window": str(preset.window), "max_source_tokens": f"whole documents, and {preset.window} for the truncated baseline",
            "tokenizer": "its own sentencepiece tokenizer", "text_column": "document", "summary_column": "summary"}.get(name, "its generated data")


def refuse_fixed_flags(run: RunConfig, ds_config: dict | None = None) -> None:
    """A flag the embedded default job fixes, set by the user, is an error rather than ignored."""
    preset = PRESETS[run.preset]
    for section, name in FIXED_FLAGS:  # the fixed value itself is accepted, as in the config
        if run.user_set(section, name) and str(getattr(getattr(run, section), name)) != _fixed_value(name, preset):
            raise ValueError(f"--{name} is fixed by the embedded default job ({_fixed_value(name, preset)}); "
                             "give --train_file/--dataset and --model to choose it")
    window = ((ds_config or {}).get("cached") or {}).get("window")
    if window is not None and window != preset.window:
        raise ValueError(f'{run.deepspeed!r} sets "cached.window": {window!r}, but the window is fixed by the embedded default job '
                         f'({preset.window}); set it to null there, or give --train_file/--dataset and --model to choose it')


def _with_preset(run: RunConfig, preset: Preset, data_dir: Path) -> RunConfig:
    """The preset fills every optimisation flag the user did not choose (``RunConfig.user_set``:
    given on the command line, even at its default value, or changed from the default)."""
    chosen = {"max_steps": preset.steps, "micro_batch_size": preset.micro_batch_size, "lr": preset.lr,
              "warmup_steps": preset.warmup_steps, "lr_decay": False}  # tuned with a constant rate
    optim = replace(run.optim, **{k: v for k, v in chosen.items() if not run.user_set("optim", k)})
    model_dir = str(data_dir / "model")
    return replace(
        run,
        model=ModelArgs(model=model_dir, tokenizer=model_dir),
        data=DataArgs(train_file=str(data_dir / "train.jsonl"), eval_file=str(data_dir / "eval.jsonl"),
                      max_target_tokens=run.data.max_target_tokens, max_eval_documents=run.data.max_eval_documents),
        cached=CachedArgs(window=preset.window, group_tokens=run.cached.group_tokens),
        optim=optim,
        eval=run.eval if run.user_set("eval", "max_new_tokens") else replace(run.eval, max_new_tokens=preset.max_new_tokens),
    )


def train_embedded_default(run: RunConfig) -> dict:
    from .trainer import Trainer, init_distributed

    init_distributed()
    preset = PRESETS[run.preset]
    data_dir = run.output_dir / "data"
    choose_checkpoint(CheckpointStore(run.output_dir), run.checkpoint.resume)  # a refused resume writes no corpus either
    if rank() == 0:
        _prepare(data_dir, preset, run.optim.seed)
    barrier()

    whole = _with_preset(run, preset, data_dir)
    scores = Trainer(whole).train()
    baseline_dir = run.output_dir / "truncated"
    resume_baseline = run.checkpoint.resume and CheckpointStore(baseline_dir).latest() is not None  # it may not have started
    truncated = replace(whole, data=replace(whole.data, max_source_tokens=preset.window),
                        checkpoint=replace(whole.checkpoint, output_dir=str(baseline_dir), resume=resume_baseline))
    baseline = Trainer(truncated).train()
    if rank() == 0:
        scores["truncated"] = baseline
        write_atomic(run.output_dir / "eval_results.json", json.dumps(scores, indent=2) + "\n")
        print(side_by_side(scores, baseline, preset.window), flush=True)
    return scores


def side_by_side(cached: dict, truncated: dict, window: int) -> str:
    header = f"{'ROUGE (F x 100)':<34}" + "".join(f"{k:>11}" for k in ROUGE_TYPES)
    rows = [("CachED, whole documents", cached), (f"truncated to the first {window} tokens", truncated)]
    lines = [header] + [f"{name:<34}" + "".join(f"{scores[k]:>11.2f}" for k in ROUGE_TYPES) for name, scores in rows]
    lines.append(f"{'CachED lead':<34}" + "".join(f"{cached[k] - truncated[k]:>+11.2f}" for k in ROUGE_TYPES))
    return "\n".join(lines)
