"""GPU check of cached_ds.t5_attention: the CUDA paths against HF's eager attention, fp32.

For tiny T5 and LongT5 (local, transient-global) models on CUDA, one forward + backward of a
fixed random weighting of encoder states and logits (two padded documents, padded summaries),
once with the fast attention installed and once on an untouched copy with HF eager attention;
prints a JSON line per case (``case_lines.py``): the max relative errors of outputs, parameter gradients (global
and worst single parameter) and input gradients, whether the flex_attention path ran, seconds.
Every case catches its own exception and reports it in the JSON. About 30-60 s on an H100
(flex_attention compiles a few small shapes).

    python bench/gpu_checks/t5_attention_check.py
"""

from __future__ import annotations

import copy
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for cached_ds
from case_lines import emit  # noqa: E402  (bench/gpu_checks/case_lines.py)

# fp32 with different summation orders (the CPU tests hold 1e-5); bf16 against fp32: its rounding alone
# leaves 4-14% on single tensors (measured on CPU), where a gradient a kernel does not return is 100% off
TOLERANCE = {"fp32": 1e-4, "bf16": 0.3}


def tiny(family: str):
    import transformers as hf

    common = {
        "vocab_size": 96, "d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2,
        "num_heads": 2, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32,
        "decoder_start_token_id": 0,
        "dropout_rate": 0.0,  # the fast path runs HF's code under attention dropout; keep it on ours
    }
    if family == "t5":
        return hf.T5ForConditionalGeneration(hf.T5Config(**common))
    kind = {"longt5-local": "local", "longt5-tglobal": "transient-global"}[family]
    return hf.LongT5ForConditionalGeneration(
        hf.LongT5Config(**common, encoder_attention_type=kind, local_radius=7, global_block_size=8)
    )


LENGTHS = (150, 97)  # two documents, padded to the longer


def step(model, lengths=LENGTHS, summary=(12, 7)):
    import torch

    gen = torch.Generator().manual_seed(1)
    batch, width = len(lengths), max(lengths)
    ids = torch.randint(4, 96, (batch, width), generator=gen)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    dec = torch.randint(4, 96, (batch, max(summary)), generator=gen)
    dec_mask = (torch.arange(max(summary))[None] < torch.tensor(summary)[:, None]).long()
    ids, mask, dec, dec_mask = (t.cuda() for t in (ids, mask, dec, dec_mask))
    embed = model.get_input_embeddings()
    x = embed(ids).detach().requires_grad_(True)
    y = embed(dec).detach().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(inputs_embeds=x, attention_mask=mask, decoder_inputs_embeds=y, decoder_attention_mask=dec_mask, use_cache=False)
    enc = out.encoder_last_hidden_state * mask[..., None]
    logits = out.logits * dec_mask[..., None]
    loss = sum((t * torch.randn(t.shape, generator=gen).cuda()).sum() / t.numel() for t in (enc, logits))
    loss.backward()
    grads = {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}
    return {"encoder": enc.detach(), "logits": logits.detach(), "x": x.grad, "y": y.grad}, grads


def check(family: str, kernel: str, lengths=LENGTHS, dtype: str = "fp32") -> dict:
    """``kernel``: "flex", "blocked" or "local_sdpa" (LongT5's encoder layers on SDPA over
    blocks, its efficient kernel with a bias gradient; the decoder's on flex). ``dtype`` "bf16":
    the fast model in bf16 against the fp32 reference, to bf16's tolerance (a gradient a kernel
    does not return is off by 100%)."""
    import torch
    from errors import global_relative, relative  # bench/gpu_checks/errors.py

    from cached_ds import flex_t5
    from cached_ds.t5_attention import install_fast_t5_attention

    start = time.time()
    torch.manual_seed(0)
    model = tiny(family).cuda().train()
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    if dtype == "bf16":
        model.to(torch.bfloat16)
    use_flex = kernel != "blocked"
    install_fast_t5_attention(model, block=64, use_flex=use_flex, local_sdpa=kernel == "local_sdpa")
    calls = flex_t5.calls
    outs, grads = step(model, lengths)
    flex_calls = flex_t5.calls - calls
    ref_outs, ref_grads = step(reference, lengths)
    errors = {f"{k}_rel": relative(outs[k], ref_outs[k]) for k in ref_outs}
    missing = sorted(set(grads) ^ set(ref_grads))
    per_param = {k: relative(grads[k], ref_grads[k]) for k in ref_grads if k in grads and ref_grads[k].norm() > 1e-6}
    worst = max(per_param, key=per_param.get)
    errors.update(grad_global_rel=global_relative(grads, ref_grads), grad_worst_param=worst, grad_worst_rel=per_param[worst])
    bias = [k for k in ref_grads if "relative_attention_bias" in k]
    errors["bias_table_grad_rel"] = max(relative(grads[k], ref_grads[k]) for k in bias)
    numbers = [v for k, v in errors.items() if k.endswith("_rel")]
    return {
        **errors, "missing_grads": missing, "flex_calls": flex_calls, "flex_failure": flex_t5.failure,
        "seconds": round(time.time() - start, 1),
        "dtype": dtype, "ok": not missing and max(numbers) <= TOLERANCE[dtype] and (flex_calls > 0) == use_flex,
    }


def main() -> None:
    result: dict = {"check": "t5_attention"}
    try:
        import torch
        import transformers

        result.update(torch=torch.__version__, transformers=transformers.__version__, cuda=torch.cuda.is_available())
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons, on both sides
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        if torch.cuda.is_available():
            result["device"] = torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001 — report, never crash
        result["error"] = traceback.format_exc(limit=3)
    emit(result)
    cases_ok = []
    if result.get("cuda"):
        # The flex case at new lengths: its compiled kernels go automatic-dynamic (symbolic sizes,
        # forward and backward), as every later document length will. The bf16 local_sdpa case
        # checks the bias gradient of the kernel the sweep runs (memory-efficient SDPA), against fp32.
        cases = [("t5", "flex", None, "fp32"), ("longt5-local", "flex", None, "fp32"), ("longt5-tglobal", "flex", None, "fp32"),
                 ("t5", "blocked", None, "fp32"), ("longt5-tglobal", "blocked", None, "fp32"),
                 ("longt5-tglobal", "flex", (213, 130), "fp32"), ("longt5-local", "local_sdpa", None, "fp32"),
                 ("longt5-tglobal", "local_sdpa", None, "fp32"), ("longt5-tglobal", "local_sdpa", None, "bf16")]
        for family, kernel, lengths, dtype in cases:
            name = f"{family}-{kernel}" + (f"-lengths{lengths[0]}" if lengths else "") + ("-bf16" if dtype == "bf16" else "")
            try:
                case = check(family, kernel, lengths or LENGTHS, dtype)
            except Exception as error:  # noqa: BLE001
                case = {"ok": False, "error": f"{type(error).__name__}: {error}"[:1500], "trace": traceback.format_exc(limit=6)[-1500:]}
            emit({name: case})
            cases_ok.append(case["ok"])
    emit({"t5_attention_ok": bool(result.get("cuda")) and all(cases_ok)})


if __name__ == "__main__":
    main()
