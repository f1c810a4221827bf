"""CachED's encoder pass as one autograd Function (Saxena, Tang & Keller, TACL 2025).

The steps, as in GradCache's ``grad_cache.py``:

1. ``WindowPlan`` splits the documents into windows and window groups (``windows.py``).
2. ``forward``: encode every group without autograd, remembering its RNG and autocast state,
   and fuse the outputs into one (batch, tokens, hidden) tensor for the decoder. Under a memory
   budget (``GroupSchedule.keep_bytes``) the leading groups run with autograd instead and keep
   their graphs until backward, as many as fit.
3. The caller runs the decoder and ``loss.backward()``; d(loss)/d(fused states) is the gradient
   cache. The fused states carry a ``GradientSink``: decoder layers that know it (streaming
   cross-attention) add their share into its fp32 buffer out of band; autograd hands us the rest
   (layers that ran HF's module), and the two are summed in fp32.
4. ``backward``: re-encode group by group *with* autograd, replaying each group's RNG state (same
   dropout masks) and autocast state (a kept group uses its forward graph instead), push the
   group's slice of the gradient cache through it, and sum the encoder's parameter gradients of
   every group but one in fp32 (``torch.autograd.grad``: no ``.grad`` written). A hook on each
   parameter adds its sum into that last group's nested backward, so every parameter's
   ``.grad`` is written exactly once per backward — whatever engine hooks sit on it fire once,
   not once per group.

Encoder activation memory is one window group, whatever the document length, plus the budget for
kept graphs: a document whose groups all fit costs what full backprop costs, with no recompute.
With ``offload_states``/``offload_cache`` the fused states and the gradient cache live in host
memory and come and go group by group, overlapped with the compute (``host_offload.py``).
The token embedding weight is an input too: its encoder share comes back from the recompute and
autograd adds it to the decoder's and the LM head's shares (the tied embedding gets all three).

No DeepSpeed, logging or CLI in here: engines integrate by wrapping ``loss.backward()``.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.profiler import record_function

from . import families
from .fused_states import FusedStates, fuse
from .gradient_sink import GradientSink, attach
from .held_scope import HeldScope, closed_after_backward
from .host_offload import mark_offloaded, to_device
from .memory import SavedBytesCounter
from .windows import WindowGroup, WindowPlan


@dataclass(frozen=True)
class RngState:
    """The generator state dropout reads: CPU always, plus the accelerator's when the data is on one."""

    cpu: torch.Tensor
    device_type: str
    device: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        accelerator = None if device.type == "cpu" else getattr(torch, device.type)
        return cls(torch.get_rng_state(), device.type, accelerator.get_rng_state(device) if accelerator else None)

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            getattr(torch, self.device_type).set_rng_state(self.device, device)


@dataclass(frozen=True)
class AutocastState:
    """The forward's autocast settings, replayed in the recompute (as ``torch.utils.checkpoint`` does)."""

    device_type: str
    enabled: bool
    dtype: torch.dtype
    cache_enabled: bool

    @classmethod
    def capture(cls, device: torch.device) -> AutocastState:
        kind = device.type
        return cls(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind), torch.is_autocast_cache_enabled())

    def replay(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled, cache_enabled=self.cache_enabled)


@contextmanager
def replayed(rng: RngState, autocast: AutocastState, device: torch.device) -> Iterator[None]:
    """Run with a group's forward RNG and autocast state, then put the outer RNG back."""
    outer = RngState.capture(device)
    rng.restore(device)
    try:
        with torch.enable_grad(), autocast.replay():
            yield
    finally:
        outer.restore(device)


def encode_group(model: nn.Module, weight: torch.Tensor, group: WindowGroup) -> torch.Tensor:
    """One HF encoder call over a group's stacked windows (positions restart in every window).
    A plan in host memory (``windows``) has the group's ids and mask copied to the encoder's
    device here, one group's at a time, without the host waiting (``to_device``)."""
    ids, mask = (None if t is None else to_device(t, weight.device) for t in (group.input_ids, group.encoder_mask))
    embeds = families.embed(model, ids, weight)
    return model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state


