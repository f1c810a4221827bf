"""The training run behind ``launchers/train.py``: build, train, checkpoint, export, evaluate.

    deepspeed launchers/train.py --deepspeed ds_configs/zero3.json --model facebook/bart-large \\
        --dataset ccdv/govreport-summarization --text_column report --max_steps 1000

Loss is a token-level mean over the whole global batch: each micro-batch's summed cross-entropy
is divided by the label-token count of the global batch (all micro-batches, all ranks — counted
before the first backward, since a step's batches are prepared ahead) and multiplied by GAS ×
world to undo DeepSpeed's division by GAS and its averaging over ranks. Every summary token then
weighs the same, however the batch is split.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import signal
import time
from dataclasses import asdict
from datetime import timedelta
from functools import partial

import deepspeed.comm
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers as hf
from tqdm.auto import tqdm

from . import data as data_lib
from . import families, languages
from .checkpoints import CheckpointStore, injected_fault
from .config import DEFAULT_GROUP_TOKENS
from .distributed import (all_reduce_sum, from_rank0, init_process_group, patient_barrier, progress_beat, rank,
                          require_shared_directory, world_size)
from .deepspeed_engine import EngineSettings, export_hf, initialize
from .ds_config import REPLACED_SCHEDULERS, auto_values, check_batch_sizes, cosine_min_ratio, enabled, load_config, native_bf16, resolve_auto
from .evaluation import GENERATION_FLAGS, generation_settings, rouge, shard, summarize
from .host_offload import placed
from .model_zoo import load_model, load_tokenizer
from .stop_signals import StopSignals
from .resume import ResumeState, choose_checkpoint
from .run_config import EVAL_DEFAULTS, RunConfig
from .run_outputs import RUN_COMPLETE, clear_earlier_outputs, forget_metrics_after, write_atomic

logger = logging.getLogger("cached_ds")


def init_distributed() -> None:
    """The process group (``distributed.init_process_group``) and rank-0 logging."""
    init_process_group()
    logging.basicConfig(level=logging.INFO if rank() == 0 else logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def train_step(engine, micro_batches: list[dict], check=None, nan_fault: bool = False, kill_fault: bool = False,
               optimizer_step: bool = True) -> tuple[float, float, float, float | None]:
    """One optimizer step over this rank's micro-batches with the loss normalised over the
    global batch; returns (summed loss, label tokens, document tokens), all global, and the
    gradient norm where DeepSpeed keeps none (ZeRO-0 in fp32 clips without recording it).
    ``optimizer_step=False`` stops at the accumulation boundary with the gradients in place.
    Tests only: ``nan_fault`` makes the loss NaN, ``kill_fault`` SIGKILLs the process between the
    first backward and its optimizer step."""
    device = engine.device
    label_tokens = all_reduce_sum(sum(int((b["labels"] != -100).sum()) for b in micro_batches))
    doc_tokens = all_reduce_sum(sum(int(b["attention_mask"].sum()) for b in micro_batches))
    scale = engine.gradient_accumulation_steps() * world_size() / label_tokens
    summed, norm = 0.0, None
    for batch in micro_batches:
        batch = placed(batch, device)
        logits = engine(**batch).logits
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")
        if nan_fault:
            loss_sum = loss_sum * float("nan")
        if check is not None:
            check(loss_sum)
        engine.backward(loss_sum * scale)
        if kill_fault:
            os.kill(os.getpid(), signal.SIGKILL)
        if optimizer_step or not engine.is_gradient_accumulation_boundary():
            if engine.is_gradient_accumulation_boundary() and _norm_not_recorded(engine):
                norm = _gradient_norm(engine)
            engine.step()
        summed += float(loss_sum.detach())
    return all_reduce_sum(summed), label_tokens, doc_tokens, norm


def out_of_memory_advice(error: Exception, cached, longest: int, step: int) -> str:
    """The allocator's message, then where this rank's memory went and the settings that fit a
    longer document, only those that are off and that the run's mode takes (``cached``: the run's
    ``CachedConfig``)."""
    first = str(error).splitlines()[0] if str(error) else "out of memory"
    lines = [first, f"step {step} on rank {rank()} ran out of device memory (peak {peak_memory_gib():.1f} GiB); "
             f"its longest document here has {longest:,} tokens. In the DeepSpeed config's \"cached\" section:"]
    full = cached.mode == "full"
    if full:
        lines.append('- "mode": "cached": full backprop keeps every window\'s encoder activations; CachED one group\'s')
    # what grows with a document in CachED is the decoder's side (fused states, their gradient, K/V)
    if cached.cross_attention_block is None:
        lines.append('- "cross_attention_block": 65536 streams the cross-attention over key blocks (no keys and values '
                     'over the whole document in any decoder layer; a model with attention dropout also needs '
                     '"keep_attention_dropout": false; ds_configs/zero3_long.json sets both)')
    elif not full:
        held = {"offload_gradient_cache": "the fp32 gradient cache (4 KiB a token for BART-large)",
                "offload_encoder_states": "the encoder's states (2 KiB a token)"}
        lines += [f'- "{name}": true keeps {what} in pinned host memory' for name, what in held.items() if not getattr(cached, name)]
    if not full:
        if cached.keep_graphs_bytes:
            lines.append(f'- "keep_graphs_bytes" (now {cached.keep_graphs_bytes:,}) lower: fewer encoder graphs kept from '
                         "forward to backward")
        if isinstance(cached.group_windows, int):
            lines.append(f'- "group_windows" (now {cached.group_windows}) smaller: the encoder holds one group of windows '
                         "with autograd at a time")
        else:  # group_tokens, its default, or group_windows "all" (replaced by it)
            now = "all windows" if cached.group_windows == "all" else f"{cached.group_tokens or DEFAULT_GROUP_TOKENS:,}"
            lines.append(f'- "group_tokens" (now {now}) smaller: the encoder holds one group of windows with autograd '
                         "at a time" + ('; remove "group_windows"' if cached.group_windows == "all" else ""))
    if not cached.decoder_gradient_checkpointing:
        lines.append('- "decoder_gradient_checkpointing": true')
    lines.append("- --max_source_tokens cuts documents (their ends are then never read)")
    return "\n".join(lines)


def _norm_not_recorded(engine) -> bool:
    """DeepSpeed's ZeRO-0 fp32 step clips with torch's clip_grad_norm_ and drops the norm it
    returns (engine.py clip_fp32_gradients); its ZeRO and mixed-precision optimizers keep theirs."""
    return engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())


def _gradient_norm(engine) -> float:
    """The norm DeepSpeed clips by: every gradient, already averaged over ranks at the boundary."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


