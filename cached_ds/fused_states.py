"""The fused (batch, tokens, hidden) encoder states written window group by window group.

Each group's rows go straight to their place (``WindowGroup.runs``) and the group's output can
be freed: on the device, or in host memory through ``host_offload``'s side stream. Fusing every
output at once (a gather and a concatenation) would hold every output, their real rows and their
concatenation beside the result: three copies of the states at the peak of CachED's no-grad pass.
``fuse`` is the differentiable form, for ``full`` mode, where autograd holds every output anyway.
"""

from __future__ import annotations

import torch

from .host_offload import host_empty, mark_offloaded, rows_to_host, to_device, wait_for_host
from .windows import WindowPlan


class FusedStates:
    """``add`` each group's output in plan order (it can be freed at once), then ``result()``:
    only the fused tensor and one group's output exist at a time. Not differentiable: ``fuse``.

    ``on_host``: the fused states in host memory (pinned beside a GPU), each group's rows copied
    there on a side stream while the next group is encoded (``host_offload``). ``buffer``: rows
    (batch * longest, hidden) to fill instead of new ones; their contents do not matter (every
    row is written: the groups' by their outputs, the padding ones with zeros)."""

    def __init__(self, plan: WindowPlan, on_host: bool = False, buffer: torch.Tensor | None = None):
        self.plan, self.on_host, self.rows, self.device, self.next_group = plan, on_host, buffer, None, 0

    def add(self, output: torch.Tensor) -> None:
        group = self.plan.groups[self.next_group]
        self.next_group += 1
        hidden = output.shape[-1]
        self.device = output.device
        if self.rows is None:
            shape = (self.plan.fused_mask.numel(), hidden)
            self.rows = (host_empty(shape, output.dtype, output.device) if self.on_host
                         else torch.empty(shape, dtype=output.dtype, device=output.device))
        group_rows = output.reshape(-1, hidden)
        if self.on_host:
            rows_to_host(group_rows, group.runs, self.rows)
        else:
            for group_row, fused_row, count in group.runs:
                self.rows[fused_row : fused_row + count] = group_rows[group_row : group_row + count]

    def result(self) -> torch.Tensor:
        fused = self.rows.view(*self.plan.fused_mask.shape, -1)
        if self.on_host:
            wait_for_host(self.device)  # only the last group's copy is still running
        if self.plan.has_padding:  # rows no group writes
            padding = (self.plan.fused_mask == 0)[..., None]
            fused.masked_fill_(to_device(padding, fused.device), 0)  # no boolean indexing: a sync on a GPU
        return mark_offloaded(fused) if self.on_host else fused


def fuse(plan: WindowPlan, outputs: list[torch.Tensor]) -> torch.Tensor:
    """The fused states of every group's output, differentiable: each output gets exactly its
    ``split_gradient`` slice, padding groups' outputs (ranks' stand-ins) a zero one, so every
    group's encoder backward still runs (under ZeRO-3 each issues the parameter gathers the other
    ranks issue too)."""
    return _Fuse.apply(plan, *outputs)


class _Fuse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: WindowPlan, *outputs):
        ctx.plan = plan
        states = FusedStates(plan)
        for output in outputs:
            states.add(output)
        return states.result()

    @staticmethod
    def backward(ctx, grad):
        return (None, *ctx.plan.split_gradient(grad))
