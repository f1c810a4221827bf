"""Host memory for the N-sized tensors, with copies that run beside the compute.

With ``offload_gradient_cache`` and ``offload_encoder_states`` the fp32 gradient cache and the
fused encoder states live in host memory (pinned beside a GPU), and the device only ever holds
one block or one window group of them. Every copy between the two goes on a side CUDA stream,
one per direction, so it runs while the compute stream works on the neighbouring block or group:

- encoder forward: each group's output goes to its place in the host states while the next
  group is encoded (``fused_states.FusedStates`` with ``on_host``, through ``rows_to_host``);
- streaming cross-attention, forward and backward: key block i+1 comes over while block i is
  attended (``rows_to_device`` through ``prefetched``);
- its backward: block i's gradient for the states goes to pinned memory, and a worker thread
  adds it into the fp32 cache once it has arrived, while block i+1 is computed
  (``HostAccumulator``);
- the recompute: group i+1's slice of the cache comes over while group i is recomputed
  (``WindowPlan.split_gradient``).

The documents' token ids are N-sized too. The trainer keeps them in host memory (``placed``:
a batch's ids and mask, pinned), and each window group's ids go over when the group is encoded
(``to_device``, ``cached_encoder.encode_group``).

The copies move row ranges (``WindowGroup.runs``), not index lists: an indexed copy would run on
the host. Pinned buffers come from PyTorch's caching host allocator, which rounds each request up
to a power of two and keeps freed blocks for the next step (no re-pinning per step, but up to 2×
the N-sized buffers' size in page-locked RAM when N × hidden is not a power of two). Off CUDA the copies are plain copies in the same order, and the worker thread still
adds (what CI runs: on a CPU-only machine host and device coincide, so only order and
exactness can be checked there; ``bench/gpu_checks`` checks the streams).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext

import torch

from .tensor_tags import get_tag, set_tag

OFFLOADED_TAG = "in_host_memory"
MAX_ADDS_IN_FLIGHT = 4  # pinned blocks waiting for the worker: bounds the host memory they hold

_streams: dict[tuple[int, str], torch.cuda.Stream] = {}
_adders: dict[int | None, ThreadPoolExecutor] = {}
_created = threading.Lock()  # autograd runs backward on threads of its own


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _side_stream(device: torch.device, direction: str) -> torch.cuda.Stream | None:
    """The side stream for ``direction`` ("to_host", "to_device") on a CUDA device; None elsewhere."""
    if device.type != "cuda":
        return None
    key = (_index(device), direction)
    with _created:
        if key not in _streams:
            _streams[key] = torch.cuda.Stream(device=key[0])
        return _streams[key]


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


def host_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised host memory, pinned when ``device`` is a GPU (asynchronous copies need it).
    Not zero-filled: at 16M tokens the two N-sized buffers are 96 GiB, seconds of memset per
    step; their users write every row before reading it."""
    return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=device.type == "cuda")


DOCUMENT_KEYS = ("input_ids", "attention_mask")


