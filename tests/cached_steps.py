"""One CachedSeq2Seq training step on a model, its loss and gradients: what tests compare with
the plain-HF references of ``reference.py``."""

import torch
from reference import grads_of

from cached_ds import CachedConfig, CachedSeq2Seq


def cached_step(model, ids, mask, labels, seed: int, window: int, **settings):
    wrapped = CachedSeq2Seq(model, CachedConfig(window=window, group_windows=1, **settings))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = wrapped(ids, mask, labels=labels).loss
    loss.backward()
    return loss.detach(), grads_of(model)
