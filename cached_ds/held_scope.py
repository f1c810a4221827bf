"""A context entered in a forward and left when that forward's backward is over.

An engine may hold parameters gathered for a whole training step (ZeRO-3: the decoder's, with
its module hooks lifted, ``deepspeed_engine.keep_decoder_gathered``): then the backward, which
has no hooks left to gather them again, must find them still there, and they may go only once
autograd is done with the graph.

    held = HeldScope(scope())                     # entered now
    output.loss = closed_after_backward(output.loss, held)
    output.loss.backward()                        # left when this backward finishes

A forward whose graph is freed without a backward (the loss dropped) leaves the scope then. A
second backward through the same graph (``retain_graph=True``) is refused with an error naming
the setting, rather than running on what the scope no longer holds.
"""

from __future__ import annotations

import weakref

import torch


class HeldScope:
    """A scope entered now and left by ``close()`` (once; later calls do nothing), or when the
    last reference to it goes (a graph freed without a backward)."""

    def __init__(self, scope):
        scope.__enter__()
        self._finalizer = weakref.finalize(self, scope.__exit__, None, None, None)

    def close(self) -> None:
        self._finalizer()

    @property
    def is_open(self) -> bool:
        return self._finalizer.alive


class _CloseAfterBackward(torch.autograd.Function):
    """Identity whose backward asks autograd to close ``held`` when the whole backward it runs
    in has finished (``queue_callback``: after every other node, nested backwards included)."""

    @staticmethod
    def forward(ctx, held: HeldScope, tensor: torch.Tensor) -> torch.Tensor:
        ctx.held = held
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.held.is_open:  # before any node below runs on what the scope no longer holds
            raise RuntimeError(
                "a second backward through one forward (retain_graph=True): the scope held for its backward was "
                "left after the first one (under DeepSpeed ZeRO-3, keep_decoder_gathered released the decoder's "
                'parameters); run one backward per forward, or set "keep_decoder_gathered": false in the "cached" section'
            )
        torch.autograd.Variable._execution_engine.queue_callback(ctx.held.close)
        return None, grad


def closed_after_backward(tensor: torch.Tensor, held: HeldScope) -> torch.Tensor:
    """``tensor`` unchanged, with ``held`` closed at the end of a backward through it."""
    return _CloseAfterBackward.apply(held, tensor)
