"""Two-rank DeepSpeed cases in one launch (run by test_engine_two_ranks.py):

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/distributed_cases.py OUT.jsonl

Each rank trains on its own document; the reference is the mean of plain-HF gradients of both
documents. Rank 0 writes one JSON object per case to OUT.jsonl.
"""

from __future__ import annotations

import copy
import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from ds_helpers import record_streaming_states, resolved_config  # noqa: E402
from reference import windowed_hf_step  # noqa: E402
from tiny_models import make_model, make_model_without_cross_attention_dropout, random_batch  # noqa: E402

WINDOW = 16
COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
    "all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_coalesced", "broadcast", "all_to_all_single",
)


class CollectiveCounter:
    """Counts torch.distributed collectives while active. DeepSpeed's comm layer calls them as
    ``torch.distributed.X`` and ``torch.distributed.distributed_c10d.X``: both are wrapped, and
    only the outermost call counts (one collective may be built on another)."""

    def __init__(self):
        self.counts, self.active, self.depth = Counter(), False, 0
        c10d = dist.distributed_c10d
        for name in COLLECTIVES:
            original = getattr(c10d, name, None) or getattr(dist, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                if self.active and self.depth == 0:
                    self.counts[_name] += 1
                self.depth += 1
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.depth -= 1

            for module in (dist, c10d):
                if hasattr(module, name):
                    setattr(module, name, counted)

    def total(self, kind: str) -> int:
        return sum(n for name, n in self.counts.items() if kind in name)


def documents(windows_per_rank: list[int], pad: int):
    return [random_batch([w * WINDOW], [6], pad, seed=40 + r) for r, w in enumerate(windows_per_rank)]


def two_rank_config(stage_config: str, **cached) -> dict:
    """``keep_encoder_gathered`` and ``keep_decoder_gathered`` are off unless a case asks (the shipped ZeRO-3 config turns them on)."""
    if stage_config.startswith("zero3"):
        cached = {"keep_encoder_gathered": False, "keep_decoder_gathered": False, **cached}
    config = resolved_config(stage_config, world=2, cached={"window": WINDOW, "group_windows": 1, "group_tokens": None, **cached})
    if stage_config == "zero3":  # release parameters after every use, as at real model sizes
        config["zero_optimization"].update(stage3_max_reuse_distance=0, stage3_max_live_parameters=0)
    return config


def one_group_graph_bytes() -> int:
    """What keeping one one-window group's graph costs for this test's model (measured by a
    CachedSeq2Seq outside any engine, with every group kept)."""
    from cached_ds import CachedConfig, CachedSeq2Seq

    model = make_model("bart")
    ids, mask, labels = documents([1, 1], model.config.pad_token_id)[0]
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=1, keep_graphs_bytes=2**40))
    wrapped(ids, mask, labels=labels).loss.backward()
    assert wrapped.last_kept_groups == 1
    return wrapped.last_kept_bytes


def gradient_case(stage_config: str, windows_per_rank: list[int], rank: int, family: str = "bart", again: bool = False,
                  **cached) -> dict:
    """``again``: a second step on the same documents, where DeepSpeed's ZeRO-3 checks that every
    rank traced the same module calls in the first (ranks that did not abort there)."""
    from cached_ds.deepspeed_engine import initialize

    # Streaming cross-attention has no attention-probability dropout: the reference gets none there either.
    model = make_model_without_cross_attention_dropout(family) if cached.get("cross_attention_block") else make_model(family)
    pristine = copy.deepcopy(model)
    docs = documents(windows_per_rank, model.config.pad_token_id)
    engine, *_ = initialize(model, two_rank_config(stage_config, **cached))
    streaming_calls = record_streaming_states(engine.module.model)
    positions = getattr(engine.module.model.get_encoder(), "embed_positions", None)
    position_calls = []  # calls of the encoder's position module (ZeRO-3 traces them): as many on every rank
    if positions is not None:
        positions.register_forward_pre_hook(lambda *_: position_calls.append(1))
    error = error_against_mean_reference(engine, pristine, docs, rank)
    kept, calls = [None] * dist.get_world_size(), [None] * dist.get_world_size()
    dist.all_gather_object(kept, engine.module.last_kept_groups)  # each rank's
    dist.all_gather_object(calls, len(position_calls))
    engine.step()
    if again:
        ids, mask, labels = docs[rank]
        engine.backward(engine(ids, mask, labels=labels).loss)
        engine.step()
    suffix = "".join(f"-{key}" for key, value in cached.items() if value) + ("" if family == "bart" else f"-{family}")
    return {"case": f"{stage_config}{suffix}-windows{windows_per_rank}", "relative_error": error, "kept_groups": kept,
            "streaming_calls": streaming_calls, "position_calls": calls}


