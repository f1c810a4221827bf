"""CachED inside a DeepSpeed engine: ZeRO 0–3, offload, bf16, gradient accumulation.

    config = resolve_auto(load_config("ds_configs/zero3.json"), auto_values(...))  # as launchers/train.py does
    engine, optimizer, _, scheduler = initialize(hf_model, config)
    for batch in batches:                      # input_ids, attention_mask, labels
        loss = engine(**batch).loss
        engine.backward(loss)                  # one CachED step: decoder, then window groups
        engine.step()

Settings come from the config's ``"cached"`` section (``CachedConfig`` fields plus the engine's
own ``keep_encoder_gathered`` and ``keep_decoder_gathered``); unknown keys are errors.

Why ZeRO needs no patch (docs/engine.md has the long version): DeepSpeed reduces a parameter's
gradient from a hook that fires when autograd accumulates it into ``.grad``
(``register_post_accumulate_grad_hook``, ``deepspeed/utils/torch.py``). A naive CachED, one nested
backward per window group, fires it once per group: ZeRO-2 asserts "Gradient computed twice for
this partition", ZeRO-3 breaks its IPG bucket. ``cached_encoder.CachedEncoderFunction`` instead
takes every group but the last through ``torch.autograd.grad`` (no ``.grad``, no hook) and folds
their fp32 sums into the last group's backward, so each hook fires once per micro-batch and
DeepSpeed reduces once, as for any model. ``engine.coalesce_grad_reduction()`` does not fit this
job: it rejects ZeRO-0 and the BF16_Optimizer wrapper (ZeRO-1 + bf16 with fp32 accumulation),
allows one block per optimizer step, and holds every unreduced gradient until the block ends.

What remains engine-specific lives here: ranks agree on the number of window groups under
ZeRO-3 (its parameter all-gathers follow the encoder calls), DeepSpeed activation checkpointing
for the decoder, and keeping the encoder and the decoder gathered under ZeRO-3
(``keep_encoder_gathered``, ``keep_decoder_gathered``).
"""

from __future__ import annotations

import os
import shutil
import signal
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import deepspeed
import pydantic
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from torch import nn

from . import families
from .checkpoints import injected_fault
from .config import CachedConfig
from .distributed import barrier, init_process_group, max_over_ranks, patient_barrier, rank, world_size
from .ds_config import load_config, reuse_distance, unresolved_auto
from .ds_schema import check_sections, deepspeed_schema_error
from .longt5_attention import TRANSIENT_GLOBAL_NEEDS_GATHERED, has_transient_global_attention
from .model import CachedSeq2Seq
from .streaming_cross_attention import StreamingCrossAttention, has_streaming_cross_attention

ENGINE_KEYS = ("keep_encoder_gathered", "keep_decoder_gathered")


@dataclass(frozen=True)
class EngineSettings:
    """The ``"cached"`` section: the core's ``CachedConfig`` and what only the engine uses.

    keep_encoder_gathered: ZeRO-3 only. Gather the encoder's parameters once for the no-grad
        pass and once for the recompute instead of once per window group: all-gathers stop
        growing with the document, at the cost of the whole encoder's parameters on every rank
        while it runs (about 2 bytes × encoder parameters in bf16: 0.4 GB for BART-large).
    keep_decoder_gathered: ZeRO-3 only. Gather the decoder's and the LM head's parameters once
        per micro-batch, from the decoder's forward to the end of its backward, instead of per
        submodule in the forward, the checkpointing recompute and the backward; costs their
        parameters on every rank for that time (0.8 GB for LongT5-large's decoder in bf16).
    """

    cached: CachedConfig
    keep_encoder_gathered: bool = False
    keep_decoder_gathered: bool = False

    @classmethod
    def from_section(cls, section: dict | None) -> EngineSettings:
        if section is not None and not isinstance(section, dict):
            raise ValueError(f'the "cached" section must be a JSON object, got {type(section).__name__}')
        section = dict(section or {})
        known = {f.name for f in fields(CachedConfig)} | set(ENGINE_KEYS)
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f'unknown keys {unknown} in the "cached" section; valid keys are {sorted(known)}')
        engine_values = {key: section.pop(key, False) for key in ENGINE_KEYS}
        for key, value in engine_values.items():
            if not isinstance(value, bool):
                raise ValueError(f'"cached.{key}" must be true or false, got {value!r}')
        return cls(CachedConfig.from_dict(section), **engine_values)


