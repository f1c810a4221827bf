"""``CachedSeq2Seq``: a Hugging Face encoder–decoder that trains and summarises whole long documents.

    model = CachedSeq2Seq(AutoModelForSeq2SeqLM.from_pretrained("facebook/bart-large"),
                          CachedConfig(window=1024, group_windows=8))
    loss = model(input_ids, attention_mask, labels=labels).loss   # any document length
    loss.backward()                                                # exact CachED gradients
    summary_ids = model.generate(input_ids, attention_mask, num_beams=4, max_new_tokens=256)

``input_ids`` and ``attention_mask`` may stay in host memory (pinned, beside a GPU), as the
trainer keeps them (``host_offload.placed``): each window group's ids go to the device when it
is encoded, so a long document's ids cost the device nothing (``windows``); a padded batch's
key mask goes to the decoder's device. Labels go to the model's device.

It is an ``nn.Module``, so ``deepspeed.initialize(model=CachedSeq2Seq(...))`` wraps it like any
other model; the wrapped HF model stays at ``.model`` (``save_pretrained`` as usual).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, ContextManager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from . import families
from .cached_encoder import GroupSchedule, encode_windows
from .config import CachedConfig
from .distributed import max_over_ranks, min_over_ranks, partitioned_across_ranks
from .held_scope import HeldScope, closed_after_backward
from .host_offload import to_device
from .longt5_attention import TRANSIENT_GLOBAL_NEEDS_GATHERED, has_banded_attention, has_transient_global_attention
from .shared_beam_generation import document_ids_for_processors, generate_shared
from .streaming_cross_attention import (
    compact_key_mask,
    has_streaming_cross_attention,
    install_streaming_cross_attention,
    streams_every_layer,
)
from .t5_attention import attention_targets as fast_t5_targets, install_fast_t5_attention
from .windows import WindowPlan

logger = logging.getLogger("cached_ds")
CACHED_CONFIG_FILE = "cached_config.json"  # beside a saved HF model: the windows it was trained with

IGNORE_INDEX = -100
IN_PLACE = ("decoder_gradient_checkpointing", "encoder_gradient_checkpointing", "cross_attention_block", "cross_attention_kernel",
            "fast_t5_attention", "t5_attention_kernel", "keep_attention_dropout")
T5_FAMILIES = ("t5", "mt5", "longt5")


class CachedSeq2Seq(nn.Module):
    def __init__(self, model: nn.Module, config: CachedConfig | None = None):
        super().__init__()
        families.require_encoder_decoder(model)
        config = config or CachedConfig()
        # The settings that change the model in place (its modules, checkpointing flags, dropout):
        # a second wrapper with others would not undo the first's, and would not describe the model.
        changes = {name: getattr(config, name) for name in IN_PLACE}
        earlier = getattr(model, "_cached_ds_changes", None)
        if earlier is not None and earlier != changes:
            differ = ", ".join(f"{name} {earlier[name]!r} then, {changes[name]!r} now" for name in IN_PLACE if earlier[name] != changes[name])
            warnings.warn(f"this {type(model).__name__} was wrapped before by a CachedSeq2Seq that changed it in place with "
                          f"other settings ({differ}); those changes stay, so this wrapper's cached_config (and what "
                          "save_pretrained writes) does not describe the model: load (or copy.deepcopy before wrapping) "
                          "another model for other settings", stacklevel=2)
        self.model = model
        model._cached_ds_changes = changes
        self.train(model.training)  # HF's from_pretrained gives eval mode: say so, as the model does
        self.cached_config = config
        self.window = self.cached_config.window or families.default_window(model)
        limit = families.max_window(model)
        if limit is not None and self.window > limit:
            raise ValueError(
                f"window={self.window} exceeds the encoder's {limit} positions (config."
                f"{families.encoder_positions_field(model.config)} of {model.config.model_type}); set window <= {limit}"
            )
        if self.cached_config.group_tokens is not None and self.cached_config.group_tokens < self.window:
            raise ValueError(
                f"group_tokens={self.cached_config.group_tokens} is smaller than one window ({self.window} tokens); "
                f"set group_tokens >= {self.window}"
            )
        if self.cached_config.decoder_gradient_checkpointing:
            enable_decoder_checkpointing(model)
        if self.cached_config.encoder_gradient_checkpointing:
            enable_encoder_checkpointing(model)
        replaced = []  # attention modules whose attention-probability dropout the kernels lack
        if self.cached_config.cross_attention_block is not None:
            fused = self.cached_config.cross_attention_kernel == "fused"
            replaced += [m.original for m in install_streaming_cross_attention(model, self.cached_config.cross_attention_block, fused)]
        if self.cached_config.fast_t5_attention:
            if model.config.model_type not in T5_FAMILIES:
                raise ValueError(f"fast_t5_attention is for {T5_FAMILIES}, got {model.config.model_type}; set it to false")
            kernel = self.cached_config.t5_attention_kernel
            if kernel == "local_sdpa" and not has_banded_attention(model):
                raise ValueError(f"t5_attention_kernel='local_sdpa' runs LongT5's local and transient-global encoder layers, "
                                 f"and this {model.config.model_type} model has none (it would run as 'flex'); use 'flex' or "
                                 "'blocked'")
            install_fast_t5_attention(model, use_flex=kernel != "blocked", local_sdpa=kernel == "local_sdpa")
            replaced += [module for module, _ in fast_t5_targets(model)]
        _settle_attention_dropout(replaced, self.cached_config.keep_attention_dropout)
        if self.cached_config.offload_gradient_cache and not has_streaming_cross_attention(model):
            raise ValueError(
                "offload_gradient_cache offloads the fp32 gradient cache that streaming cross-attention writes, "
                "and this model has none; set cross_attention_block (e.g. 8192) or remove offload_gradient_cache"
            )
        # Engines whose collectives follow the encoder calls (ZeRO-3) set this to agree on a group
        # count across ranks: it maps this rank's count to the count every rank will run.
        self.sync_group_count: Callable[[int], int] | None = None
        # Entered around every pass over the window groups (ZeRO-3 keeps the encoder gathered there).
        self.encoder_scope: Callable[[], ContextManager] = contextlib.nullcontext
        # Entered before the decoder's forward and left when its backward is over (ZeRO-3 keeps the
        # decoder gathered for the whole step there); None: nothing to hold.
        self.decoder_scope: Callable[[], ContextManager] | None = None
        # Window groups whose encoder graph the last training forward kept (``keep_graphs_bytes``)
        # instead of recomputing it in backward, and the bytes they hold.
        self.last_kept_groups = 0
        self.last_kept_bytes = 0

    def save_pretrained(self, folder: str | Path, state_dict: dict | None = None, **kwargs) -> Path:
        """The HF model's ``save_pretrained`` (``state_dict``: e.g. consolidated ZeRO weights) plus
        ``cached_config.json``, the CachED settings and the window it was trained with, which
        ``CachedSeq2Seq.from_pretrained`` reads back."""
        folder = Path(folder)
        self.model.save_pretrained(folder, state_dict=state_dict, **kwargs)
        settings = {**dataclasses.asdict(self.cached_config), "window": self.window}
        (folder / CACHED_CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, **hf_kwargs) -> "CachedSeq2Seq":
        """A folder written by ``save_pretrained`` (or ``export_hf``, or launchers/train.py's
        ``exported/``): the HF model (``AutoModelForSeq2SeqLM.from_pretrained(folder,
        **hf_kwargs)``) wrapped with the settings it was trained with."""
        path = Path(folder) / CACHED_CONFIG_FILE
        if not path.is_file():
            raise ValueError(f"{path} is missing: give a folder written by CachedSeq2Seq.save_pretrained or export_hf "
                             "(launchers/train.py's <output_dir>/exported), not a run folder or a checkpoint")
        settings = json.loads(path.read_text())
        known = {field.name for field in dataclasses.fields(CachedConfig)}
        if set(settings) - known:
            raise ValueError(f"{path} has settings this version of cached-ds does not know: {sorted(set(settings) - known)}")
        from transformers import AutoModelForSeq2SeqLM

        model = AutoModelForSeq2SeqLM.from_pretrained(folder, **hf_kwargs)
        return cls(model, CachedConfig(**_without_settings_that_did_nothing(settings, model, path)))

    @property
    def config(self):
        """The HF model's config, where code written for HF models reads it (HF's Trainer and its
        DeepSpeed "auto" values, generation, PEFT); the CachED settings are ``cached_config``."""
        return self.model.config

    @property
    def generation_config(self):
        return self.model.generation_config

    def plan(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> WindowPlan:
        pad = self.model.config.pad_token_id
        pad = pad if pad is not None else 0
        plan = WindowPlan.build(input_ids, attention_mask, self.window, pad, **self.cached_config.grouping())
        if self.sync_group_count is None and partitioned_across_ranks(self.model.get_encoder()):
            # A ZeRO-3 engine that cached_ds.deepspeed_engine.initialize did not build (plain
            # deepspeed.initialize, HF's Trainer): ranks must still run as many encoder calls.
            if has_transient_global_attention(self.model):
                raise ValueError(TRANSIENT_GLOBAL_NEEDS_GATHERED)
            self.sync_group_count = max_over_ranks
            logger.warning("CachedSeq2Seq is trained by a ZeRO-3 engine that cached_ds.deepspeed_engine.initialize did not "
                           "build: exact, but without its ZeRO-3 settings (a bounded stage3_max_reuse_distance, the encoder "
                           "and decoder kept gathered), which make long documents many times faster (docs/engine.md)")
        if self.sync_group_count is not None:
            plan = plan.padded_to(self.sync_group_count(len(plan.groups)), pad)
        return plan

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encode_only: bool = False,
    ) -> Seq2SeqLMOutput | tuple[BaseModelOutput, torch.Tensor]:
        """HF's seq2seq forward (same loss) with the encoder run window by window. Without
        ``labels``, ``decoder_input_ids`` give the logits alone (a caller's own loss backpropagates
        through them the same way).

        ``encode_only=True`` returns ``(encoder outputs, fused mask)`` instead (``encode_long``):
        running inside this module's forward lets engines such as ZeRO-3 gather the embedding
        weight the core reads, as they do for training."""
        if not encode_only:
            _check_labels(labels, input_ids, decoder_input_ids)
            _check_summary_positions(self.model, labels if labels is not None else decoder_input_ids)
            if labels is not None and labels.dtype != torch.long:
                labels = labels.long()  # int32 ids are ids too (as input_ids may be); HF's loss takes int64 only
        plan = self.plan(input_ids, attention_mask)
        device = families.input_embedding(self.model).weight.device
        if encode_only:
            fused = encode_windows(self.model, plan, scope=self.encoder_scope)
            if plan.has_padding:  # generate reads the mask on the device
                mask = to_device(plan.fused_mask, device)
            else:  # a broadcast one: a copy would be 8 B per token
                mask = torch.ones((), dtype=torch.long, device=device).expand(plan.fused_mask.shape)
            return BaseModelOutput(last_hidden_state=fused), mask
        schedule = GroupSchedule(self.cached_config.grad_torch_dtype, self.cached_config.keep_graphs_bytes or 0,
                                 self.cached_config.offload_gradient_cache, self.cached_config.offload_encoder_states,
                                 agree_kept=min_over_ranks if self.sync_group_count is not None else None)
        fused = encode_windows(self.model, plan, self.cached_config.mode, schedule, self.encoder_scope)
        self.last_kept_groups, self.last_kept_bytes = schedule.kept_groups, schedule.kept_bytes
        mask = plan.decoder_mask
        if mask is not None:  # ids and mask may be in host memory (``windows``): the decoder's goes to its device
            mask = compact_key_mask(mask, device) if streams_every_layer(self.model) else to_device(mask, device)
        held = HeldScope(self.decoder_scope()) if self.decoder_scope is not None else None
        try:
            output = self.model(
                encoder_outputs=BaseModelOutput(last_hidden_state=fused),
                attention_mask=mask,
                labels=labels,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                use_cache=False,
            )
        except BaseException:
            if held is not None:
                held.close()
            raise
        return output if held is None else _held_until_backward(output, held)

    @torch.no_grad()
    def encode_long(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[BaseModelOutput, torch.Tensor]:
        """Fused encoder states of whole documents (windowed, no autograd) and their mask."""
        return self(input_ids, attention_mask, encode_only=True)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs):
        """HF ``generate`` (greedy, beam, sampling…) conditioned on the whole documents; the beams
        of a document share one copy of its encoder states and cross-attention K/V
        (``shared_beam_generation``) instead of HF's one per beam. Under ZeRO-3 on several ranks
        ``synced_gpus`` defaults to on: a rank whose summaries end first keeps taking decoder
        steps, or the others would wait on its parameter gathers forever (HF turns it on only for
        an ``HfDeepSpeedConfig``, which a cached_ds engine does not make)."""
        generate_kwargs.setdefault("synced_gpus", partitioned_across_ranks(self.model))
        self._check_generation(generate_kwargs)
        encoder_outputs, fused_mask = self.encode_long(input_ids, attention_mask)
        # HF's generate gets the states, not the ids, which encoder_repetition_penalty and
        # encoder_no_repeat_ngram_size read (Blenderbot's generation_config sets the latter)
        reads_ids = self._reads_document_ids(generate_kwargs)
        ids = input_ids.to(fused_mask.device) if reads_ids else None
        with document_ids_for_processors(self.model, ids) if reads_ids else contextlib.nullcontext():
            return generate_shared(self.model, encoder_outputs, fused_mask, self.cached_config.cross_attention_block, **generate_kwargs)

    def _setting(self, generate_kwargs: dict, name: str):
        """(value, where it is set) as HF resolves a generation setting: a keyword, else the
        ``generation_config`` passed where it sets the field, else the model's (HF fills a passed
        config's unset fields from the model's)."""
        if name in generate_kwargs:
            return generate_kwargs[name], name
        passed = generate_kwargs.get("generation_config")
        if passed is not None and getattr(passed, name, None) is not None:
            return getattr(passed, name), f"generation_config.{name}"
        return getattr(self.model.generation_config, name, None), f"model.generation_config.{name}"

    def _check_generation(self, generate_kwargs: dict) -> None:
        """Lengths past a learned decoder's positions (an index error, a device-side assert on a GPU)."""
        setting = partial(self._setting, generate_kwargs)
        limit = families.decoder_positions(self.model)
        (new_tokens, new_from), (length, length_from) = setting("max_new_tokens"), setting("max_length")
        # HF: max_new_tokens, where set, decides and max_length is not read
        value, where, most = (new_tokens, new_from, limit - 1 if limit else None) if new_tokens is not None else (length, length_from, limit)
        if most is not None and (value or 0) > most:
            raise ValueError(f"{where}={value} runs past the decoder's {limit} positions (config."
                             f"{families.decoder_positions_field(self.model.config)}, the start token takes one); "
                             f"set {where.rsplit('.', 1)[-1]} <= {most}")

    def _reads_document_ids(self, generate_kwargs: dict) -> bool:
        """A setting whose logits processor reads the encoder's input ids is on."""
        penalty = self._setting(generate_kwargs, "encoder_repetition_penalty")[0]
        return penalty not in (None, 1.0) or bool(self._setting(generate_kwargs, "encoder_no_repeat_ngram_size")[0])