def error_against_mean_reference(engine, pristine, docs, rank: int) -> float:
    """This rank's document through the engine (its full gradients gathered: a collective under
    ZeRO-3) against the plain-HF gradients averaged over every rank's document."""
    from ds_helpers import reduced_grad

    ids, mask, labels = docs[rank]
    torch.manual_seed(100 + rank)
    engine.backward(engine(ids, mask, labels=labels).loss)
    grads = {n: reduced_grad(p) for n, p in engine.module.model.named_parameters()}
    ref = {}
    for r, (ids, mask, labels) in enumerate(docs):
        _, g = windowed_hf_step(pristine, ids, mask, labels, WINDOW, 1, seed=100 + r)
        for k, v in g.items():
            ref[k] = ref.get(k, 0) + v / len(docs)
    num = sum(float((grads[k] - ref[k]).pow(2).sum()) for k in ref)
    return (num / sum(float(ref[k].pow(2).sum()) for k in ref)) ** 0.5



def plain_deepspeed_case(rank: int) -> dict:
    """CachedSeq2Seq in an engine from plain ``deepspeed.initialize`` (as HF's Trainer builds one),
    ZeRO-3, ranks with 2 and 4 window groups: it pads the short rank by itself (it used to
    abort with a gloo collective mismatch; NCCL hangs) and stays exact."""
    import deepspeed

    from cached_ds import CachedConfig, CachedSeq2Seq

    model = make_model("bart")
    pristine = copy.deepcopy(model)
    docs = documents([2, 4], model.config.pad_token_id)
    config = two_rank_config("zero3")
    config.pop("cached")
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=1))
    engine, *_ = deepspeed.initialize(model=wrapped, config=config, model_parameters=list(wrapped.parameters()))
    return {"case": "plain-deepspeed-zero3-windows[2, 4]", "relative_error": error_against_mean_reference(engine, pristine, docs, rank)}


def plain_deepspeed_refusal_case(rank: int) -> dict:
    """LongT5 transient-global in an engine from plain ``deepspeed.initialize`` (HF's Trainer),
    ZeRO-3, where keep_encoder_gathered cannot be set: refused at the first forward (a rank with
    a group shorter than a global block gathers in another order: gloo aborts, NCCL hangs)."""
    import deepspeed

    from cached_ds import CachedConfig, CachedSeq2Seq

    model = make_model("longt5-tglobal")
    ids, mask, labels = documents([2, 4], model.config.pad_token_id)[rank]
    config = two_rank_config("zero3")
    config.pop("cached")
    wrapped = CachedSeq2Seq(model, CachedConfig(window=WINDOW, group_windows=1))
    engine, *_ = deepspeed.initialize(model=wrapped, config=config, model_parameters=list(wrapped.parameters()))
    try:
        engine(ids, mask, labels=labels)
    except ValueError as error:
        return {"case": "plain-deepspeed-zero3-longt5-tglobal-refused", "error": str(error)}
    return {"case": "plain-deepspeed-zero3-longt5-tglobal-refused", "error": None}


def generation_case(rank: int) -> dict:
    """``engine.module.generate`` under ZeRO-3, outside the engine's forward, as users and the
    evaluation call it: ranks whose summaries end at different steps (different max_new_tokens
    here) must not hang waiting on each other's parameter gathers, and the fast T5 kernels must
    get the partitioned relative-bias tables gathered. Counts the ranks whose tokens equal the
    same model's outside any engine."""
    from cached_ds import CachedConfig, CachedSeq2Seq
    from cached_ds.deepspeed_engine import initialize

    model = make_model("t5", dropout=0.0).eval()
    settings = {"fast_t5_attention": True, "keep_attention_dropout": False}
    ids, mask, _ = documents([2, 3], model.config.pad_token_id)[rank]
    steps = 3 + 3 * rank
    want = CachedSeq2Seq(copy.deepcopy(model), CachedConfig(window=WINDOW, **settings)).generate(
        ids, mask, num_beams=2, max_new_tokens=steps)
    engine, *_ = initialize(model, two_rank_config("zero3", **settings))
    engine.module.eval()
    got = engine.module.generate(ids, mask, num_beams=2, max_new_tokens=steps)
    matching = torch.tensor([float(got.shape == want.shape and torch.equal(got, want))])
    dist.all_reduce(matching)
    return {"case": "zero3-generate-fast_t5-uneven-lengths", "ranks_matching": int(matching.item())}


def communication_case(stage_config: str, groups: int, counter: CollectiveCounter, rank: int, **cached) -> dict:
    """Collectives issued by one training step after a warm-up step, with ``groups`` window groups."""
    from cached_ds.deepspeed_engine import initialize

    model = make_model("bart", dropout=0.0)
    engine, *_ = initialize(model, two_rank_config(stage_config, **cached))
    ids, mask, labels = documents([groups, groups], model.config.pad_token_id)[rank]
    for measured in (False, True):
        counter.counts.clear()
        counter.active = measured
        engine.backward(engine(ids, mask, labels=labels).loss)
        engine.step()
    counter.active = False
    suffix = "".join(f"-{key}" for key, value in cached.items() if value)
    return {"case": f"comm-{stage_config}{suffix}-groups{groups}", "reductions": counter.total("reduce"),
            "gathers": counter.total("gather"), "counts": dict(counter.counts)}


