"""The host-memory copies behind ``offload_encoder_states`` / ``offload_gradient_cache``
(``cached_ds.host_offload``): row-range copies instead of index lists, prefetched one block or
group ahead, and the states gradient added into the host cache by a worker thread.

On this CPU-only machine host and device coincide, so the side streams are not exercised (the GPU
check is ``bench/gpu_checks/streaming_cross_attention_check.py``); what is checked is that every
row lands where the plain layout says, in every shape of plan, and that the worker's sum is the
synchronous sum bit for bit. The end-to-end exactness of the offloaded step against plain HF is in
``test_gradient_cache_fp32.py``."""

import pytest
import torch

from cached_ds.host_offload import HostAccumulator, is_offloaded, mark_offloaded
from cached_ds.streaming_attention import streaming_cross_attention
from cached_ds.fused_states import FusedStates, fuse
from cached_ds.windows import WindowPlan

PAD = 0
HIDDEN = 3
SCALE = torch.tensor([1.0, -2.0, 0.5])  # every hidden channel a different multiple of the token id


def documents(lengths: list[int]):
    """Right-padded ids whose every real token is unique (1, 2, ...), so a row's value names its token."""
    ids = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    first = 1
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.arange(first, first + n)
        mask[row, :n] = 1
        first += n
    return ids, mask


def token_values(ids: torch.Tensor) -> torch.Tensor:
    return ids.double()[..., None] * SCALE.double()


PLANS = {
    "one-document-whole-windows": ([32], dict(window=8, group_windows=2)),
    "partial-windows-across-documents": ([29, 5, 17], dict(window=8, group_windows=3)),
    "groups-by-token-budget": ([29, 5, 17], dict(window=8, group_tokens=20)),
    # a document ending on a window boundary, then a group running on into the next document
    "whole-window-document-then-a-longer-one": ([16, 29], dict(window=8, group_windows=3)),
    "one-group": ([29, 5], dict(window=8)),
    # whole windows of a document after the first, read in place (their rows start past row 0's
    # document: a view at the wrong offset passed these tests before these plans, mutation testing)
    "later-document-whole-windows": ([9, 16], dict(window=8, group_windows=2)),
    "every-later-window-alone": ([5, 24, 16], dict(window=8, group_windows=1)),
    "later-document-by-token-budget": ([3, 16], dict(window=8, group_tokens=16)),
}


def plan_for(name: str, padded_groups: int = 0) -> tuple[WindowPlan, torch.Tensor, torch.Tensor]:
    lengths, grouping = PLANS[name]
    ids, mask = documents(lengths)
    plan = WindowPlan.build(ids, mask, pad_token_id=PAD, **grouping)
    if padded_groups:
        plan = plan.padded_to(len(plan.groups) + padded_groups, PAD)
    return plan, ids, mask


def test_a_token_budget_fills_groups_to_exactly_its_size():
    """``group_tokens`` is a ceiling that may be met: 16 tokens hold two 8-token windows."""
    ids, mask = documents([40])
    plan = WindowPlan.build(ids, mask, window=8, pad_token_id=PAD, group_tokens=16)
    assert [group.input_ids.shape for group in plan.groups] == [(2, 8), (2, 8), (1, 8)]


@pytest.mark.parametrize("on_host", [False, True], ids=["device", "host"])
@pytest.mark.parametrize("padded_groups", [0, 2], ids=["no-padding-groups", "padding-groups"])
@pytest.mark.parametrize("name", PLANS)
def test_fused_states_put_every_token_where_the_document_has_it(name, padded_groups, on_host):
    plan, ids, mask = plan_for(name, padded_groups)
    if name == "one-document-whole-windows":  # one copy per group, not one per window
        assert [len(group.runs) for group in plan.groups if not group.padding] == [1] * 2
    # A reused buffer's old contents (NaN here) must not leak into any row, padding included.
    states = FusedStates(plan, on_host, buffer=torch.full((ids.numel(), HIDDEN), float("nan"), dtype=torch.float64))
    for group in plan.groups:
        # What an encoder would return for the group: each (padded) position's own token value.
        states.add(token_values(group.input_ids * group.attention_mask))
    fused = states.result()
    assert is_offloaded(fused) == on_host
    assert torch.equal(fused, token_values(ids * mask))  # zeros past each document's end


@pytest.mark.parametrize("ahead", [False, True], ids=["one-by-one", "fetched-ahead"])
@pytest.mark.parametrize("padded_groups", [0, 2], ids=["no-padding-groups", "padding-groups"])
@pytest.mark.parametrize("name", PLANS)
def test_each_group_gets_its_slice_of_a_gradient_cache(name, padded_groups, ahead):
    plan, ids, mask = plan_for(name, padded_groups)
    cache = token_values(ids * mask) + 0.25 * (1 - mask)[..., None]  # padding rows nonzero: they must not leak
    slices = list(plan.split_gradient(cache, torch.device("cpu"), ahead=ahead))
    assert len(slices) == len(plan.groups)
    for group, got in zip(plan.groups, slices):
        assert got.shape == (*group.input_ids.shape, HIDDEN)
        assert torch.equal(got, token_values(group.input_ids * group.attention_mask))  # zeros on the group's padding


