"""How far a result is from its reference, as the GPU checks report it (fp64 sums, so the
figure is the kernels' error and not the sum's own rounding).

    relative(a, b)                 ‖a − b‖ / ‖b‖ of two tensors
    global_relative(grads, ref)    the same over all of the reference's parameters together
"""

from __future__ import annotations

import torch


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def global_relative(grads: dict, reference: dict) -> float:
    """Parameters in ``reference`` only; a caller checks first that both have the same names."""
    num = sum(float((grads[k].double() - reference[k].double()).pow(2).sum()) for k in reference if k in grads)
    return (num / sum(float(reference[k].double().pow(2).sum()) for k in reference)) ** 0.5