def _without_settings_that_did_nothing(settings: dict, model: nn.Module, path: Path) -> dict:
    """Settings an older cached-ds saved that changed nothing, which ``CachedConfig`` and the
    wrapper now refuse: reset, so its exported models still load."""
    settings = dict(settings)
    reset = {}
    if settings.get("keep_attention_dropout") is False and settings.get("cross_attention_block") is None \
            and not settings.get("fast_t5_attention"):
        reset["keep_attention_dropout"] = True
    if settings.get("offload_gradient_cache") and settings.get("mode", "cached") != "cached":
        reset["offload_gradient_cache"] = False
    if settings.get("t5_attention_kernel") == "local_sdpa" and not has_banded_attention(model):
        reset["t5_attention_kernel"] = "flex"
    if reset:
        logger.info("%s: %s had no effect in the run that saved it; loaded as %s", path,
                    ", ".join(f"{k}={settings[k]!r}" for k in reset), ", ".join(f"{k}={v!r}" for k, v in reset.items()))
    return {**settings, **reset}


def _held_until_backward(output: Seq2SeqLMOutput, held: HeldScope) -> Seq2SeqLMOutput:
    """The decoder's scope stays open until a backward through the loss or the logits is over
    (whichever the caller backpropagates; both is fine: it closes once); with nothing to
    backpropagate (no autograd), it closes now."""
    differentiable = [name for name in ("loss", "logits") if getattr(output, name, None) is not None and output[name].requires_grad]
    if not differentiable:
        held.close()
    for name in differentiable:
        output[name] = closed_after_backward(output[name], held)
    return output


