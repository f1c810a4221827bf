"""GPU check of CachED through a real DeepSpeed engine on CUDA against plain HF.

The CI tests prove the engine exact on DeepSpeed's CPU accelerator, where there are no CUDA
streams, no pinned host memory and no asynchronous activation offload. Here the same kind of
step runs on a GPU: a tiny BART with dropout on, a padded two-document micro-batch, the
gradients at the accumulation boundary against the plain windowed HF reference
(``tests/reference.py``: HF calls only, the same RNG), in fp32 (TF32 off), to the tests' bounds.
Cases:
- ``zero3``: ``ds_configs/zero3.json`` as shipped: torch's linear (``memory_efficient_linear``
  off), the encoder and the decoder kept gathered;
- ``zero3-streaming-cpu-checkpointing``: with streaming cross-attention and DeepSpeed's
  ``activation_checkpointing.cpu_checkpointing``, which checkpoints the decoder's layers to host
  memory and keeps the fp32 gradient cache there too ([decoder-memory]; on DeepSpeed's CPU
  accelerator the engine keeps every input as it is, so only a GPU runs DeepSpeed's offload);
- ``zero3_offload``: ``zero3_offload.json``: parameters and optimizer in pinned host memory,
  DeepSpeed's linear wrapper;
- ``zero2-fp16``: fp16 with a static loss scale (``--fp16``; the CPU tests lift DeepSpeed's "no
  fp16 on CPU" check, so this is its first run on a real fp16 device).
Prints a JSON line per case as it ends (``case_lines.py``); every case catches its own exception. A few seconds a case.

    python bench/gpu_checks/engine_check.py
    CHECK_DEVICE=cpu python bench/gpu_checks/engine_check.py    # the plumbing, on the CPU accelerator
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # cached_ds, and the tests' plain-HF reference
DEVICE = os.environ.get("CHECK_DEVICE", "cuda")
if DEVICE == "cpu":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from case_lines import emit  # noqa: E402  (bench/gpu_checks/case_lines.py)
from errors import global_relative  # noqa: E402  (bench/gpu_checks/errors.py)

WINDOW = 16
CACHED = {"window": WINDOW, "group_windows": 1, "group_tokens": None}
FP16_SCALE = 256
# (config, "cached" kernels, activation_checkpointing section, global relative bound). The bound is
# the CI tests' 1e-5 where both sides run HF's modules on the same kernels; streaming
# cross-attention's fused block kernels sum in another order than HF's attention, and its
# kernel check allows 1e-4 on CUDA. Per parameter: 100x the bound, or 1e-6 absolute.
CASES = {
    "zero3": ("zero3", {}, None, 1e-5),
    "zero3-streaming-cpu-checkpointing": (
        "zero3", {"cross_attention_block": 8},
        {"partition_activations": False, "cpu_checkpointing": True, "contiguous_memory_optimization": False}, 1e-4,
    ),
    "zero3_offload": ("zero3_offload", {}, None, 1e-5),
    # fp16 (--fp16) with a static loss scale, dropout off (CUDA's fp16 dropout draws other masks):
    # scaled gradients through the cache, against fp32 HF to fp16's rounding (CPU: ~1e-3)
    "zero2-fp16": ("zero2", {}, None, 1e-2, {"fp16": {"enabled": True, "loss_scale": FP16_SCALE}}),
}


def compare(grads: dict, ref: dict, bound: float) -> dict:
    """The global relative error and the worst parameter against the bounds (not an assertion:
    the report says how far off each case is)."""
    if sorted(grads) != sorted(ref):
        return {"ok": False, "error": f"parameters with a gradient differ: {sorted(set(grads) ^ set(ref))}"}
    worst, worst_name = 0.0, None
    for name in ref:
        excess = float(((grads[name].double() - ref[name].double()).abs() - 100 * bound * ref[name].double().abs()).max())
        if excess > worst:
            worst, worst_name = excess, name
    global_rel = global_relative(grads, ref)
    return {"global_rel": global_rel, "bound": bound, "worst_param": worst_name, "worst_excess": worst,
            "ok": global_rel <= bound and worst <= 1e-6}


def engine_case(config_name: str, kernels: dict, checkpointing: dict | None, bound: float, extra: dict | None = None) -> dict:
    from ds_helpers import reduced_grad, resolved_config
    from reference import windowed_hf_step
    from tiny_models import make_model, make_model_without_cross_attention_dropout, random_batch

    from cached_ds.deepspeed_engine import initialize
    from cached_ds.host_offload import placed

    # streaming cross-attention has no attention dropout: the reference's is off there too. Four
    # decoder layers under cpu_checkpointing: DeepSpeed keeps the last layer's input and its two
    # newest offloads on the GPU, so with fewer no input would come back from host memory.
    layers = {"decoder_layers": 4} if checkpointing else {}
    fp16 = bool(extra and "fp16" in extra)
    if fp16:
        layers["dropout"] = 0.0
    model = (make_model_without_cross_attention_dropout if kernels.get("cross_attention_block") else make_model)("bart", **layers)
    ids, mask, labels = random_batch([3 * WINDOW + 5, 2 * WINDOW + 1], [7, 5], model.config.pad_token_id, seed=3)
    device = torch.device(DEVICE)
    reference = copy.deepcopy(model).to(device)
    _, ref = windowed_hf_step(reference, ids.to(device), mask.to(device), labels.to(device), WINDOW, 1, seed=100)

    config = resolved_config(config_name, micro=2, cached={**CACHED, **kernels})
    if DEVICE == "cuda":  # the shipped offload config pins its host memory; the CI tests cannot
        for section in ("offload_param", "offload_optimizer"):
            if section in config["zero_optimization"]:
                config["zero_optimization"][section]["pin_memory"] = True
    if checkpointing:
        config["activation_checkpointing"] = checkpointing
    config.update(extra or {})
    engine, *_ = initialize(model, config)
    batch = placed({"input_ids": ids, "attention_mask": mask, "labels": labels}, engine.device)  # as the trainer does
    torch.manual_seed(100)
    engine.backward(engine(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss)
    unscale = FP16_SCALE if fp16 else 1
    grads = {name: reduced_grad(p).float() / unscale for name, p in engine.module.model.named_parameters()}
    engine.step()
    result = compare({k: v.to(device) for k, v in grads.items()}, ref, bound)
    result["linear"] = torch.nn.functional.linear.__name__
    result["gradient_cache_offloaded"] = bool(engine.module.cached_config.offload_gradient_cache)
    if checkpointing and checkpointing.get("cpu_checkpointing"):
        from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing

        offload = ds_checkpointing._cpu_offload_engine  # None on the CPU accelerator (its blocking path)
        result["activation_offload"] = None if offload is None else vars(offload.stats)
        if DEVICE == "cuda":  # a pass must have sent some layer's input to host memory and back
            result["ok"] = result["ok"] and offload is not None and offload.stats.offloaded_tensors >= 3
    return result


@contextlib.contextmanager
def fp16_on_cpu(extra: dict | None):
    """The CPU dry run of the fp16 case: DeepSpeed's CPU accelerator says it has no fp16, so its
    check is lifted for that case only (as tests/test_fp16.py does); the plumbing, not the numbers."""
    if DEVICE != "cpu" or not (extra and "fp16" in extra):
        yield
        return
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    saved = CPU_Accelerator.is_fp16_supported, CPU_Accelerator.supported_dtypes
    CPU_Accelerator.is_fp16_supported = lambda self: True
    CPU_Accelerator.supported_dtypes = lambda self: [torch.float32, torch.bfloat16, torch.float16]
    try:
        yield
    finally:
        CPU_Accelerator.is_fp16_supported, CPU_Accelerator.supported_dtypes = saved


def main() -> None:
    from cached_ds.distributed import init_process_group

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    init_process_group()
    emit({"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "torch": torch.__version__})
    for name, args in CASES.items():  # each line flushed before os._exit, which flushes nothing
        start = time.perf_counter()
        try:
            with fp16_on_cpu(args[4] if len(args) > 4 else None):
                emit({f"engine-{name}": {**engine_case(*args), "seconds": round(time.perf_counter() - start, 2)}})
        except Exception as error:  # noqa: BLE001 - reported, so one failure does not hide the others
            emit({f"engine-{name}": {"ok": False, "error": f"{type(error).__name__}: {error}"[:500],
                                     "trace": traceback.format_exc()[-int(os.environ.get("TRACE_CHARS", 800)):]}})


if __name__ == "__main__":
    main()
    os._exit(0)  # skip interpreter teardown (NCCL groups can hang in destructors)
