"""Values tied to a tensor's data, which survive an engine handing modules an alias of it.

DeepSpeed ZeRO-3 passes every positional input and every output of every module through an
autograd Function whose forward is ``x.detach()`` (``deepspeed/runtime/zero/parameter_offload.py``:
``PostBackwardFunctionModule``, ``PreBackwardFunctionForModule``). A module then sees a new Python
tensor on the same memory, without the original's Python attributes: a gradient sink or an
"in host memory" mark set as an attribute on the encoder states is gone by the time a decoder
layer's cross-attention reads them. A tag here is found through any alias that views the same
memory the same way (storage, offset, shape, strides, dtype, device).

A tag lives as long as its ``owner`` (a ``weakref.finalize``; by default the tensor it was set
on). Give an owner that outlives the tensor's Python object when aliases are looked up later,
as activation checkpointing does when it re-runs a layer in backward: the CachED encoder's
gradient sink owns the tags of the states it rides on. While the owner lives, a tensor viewing
freed-and-reused memory exactly as the tagged one did would see its tags; the tags set here are
on N-sized encoder states, which only their producer makes.

    states = set_tag(states, "sink", sink, owner=sink)
    get_tag(states.detach(), "sink")   # -> sink
"""

from __future__ import annotations

import weakref

import torch

_tags: dict[tuple, dict[str, tuple[object, object]]] = {}  # key -> name -> (get value, the setting's token)


def _key(tensor: torch.Tensor) -> tuple:
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tensor.stride(), tensor.dtype)


def set_tag(tensor: torch.Tensor, name: str, value, owner=None) -> torch.Tensor:
    """``tensor`` itself, with ``name`` set to ``value`` for it and its aliases while ``owner``
    (default ``tensor``) lives. A value that is its own owner is held weakly, so the tag does
    not keep it alive."""
    key, token = _key(tensor), object()
    get = weakref.ref(value) if owner is value else (lambda: value)
    _tags.setdefault(key, {})[name] = (get, token)
    weakref.finalize(tensor if owner is None else owner, _forget, key, name, token)
    return tensor


def _forget(key: tuple, name: str, token: object) -> None:
    entry = _tags.get(key)
    if entry is not None and name in entry and entry[name][1] is token:  # not a later setting's
        del entry[name]
        if not entry:
            _tags.pop(key, None)


def get_tag(tensor: torch.Tensor, name: str, default=None):
    entry = _tags.get(_key(tensor))
    value = entry[name][0]() if entry is not None and name in entry else None
    return default if value is None else value


def drop_tag(tensor: torch.Tensor, name: str) -> None:
    entry = _tags.get(_key(tensor))
    if entry is not None:
        entry.pop(name, None)