def _settle_attention_dropout(modules: list[nn.Module], keep: bool) -> None:
    """``keep_attention_dropout=False``: the kernels' modules lose their attention-probability
    dropout. Kept and non-zero, streaming cross-attention refuses to train and the fast T5
    attention runs HF's code (exact, not fast): say so now rather than at the first step."""
    if not keep:
        for module in modules:
            module.dropout = 0.0
    elif any(module.dropout > 0 for module in modules):
        warnings.warn(
            "attention-probability dropout is on in modules the long-document kernels replace: streaming "
            "cross-attention will refuse to train and the fast T5 attention will run HF's code; set "
            '"keep_attention_dropout": false in the "cached" section (CachedConfig) to switch it off there',
            stacklevel=3,
        )


def enable_decoder_checkpointing(model: nn.Module) -> None:
    """HF gradient checkpointing in the decoder only (the encoder has CachED's recompute).

    Sets the same per-module flags as HF's ``gradient_checkpointing_enable`` but on the decoder,
    with non-reentrant checkpointing, which preserves RNG state: gradients stay exact."""
    _enable_checkpointing(model.get_decoder())


def enable_encoder_checkpointing(model: nn.Module) -> None:
    """The same flags on the encoder. They act only where autograd records (``cached``: the
    per-group recompute; ``full``: every window), and non-reentrant checkpointing replays each
    layer with the RNG state of its first run, so dropout masks and gradients stay exact."""
    _enable_checkpointing(model.get_encoder())


