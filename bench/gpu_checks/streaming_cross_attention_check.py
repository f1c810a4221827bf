"""GPU check of cached_ds.streaming_cross_attention on CUDA against HF's cross-attention.

For tiny BART and T5 decoders (head_dim 64, scores O(1)) on CUDA, one forward + backward of a
padded two-document batch whose encoder states need a gradient, once with streaming
cross-attention installed (several key blocks, the last one partial) and once on an untouched
copy. fp32 must agree to 1e-4 relative (different summation orders): the exactness check. In
bf16 autocast, a sanity check: streaming may be at most twice as far from the fp32 result as
the farthest of HF's own bf16 paths (SDPA, SDPA math, eager; ``_exactness``). Each family runs
on the default block kernel, then in bf16 on each kernel alone (flash, memory-efficient, plain
blocks); each case names the kernel it ran. Then a long one: BART-large's decoder shape over 256K keys
in bf16, reporting the peak memory of the streamed backward against HF's, and a CachED step's
peak with the gradient cache and fused states on the device and in host memory. And a CachED
step with both in host memory (side-stream copies, the worker thread's adds), and one with the
documents' ids in pinned host memory, against the same step on the device: fp32, to 1e-6.
Prints a JSON line per case as it ends (``case_lines.py``); every case catches its own exception. About 30 s on an H200.

    python bench/gpu_checks/streaming_cross_attention_check.py
"""

from __future__ import annotations

import copy
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from case_lines import emit  # bench/gpu_checks/case_lines.py
from errors import global_relative, relative  # bench/gpu_checks/errors.py

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for cached_ds

TOLERANCE = {"fp32": 1e-4}  # bf16: against the fp32 result, next to HF's bf16 paths (_exactness)
DEVICE = os.environ.get("CHECK_DEVICE", "cuda")  # "cpu": a dry run of the exactness cases


