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
"""

from __future__ import annotations

from contextlib import contextmanager

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