# DeepSpeed's warm-up schedulers run the first two optimizer steps at warmup_min_lr whatever the
# warm-up: their step k uses iteration k - 2 (measured: lrs 0, 0, 1e-3, ... with warm-up 0, then
# a log ramp one step late; WarmupCosineLR the same, and it refuses a warm-up of 0). The launcher
# runs these sections' schedule with HF's own functions instead (what HF's Trainer does with
# DeepSpeed): linear warm-up over --warmup_steps, then a linear decay to 0 at the last step
# (--lr_decay), a constant rate, or for WarmupCosineLR a cosine to cos_min_ratio × --lr.
def warmup_schedule(optimizer, warmup: int, total: int | None, cosine_min_ratio: float | None = None):
    """HF's ``get_linear_schedule_with_warmup`` (``total`` steps), with ``total=None``
    ``get_constant_schedule_with_warmup``, with ``cosine_min_ratio``
    ``get_cosine_with_min_lr_schedule_with_warmup``: step 1 at the peak when ``warmup`` is 0."""
    if cosine_min_ratio is not None:
        return hf.get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total,
                                                              min_lr_rate=cosine_min_ratio)
    if total is None:
        return hf.get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)
    return hf.get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total)


SUMMARY_STALL = timedelta(hours=1)  # longer than any one document's summary takes


class _ReportingProgress:
    """The evaluation's progress bar; each summary done also tells the other ranks this one is
    alive (``distributed.progress_beat``), which their wait for it reads."""

    def __init__(self, bar):
        self.bar = bar

    def update(self, count: int) -> None:
        self.bar.update(count)
        progress_beat()