def encode_plan(
    model: nn.Module,
    weight: torch.Tensor,
    plan: WindowPlan,
    rng_states: list | None = None,
    encode: Callable[[WindowGroup], torch.Tensor] | None = None,
    into: FusedStates | None = None,
) -> torch.Tensor:
    """Every group in order, fused; each group's RNG state is appended to ``rng_states``.
    Padding groups leave the dropout stream as they found it, so padding changes no mask.
    ``encode`` (default ``encode_group``) runs one group: whatever it keeps, it draws the same
    dropout masks, so the stream later groups see does not depend on it. ``into``: outputs that
    need no autograd are written there group by group and dropped (``FusedStates``), instead of
    all being held for ``fuse``, which autograd can differentiate (``full`` mode)."""
    encode = encode or partial(encode_group, model, weight)
    outputs = []
    for group in plan.groups:
        rng = RngState.capture(weight.device)
        if rng_states is not None:
            rng_states.append(rng)
        output = encode(group)
        if into is not None:
            into.add(output)
        else:
            outputs.append(output)
        if group.padding:
            rng.restore(weight.device)
    return into.result() if into is not None else fuse(plan, outputs)


@dataclass
class GroupSchedule:
    """How ``CachedEncoderFunction.backward`` gets each window group's parameter gradients.

    keep_bytes: device memory for autograd graphs kept from the forward. Groups are kept in
        order while their graphs (saved tensors and output) fit; a kept group is not recomputed,
        so when every group fits CachED costs what full backprop costs. 0: recompute every group.
    grad_dtype: dtype the per-group parameter gradients are summed in.
    offload_cache: keep the gradient cache (the N-sized fp32 buffer streaming cross-attention
        writes) in host memory; each group's slice goes to the device when its turn comes.
    offload_states: return the fused encoder states in host memory, each group's output copied
        there as it is made (only streaming cross-attention can read them: block by block).
    agree_kept: maps the number of groups this rank kept to the number every rank keeps (the
        fewest): under ZeRO-3 a recompute is a module call ZeRO-3 traces, and ranks must make the
        same calls (a short document's one-token stand-in groups are cheap to keep). None: as kept.
        The widest group (run last) may be kept on one rank and recomputed on another: each still
        makes as many encoder calls in backward, and with the encoder kept gathered, which ZeRO-3
        needs for kept graphs, that top-level call is all ZeRO-3 traces there, whatever its order.
    kept_groups, kept_bytes: what the last forward kept (written by it).
    """

    grad_dtype: torch.dtype = torch.float32
    keep_bytes: int = 0
    offload_cache: bool = False
    offload_states: bool = False
    agree_kept: Callable[[int], int] | None = None
    kept_groups: int = 0
    kept_bytes: int = 0