def initialize(model: nn.Module, config: str | Path | dict, model_parameters=None, **kwargs):
    """``deepspeed.initialize`` for an HF encoder–decoder trained with CachED.

    Returns DeepSpeed's ``(engine, optimizer, dataloader, lr_scheduler)``; ``engine.module`` is
    the ``CachedSeq2Seq`` wrapper and ``engine.module.model`` the HF model. ``config`` has no
    ``"auto"`` left: HF's Trainer fills those from its arguments, and here that is
    ``ds_config.resolve_auto`` with ``ds_config.auto_values`` (the launcher's flags)."""
    source = repr(str(config)) if isinstance(config, (str, Path)) else "the DeepSpeed config"
    config = load_config(config)
    check_sections(config, source)  # DeepSpeed's own schema, with the field's path in the file
    auto = unresolved_auto(config)
    if auto:  # DeepSpeed would fail on them later with "'>' not supported between 'str' and 'int'"
        raise ValueError(
            f'the DeepSpeed config still has "auto" in {auto}; resolve them first with '
            "cached_ds.ds_config.resolve_auto(config, auto_values(micro_batch_size=..., lr=..., ...)) "
            "as launchers/train.py does, or write numbers there"
        )
    settings = EngineSettings.from_section(config.pop("cached", None))
    # Under plain ``python`` (no launcher env) deepspeed.initialize would look for MPI (mpi4py):
    # a one-rank group on a free port instead, as launchers/train.py makes.
    init_process_group()
    zero = config.get("zero_optimization") or {}
    _check_zero3_settings(model, settings, zero.get("stage", 0))  # before ZeRO-3 partitions the model in place
    wrapped = CachedSeq2Seq(model, settings.cached)
    if zero.get("stage") == 3:
        zero.setdefault("stage3_max_reuse_distance", reuse_distance(model.config.d_model))  # not 1e9: see reuse_distance
        _gather_streaming_modules_whole(wrapped.model)
    if model_parameters is None:
        model_parameters = [p for p in wrapped.parameters() if p.requires_grad]
    try:
        engine, optimizer, dataloader, scheduler = deepspeed.initialize(
            model=wrapped, config=config, model_parameters=model_parameters, **kwargs
        )
    except pydantic.ValidationError as error:  # a section of DeepSpeed's schema: name the field, not pydantic's frames
        raise deepspeed_schema_error(error, source) from None
    attach(engine, settings)
    return engine, optimizer, dataloader, scheduler


def _check_zero3_settings(model: nn.Module, settings: EngineSettings, stage: int) -> None:
    if stage != 3 or settings.keep_encoder_gathered:
        return
    if settings.cached.keep_graphs_bytes:
        # Kept encoder graphs hold the parameters autograd saved in the forward; ZeRO-3 releases
        # them (empty partitions) when the forward's encoder pass ends, unless the encoder is
        # kept gathered, which then stays gathered from the forward to the backward.
        raise ValueError(
            '"cached.keep_graphs_bytes" under ZeRO-3 needs "cached.keep_encoder_gathered": true '
            "(the encoder's parameters resident from forward to backward); set it, or remove keep_graphs_bytes"
        )
    if world_size() > 1 and has_transient_global_attention(model):
        raise ValueError(TRANSIENT_GLOBAL_NEEDS_GATHERED)