def loss_split_case(rank: int) -> dict:
    """GAS 1 × 2 ranks, two documents per rank, vs the plain-HF token-level mean over all four."""
    from ds_helpers import reduced_grad
    from loss_split_cases import batch_of
    from loss_split_cases import documents as split_documents
    from reference import token_mean_hf_step

    from cached_ds.deepspeed_engine import initialize
    from cached_ds.trainer import train_step

    model = make_model("bart", dropout=0.0)
    pad = model.config.pad_token_id
    docs = split_documents(pad)
    ref_loss, ref = token_mean_hf_step(model, docs, WINDOW)
    model.zero_grad(set_to_none=True)
    engine, *_ = initialize(model, resolved_config("zero2", micro=2, world=2, cached={"window": WINDOW}))
    summed, label_tokens, doc_tokens, _ = train_step(engine, [batch_of(docs[2 * rank : 2 * rank + 2], pad)], optimizer_step=False)
    grads = {n: reduced_grad(p) for n, p in engine.module.model.named_parameters()}
    num = sum(float((grads[k] - ref[k]).pow(2).sum()) for k in ref)
    return {"case": "loss-split-gas1-2ranks", "relative_error": (num / sum(float(ref[k].pow(2).sum()) for k in ref)) ** 0.5,
            # what metrics.jsonl logs: the loss over both ranks' documents, and all their tokens
            "loss_error": abs(summed / label_tokens - ref_loss) / ref_loss,
            "doc_tokens": doc_tokens, "all_tokens": sum(ids.numel() for ids, _ in docs)}


def main(out: str) -> None:
    import deepspeed

    counter = CollectiveCounter()  # before init: DeepSpeed's TorchBackend keeps references to these
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    results = []
    for stage in ("zero0", "zero1", "zero2", "zero3"):
        results.append(gradient_case(stage, [2, 4], rank))  # unequal window-group counts
    results.append(gradient_case("zero3", [3, 3], rank))
    # full backprop (the baseline) also pads the rank with fewer groups: its stand-in groups' backward
    # must run too, or that rank issues fewer ZeRO-3 parameter gathers than the other (a hang).
    results.append(gradient_case("zero3", [2, 4], rank, mode="full"))
    results.append(gradient_case("zero3", [2, 4], rank, keep_encoder_gathered=True))
    # A budget of about two one-window groups (as measured outside the engine): each rank keeps
    # some of its 4 groups (ranks pad to the same count) and recomputes the rest.
    budget = 2 * one_group_graph_bytes()
    # ranks agree on how many groups keep their graphs (the short rank's stand-in groups are cheap
    # to keep): a recompute is a module call ZeRO-3 traces, checked in the second step
    results.append(gradient_case("zero3", [2, 4], rank, again=True, keep_encoder_gathered=True, keep_graphs_bytes=budget))
    # the encoder not kept gathered, ZeRO-3 tracing each module call, where M2M100's positions
    # depend on a pad id in the window (the stand-in groups are pad ids); LongT5 transient-global
    # needs the encoder kept gathered here (its short groups skip a module's backward), with it
    results.append(gradient_case("zero3", [2, 4], rank, family="m2m_100", again=True))
    results.append(gradient_case("zero3", [2, 4], rank, family="longt5-tglobal", again=True, keep_encoder_gathered=True))
    try:
        gradient_case("zero3", [2, 4], rank, family="longt5-tglobal")
    except ValueError as error:
        results.append({"case": "zero3-longt5-tglobal-refused", "error": str(error)})
    results.append(plain_deepspeed_refusal_case(rank))
    results.append(gradient_case("zero3", [2, 4], rank, keep_encoder_gathered=True, cross_attention_block=5,
                                 offload_gradient_cache=True, offload_encoder_states=True))
    # the decoder gathered from its forward to the end of its backward, checkpointing's recompute
    # included, and with streaming cross-attention's ZeRO-3 leaf modules inside it
    results.append(gradient_case("zero3", [2, 4], rank, keep_encoder_gathered=True, keep_decoder_gathered=True,
                                 decoder_gradient_checkpointing=True))
    results.append(gradient_case("zero3", [2, 4], rank, keep_decoder_gathered=True, cross_attention_block=5))
    for stage in ("zero2", "zero3"):
        for groups in (2, 8):
            results.append(communication_case(stage, groups, counter, rank))
    for groups in (2, 8):
        results.append(communication_case("zero3", groups, counter, rank, keep_encoder_gathered=True))
    results.append(communication_case("zero3", 2, counter, rank, keep_encoder_gathered=True, keep_decoder_gathered=True))
    results.append(loss_split_case(rank))
    results.append(plain_deepspeed_case(rank))
    results.append(generation_case(rank))
    if rank == 0:
        Path(out).write_text("".join(json.dumps(r) + "\n" for r in results))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