class CachedEncoderFunction(torch.autograd.Function):
    """forward: steps 1–2 without autograd (but for kept groups); backward: step 4.

    Inputs are ``(model, plan, schedule, scope, weight, anchor)``; ``scope()`` is entered
    around the no-grad pass and around the recompute (an engine can hold parameters there).
    The encoder's trainable parameters are *not* inputs: an engine may swap their storage between uses (ZeRO-3 keeps them as empty
    partitions outside their module's forward), and an input's shape is frozen into the graph.
    ``anchor`` is an empty tensor that needs a gradient, so autograd calls ``backward`` even when
    the embedding is frozen and the encoder is not (it would otherwise silently skip the encoder).

    The output carries a ``GradientSink`` this Function owns (``gradient_sink``): the gradient
    cache is the sink's fp32 total plus whatever autograd delivers (``None`` when every consumer
    wrote to the sink: gradients are not materialised), kept in fp32 and cast to the encoder's
    dtype one group slice at a time.

    ``schedule`` (``GroupSchedule``) sets the budget for graphs kept from the forward and the
    dtype of the sums, and gets what was kept. Kept groups are the leading ones, so backward,
    which runs the groups in order, frees them before it recomputes the first other group (but
    for the widest group's, if kept: held to the end, within the budget it was kept in).

    In ``backward`` all groups but the widest (``widest_group``) are recomputed (or taken from
    the forward) in order under ``torch.autograd.grad``, which leaves ``.grad`` and its hooks
    alone (and frees a kept graph as it goes); their parameter gradients are summed in
    ``grad_dtype``. The widest group runs last, an ordinary nested backward, and a hook on each
    parameter adds the sum to the incoming gradient: each ``.grad`` is accumulated exactly once per step, so an engine's
    gradient hooks (DeepSpeed ZeRO's reductions) fire once, not once per group. The embedding's
    encoder share is returned as ``weight``'s gradient and autograd adds it to the decoder's.
    """

    @staticmethod
    def forward(ctx, model, plan: WindowPlan, schedule: GroupSchedule, scope, weight, anchor):
        device = weight.device
        ctx.model, ctx.plan, ctx.grad_dtype, ctx.scope, ctx.device = model, plan, schedule.grad_dtype, scope, device
        ctx.autocast = AutocastState.capture(device)
        ctx.rng_states = []
        ctx.weight = weight
        ctx.sink = GradientSink(offload=schedule.offload_cache)
        ctx.set_materialize_grads(False)  # no N-sized zeros when every decoder layer used the sink
        # Kept graphs hold the parameters as the scope gave them, so under a budget the scope
        # stays open until backward (decided by the budget alone, the same on every rank).
        ctx.held = HeldScope(scope()) if schedule.keep_bytes > 0 else None
        with contextlib.nullcontext() if ctx.held else scope():
            keeper = _GraphKeeper(ctx, schedule.keep_bytes, ctx.needs_input_grad[4])  # parameters as gathered
            fused = encode_plan(model, weight, plan, ctx.rng_states, keeper, FusedStates(plan, on_host=schedule.offload_states))
        if schedule.agree_kept is not None and ctx.held:
            keeper.keep_first(schedule.agree_kept(len(keeper.kept)))
        ctx.kept = keeper.kept  # group index -> (weight leaf, output), until backward takes it
        schedule.kept_groups, schedule.kept_bytes = len(keeper.kept), keeper.bytes
        ctx.fused_shape, ctx.fused_dtype = fused.shape, fused.dtype
        if schedule.offload_states:  # for as long as the sink, which lives until this backward
            mark_offloaded(fused, owner=ctx.sink)
        return attach(fused, ctx.sink)

    @staticmethod
    def backward(ctx, grad_fused):
        _require_accumulating_backward(ctx)
        # profiler spans (cached_ds:*): what a step's backward spends before and in the recompute
        with contextlib.ExitStack() as stack:
            with record_function("cached_ds:backward:gather"):  # the engine's scope (ZeRO-3: the encoder gathered)
                stack.enter_context(ctx.scope())
            grads = CachedEncoderFunction._recompute_groups(ctx, grad_fused)
        if ctx.held:
            ctx.held.close()
        return grads

    @staticmethod
    def _recompute_groups(ctx, grad_fused):
        needs_weight = ctx.needs_input_grad[4]
        params = trainable_encoder_params(ctx.model)
        dtype = ctx.grad_dtype
        param_sums: dict[nn.Parameter, torch.Tensor] = {}
        weight_sum = None
        with record_function("cached_ds:backward:gradient_cache"):
            cache, on_host = _gradient_cache(ctx, grad_fused)  # fp32 where the decoder wrote it out of band
            grads = ctx.plan.split_gradient(cache, ctx.device, ahead=on_host)
        last = widest_group(ctx.plan)
        for index, (group, rng, grad) in enumerate(zip(ctx.plan.groups, ctx.rng_states, grads)):
            if index == last:
                held = group, rng, grad  # its slice, cut in order (a host cache streams ahead), runs last
                continue
            weight, output = _group_graph(ctx, index, group, rng, needs_weight)
            targets = [weight] * needs_weight + params
            with record_function("cached_ds:group_backward"):
                group_grads = torch.autograd.grad(output, targets, grad.to(output.dtype), allow_unused=True)
            for target, g in zip(targets, group_grads):
                if target is weight:
                    weight_sum = _accumulate(weight_sum, g, dtype)
                elif g is not None:  # None: unused by this group (LayerDrop)
                    param_sums[target] = _accumulate(param_sums.get(target), g, dtype)
        group, rng, grad = held
        weight, output = _group_graph(ctx, last, group, rng, needs_weight)
        with record_function("cached_ds:last_group_backward"):  # every encoder .grad written, and an engine's reductions
            _backward_adding(output, grad.to(output.dtype), [weight] * needs_weight + params, param_sums)
        weight_sum = _accumulate(weight_sum, weight.grad, dtype)
        return None, None, None, None, None if weight_sum is None else weight_sum.to(ctx.weight.dtype), None