def attach(engine, settings: EngineSettings) -> None:
    """Adapt an initialised engine whose module is a ``CachedSeq2Seq`` to its ZeRO stage."""
    wrapped: CachedSeq2Seq = engine.module
    stage = engine.zero_optimization_stage()
    for key in ENGINE_KEYS:
        if getattr(settings, key) and stage != 3:
            raise ValueError(f'"cached.{key}" needs ZeRO stage 3 (this config has stage {stage}); remove it')
    if stage == 3:
        _linear_as_configured(engine)
        _check_zero3_model(wrapped.model)
        _no_zero_gradients_through_decoder_hooks(wrapped.model)
        if world_size() > 1:
            wrapped.sync_group_count = max_over_ranks
        hook_ids, settle = _zero3_module_hook_ids(engine), _prefetch_settler(engine)
        if settings.keep_encoder_gathered:
            wrapped.encoder_scope = _encoder_gathered(wrapped.model, hook_ids, settle).scope
        if settings.keep_decoder_gathered:
            wrapped.decoder_scope = _decoder_gathered(wrapped.model, hook_ids, settle).scope
    # DeepSpeed's section has no on/off switch: a non-empty section asks for checkpointing.
    checkpointing = engine.config.get("activation_checkpointing")
    if checkpointing and checkpointing.get("partition_activations"):
        # Its backward rebuilds a layer's arguments from (tensor, size) pairs and loses count
        # with the None arguments HF's decoder layers take: "got multiple values for argument
        # 'encoder_attention_mask'" (checkpointing.py, get_partitioned_activations_for_backward).
        raise ValueError(
            '"activation_checkpointing.partition_activations" splits activations across model-parallel ranks '
            "(Megatron) and breaks on HF's decoder layers; set it false (cpu_checkpointing works without it)"
        )
    if checkpointing and settings.cached.fast_t5_attention:
        # The fast layers hand a non-tensor position bias (t5_attention.OffsetBias) from layer to
        # layer; DeepSpeed's reentrant checkpoint builds it without autograd in layer 0 and the
        # other layers' share of its gradient is lost (decoder position bias off by ~90%).
        raise ValueError(
            '"activation_checkpointing" (DeepSpeed\'s checkpointing of the decoder) is not exact with '
            '"cached.fast_t5_attention"; remove the section and set "cached.decoder_gradient_checkpointing": true '
            "(torch's non-reentrant checkpointing, exact with it)"
        )
    if checkpointing:
        _use_deepspeed_checkpointing(engine, wrapped.model)
        if checkpointing.get("cpu_checkpointing") and has_streaming_cross_attention(wrapped.model):
            wrapped.cached_config.offload_gradient_cache = True  # activations to the host: the gradient cache too