class Trainer:
    def __init__(self, run: RunConfig, tokenizer=None):
        self.run = run
        self.out = run.output_dir
        init_distributed()
        require_shared_directory(self.out, "--output_dir")
        self.store = CheckpointStore(self.out, run.checkpoint.keep_checkpoints)
        self.resume = choose_checkpoint(self.store, run.checkpoint.resume)  # a tag or None; before anything is written
        # A requeue of a run that had finished: said before the data, model and engine are built,
        # which for a large corpus and model take minutes of the requeued job for nothing.
        self.complete = self._completed_at(self.resume) if self.resume else None
        if self.complete is not None:
            return
        seed_everything(run.optim.seed)
        self.tokenizer = tokenizer or self._load_tokenizer()
        unsure = languages.set_language(self.tokenizer, run.model.lang)  # before tokenizing: the codes it adds
        if unsure and rank() == 0:
            logger.warning(unsure)
        self.train_rows, self.eval_rows = self._load_data()
        seed_everything(run.optim.seed)  # model init independent of data loading
        # from_pretrained returns a model in eval mode: fine-tuning would run with dropout off
        self.model = load_model(run.model.model, self.tokenizer).train()
        languages.set_generation_start(self.model, self.tokenizer, run.model.forced_bos_token)
        self._keep_source_prefix()
        self._check_tokenizer()
        self._check_summary_lengths()
        self.generation = self._generation_settings()
        self.plan = data_lib.BatchPlan(data_lib.lengths(self.train_rows), world_size(),
                                       run.optim.micro_batch_size, run.optim.gradient_accumulation_steps, run.optim.seed)
        self.plan.check()
        left_out = len(self.train_rows) - self.plan.steps_per_epoch * self.plan.docs_per_step
        if left_out and rank() == 0:  # a different random remainder each epoch; a large one is worth knowing about
            logger.warning("each epoch leaves out %d of %d training documents (a step takes %d: ranks × micro-batch × "
                           "accumulation), a different random %d each epoch", left_out, len(self.train_rows),
                           self.plan.docs_per_step, left_out)
        self.total_steps = run.optim.max_steps or run.optim.epochs * self.plan.steps_per_epoch
        config, lr_scheduler = self._engine_config()
        self.state = ResumeState(
            zero_stage=(config.get("zero_optimization") or {}).get("stage", 0), world_size=world_size(),
            data_plan=self._data_plan(), lr=(config.get("optimizer") or {}).get("params", {}).get("lr", run.optim.lr),
            # who sets the rate: our HF schedule, the config's own DeepSpeed scheduler, or nobody (constant)
            lr_schedule="ours" if lr_scheduler else config.get("scheduler", {}).get("type", "none"), config_path=str(run.deepspeed))
        # A resume is checked against the checkpoint's resume.json now, so that a refused one leaves
        # the earlier run's ds_config.json as it was; older checkpoints have none (checked at load).
        saved = self.store.sidecar(self.resume) if self.resume else None
        if saved is not None:
            self.state.check(saved)
        if not self.resume and rank() == 0:
            clear_earlier_outputs(self.out)
        self.engine = self._build_engine(config, lr_scheduler)
        self.step = 0

    # ---- building ---------------------------------------------------------------------------
    def _load_tokenizer(self):
        return load_tokenizer(self.run.model.tokenizer or self.run.model.model)

    def _load_data(self):
        splits = {}
        # rank 0 tokenizes first and fills datasets' cache (hours, for a corpus of books); the others then read it
        for split in ("train", "eval"):
            if rank() != 0:
                patient_barrier(f"tokenize-{split}")
            splits[split] = self._load_split(split)  # Arrow-backed, numpy rows (data.tokenize): read when used
            if rank() == 0:
                patient_barrier(f"tokenize-{split}")
        if splits["train"] is None or len(splits["train"]) == 0:
            raise ValueError("no training documents left after skipping empty ones")
        return splits["train"], splits["eval"]

    def _load_split(self, split: str):
        args = self.run.data
        dataset = data_lib.load_split(args, split)
        if dataset is None:
            return None
        data_lib.remove_stale_partial_files(dataset)
        dataset = data_lib.check_columns(dataset, args, split)
        dataset, dropped = data_lib.drop_empty(dataset, args)
        if dropped and rank() == 0:
            logger.warning("skipped %d %s documents with an empty text or summary", dropped, split)
        dataset = data_lib.tokenize(dataset, self.tokenizer, args)
        if split == "train" and rank() == 0 and len(dataset):
            data_lib.check_ends_with_eos(dataset, self.tokenizer)
            data_lib.check_known_tokens(dataset, self.tokenizer)
        if split == "eval" and args.max_eval_documents:
            dataset = dataset.select(range(min(args.max_eval_documents, len(dataset))))
        return dataset

    def _keep_source_prefix(self) -> None:
        """--source_prefix goes into the model's config (HF's ``prefix``), so the exported model
        says which prefix its documents had and summarize.py puts it there too. Without the flag
        the documents have none, and the config says so; a model whose config expects one (T5's
        "summarize: ", or an earlier run's) gets a warning, as in HF's run_summarization.py."""
        config, given = self.model.config, self.run.data.source_prefix
        expected = getattr(config, "prefix", None) or ((getattr(config, "task_specific_params", None) or {})
                                                       .get("summarization", {}).get("prefix"))
        if given is None and expected and rank() == 0:
            logger.warning("the model expects documents to start with %r (its config), but --source_prefix is not set: training "
                           "without it; pass --source_prefix %r to keep it (or --source_prefix '' to say no prefix)",
                           expected, expected)
        config.prefix = given or None

    def _check_tokenizer(self) -> None:
        """Token ids past the model's embedding table fail in the first step (a device-side assert
        on a GPU); a tokenizer without a pad token fails in the first batch. Its model's pad id
        fills in where the tokenizer has none."""
        name = self.run.model.tokenizer or self.run.model.model
        rows = self.model.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > rows:
            raise ValueError(f"the tokenizer ({name}) has {len(self.tokenizer)} tokens but the model embeds {rows}; pass the "
                             "model's own tokenizer with --tokenizer")
        if self.tokenizer.pad_token_id is None:
            pad = self.model.config.pad_token_id
            if pad is None:
                raise ValueError(f"the tokenizer ({name}) has no pad token and the model config no pad_token_id; give the "
                                 "tokenizer one (tokenizer.pad_token = ...; save_pretrained) and pass it with --tokenizer")
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(pad)
            if rank() == 0:
                logger.warning("the tokenizer has no pad token: padding with the model's pad_token_id %d (%r)", pad, self.tokenizer.pad_token)

    def _check_summary_lengths(self) -> None:
        """Learned decoder positions (BART, mBART, PEGASUS) end at the model's limit: a longer
        summary would fail mid-run with an index error (a device-side assert on a GPU), and so
        would generating past it (capped, with a warning)."""
        limit = families.decoder_positions(self.model)
        if limit is None:
            return
        longest = max(max(data_lib.lengths(rows, "num_label_tokens")) for rows in (self.train_rows, self.eval_rows) if rows)
        if longest > limit:
            raise ValueError(f"a reference summary has {longest} tokens but this {self.model.config.model_type} decoder has "
                             f"{limit} positions; pass --max_target_tokens {limit}")

    def _generation_settings(self) -> dict:
        """The evaluation's generate keywords: the flags given, else the model's
        generation_config, else the run's defaults (``evaluation.generation_settings``); said once."""
        given = {name: getattr(self.run.eval, name) for name in GENERATION_FLAGS}
        settings, notes = generation_settings(self.model, given, EVAL_DEFAULTS)
        for level, note in notes if self.eval_rows and rank() == 0 else ():
            logger.log(level, "evaluation: %s", note)
        return settings

    def _engine_config(self):
        """The resolved DeepSpeed config and our lr schedule (None where the config's own
        scheduler, or none, drives the rate); nothing written yet."""
        run = self.run
        config = load_config(run.deepspeed)
        cached = config.setdefault("cached", {})
        for key in ("window", "group_tokens"):
            if getattr(run.cached, key) is not None:
                cached[key] = getattr(run.cached, key)
                if key == "group_tokens":
                    cached.pop("group_windows", None)
        EngineSettings.from_section(cached)  # fail on unknown keys before DeepSpeed starts
        fp16 = run.optim.fp16 or enabled(config, "fp16") is True  # a config that turns it on with a number
        bf16 = run.optim.bf16 if run.optim.bf16 is not None else bool(
            not fp16 and native_bf16())
        hidden = self.model.config.d_model
        config = resolve_auto(config, auto_values(
            micro_batch_size=run.optim.micro_batch_size, gradient_accumulation_steps=run.optim.gradient_accumulation_steps,
            world_size=world_size(), lr=run.optim.lr, weight_decay=run.optim.weight_decay, warmup_steps=run.optim.warmup_steps,
            total_steps=self.total_steps, max_grad_norm=run.optim.max_grad_norm, bf16=bf16, hidden_size=hidden, fp16=fp16))
        for name, given in (("fp16", run.optim.fp16), ("bf16", run.optim.bf16 is True)):  # for a config without the section
            if given:
                config.setdefault(name, {})["enabled"] = True
        check_batch_sizes(config, world_size(), run.optim.micro_batch_size, run.optim.gradient_accumulation_steps, run.deepspeed)
        lr_scheduler = None
        if config.get("scheduler", {}).get("type") in REPLACED_SCHEDULERS:
            scheduler = config.pop("scheduler")
            cosine = scheduler["type"] == "WarmupCosineLR"
            lr_scheduler = partial(warmup_schedule, warmup=run.optim.warmup_steps,
                                   total=self.total_steps if cosine or run.optim.lr_decay else None,
                                   cosine_min_ratio=cosine_min_ratio(scheduler) if cosine else None)
        if run.logging.tensorboard:
            config.setdefault("tensorboard", {"enabled": True, "output_path": str(self.out / "tensorboard"), "job_name": "train"})
        if run.logging.csv:
            config.setdefault("csv_monitor", {"enabled": True, "output_path": str(self.out / "csv"), "job_name": "train"})
        return config, lr_scheduler

    def _build_engine(self, config: dict, lr_scheduler):
        if rank() == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "ds_config.json").write_text(json.dumps(config, indent=2) + "\n")
            zero = (config.get("zero_optimization") or {}).get("stage", 0)
            if enabled(config, "bf16") and zero == 0 and "data_types" not in config:
                logger.warning("bf16 under ZeRO stage 0: DeepSpeed keeps no fp32 master weights there (its optimizer updates "
                               "the bf16 weights, and trains differently from ZeRO 1-3); use ZeRO 1 or more for bf16 training")
            if enabled(config, "fp16") and zero == 0:
                logger.warning("fp16 under ZeRO stage 0: DeepSpeed's fp32 master weights there are not in what it saves for "
                               "export, so exported/ holds the fp16 copies; use ZeRO 1 or more for fp16 training")
        engine, *_ = initialize(self.model, config, lr_scheduler=lr_scheduler)
        return engine

    # ---- training ---------------------------------------------------------------------------
    def train(self) -> dict:
        if self.complete is not None:
            logger.info("the run was already complete at step %d (%s): nothing to do; delete it to export and evaluate "
                        "again", self.complete["step"], self.out / RUN_COMPLETE)
            results = self.out / "eval_results.json"
            return json.loads(results.read_text()) if results.is_file() else {}
        run = self.run
        epoch, position = 0, 0
        if self.resume:  # its resume.json was checked in __init__; an older checkpoint's data plan is checked here
            state = self.store.load(self.engine, check=self.state.check)
            self.step, epoch, position = state["step"], state["epoch"], state["position"]
            logger.info("resumed from step %d", self.step)
            old_lr = self.state.apply_new_lr(self.engine)
            if old_lr is not None and rank() == 0:
                logger.warning("resuming with --lr %g (the checkpoint's run used %g)", self.state.lr, old_lr)
            if rank() == 0:  # a crashed run's lines after its last checkpoint are about to be trained again
                forget_metrics_after(self.out, self.step, self.engine.global_samples, getattr(self.engine.monitor, "csv_monitor", None))
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=rank() != 0, dynamic_ncols=True)
        metrics_file = self.out / "metrics.jsonl"
        with StopSignals() as stop:  # SIGTERM: finish the step, save, exit (stop_signals.py)
            while self.step < self.total_steps:
                steps = self.plan.epoch(epoch, rank())
                while position < len(steps) and self.step < self.total_steps:
                    record = self._train_step([data_lib.collate([self.train_rows[i] for i in batch], self.tokenizer.pad_token_id) for batch in steps[position]])
                    position += 1
                    self.step += 1
                    if rank() == 0 and self.step % run.logging.logging_steps == 0:
                        with metrics_file.open("a") as handle:
                            handle.write(json.dumps(record) + "\n")
                        self.engine.monitor.write_events([(f"train/{k}", v, self.step) for k, v in record.items() if k != "step" and v is not None])
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", doc_tokens=record["doc_tokens"])
                    if position == len(steps):
                        epoch, position = epoch + 1, 0
                    # evaluate, then save: a run stopped during the evaluation resumes before it and redoes
                    # it (saved first, the resumed run would start after it and skip it for good)
                    if run.eval.eval_steps and self.step % run.eval.eval_steps == 0 and self.step < self.total_steps:
                        self.evaluate(f"step{self.step}")
                    if run.checkpoint.save_steps and self.step % run.checkpoint.save_steps == 0:
                        self.store.save(self.engine, self.step, self._client_state(epoch, position), self.state.sidecar())
                    if stop.requested():
                        self._stop_for(stop, epoch, position, bar)
                    if position == 0:
                        break  # a new epoch: new document order
            bar.close()
            self._save_unless_saved(epoch, position)
        if deepspeed.comm.comms_logger.enabled:  # the config's comms_logger: its table, which nothing else prints
            deepspeed.comm.log_summary()  # every rank: it synchronises them
        tag = self.store.latest()  # a collective (rank 0's view, broadcast): read once
        finished = self._finished(self.step, tag)
        export_hf(self.engine, self.store.root, self.out / "exported", tag=tag, tokenizer=self.tokenizer)
        results = self.evaluate("final")
        if rank() == 0:
            write_atomic(self.out / RUN_COMPLETE, json.dumps(finished) + "\n")
        return results

    def _finished(self, step: int, tag: str | None) -> dict:
        """What a finished run's outputs were made from: its last checkpoint, the length asked for
        (a larger --max_steps or --epochs trains on) and the settings of the export and the final
        evaluation (another eval file or beam width redoes them)."""
        run = self.run
        data = {k: v for k, v in asdict(run.data).items() if k != "preprocessing_num_workers"}  # how, not what
        settings = {"length": {"max_steps": run.optim.max_steps, "epochs": run.optim.epochs}, "eval": asdict(run.eval),
                    "data": data, "tokenizer": run.model.tokenizer, "lang": run.model.lang, "forced_bos_token": run.model.forced_bos_token}
        return json.loads(json.dumps({"step": step, "checkpoint": tag, **settings}, default=str))

    def _completed_at(self, tag: str) -> dict | None:
        """``run_complete.json`` where it records this run's end at checkpoint ``tag`` with these
        settings and its outputs are all still there, else None (every rank calls this together)."""
        path, recorded = self.out / RUN_COMPLETE, None
        if rank() == 0 and path.is_file() and (self.out / "exported" / "config.json").is_file():
            try:
                recorded = json.loads(path.read_text())
            except json.JSONDecodeError:  # cut short: not a record of anything
                pass
        saved = self.store.sidecar(tag) or {}  # the checkpoint's resume.json holds its step
        finished = recorded is not None and "step" in saved and recorded == self._finished(saved["step"], tag)
        return from_rank0(recorded if finished else None)

    def _stop_for(self, stop: StopSignals, epoch: int, position: int, bar) -> None:
        """A scheduler asked the run to stop: checkpoint this step (unless just saved) and exit."""
        bar.close()
        self._save_unless_saved(epoch, position)
        if rank() == 0:  # (the tag is this step's: store.latest() is a collective, not for rank 0 alone)
            logger.warning("stopped by %s after step %d: checkpoint step%08d saved; the same command with --resume auto "
                           "continues from it", stop.name(), self.step, self.step)
        raise stop.exit()

    def _save_unless_saved(self, epoch: int, position: int) -> None:
        """A checkpoint of this step, unless --save_steps has just written it."""
        if self.store.latest() != f"step{self.step:08d}":
            self.store.save(self.engine, self.step, self._client_state(epoch, position), self.state.sidecar())

    def _data_plan(self) -> dict:
        """What the document order and the place in an epoch depend on."""
        optim = self.run.optim
        return {"ranks": world_size(), "micro_batch_size": optim.micro_batch_size,
                "gradient_accumulation_steps": optim.gradient_accumulation_steps, "seed": optim.seed,
                "documents": len(self.train_rows)}

    def _client_state(self, epoch: int, position: int) -> dict:
        return {"step": self.step, "epoch": epoch, "position": position, "data_plan": self.state.data_plan}

    def _train_step(self, micro_batches: list[dict]) -> dict:
        started = time.perf_counter()
        lr = self.engine.get_lr()[0]  # the rate this step uses (after it, the scheduler has moved on)
        skipped, scale = self.engine.skipped_steps, self._loss_scale()  # the scale this step's backward uses
        try:
            if injected_fault("out_of_memory", self.step + 1):  # tests only: what a device's allocator raises
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            summed, label_tokens, doc_tokens, norm = train_step(
                self.engine, micro_batches, check=self._stop_unless_finite, nan_fault=injected_fault("nan_loss", self.step + 1),
                kill_fault=injected_fault("kill_mid_step", self.step + 1))
        except torch.OutOfMemoryError as error:
            longest = max(int(row.sum()) for batch in micro_batches for row in batch["attention_mask"])
            raise torch.OutOfMemoryError(out_of_memory_advice(error, self.engine.module.cached_config, longest, self.step + 1)) from error
        elapsed = time.perf_counter() - started
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        row = {"step": self.step + 1, "loss": summed / label_tokens, "lr": lr,
               "grad_norm": None if norm is None else float(norm), "tokens_per_s": doc_tokens / elapsed,
               "peak_mem_gib": peak_memory_gib(), "doc_tokens": int(doc_tokens)}
        if scale is not None:  # fp16: an overflow skips the update and lowers the scale (DeepSpeed logs "OVERFLOW!")
            row.update(loss_scale=scale, skipped=self.engine.skipped_steps > skipped)
        return row

    def _loss_scale(self) -> float | None:
        """fp16's current loss scale, read as DeepSpeed's own monitor reads it; None otherwise."""
        return float(self.engine._get_optimizer_loss_scale()) if self.engine.fp16_enabled() else None

    def _stop_unless_finite(self, loss: torch.Tensor) -> None:
        bad = all_reduce_sum(0.0 if torch.isfinite(loss).item() else 1.0)
        if bad:
            latest = self.store.latest()
            kept = f"the last good checkpoint is {self.store.root / latest}" if latest else "no checkpoint was saved yet"
            raise FloatingPointError(f"loss is not finite at step {self.step + 1}: stopping; {kept} (lower --lr or check the data)")

    # ---- evaluation -------------------------------------------------------------------------
    def evaluate(self, name: str) -> dict:
        """Summaries of the held-out documents (sharded over ranks), ROUGE on rank 0."""
        if not self.eval_rows:
            return {}
        if injected_fault("kill_during_eval", self.step):  # tests only: a run stopped mid-evaluation
            os.kill(os.getpid(), signal.SIGKILL)
        mine, padded = shard(rank(), world_size(), len(self.eval_rows))
        stage3 = self.engine.zero_optimization_stage() == 3 and world_size() > 1
        bar = tqdm(total=len(padded), desc=f"eval {name}", disable=rank() != 0)
        texts = summarize(self.engine.module, self.tokenizer, data_lib.ColumnOf(self.eval_rows, padded, "input_ids"),
                          **self.generation, synced_gpus=stage3, progress=_ReportingProgress(bar))
        pairs = list(zip(mine, texts))
        gathered = [None] * world_size()
        # Ranks end their summaries at different times (documents and summaries of different
        # lengths), and then wait for rank 0's ROUGE: both waits can outlast the process group's
        # timeout, so they wait at a patient barrier, not in a collective; a rank that reports
        # no summary for an hour is taken for dead there (where the launcher does not end the job)
        patient_barrier("evaluation-summaries", stall=SUMMARY_STALL)
        if dist.is_initialized():
            dist.all_gather_object(gathered, pairs)
        else:
            gathered = [pairs]
        if rank() != 0:
            patient_barrier("evaluation-scores")
            return {}
        predictions = dict(p for part in gathered for p in part)
        order = sorted(predictions)
        references = [str(self.eval_rows[i]["reference"]) for i in order]
        scores = rouge([predictions[i] for i in order], references)
        # "index": the document's row in the eval file or split (rows skipped as empty keep their numbers)
        write_atomic(self.out / f"predictions_{name}.jsonl", "".join(
            json.dumps({"index": int(self.eval_rows[i][data_lib.ROW]), "prediction": predictions[i], "reference": ref},
                       ensure_ascii=False) + "\n" for i, ref in zip(order, references)))
        results = json.dumps(scores, indent=2) + "\n"
        write_atomic(self.out / f"eval_results_{name}.json", results)
        if name == "final":
            write_atomic(self.out / "eval_results.json", results)
        self.engine.monitor.write_events([(f"eval/{k}", v, self.step) for k, v in scores.items()])
        logger.info("eval %s: %s", name, " ".join(f"{k}={v:.2f}" for k, v in scores.items()))
        patient_barrier("evaluation-scores")
        return scores

