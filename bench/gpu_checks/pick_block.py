"""Time one streaming cross-attention layer (forward + backward) per key-block size; print the fastest.

Each key block costs a fixed number of host-side op launches, 57 aten ops for its forward and
backward (slice, the stacked K/V projection, kernel, log-sum-exp merge and their backward;
counted on CPU, torch 2.13), a few tenths of a millisecond of Python and dispatch, while an H100
needs about that long for the compute of an 8192-key block: small blocks leave the GPU waiting
on the host. Measured here, on the machine the sweep runs on, at BART-large's
decoder shape (hidden 1024, 16 heads, 1024 targets) over 256K keys in bf16, so the sweep's
streaming lines use the block that is fastest there. Appends one JSON line (each block's
milliseconds) to ``--report``; prints only the chosen block on stdout.

    BLOCK=$(python bench/gpu_checks/pick_block.py --report $OUT/checks.jsonl)
    CHECK_DEVICE=cpu python bench/gpu_checks/pick_block.py --keys 8192 --blocks 512,2048   # dry run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for cached_ds

DEVICE = os.environ.get("CHECK_DEVICE", "cuda")


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def layer_seconds(block: int, keys: int, fused: bool = True, hidden: int = 1024, heads: int = 16, target: int = 1024,
                  repeats: int = 3) -> float:
    """Median seconds of one layer's streamed forward + backward (states and weights need gradients)."""
    from cached_ds.streaming_attention import streaming_cross_attention

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype, generator=gen).requires_grad_()

    head_dim = hidden // heads
    query, states = leaf(1, heads, target, head_dim), leaf(1, keys, hidden)
    k_weight, v_weight, k_bias, v_bias = leaf(hidden, hidden), leaf(hidden, hidden), leaf(hidden), leaf(hidden)
    times = []
    for _ in range(repeats + 1):  # the first run warms up the kernels and the allocator
        synchronize()
        start = time.perf_counter()
        out = streaming_cross_attention(query, states, None, k_weight, k_bias, v_weight, v_bias, head_dim**-0.5, block, fused=fused)
        out.float().sum().backward()
        synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=262144)
    parser.add_argument("--blocks", default="8192,16384,32768,65536", help="comma-separated key-block sizes to time")
    parser.add_argument("--report", type=Path, default=None, help="append the timings as one JSON line here")
    parser.add_argument("--plain", action="store_true", help="time the plain blocks (cross_attention_kernel plain), not the fused kernels")
    args = parser.parse_args(argv)
    blocks = [int(b) for b in args.blocks.split(",")]
    ms = {block: round(1e3 * layer_seconds(block, args.keys, fused=not args.plain), 2) for block in blocks}
    chosen = min(ms, key=ms.get)
    if args.report is not None:
        with args.report.open("a") as report:
            report.write(json.dumps({"block_timing": {"device": DEVICE, "keys": args.keys, "plain": args.plain, "layer_ms": ms, "chosen": chosen}}) + "\n")
    print(chosen)


if __name__ == "__main__":
    main()