def _enable_checkpointing(stack: nn.Module) -> None:
    for module in stack.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)


def _check_summary_positions(model: nn.Module, summaries: torch.Tensor | None) -> None:
    """Summaries longer than a learned/sinusoidal decoder position table fail inside HF with an
    index error (a device-side assert on a GPU); say which field and what to do instead."""
    limit = families.decoder_positions(model)
    if summaries is not None and limit is not None and summaries.shape[-1] > limit:
        raise ValueError(f"the summaries have {summaries.shape[-1]} tokens, past the decoder's {limit} positions (config."
                         f"{families.decoder_positions_field(model.config)}); truncate them to {limit} tokens "
                         f"(launchers/train.py: --max_target_tokens {limit})")


def _check_labels(labels: torch.Tensor | None, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None) -> None:
    if labels is None:
        if decoder_input_ids is not None:  # logits only (scoring, a loss of the caller's own), as in HF
            return
        raise ValueError(
            "labels is required for training: pass the tokenized summaries (pad with -100), or "
            "decoder_input_ids for logits without a loss"
        )
    if labels.dim() != 2 or labels.shape[1] == 0 or not (labels != IGNORE_INDEX).any():
        raise ValueError(
            f"labels must be a non-empty (batch, summary_tokens) tensor with some tokens not equal to "
            f"{IGNORE_INDEX}, got shape {tuple(labels.shape)}; check the summary column is not empty"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold token ids (an integer dtype, -100 where ignored), got {labels.dtype}")
    if input_ids.dim() == 2 and labels.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"labels has {labels.shape[0]} rows but input_ids has {input_ids.shape[0]}: one summary per document"
        )