def _linear_as_configured(engine) -> None:
    """ZeRO-3's ``memory_efficient_linear`` (DeepSpeed's default: true) replaces
    ``torch.nn.functional.linear`` for the whole process with a Python autograd Function
    (``deepspeed/runtime/zero/linear.py``) that saves the parameter instead of torch's view of
    its gathered storage, so ZeRO-3 can free that storage between forward and backward
    (deepspeedai/DeepSpeed#8189 turned it on for models built outside ``zero.Init``, as ours
    are). It costs a Python call per linear in forward and backward and, for 3-D inputs, its
    bias as a separate kernel over the whole output. Outside DeepCompile nothing puts torch's
    function back ("This will persist unless manually reset", ``partition_parameters.py``), so
    an engine configured with false, built after one with true in the same process, would still
    run the wrapper: here torch's own is restored when this engine's config says false. The
    setting is process-wide either way: an earlier engine that asked for the wrapper loses it
    (more memory, same gradients). Only DeepSpeed's wrapper is undone, no other patch."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    wrapped = torch.nn.functional.linear is zero3_linear_wrap
    if wrapped and original is not None and not engine._config.zero_config.memory_efficient_linear:
        torch.nn.functional.linear = original


def _encoder_gathered(model: nn.Module, zero3_hook_ids: frozenset[int], settle) -> _GatheredModules:
    """ZeRO-3: gather the encoder's parameters once for a whole pass over the window groups and
    pin them (``ds_persist``, which ZeRO-3's release logic honours) until the pass ends.

    While they are pinned, ZeRO-3's module hooks inside the encoder (fetch, trace, release:
    four per submodule, ``zero3_hook_ids``) have nothing to do but cost time: about 200 Python
    hook calls per encoder call for BART-large, once per window group, which left an H100 idle
    (CachED's no-grad encode 3.3x slower than HF's one-batch encoder on the same tokens,
    bench/results/2026-11-27-*). They are taken off for the pass and put back, in order, after.
    Gradient reduction is unaffected: it hangs on the parameters, not on the modules.

    The shared embedding stays with ZeRO-3's own handling: the decoder uses it too. Holds are
    counted, not nested: under a ``keep_graphs_bytes`` budget the core keeps a forward's scope
    open until its backward (or until its graph is freed), so scopes of different steps can end
    in any order; the encoder is released when the last one ends."""
    encoder, embedding = model.get_encoder(), families.input_embedding(model)
    # the encoder module's own hooks too (it holds no parameters of its own): called once per
    # window group, they cost ~0.25 ms of host time each, and their entries in ZeRO-3's module
    # trace change with the group count, which on real data (every document its own length)
    # invalidated the trace every step and ran its cross-rank checks (``reset_step``)
    return _GatheredModules([m for m in encoder.modules() if m is not embedding], embedding, zero3_hook_ids, settle)


def _decoder_gathered(model: nn.Module, zero3_hook_ids: frozenset[int], settle) -> _GatheredModules:
    """ZeRO-3: the same for the decoder and an untied LM head, held by the core from the
    decoder's forward to the end of its backward (``held_scope``): one flat all-gather per
    micro-batch instead of one per submodule in the forward, again in decoder checkpointing's
    recompute and again in the backward, and none of ZeRO-3's hooks on those submodules. With
    the hooks lifted nothing would gather the parameters for the backward, so they stay until it
    is over. The shared embedding (a tied LM head too) again stays with ZeRO-3."""
    decoder, embedding = model.get_decoder(), families.input_embedding(model)
    modules = [m for m in decoder.modules() if m is not embedding]
    head = model.get_output_embeddings()
    if head is not None and all(p is not q for p in head.parameters() for q in embedding.parameters()):
        modules.append(head)
    return _GatheredModules(modules, embedding, zero3_hook_ids, settle)


def _prefetch_settler(engine):
    """Waits out and releases ZeRO-3's in-flight prefetches (``_clean_inflight_param_registry``,
    what its own ``reset_step`` does). A prefetch issued where the module trace came from another
    pass (``generate`` in an evaluation, outside the engine's forward) can be in flight for a
    parameter a scope is about to pin; ZeRO-3 later releases it when the prefetch is cleaned,
    without looking at ``ds_persist``, so a pinned decoder parameter was empty in the backward
    ("size of tensor a (0) must match", the first step after an evaluation)."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    coordinator = offload.get_param_coordinator() if offload is not None else None
    return getattr(coordinator, "_clean_inflight_param_registry", None)


class _GatheredModules:
    """The parameters of ``modules`` gathered and pinned, and ZeRO-3's module hooks on them
    lifted, while ``holders`` > 0 (``scope``). Built outside any forward: there, reading a
    partitioned parameter as an attribute registers it with the running module (ZeRO-3's
    external parameters), which then releases it, pinned or not, when its own forward ends."""

    def __init__(self, modules: list[nn.Module], embedding: nn.Module, zero3_hook_ids: frozenset[int], settle=None):
        shared = {id(p) for p in embedding.parameters()}
        params = {id(p): p for m in modules for p in m.parameters(recurse=False) if id(p) not in shared}
        self.params, self.inner = list(params.values()), modules
        self.hook_ids, self.holders, self._hooks, self.settle = zero3_hook_ids, 0, None, settle

    @contextmanager
    def scope(self):
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def acquire(self) -> None:
        self.holders += 1
        if self.holders > 1:
            return
        if self.settle is not None and any(p.ds_status == ZeroParamStatus.INFLIGHT for p in self.params):
            self.settle()  # ZeRO-3 would release these later, pinned or not (_prefetch_settler)
        for p in self.params:
            p.ds_persist = True
        # As ZeRO-3's own fetch does: one flat all-gather for all of them (``all_gather`` would
        # issue one collective per parameter), of those not already there.
        missing = [p for p in self.params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if missing:
            missing[0].all_gather_coalesced(missing).wait()
        self._hooks = _hooks_removed(self.inner, self.hook_ids)
        self._hooks.__enter__()

    def release(self) -> None:
        self.holders -= 1
        if self.holders:
            return
        self._hooks.__exit__(None, None, None)
        for p in self.params:
            p.ds_persist = False
        idle = [p for p in self.params if not p.ds_active_sub_modules]  # modules mid-backward release their own
        if idle:
            idle[0].partition(param_list=idle)


def _zero3_module_hook_ids(engine) -> frozenset[int]:
    """Ids of the forward hooks ZeRO-3 put on every module (``DeepSpeedZeRoOffload``)."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    handles = [*getattr(offload, "forward_hooks", ()), *getattr(offload, "backward_hooks", ())]
    return frozenset(handle.id for handle in handles)


@contextmanager
def _hooks_removed(modules: list[nn.Module], hook_ids: frozenset[int]):
    saved = []
    for module in modules:
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            if any(i in hook_ids for i in hooks):
                saved.append((hooks, dict(hooks)))
                for i in [i for i in hooks if i in hook_ids]:
                    del hooks[i]
    try:
        yield
    finally:
        for hooks, original in saved:
            added = {i: fn for i, fn in hooks.items() if i not in original}
            hooks.clear()
            hooks.update(original)
            hooks.update(added)


def _no_zero_gradients_through_decoder_hooks(model: nn.Module) -> None:
    """ZeRO-3 passes every positional input of every module through an autograd Function of its
    own (``module.post_bwd_fn``, ``deepspeed/runtime/zero/parameter_offload.py``), and HF hands
    each decoder layer the encoder states positionally. Streaming cross-attention gives the
    states no autograd gradient (its gradient sink takes it), but autograd fills a missing
    gradient with zeros before calling a Python Function's backward: an N-sized zero tensor per
    layer, summed into another, where the design keeps nothing N-sized but the states and the
    sink. Each decoder module's Function is swapped for a subclass that passes ``None`` on."""
    for module in model.get_decoder().modules():
        function = module.__dict__.get("post_bwd_fn")
        if function is not None and not getattr(function, "passes_missing_gradients", False):
            module.post_bwd_fn = _passing_missing_gradients(function)


def _passing_missing_gradients(function: type) -> type:
    class PassingMissingGradients(function):
        passes_missing_gradients = True

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.set_materialize_grads(False)  # DeepSpeed's backward returns what it is given: None stays None
            function.setup_context(ctx, inputs, output)

    return PassingMissingGradients


def _gather_streaming_modules_whole(model: nn.Module) -> None:
    """Streaming cross-attention reads its K/V projection weights block by block inside its own
    forward and backward, not through the projections' ``nn.Linear`` calls, where ZeRO-3 would
    gather them. As ZeRO-3 leaf modules (set before ``deepspeed.initialize`` registers its
    hooks) they get all their parameters gathered around their forward and their backward.

    ZeRO-3 reduces a leaf module's gradients from a full backward hook (stage3.py,
    ``reduce_leaf_module_grads``), which torch fires once the gradients of the module's
    *positional* tensor inputs are computed. mBART, PEGASUS, M2M100, BlenderBot... call the
    cross-attention with keywords only: the hook then fired as soon as the output's gradient
    arrived, reduced zeros, and the projections' gradients came after it (the optimizer never saw
    them). A pre-hook passes ``hidden_states`` positionally, as BART's layers do."""
    from deepspeed.utils import set_z3_leaf_module

    for module in model.modules():
        if isinstance(module, StreamingCrossAttention):
            set_z3_leaf_module(module, True)
            if not getattr(module, "_cached_ds_positional_query", False):
                module.register_forward_pre_hook(_query_positional, with_kwargs=True)
                module._cached_ds_positional_query = True


def _query_positional(module: nn.Module, args: tuple, kwargs: dict):
    """``hidden_states=`` becomes the first positional argument (see above)."""
    if args or "hidden_states" not in kwargs:
        return None
    kwargs = dict(kwargs)
    return (kwargs.pop("hidden_states"),), kwargs


def _check_zero3_model(model: nn.Module) -> None:
    layerdrop = getattr(model.config, "encoder_layerdrop", 0.0) or 0.0
    if layerdrop > 0:
        # A layer skipped by the last group would need its gradient delivered outside any module
        # forward, where ZeRO-3 holds the parameter as an empty partition.
        raise ValueError(f"encoder_layerdrop={layerdrop} is not supported under ZeRO-3; set model.config.encoder_layerdrop = 0")


def _use_deepspeed_checkpointing(engine, model: nn.Module) -> None:
    """Decoder layers checkpointed by ``deepspeed.checkpointing`` (partitioning, CPU checkpointing,
    as the section says); it saves and restores the RNG, so gradients stay exact."""
    deepspeed.checkpointing.configure(None, deepspeed_config=engine.config)
    for module in model.get_decoder().modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = _checkpoint_layer


def _checkpoint_layer(function, *args):
    """``deepspeed.checkpointing.checkpoint`` for one HF decoder layer, whose first argument is
    its own input and the rest (encoder states, masks) are shared with every other layer.

    With ``cpu_checkpointing`` DeepSpeed empties each checkpointed input's storage once the
    layer's forward has run (``arg.data = torch.empty([])`` in ``get_cpu_activations_for_backward``
    and, on GPUs, ``get_offloaded_activations_for_backward``), as Megatron's layers allow: there
    an input belongs to one layer. Here the second layer then read emptied encoder states ("both
    arguments to linear need to be at least 1D" in HF's cross-attention, an IndexError in
    streaming cross-attention), on DeepSpeed's CPU accelerator and, by the same code, on GPUs.
    The shared inputs are flagged ``no_checkpointing``, which ``is_activation_to_checkpoint``
    honours: DeepSpeed keeps them as they are (they stay alive for the other layers anyway, and
    copying N-sized encoder states to the host once per layer would cost N × layers).

    Where DeepSpeed has no offload engine (its CPU accelerator: the blocking path) the layer's
    own input is flagged too: activations are in host memory already, and that path loses it
    (its copy "to the CPU" of a CPU tensor is the tensor itself, which it then empties:
    ``get_cpu_activations_for_backward``)."""
    from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing

    blocking = ds_checkpointing._get_cpu_offload_engine() is None  # the path DeepSpeed's forward will take
    for arg in args if blocking else args[1:]:
        if torch.is_tensor(arg):
            arg.no_checkpointing = True
    return deepspeed.checkpointing.checkpoint(function, *args)


def export_hf(engine, checkpoint_dir: str | Path, output_dir: str | Path, tag: str | None = None, tokenizer=None) -> Path:
    """Write an HF folder (``from_pretrained`` loads it) from a checkpoint saved by
    ``engine.save_checkpoint(checkpoint_dir)``, plus ``cached_config.json`` (window, groups) so
    inference uses the same windows. Call on every rank; rank 0 consolidates and writes.

    Weights come from ``zero_to_fp32`` for ZeRO 1–3 (fp32 master weights); it rejects stage-0
    checkpoints, whose module weights are the full weights, so stage 0 exports them directly, and
    so does DeepSpeed's BF16_Optimizer (bf16 with ``data_types.grad_accum_dtype`` fp32 under
    ZeRO 0–1), whose checkpoints it does not read ("... is not a zero checkpoint", after the whole
    run had trained): its module holds every weight, in bf16."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    output_dir = Path(output_dir)
    wrapped: CachedSeq2Seq = engine.module
    if engine.zero_optimization_stage() == 0 or type(engine.optimizer).__name__ == "BF16_Optimizer":
        state = {k: v.detach().float().clone() for k, v in wrapped.model.state_dict().items()}
    else:
        barrier()  # every rank's shard is on disk
        state = None
        if rank() == 0:  # it reads every rank's shards: once per job, not once per rank (host memory)
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
            state = {k.removeprefix("model."): v for k, v in state.items()}
    if rank() == 0:
        # written beside it, then swapped in: a run stopped mid-export leaves the earlier folder
        # (or none), never weights without their tokenizer that look complete
        staging, old = output_dir.with_name(output_dir.name + ".partial"), output_dir.with_name(output_dir.name + ".old")
        for leftover in (staging, old):
            shutil.rmtree(leftover, ignore_errors=True)
        staging.mkdir(parents=True)
        wrapped.save_pretrained(staging, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if injected_fault("kill_during_export", 0):  # tests only
            os.kill(os.getpid(), signal.SIGKILL)
        if output_dir.exists():
            output_dir.rename(old)
        staging.rename(output_dir)
        shutil.rmtree(old, ignore_errors=True)
    patient_barrier("export")  # rank 0's reading of every shard can outlast the process group's timeout (large models)
    return output_dir
