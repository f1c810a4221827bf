"""One buffer, of at least fp32, for d(loss)/d(encoder states) written out of band.

Every decoder layer's cross-attention reads the same (batch, N, hidden) encoder states, so
autograd would hand each layer's N-sized gradient back in the states' dtype and sum them there
(bf16: one rounding per layer, on partial sums that grow with the layer count). Instead a
``GradientSink`` rides on the states tensor (a ``tensor_tags`` tag, which survives the aliases
DeepSpeed ZeRO-3 hands modules); layers that know it
(``streaming_cross_attention``) add their share block by block into its fp32 total and return no
gradient for the states, and whoever produced the states (``cached_encoder``'s gradient cache,
or ``streaming_cross_attention.with_gradient_sink``) takes the total in its backward, which
autograd runs after every consumer's.

No dependencies beyond torch (and ``host_offload``, ``tensor_tags``), so the core and the
decoder modules can both import it.
"""

from __future__ import annotations

import torch

from .host_offload import HostAccumulator, host_empty
from .tensor_tags import drop_tag, get_tag, set_tag

SINK_TAG = "gradient_sink"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are kept in: fp32 at least (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


class GradientSink:
    """d(loss)/d(states) summed over every layer that writes here, in one buffer of
    ``accumulation_dtype(states.dtype)``, allocated on the first ``add``; ``take`` empties it.
    ``blocks_added`` counts the ``add`` calls (never reset): whether, and how much, was delivered."""

    def __init__(self, offload: bool = False) -> None:
        self.total: torch.Tensor | None = None
        self.blocks_added = 0
        self.offload = offload  # keep the buffer in host memory (pinned beside a GPU), not on the device
        self._host_adds: HostAccumulator | None = None

    def add(self, states: torch.Tensor, start: int, grad: torch.Tensor) -> None:
        """Add ``grad`` (not to be changed afterwards), the gradient of ``states[:, start : start + grad.shape[1]]``."""
        if self.total is None:
            dtype = accumulation_dtype(states.dtype)
            if self.offload:  # pinned when the gradient comes from a GPU (states may be on the host)
                self.total = host_empty(states.shape, dtype, grad.device)  # rows set as blocks arrive
                self._host_adds = HostAccumulator(self.total)
            else:
                self.total = torch.zeros(states.shape, dtype=dtype, device=grad.device)  # where the compute is
        if self._host_adds is not None:  # copied and added beside the compute of the next block
            self._host_adds.add(start, grad)
        else:
            self.total[:, start : start + grad.shape[1]] += grad
        self.blocks_added += 1

    def take(self) -> torch.Tensor | None:
        """The total so far (``None`` if nothing was added), leaving the sink empty."""
        if self._host_adds is not None:
            self._host_adds.finish()  # every add landed; rows no block reached are zero
        total, self.total, self._host_adds = self.total, None, None
        return total


def attach(states: torch.Tensor, sink: GradientSink) -> torch.Tensor:
    """``states`` itself, now carrying ``sink`` (layers find it with ``sink_of``, on any alias,
    for as long as the sink lives: its producer keeps it until its backward)."""
    return set_tag(states, SINK_TAG, sink, owner=sink)


def sink_of(states: torch.Tensor) -> GradientSink | None:
    return get_tag(states, SINK_TAG)


def detach_sink(states: torch.Tensor) -> None:
    """``states`` (and its aliases) no longer carry a sink: layers return their gradient through autograd."""
    drop_tag(states, SINK_TAG)
