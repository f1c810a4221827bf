"""Where LongT5's flex attention loses its time ([t5-speed]): one transient-global layer's
attention at LongT5-large's shape, timed in variants that add one thing at a time.

At 16K tokens the encoder's flex kernel ran at ~5 TFLOP/s on an H200 (392 ms for 72 forward
calls, ``results/2026-11-28-nvidia-h200/NOTES.md``), where dense flash attention runs at hundreds.
The variants, each forward and forward + backward, over 4 windows of 4096 tokens, 16 heads of 64:
- ``sdpa_dense``: dense SDPA over each whole window (the kernel ceiling, 16x the band's work);
- ``flex_band``: flex with the band block mask (|key - query| <= 127) and no score_mod;
- ``flex_band_bias``: + the T5 offset bias read in the score_mod (no gradient to it);
- ``flex_band_bias_grad``: the bias needs a gradient (flex's backward scatters into it);
- ``flex_tglobal``: ``flex_t5.flex_bias_attention`` as a transient-global layer calls it (256
  global keys, their bias, the segment mask), the code the sweep runs.
The forward is timed without autograd (as the no-grad encode runs it). TFLOP/s counts the
attended (query, key) pairs only: 4 x head dim FLOPs each forward, 10 x for
forward + backward. Prints a JSON line per variant as it ends (``case_lines.py``); each
variant catches its own exception.

    python bench/gpu_checks/flex_variants.py
    CHECK_DEVICE=cpu python bench/gpu_checks/flex_variants.py    # the plumbing, tiny shapes
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for cached_ds
from case_lines import emit  # noqa: E402  (bench/gpu_checks/case_lines.py)

DEVICE = os.environ.get("CHECK_DEVICE", "cuda")
CPU = DEVICE == "cpu"
# LongT5-large's attention shape on the GPU; a tiny one for the CPU dry run
WINDOWS, HEADS, LENGTH, HEAD_DIM, RADIUS, GLOBAL_BLOCK = (2, 2, 256, 16, 15, 16) if CPU else (4, 16, 4096, 64, 127, 16)
DTYPE = torch.float32 if CPU else torch.bfloat16


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(run, repeats: int = 2 if CPU else 5) -> float:
    """Median seconds of ``run()`` after one warm-up call (which compiles)."""
    run()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def tglobal_layer():
    """A transient-global attention module of LongT5-large's shape (random init) and its layout
    inputs as the fast first layer builds them (``longt5_attention._first_layer_bias``)."""
    import transformers as hf

    from cached_ds.longt5_attention import _first_layer_bias

    config = hf.LongT5Config(d_model=HEADS * HEAD_DIM, d_kv=HEAD_DIM, num_heads=HEADS, encoder_attention_type="transient-global",
                             local_radius=RADIUS, global_block_size=GLOBAL_BLOCK)
    module = hf.models.longt5.modeling_longt5.LongT5TransientGlobalAttention(config, has_relative_attention_bias=True)
    module = module.to(DEVICE)
    mask = torch.ones(WINDOWS, LENGTH, device=DEVICE)
    return module, _first_layer_bias(module, mask, LENGTH)


def variants() -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from cached_ds import flex_t5
    from cached_ds.t5_attention import Layout

    shape = (WINDOWS, HEADS, LENGTH, HEAD_DIM)
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=DTYPE, requires_grad=not CPU) for _ in range(3))  # CPU: no flex backward
    module, bias = tglobal_layer()
    by_head = bias.offsets.detach().to(DTYPE).t().contiguous()  # (heads, 2L - 1)
    by_head_grad = by_head.clone().requires_grad_(not CPU)
    band = create_block_mask(lambda b, h, qi, ki: (ki - qi).abs() <= RADIUS, None, None, LENGTH, LENGTH, device=DEVICE)
    compiled = torch.compile(flex_attention, dynamic=False)
    band_pairs = sum(min(LENGTH, i + RADIUS + 1) - max(0, i - RADIUS) for i in range(LENGTH)) * WINDOWS * HEADS
    count = bias.extra["side"].segments.shape[1]
    side_k, side_v = (torch.randn(WINDOWS, HEADS, count, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=not CPU) for _ in range(2))

    def with_bias(table):
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[h, kv_idx - q_idx + LENGTH - 1].to(score.dtype)
        return score_mod

    # leaves needing a gradient, as the bias tables do in training (a graph shared by the timed
    # calls would be freed by the first backward)
    offsets_leaf = bias.offsets.detach().to(DTYPE).requires_grad_(not CPU)
    table_leaf = bias.extra["table"].detach().to(DTYPE).requires_grad_(not CPU)
    key_valid = torch.ones(WINDOWS, LENGTH, dtype=torch.bool, device=DEVICE)
    shared = {}  # the block mask, built once as for a stack's 24 layers

    def tglobal():
        layout = Layout(128, offsets_leaf, key_valid=key_valid, radius=RADIUS, side=bias.extra["side"], shared=shared)
        return flex_t5.flex_bias_attention(q, k, v, layout, side_k, side_v, table_leaf)

    return {  # name: (forward, attended pairs)
        "sdpa_dense": (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), WINDOWS * HEADS * LENGTH * LENGTH),
        "flex_band": (lambda: compiled(q, k, v, block_mask=band), band_pairs),
        "flex_band_bias": (lambda: compiled(q, k, v, score_mod=with_bias(by_head), block_mask=band), band_pairs),
        "flex_band_bias_grad": (lambda: compiled(q, k, v, score_mod=with_bias(by_head_grad), block_mask=band), band_pairs),
        "flex_tglobal": (tglobal, band_pairs + WINDOWS * HEADS * LENGTH * count),
    }


def main() -> None:
    emit({"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "torch": torch.__version__,
          "shape": {"windows": WINDOWS, "heads": HEADS, "length": LENGTH, "head_dim": HEAD_DIM, "radius": RADIUS}})
    try:
        cases = variants()
    except Exception as error:  # noqa: BLE001 - reported
        emit({"flex_variants": {"ok": False, "error": f"{type(error).__name__}: {error}"[:500]}})
        return
    for name, (forward, pairs) in cases.items():
        start = time.perf_counter()
        try:
            with torch.no_grad():  # as the no-grad encode runs it
                fwd = timed(forward)
            result = {"ok": True, "forward_ms": round(1e3 * fwd, 3), "forward_tflops": round(4 * HEAD_DIM * pairs / fwd / 1e12, 2)}
            if not CPU:  # flex attention's backward does not run on CPU
                both = timed(lambda: forward().sum().backward())
                result.update(forward_backward_ms=round(1e3 * both, 3), forward_backward_tflops=round(10 * HEAD_DIM * pairs / both / 1e12, 2))
            emit({f"flex_variants-{name}": {**result, "seconds": round(time.perf_counter() - start, 1)}})
        except Exception as error:  # noqa: BLE001 - reported, so one failure does not hide the others
            emit({f"flex_variants-{name}": {"ok": False, "error": f"{type(error).__name__}: {error}"[:500],
                                            "trace": traceback.format_exc()[-800:]}})


if __name__ == "__main__":
    main()
    os._exit(0)