def placed(batch: dict, device: torch.device) -> dict:
    """The batch as ``CachedSeq2Seq`` takes it: the documents' ids and mask in host memory,
    pinned beside a GPU, as ``host_empty`` and ``to_device`` pin (ids already on a device stay
    there); everything else (labels: summary-sized) on ``device``. On the device the documents
    would cost 16 bytes per token, growing with the document beside the fused states
    ([decoder-memory])."""
    return {k: _pinned_for(v, device) if k in DOCUMENT_KEYS else v.to(device) for k, v in batch.items()}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without the host waiting for the device. From host memory the
    copy reads pinned memory (pinned here if it is not: a copy from pageable memory waits until
    the device has done everything queued before it, so the host could not run ahead), and the
    caching host allocator keeps that block until the copy has read it. Already there: itself."""
    if tensor.device.type == "cpu" and device.type == "cuda":
        return _pinned_for(tensor, device).to(device, non_blocking=True)
    return tensor.to(device)


def _pinned_for(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor bound for a CUDA ``device``, pinned (itself if it already is); anything
    else as it is."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        return tensor.pin_memory()
    return tensor


def mark_offloaded(tensor: torch.Tensor, owner=None) -> torch.Tensor:
    """``tensor`` itself, marked as living in host memory for a device's compute (CPU-only
    machines cannot tell that from its device); the mark is a ``tensor_tags`` tag, so the
    aliases DeepSpeed ZeRO-3 hands modules carry it too, while ``owner`` (default: ``tensor``) lives."""
    return set_tag(tensor, OFFLOADED_TAG, True, owner=owner)


def is_offloaded(tensor: torch.Tensor) -> bool:
    return get_tag(tensor, OFFLOADED_TAG, False)


class InFlight:
    """A device tensor being filled on a side stream; ``ready()`` hands it to the current stream."""

    def __init__(self, tensor: torch.Tensor, stream: torch.cuda.Stream | None):
        self.tensor, self.event = tensor, None
        if stream is not None:
            self.event = torch.cuda.Event()
            self.event.record(stream)

    def ready(self) -> torch.Tensor:
        if self.event is not None:
            current = torch.cuda.current_stream(self.tensor.device)
            current.wait_event(self.event)
            self.tensor.record_stream(current)  # allocated on the side stream, used (and freed) here
        return self.tensor


def rows_to_device(host_rows: torch.Tensor, runs: Sequence[tuple[int, int, int]], rows: int, device: torch.device,
                   zeros: bool = False) -> InFlight:
    """A (rows, hidden) device tensor of ``host_rows``' dtype, ``out[to : to + n] = host_rows[src : src + n]``
    for each ``(src, to, n)`` in ``runs``; the other rows zero (``zeros``) or unset. From host
    memory the copies run on the side stream; rows already on ``device`` were computed on the
    current stream, so they are copied there."""
    stream = _side_stream(device, "to_device") if host_rows.device.type == "cpu" else None
    with _on(stream):
        out = (torch.zeros if zeros else torch.empty)((rows, host_rows.shape[-1]), dtype=host_rows.dtype, device=device)
        for src, to, n in runs:
            out[to : to + n].copy_(host_rows[src : src + n], non_blocking=True)
    return InFlight(out, stream)


def rows_to_host(device_rows: torch.Tensor, runs: Sequence[tuple[int, int, int]], host_rows: torch.Tensor) -> None:
    """``host_rows[to : to + n] = device_rows[src : src + n]`` for each ``(src, to, n)``, queued
    after what the current stream has queued; ``wait_for_host`` before the host reads them."""
    stream = _side_stream(device_rows.device, "to_host")
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(device_rows.device))  # device_rows is computed
        device_rows.record_stream(stream)  # its memory is not reused before the copy has read it
    with _on(stream):
        for src, to, n in runs:
            host_rows[to : to + n].copy_(device_rows[src : src + n], non_blocking=True)


def wait_for_host(device: torch.device) -> None:
    """Every copy to the host queued so far on ``device`` has landed."""
    stream = _side_stream(device, "to_host")
    if stream is not None:
        stream.synchronize()


def prefetched(items: Sequence, fetch: Callable[[object], InFlight]) -> Iterator[tuple[object, torch.Tensor]]:
    """``(item, fetch(item) once it is ready)`` in order, the next item's fetch already issued
    when an item is handed over: its copy runs while the caller works on this one."""
    pending = fetch(items[0]) if items else None
    for index, item in enumerate(items):
        current, pending = pending, fetch(items[index + 1]) if index + 1 < len(items) else None
        yield item, current.ready()


def _worker(device: torch.device) -> ThreadPoolExecutor:
    """One thread per device: adds into a total run in the order they were asked for, never two
    at once. On CUDA it starts on that device, or waiting on an event would open a second CUDA
    context on GPU 0 (about 0.5 GiB there per rank; pytorch/pytorch#135273)."""
    index = _index(device) if device.type == "cuda" else None
    with _created:
        if index not in _adders:
            setup = (dict(initializer=torch.cuda.set_device, initargs=(index,)) if index is not None else {})
            _adders[index] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cached_ds-host-add", **setup)
        return _adders[index]


class HostAccumulator:
    """``total[:, start : start + n] += block`` for device blocks, into a host ``total`` treated
    as zeros: the block goes to pinned memory on the side stream, and a worker thread adds
    it once it has landed, so neither the copy nor the add holds up the compute stream.
    ``finish()`` waits for every add and returns ``total``. Adds run one at a time in call order,
    so the sum is the synchronous one, bit for bit.

    ``total``'s memory need not be zeroed (``host_empty``): a row's first block is copied in, not
    added, and rows no block reached are zeroed by ``finish()``."""

    def __init__(self, total: torch.Tensor):
        self.total = total
        self._written = torch.zeros(total.shape[1], dtype=torch.bool)  # rows (dim 1) holding a sum
        self._adds: deque[Future] = deque()

    def add(self, start: int, block: torch.Tensor) -> None:
        staged, landed = block, None
        stream = _side_stream(block.device, "to_host")
        if stream is not None:
            staged = torch.empty(block.shape, dtype=block.dtype, device="cpu", pin_memory=True)
            rows_to_host(block.reshape(-1, block.shape[-1]), [(0, 0, block[..., 0].numel())], staged.view(-1, block.shape[-1]))
            landed = torch.cuda.Event(blocking=True)  # the worker sleeps on it rather than spinning a core
            landed.record(stream)
        self._adds.append(_worker(block.device).submit(self._add, start, staged, landed))
        while len(self._adds) > MAX_ADDS_IN_FLIGHT:
            self._adds.popleft().result()

    def _add(self, start: int, staged: torch.Tensor, landed) -> None:
        if landed is not None:
            landed.synchronize()
        region = self.total[:, start : start + staged.shape[1]]
        written = self._written[start : start + staged.shape[1]]
        if len(written) != staged.shape[1] or region.shape != staged.shape:
            raise ValueError(f"block of shape {tuple(staged.shape)} at {start} does not fit a total of {tuple(self.total.shape)}")
        if not written.any():
            region.copy_(staged)
        else:
            if not written.all():
                region[:, ~written] = 0
            region += staged
        written.fill_(True)

    def finish(self) -> torch.Tensor:
        while self._adds:
            self._adds.popleft().result()  # re-raises a failed add here, in the caller's thread
        if not self._written.all():
            self.total[:, ~self._written] = 0
            self._written.fill_(True)
        return self.total
