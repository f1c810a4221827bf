"""GPU check of cached_ds.streaming_cross_attention on CUDA against HF's cross-attention.

For tiny BART and T5 decoders on CUDA, one forward + backward of a padded two-document batch
whose encoder states need a gradient, once with streaming cross-attention installed (several key
blocks, the last one partial) and once on an untouched copy: fp32 must agree to 1e-4 relative
(different summation orders), bf16 autocast to 3e-2; on the fused block kernels (flash for bf16,
memory-efficient for fp32: each case names the one it ran) and, for BART, on the plain blocks. Then a long one: BART-large's decoder shape
over 256K keys in bf16, reporting the peak memory of the streamed backward against HF's. And a
CachED step with the gradient cache and fused states in host memory (side-stream copies, the
worker thread's adds) against the same step without offload: fp32, to 1e-6. Prints
ONE JSON line; every case catches its own exception. About 20 s on an H100.

    python bench/gpu_checks/streaming_cross_attention_check.py
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for cached_ds

TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}
DEVICE = os.environ.get("CHECK_DEVICE", "cuda")  # "cpu": a dry run of the exactness cases


def tiny(family: str, **shape):
    import transformers as hf

    if family == "bart":
        config = hf.BartConfig(vocab_size=96, d_model=shape.get("d", 32), encoder_layers=1, decoder_layers=shape.get("layers", 2),
                               encoder_attention_heads=2, decoder_attention_heads=shape.get("heads", 2), encoder_ffn_dim=64,
                               decoder_ffn_dim=64, max_position_embeddings=shape.get("positions", 64), dropout=0.0, attention_dropout=0.0)
        return hf.BartForConditionalGeneration(config)
    config = hf.T5Config(vocab_size=96, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=2, num_heads=2,
                         dropout_rate=0.0, decoder_start_token_id=0)
    return hf.T5ForConditionalGeneration(config)


def step(model, states, mask, labels, dtype):
    from transformers.modeling_outputs import BaseModelOutput

    states = states.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = model(encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=mask, labels=labels, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return loss.float(), states.grad.float(), grads


def relative(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def exactness(family: str, dtype: str, backend: str | None = None) -> dict:
    """``backend``: the only SDPA backend switched on ("MATH": streaming runs its plain PyTorch
    blocks; "EFFICIENT_ATTENTION": the memory-efficient kernel in bf16 too), else all of them.
    Each case reports the block kernel it ran (``block_attention``)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cached_ds.block_attention import block_kernel

    with sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext():
        kernel = block_kernel(torch.empty(1, 2, 1, 16, device=DEVICE, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32))
        return {**_exactness(family, dtype), "block_kernel": kernel.name if kernel else "plain"}


def global_relative(grads: dict, reference: dict) -> float:
    """‖grads − reference‖ / ‖reference‖ over all of the reference's parameters together."""
    num = sum(float((grads[k] - reference[k]).pow(2).sum()) for k in reference)
    return (num / sum(float(reference[k].pow(2).sum()) for k in reference)) ** 0.5


def _exactness(family: str, dtype: str) -> dict:
    from cached_ds.streaming_cross_attention import install_streaming_cross_attention

    torch.manual_seed(0)
    model = tiny(family).to(DEVICE).train()
    reference = copy.deepcopy(model)
    install_streaming_cross_attention(model, block=7)
    states = torch.randn(2, 23, model.config.d_model, device=DEVICE)
    mask = torch.ones(2, 23, dtype=torch.long, device=DEVICE)
    mask[1, 14:] = 0
    labels = torch.randint(4, 96, (2, 5), device=DEVICE)
    loss, grad_states, grads = step(model, states, mask, labels, dtype)
    ref_loss, ref_states, ref_grads = step(reference, states, mask, labels, dtype)
    errors = {"loss": relative(loss, ref_loss), "states_grad": relative(grad_states[mask.bool()], ref_states[mask.bool()]),
              "param_grads": global_relative(grads, ref_grads), "same_params": sorted(grads) == sorted(ref_grads)}
    errors["ok"] = errors["same_params"] and max(v for k, v in errors.items() if k != "same_params") <= TOLERANCE[dtype]
    return errors


