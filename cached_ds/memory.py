"""Peak live bytes of the activations a module saves for backward.

Process RSS and DeepSpeed's CPU ``max_memory_allocated`` cannot tell encoder activations from
everything else; this meter counts exactly the tensors autograd saves inside chosen modules
(``saved_tensors_hooks`` around their forward), from when they are packed until their storage is
released. Parameters are not activations and are left out.

    meter = SavedTensorMeter()
    with meter.watch(model.get_encoder()):
        loss = model(...).loss
        loss.backward()
    print(meter.peak_bytes)

``SavedBytesCounter`` counts the bytes one piece of work saves (what keeping its graph until
backward costs), for the memory-budgeted schedule in ``cached_encoder``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


class _Saved:
    """What autograd holds instead of the tensor; its release is the storage's release."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key: int, meter: SavedTensorMeter):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    def __init__(self) -> None:
        self.live_bytes = 0
        self.peak_bytes = 0
        self._storages: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self._excluded: set[int] = set()

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._excluded:
            return tensor
        entry = self._storages.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.live_bytes += entry[1]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        entry[0] += 1
        return _Saved(tensor, key, self)

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live_bytes -= entry[1]
            del self._storages[key]

    @contextmanager
    def watch(self, module: nn.Module):
        """Count what ``module`` saves while this context is open (its forward calls included)."""
        self._excluded |= {p.untyped_storage().data_ptr() for p in module.parameters()}
        active = []

        def enter(*_):
            hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            hooks.__enter__()
            active.append(hooks)

        def leave(*_):
            active.pop().__exit__(None, None, None)

        handles = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


class SavedBytesCounter:
    """Bytes of the distinct storages autograd saves while counting, parameters left out (they
    are resident anyway): with the output's, what keeping a group's graph until backward costs.

    Saved-tensor hooks have one slot and the innermost pair wins, so a pair pushed inside the
    encoder's forward (``SavedTensorMeter`` watches a module that way) would hide the encoder from
    a count pushed around it. The count is pushed again first thing inside the encoder's forward,
    and hands every tensor on to the pair it displaced: whoever else watches still sees them all."""

    def __init__(self, resident: set[int]):
        self.bytes = 0
        self._seen = set(resident)  # storage pointers: the parameters', then each one counted
        self._pushed: list[torch.autograd.graph.saved_tensors_hooks] = []

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()

    @contextmanager
    def counting(self, encoder: nn.Module) -> Iterator[None]:
        """Count around the whole group (its embedding lookup included) and inside ``encoder``."""
        self._push()
        handles = [
            encoder.register_forward_pre_hook(lambda *_: self._push()),
            encoder.register_forward_hook(lambda *_: self._pop(), prepend=True, always_call=True),  # before others pop
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._pop()

    def _push(self) -> None:
        # torch's own chaining reads the slot this way too (_functorch/_aot_autograd/utils.py).
        displaced = torch._C._autograd._top_saved_tensors_default_hooks(False)

        def pack(tensor):
            self.add(tensor)
            return tensor.detach() if displaced is None else _Passed(displaced[1], displaced[0](tensor))

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, _unpack)
        hooks.__enter__()
        self._pushed.append(hooks)

    def _pop(self) -> None:
        self._pushed.pop().__exit__(None, None, None)


@dataclass(frozen=True)
class _Passed:
    """A tensor packed by the hooks a ``SavedBytesCounter`` displaced, and how they unpack it."""

    unpack: Callable
    packed: object


def _unpack(packed):
    return packed.unpack(packed.packed) if isinstance(packed, _Passed) else packed