def tiny(family: str, **shape):
    """BART or T5 with head_dim ``d // heads`` (64 by default, the large models' head size).
    BART's init is widened (``init_std`` 0.05) so its cross-attention scores are O(1): at the
    default 0.02 they are near 0, the softmax is near uniform, and a wrong softmax backward
    (dS = P (dP - rowsum(dO O))) hardly shows in the gradients."""
    import transformers as hf

    d, heads = shape.get("d", 128), shape.get("heads", 2)
    if family == "bart":
        config = hf.BartConfig(vocab_size=96, d_model=d, encoder_layers=1, decoder_layers=shape.get("layers", 2),
                               encoder_attention_heads=2, decoder_attention_heads=heads, encoder_ffn_dim=64,
                               decoder_ffn_dim=64, max_position_embeddings=shape.get("positions", 64), dropout=0.0,
                               attention_dropout=0.0, init_std=shape.get("init_std", 0.05))
        return hf.BartForConditionalGeneration(config)
    config = hf.T5Config(vocab_size=96, d_model=d, d_kv=d // heads, d_ff=64, num_layers=1, num_decoder_layers=2, num_heads=heads,
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


def exactness(family: str, dtype: str, backend: str | None = None) -> dict:
    """``backend``: the only fused SDPA backend switched on while the streaming model runs ("MATH":
    its plain PyTorch blocks; "FLASH_ATTENTION" / "EFFICIENT_ATTENTION": that kernel), else all
    of them (the default choice). Each case reports the block kernel it ran (``block_attention``)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cached_ds.block_attention import block_kernel

    def only_backend():  # MATH stays on for HF's own SDPA calls (T5's self-attention has a float mask)
        return sdpa_kernel([getattr(SDPBackend, backend), SDPBackend.MATH]) if backend else contextlib.nullcontext()

    with only_backend():
        kernel = block_kernel(torch.empty(1, 2, 1, 64, device=DEVICE, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32))
    return {**_exactness(family, dtype, only_backend), "block_kernel": kernel.name if kernel else "plain"}


def _exactness(family: str, dtype: str, only_backend) -> dict:
    """fp32: streaming against HF's cross-attention, to ``TOLERANCE``. bf16: each run against the
    fp32 result. Rounding alone moves these tiny models' bf16 gradients by 1-7 % depending on the
    kernel (T5's unscaled scores most): HF's own paths gave 1.1 % (SDPA's default), 3.4 % (eager)
    and 6.2 % (SDPA math) for T5 on CPU. So streaming may be at most twice as far from the fp32
    result as the farthest of HF's; a wrong layout or scale is off by far more."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cached_ds.streaming_cross_attention import install_streaming_cross_attention

    torch.manual_seed(0)
    model = tiny(family).to(DEVICE).train()
    reference = copy.deepcopy(model)
    install_streaming_cross_attention(model, block=7)
    states = torch.randn(2, 23, model.config.d_model, device=DEVICE)
    mask = torch.ones(2, 23, dtype=torch.long, device=DEVICE)
    mask[1, 14:] = 0
    keep = mask.bool()
    labels = torch.randint(4, 96, (2, 5), device=DEVICE)
    with only_backend():
        loss, grad_states, grads = step(model, states, mask, labels, dtype)
    ref_loss, ref_states, ref_grads = step(reference, states, mask, labels, dtype)
    errors = {"loss": relative(loss, ref_loss), "states_grad": relative(grad_states[keep], ref_states[keep]),
              "param_grads": global_relative(grads, ref_grads), "same_params": sorted(grads) == sorted(ref_grads)}
    if dtype == "fp32":
        errors["ok"] = errors["same_params"] and max(errors["loss"], errors["states_grad"], errors["param_grads"]) <= TOLERANCE["fp32"]
        return errors
    _, true_states, true_grads = step(reference, states, mask, labels, "fp32")
    with sdpa_kernel(SDPBackend.MATH):
        hf_math = step(reference, states, mask, labels, "bf16")
    eager = copy.deepcopy(reference)
    eager.set_attn_implementation("eager")
    hf_eager = step(eager, states, mask, labels, "bf16")

    def distance(run_states, run_grads):  # [states, parameters] against the fp32 result
        return [relative(run_states[keep], true_states[keep]), global_relative(run_grads, true_grads)]

    errors["vs_fp32"] = {"streaming": distance(grad_states, grads), "hf-sdpa": distance(ref_states, ref_grads),
                         "hf-sdpa-math": distance(*hf_math[1:]), "hf-eager": distance(*hf_eager[1:])}
    hf_worst = [max(d[i] for name, d in errors["vs_fp32"].items() if name != "streaming") for i in range(2)]
    errors["ok"] = errors["same_params"] and all(ours <= 2 * max(hf, 1e-3) for ours, hf in zip(errors["vs_fp32"]["streaming"], hf_worst))
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
        model = tiny("bart", d=1024, layers=12, heads=16, positions=1024).to(DEVICE).train()  # 1024 targets
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
    """A CachED step (fp32, streaming cross-attention, a padded two-document batch) with the
    gradient cache and the fused states in host memory, and one with the documents' ids and mask
    in pinned host memory (as the trainer gives them), against the same step with everything on
    the device. The side-stream copies, the worker thread's host adds and each group's copy of
    its ids must change nothing (the same fp32 adds in the same order; a block read before its
    copy landed would). Big enough that copies and compute overlap."""
    from cached_ds import CachedConfig, CachedSeq2Seq

    grads = {}
    for name, offload, documents_on_host in (("device", False, False), ("host", True, False), ("host-documents", False, True)):
        torch.manual_seed(0)
        model = tiny("bart", d=512, layers=2, heads=8, positions=1024).to(DEVICE).train()
        wrapped = CachedSeq2Seq(model, CachedConfig(window=1024, group_tokens=4096, cross_attention_block=2048,
                                                    offload_gradient_cache=offload, offload_encoder_states=offload))
        ids = torch.randint(4, 96, (2, tokens), device=DEVICE)
        mask = torch.ones_like(ids)
        mask[1, tokens - 1000 :] = 0
        labels = torch.randint(4, 96, (2, 256), device=DEVICE)
        if documents_on_host:
            ids, mask = (t.cpu().pin_memory() if DEVICE == "cuda" else t.cpu() for t in (ids, mask))
        wrapped(ids, mask, labels=labels).loss.backward()
        grads[name] = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    result = {}
    for name in ("host", "host-documents"):
        error = global_relative(grads[name], grads["device"])
        same = sorted(grads[name]) == sorted(grads["device"])
        result[name] = {"param_grads": error, "same_params": same}
    result["ok"] = all(r["param_grads"] <= 1e-6 and r["same_params"] for r in result.values())
    return result


def main() -> None:
    emit({"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "torch": torch.__version__})
    # Each family on the default kernel, then in bf16 on each one alone (fallbacks.py reads the names)
    kernels = {"plain-blocks": "MATH", "flash-kernel": "FLASH_ATTENTION"}
    if DEVICE == "cuda":  # CPU SDPA has no memory-efficient backend
        kernels["efficient-kernel"] = "EFFICIENT_ATTENTION"
    cases = {f"{family}-{dtype}": (exactness, (family, dtype)) for family in ("bart", "t5") for dtype in ("fp32", "bf16")}
    cases.update({f"{family}-bf16-{name}": (exactness, (family, "bf16", backend))
                  for family in ("bart", "t5") for name, backend in kernels.items()})
    cases["offload-vs-device-fp32"] = (offload_exactness, (32768 if DEVICE == "cuda" else 2048,))
    if DEVICE == "cuda":
        cases["bart-large-decoder-256K-keys"] = (long_memory, ())
        cases["cached-step-256K-tokens"] = (cached_step_memory, ())
    for name, (fn, args) in cases.items():
        start = time.perf_counter()
        try:
            emit({name: {**fn(*args), "seconds": round(time.perf_counter() - start, 2)}})
        except Exception as error:  # noqa: BLE001 - reported, so one failure does not hide the others
            emit({name: {"ok": False, "error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-800:]}})


if __name__ == "__main__":
    main()