def peak_memory(run) -> dict:
    """Peak allocated GiB and seconds of ``run()``; an out-of-memory error is a result."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        run()
        torch.cuda.synchronize()
        return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "s": time.perf_counter() - start}
    except torch.OutOfMemoryError:
        return {"oom": True, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def long_memory(keys: int = 262144) -> dict:
    """BART-large's decoder shape (12 layers, d=1024, 16 heads), 1024 targets, bf16 autocast."""
    from cached_ds.streaming_cross_attention import install_streaming_cross_attention

    result = {}
    for name in ("hf", "streaming"):
        torch.manual_seed(0)
        model = tiny("bart", d=1024, layers=12, heads=16).to(DEVICE).train()
        if name == "streaming":
            install_streaming_cross_attention(model, block=8192)
        states = torch.randn(1, keys, 1024, device=DEVICE, dtype=torch.bfloat16)
        mask = torch.ones(1, keys, dtype=torch.long, device=DEVICE)
        labels = torch.randint(4, 96, (1, 1024), device=DEVICE)
        result[name] = peak_memory(lambda: step(model, states, mask, labels, "bf16"))  # noqa: B023 - called at once
    return result


def cached_step_memory(tokens: int = 262144) -> dict:
    """A whole CachED step (1-layer encoder, BART-large-shaped decoder, bf16 autocast) with HF's
    cross-attention, streaming, streaming with the gradient cache in host memory, and with the
    fused states there too."""
    from cached_ds import CachedConfig, CachedSeq2Seq

    result = {}
    for name, settings in {"hf": {}, "streaming": {"cross_attention_block": 8192},
                           "streaming+offload": {"cross_attention_block": 8192, "offload_gradient_cache": True},
                           "streaming+offload-states": {"cross_attention_block": 8192, "offload_gradient_cache": True,
                                                        "offload_encoder_states": True}}.items():
        torch.manual_seed(0)
        model = tiny("bart", d=1024, layers=12, heads=16, positions=1024).to(DEVICE).train()
        wrapped = CachedSeq2Seq(model, CachedConfig(window=1024, group_tokens=16384, decoder_gradient_checkpointing=True, **settings))
        ids = torch.randint(4, 96, (1, tokens), device=DEVICE)
        labels = torch.randint(4, 96, (1, 1024), device=DEVICE)
        def run():
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = wrapped(ids, torch.ones_like(ids), labels=labels).loss
            loss.backward()

        result[name] = peak_memory(run)
    return result


def offload_exactness(tokens: int = 32768) -> dict:
    """A CachED step (fp32, streaming cross-attention) with the gradient cache and the fused
    states in host memory against the same step with both on the device: the side-stream copies
    and the worker thread's host adds must change nothing (the same fp32 adds in the same order;
    a block read before its copy landed would). Big enough that copies and compute overlap."""
    from cached_ds import CachedConfig, CachedSeq2Seq

    grads = {}
    for name, offload in (("device", False), ("host", True)):
        torch.manual_seed(0)
        model = tiny("bart", d=512, layers=2, heads=8, positions=1024).to(DEVICE).train()
        wrapped = CachedSeq2Seq(model, CachedConfig(window=1024, group_tokens=4096, cross_attention_block=2048,
                                                    offload_gradient_cache=offload, offload_encoder_states=offload))
        ids = torch.randint(4, 96, (2, tokens), device=DEVICE)
        mask = torch.ones_like(ids)
        mask[1, tokens - 1000 :] = 0
        labels = torch.randint(4, 96, (2, 256), device=DEVICE)
        wrapped(ids, mask, labels=labels).loss.backward()
        grads[name] = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    error = global_relative(grads["host"], grads["device"])
    return {"param_grads": error, "same_params": sorted(grads["host"]) == sorted(grads["device"]),
            "ok": error <= 1e-6 and sorted(grads["host"]) == sorted(grads["device"])}


def main() -> None:
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "torch": torch.__version__}
    cases = {f"{family}-{dtype}": (exactness, (family, dtype)) for family in ("bart", "t5") for dtype in ("fp32", "bf16")}
    cases.update({f"bart-{dtype}-plain-blocks": (exactness, ("bart", dtype, "MATH")) for dtype in ("fp32", "bf16")})
    cases["offload-vs-device-fp32"] = (offload_exactness, (32768 if DEVICE == "cuda" else 2048,))
    if DEVICE == "cuda":  # CPU SDPA has no memory-efficient backend
        cases["bart-bf16-efficient-kernel"] = (exactness, ("bart", "bf16", "EFFICIENT_ATTENTION"))
        cases["bart-large-decoder-256K-keys"] = (long_memory, ())
        cases["cached-step-256K-tokens"] = (cached_step_memory, ())
    for name, (fn, args) in cases.items():
        start = time.perf_counter()
        try:
            report[name] = {**fn(*args), "seconds": round(time.perf_counter() - start, 2)}
        except Exception as error:  # noqa: BLE001 - reported, so one failure does not hide the others
            report[name] = {"ok": False, "error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-800:]}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