def widest_group(plan: WindowPlan) -> int:
    """The group whose nested backward delivers every parameter's summed gradient: the one with
    the longest (padded) windows, the latest of those. A parameter it does not use gets its sum
    through a backward outside any module's forward, where ZeRO-3 holds it as an empty partition
    (a shape error); the widest group uses whatever a narrower one does. LongT5's
    transient-global bias, for one, is unused by windows shorter than a global block: the last
    group of a document often holds only its short final window."""
    return max(range(len(plan.groups)), key=lambda i: (plan.groups[i].input_ids.shape[-1], i))


def _require_accumulating_backward(node) -> None:
    """The encoder's parameters are not inputs of ``CachedEncoderFunction``: their gradients reach
    ``.grad`` through the nested backward, which only an ordinary ``loss.backward()`` (or an
    engine's) asks for. ``torch.autograd.grad`` would return None for them and find ``.grad``
    written anyway, and ``backward(inputs=...)`` would write parameters it did not name, so both
    are refused. Told apart by whether this backward runs the gradient accumulator of ``anchor``
    (the Function's last tensor input, a leaf of its own): an ordinary backward runs every leaf's,
    those two only their inputs'."""
    accumulator = node.next_functions[-1][0]
    # With no trainable encoder parameter (only the embedding, an input of the Function, needs a
    # gradient) the recompute writes no .grad, and autograd.grad gets the embedding's exactly.
    if (accumulator is not None and not torch._C._will_engine_execute_node(accumulator)
            and trainable_encoder_params(node.model)):
        raise RuntimeError(
            "CachED's encoder gradients are accumulated into .grad by loss.backward() (or engine.backward(loss)); "
            "torch.autograd.grad(...) and backward(inputs=...) reaching the encoder cannot return or select them, "
            "as its parameters are not inputs of the autograd graph. Call loss.backward() and read .grad (freeze "
            "parameters with requires_grad_(False) to leave them out), or use CachedConfig(mode='full'), which is "
            "ordinary backprop"
        )