@pytest.mark.parametrize("padded_groups", [0, 2], ids=["no-padding-groups", "padding-groups"])
@pytest.mark.parametrize("name", PLANS)
def test_fuse_hands_each_group_its_slice_back(name, padded_groups):
    """``full`` mode's differentiable fusing: each group's output gets exactly the slice
    ``split_gradient`` cuts from the same gradient, and a padding group's output a zero one, not
    none (its backward must still run: under ZeRO-3 it issues the other ranks' gathers too)."""
    plan, ids, mask = plan_for(name, padded_groups)
    gen = torch.Generator().manual_seed(0)
    outputs = [torch.randn(*g.input_ids.shape, HIDDEN, dtype=torch.float64, generator=gen, requires_grad=True)
               for g in plan.groups]
    fused = fuse(plan, outputs)
    assert torch.equal(fused.detach(), fused_without_autograd(plan, outputs))
    upstream = torch.randn(*ids.shape, HIDDEN, dtype=torch.float64, generator=gen)
    grads = torch.autograd.grad(fused, outputs, upstream)
    for group, got, expected in zip(plan.groups, grads, plan.split_gradient(upstream)):
        assert torch.equal(got, expected)
        if group.padding:
            assert not got.any()


def fused_without_autograd(plan, outputs):
    states = FusedStates(plan)
    for output in outputs:
        states.add(output.detach())
    return states.result()


BLOCKS = {
    "aligned-layers": [(0, 7), (7, 7), (14, 7), (21, 7), (28, 7), (35, 7), (42, 8)] * 3,  # three decoder layers
    "overlapping-and-partial": [(0, 7), (7, 7), (14, 7), (3, 20), (40, 10), (0, 50), (21, 7), (28, 7), (35, 7), (42, 8)],
    "rows-never-reached": [(5, 7), (12, 7), (30, 5)],
}


@pytest.mark.parametrize("blocks", BLOCKS)
def test_host_adds_are_the_synchronous_sum_bit_for_bit(blocks):
    """The total starts as uninitialised memory (NaN here: any read before a write would show):
    a row's first block is copied in, later ones added, untouched rows come out zero."""
    gen = torch.Generator().manual_seed(0)
    total = torch.full((2, 50, 4), float("nan"))
    expected = torch.zeros(2, 50, 4)
    adds = HostAccumulator(total)
    for start, n in BLOCKS[blocks]:
        block = torch.randn(2, n, 4, generator=gen, dtype=torch.bfloat16)  # the bf16 blocks a decoder layer gives
        expected[:, start : start + n] += block
        adds.add(start, block)
    assert adds.finish() is total
    assert torch.equal(total, expected)


def test_a_failed_host_add_is_raised_in_the_caller():
    adds = HostAccumulator(torch.zeros(1, 10, 4))
    adds.add(0, torch.ones(1, 5, 3))  # wrong hidden size: fails on the worker thread
    with pytest.raises(ValueError, match=r"block of shape \(1, 5, 3\) at 0 does not fit a total of \(1, 10, 4\)"):
        adds.finish()


def test_streaming_attention_reads_offloaded_states_block_by_block_the_same():
    """Batch 2 over 23 keys in blocks of 7 (the last one partial): host states marked offloaded
    take the prefetching row-copy path and give the same output and gradients as the same states
    read directly."""
    gen = torch.Generator().manual_seed(1)
    heads, head_dim, hidden = 2, 4, 8
    query = torch.randn(2, heads, 5, head_dim, generator=gen, requires_grad=True)
    keep = torch.ones(2, 23, dtype=torch.bool)
    keep[1, 15:] = False
    weights = [torch.randn(heads * head_dim, hidden, generator=gen, requires_grad=True) for _ in range(2)]
    biases = [torch.randn(heads * head_dim, generator=gen, requires_grad=True) for _ in range(2)]
    results = []
    for offloaded in (False, True):
        states = torch.randn(2, 23, hidden, generator=torch.Generator().manual_seed(2)).requires_grad_()
        source = mark_offloaded(states.detach().clone().requires_grad_()) if offloaded else states
        out = streaming_cross_attention(query, source, keep, weights[0], biases[0], weights[1], biases[1], 0.5, 7)
        inputs = [query, source, *weights, *biases]
        results.append([out, *torch.autograd.grad(out.square().sum(), inputs)])
    for plain, host in zip(*results):
        assert torch.equal(plain, host)
