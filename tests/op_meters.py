"""What ops ran and what they made, observed (not replaced) through a ``TorchDispatchMode``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class OpsSeen(TorchDispatchMode):
    """The names of the aten ops that ran, and how often."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    @property
    def names(self) -> set[str]:
        return set(self.counts)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class OpOutputs(TorchDispatchMode):
    """``(op name, shape, dtype)`` of every op output for which ``keep(tensor)`` holds; with
    ``new_only``, outputs that share storage with an input (views, in-place results) are left
    out: what an op allocated."""

    def __init__(self, keep: Callable[[torch.Tensor], bool], new_only: bool = False):
        super().__init__()
        self.keep, self.new_only, self.made = keep, new_only, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))} if self.new_only else set()
        for t in _tensors(out):
            if self.keep(t) and t.untyped_storage().data_ptr() not in inputs:
                self.made.append((func.overloadpacket.__name__, tuple(t.shape), t.dtype))
        return out


def _tensors(value) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