def _gradient_cache(ctx, grad_fused: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """d(loss)/d(fused states): the sink's total (at least fp32) plus autograd's share, added in
    place into the total; and whether it is in host memory (an offloaded sink's). No gradient at
    all (nothing downstream depended on the states): zeros, as autograd would have materialised,
    so every encoder parameter still gets its ``.grad`` (and an engine's hooks their one call);
    one row of them, expanded, not an N-sized tensor."""
    total = ctx.sink.take()
    if total is None and grad_fused is None:
        return torch.zeros(ctx.fused_shape[-1], dtype=ctx.fused_dtype, device=ctx.device).expand(ctx.fused_shape), False
    if total is None:
        return grad_fused, False
    if grad_fused is not None:
        total += grad_fused.to(total.device)
    return total, ctx.sink.offload


def _group_graph(ctx, index: int, group: WindowGroup, rng: RngState, needs_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Group ``index``'s graph: kept from the forward, used once (a second backward through the
    same step recomputes), or recomputed now."""
    with record_function("cached_ds:recompute"):
        return ctx.kept.pop(index, None) or _recompute(ctx, group, rng, needs_weight)


def _recompute(ctx, group: WindowGroup, rng: RngState, needs_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's encoder pass again, with autograd, the same dropout masks and autocast."""
    with replayed(rng, ctx.autocast, ctx.device):
        return _encode_with_graph(ctx, group, needs_weight)


def _encode_with_graph(ctx, group: WindowGroup, needs_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's encoder pass with autograd; the embedding weight enters as a fresh leaf so its
    gradient stays apart from the decoder's."""
    with torch.enable_grad():
        weight = ctx.weight.detach().requires_grad_(needs_weight)
        return weight, encode_group(ctx.model, weight, group)


class _GraphKeeper:
    """``encode`` for the forward's ``encode_plan``: groups run with autograd, and keep their
    graph (in ``kept``), while the graphs kept so far fit ``budget`` bytes; from the first group
    that does not fit, without autograd. A group shaped like one already measured is known not
    to fit without building its graph; otherwise the graph is measured and, if it does not fit,
    dropped at once: the forward holds at most the budget plus one group. Autograd or not, a
    group draws the same dropout masks, so keeping changes neither its output nor the stream the
    next groups see."""

    def __init__(self, ctx, budget: int, needs_weight: bool):
        self.ctx, self.budget, self.needs_weight = ctx, budget, needs_weight
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sizes: dict[int, int] = {}  # each kept graph's bytes
        self.bytes = 0
        self.calls = 0
        self.open = budget > 0
        self._cost_of_shape: dict[torch.Size, int] = {}
        self._resident = {p.untyped_storage().data_ptr() for p in ctx.model.parameters()} if self.open else set()

    def __call__(self, group: WindowGroup) -> torch.Tensor:
        index, self.calls = self.calls, self.calls + 1
        shape = group.input_ids.shape
        if self.open and self.bytes + self._cost_of_shape.get(shape, 0) > self.budget:
            self.open = False
        if not self.open:
            return encode_group(self.ctx.model, self.ctx.weight, group)
        counter = SavedBytesCounter(self._resident)
        with counter.counting(self.ctx.model.get_encoder()):
            weight, output = _encode_with_graph(self.ctx, group, self.needs_weight)
        counter.add(output)  # kept too, until backward
        self._cost_of_shape[shape] = counter.bytes
        if self.bytes + counter.bytes <= self.budget:
            self.kept[index] = (weight, output)
            self.sizes[index] = counter.bytes
            self.bytes += counter.bytes
        else:
            self.open = False
        return output.detach()

    def keep_first(self, count: int) -> None:
        """Only the first ``count`` kept graphs stay (the kept groups are the leading ones)."""
        for index in sorted(self.kept)[count:]:
            del self.kept[index]
            self.bytes -= self.sizes.pop(index)


def _accumulate(total: torch.Tensor | None, grad: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if grad is None:
        return total
    return grad.to(dtype, copy=True) if total is None else total.add_(grad)


def _backward_adding(output, grad, targets, sums) -> None:
    """Nested backward of the last group, each parameter's incoming gradient getting its ``sums``
    entry added before it is accumulated into ``.grad``. Parameters the last group did not use
    (a layer dropped by LayerDrop) get their sum through a backward of their own."""
    pending = dict(sums)

    def add_sum(param, g):
        return pending.pop(param).add_(g).to(g.dtype)

    handles = [p.register_hook(lambda g, p=p: add_sum(p, g)) for p in pending]
    try:
        torch.autograd.backward(output, grad, inputs=targets)
    finally:
        for handle in handles:
            handle.remove()
    if pending:
        torch.autograd.backward(list(pending), [s.to(p.dtype) for p, s in pending.items()])


def trainable_encoder_params(model: nn.Module) -> list[nn.Parameter]:
    """Encoder parameters that need a gradient, the input embedding excluded (it is ``weight``)."""
    weight = families.input_embedding(model).weight
    return [p for p in model.get_encoder().parameters() if p.requires_grad and p is not weight]


def encode_windows(
    model: nn.Module,
    plan: WindowPlan,
    mode: str = "cached",
    schedule: GroupSchedule | None = None,
    scope=contextlib.nullcontext,
) -> torch.Tensor:
    """Fused encoder states for ``plan``.

    ``cached``: CachED (encoder memory of one group, plus ``schedule.keep_bytes`` of kept graphs);
    ``full``: ordinary backprop through every group (the baseline). Without autograd, or when
    nothing on the encoder path is trainable, the encoder runs once without a graph and no
    recompute ever happens. ``scope()`` is entered around every pass over the groups.
    """
    weight = families.input_embedding(model).weight
    params = trainable_encoder_params(model)
    if not torch.is_grad_enabled() or not (weight.requires_grad or params):
        with torch.no_grad(), scope():
            return encode_plan(model, weight, plan, into=FusedStates(plan))
    if mode == "full":  # the backward runs in the scope too: it may hold what the forward's hooks would gather again
        held = HeldScope(scope())
        return closed_after_backward(encode_plan(model, weight, plan), held)
    anchor = torch.empty(0, device=weight.device, requires_grad=True)
    return CachedEncoderFunction.apply(model, plan, schedule or GroupSchedule(), scope, weight, anchor)
