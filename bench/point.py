"""One sweep point in its own process: build the model and engine, time full optimizer steps,
write one JSON result. A CUDA out-of-memory error is a result (``oom: true``), not a crash.

    python bench/point.py --spec '{"method": "cached", "model": "tiny-bart", "tokens": 1024, ...}' --result out.json

``sweep.py`` runs this once per (method, length) so one OOM cannot poison the next point.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # cached_ds from a plain checkout too

from flops import step_flops  # noqa: E402
from memory_sites import traced_step  # noqa: E402
from methods import attn_implementation, build_engine, random_document, window_for, without_attention_dropout  # noqa: E402

GIB = 2**30


def ds_config(stage: int, dtype: str, hidden: int) -> dict:
    """``ds_configs/zero<stage>.json`` with its "auto" fields fixed for a one-document step."""
    from cached_ds.ds_config import auto_values, load_config, resolve_auto

    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "ds_configs" / f"zero{stage}.json")
    config.pop("cached", None)
    config.pop("scheduler", None)  # a constant rate: the warm-up and total-step values go unused
    config = resolve_auto(config, auto_values(
        micro_batch_size=1, gradient_accumulation_steps=1, world_size=1, lr=1e-5, weight_decay=0.0,
        warmup_steps=0, total_steps=1, max_grad_norm=1.0, bf16=dtype == "bf16", hidden_size=hidden,
    ))
    # torch's AdamW: DeepSpeed's FusedAdam would compile a CUDA extension first (minutes).
    config["optimizer"]["params"]["torch_adam"] = True
    config["zero_allow_untested_optimizer"] = True
    config["steps_per_print"] = 10**9
    return config


def cached_settings(spec: dict) -> dict:
    """The spec's extra "cached" settings: its kernels, its graph budget in bytes, and whether
    the decoder stays under ZeRO-3's per-submodule gathers (an A/B of keep_decoder_gathered)."""
    settings = dict(spec.get("kernels") or {})
    if spec.get("keep_graphs_gib"):
        settings["keep_graphs_bytes"] = int(spec["keep_graphs_gib"] * GIB)
    if spec.get("zero3_decoder_hooks"):
        settings["keep_decoder_gathered"] = False
    return settings


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_step(engine, batch) -> float:
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


class PhaseClock:
    """Where one step's time goes, from the encoder's forward hooks (synchronised, so it is run on
    a step of its own, apart from the timed ones). For ``cached`` the encoder runs in forward
    without autograd and again inside backward (the recompute), which splits the backward, and
    each window group's share of the recompute is clocked (``recompute_group_s``, in order).

    A hook on the input embedding's accumulated gradient marks where the model's backward ends:
    the tied embedding is the last parameter autograd reaches, for every method. What follows is
    the engine's end of backward (``epilogue_s``: ZeRO's last bucket, its partitioning), kept
    out of the last group's time. That group is where ``cached`` delivers every encoder
    parameter's gradient, so every ZeRO reduction of the encoder falls inside it, after one
    group's compute (``hf_ds_gc`` spreads them over the whole encoder backward): a last group
    much slower than the others is that reduction's host time, not hidden by device work."""

    def __init__(self, encoder: torch.nn.Module):
        self.encoder, self.marks, self.section = encoder, [], None

    def _mark(self, name):
        synchronize()
        self.marks.append((name, time.perf_counter()))

    @contextmanager
    def phase(self, name):
        self._mark(f"{name}:start")
        yield
        self._mark(f"{name}:end")

    def run(self, engine, batch) -> dict:
        embedding = self.encoder.get_input_embeddings().weight
        decoder = getattr(engine.module, "model", engine.module).get_decoder()

        def states_hook(module, args, kwargs):  # d(loss)/d(encoder states) complete: the decoder's backward is over
            states = kwargs.get("encoder_hidden_states")
            if self.section == "forward" and torch.is_tensor(states) and states.requires_grad:
                states.register_hook(lambda _: self._mark("states_grad"))

        handles = [self.encoder.register_forward_pre_hook(lambda *_: self._mark("encoder:start")),
                   self.encoder.register_forward_hook(lambda *_: self._mark("encoder:end")),
                   decoder.register_forward_pre_hook(states_hook, with_kwargs=True)]
        if embedding.requires_grad:
            handles.append(embedding.register_post_accumulate_grad_hook(lambda _: self._mark("embedding_grad")))
        wrapped = engine.module
        scope = getattr(wrapped, "encoder_scope", None)
        if scope is not None:  # the encoder's gather (ZeRO-3 keep_encoder_gathered): when it is done
            @contextmanager
            def marked_scope():
                with scope():
                    self._mark("scope_entered")
                    yield
            wrapped.encoder_scope = marked_scope
        try:
            self.section = "forward"
            with self.phase("forward"):
                loss = engine(**batch).loss
            node = _find_node(loss.grad_fn, "CachedEncoderFunctionBackward")
            if node is not None:  # the moment autograd hands CachED its gradient cache
                handles.append(node.register_prehook(lambda *_: self._mark("cached_backward_entry")))
            self.section = "backward"
            with self.phase("backward"):
                engine.backward(loss)
            with self.phase("optimizer"):
                engine.step()
        finally:
            if scope is not None:
                wrapped.encoder_scope = scope
            for handle in handles:
                handle.remove()
        return self.split()

    def split(self) -> dict:
        times = {}
        section = None
        for name, t in self.marks:
            if name.endswith(":start") and not name.startswith("encoder"):
                section, times[section] = name.split(":")[0], {"start": t, "encoder": []}
            elif name == "encoder:start":
                times[section]["encoder"].append([t, None])
            elif name == "encoder:end":
                times[section]["encoder"][-1][1] = t
            elif name in ("embedding_grad", "states_grad", "cached_backward_entry"):
                times[section].setdefault(name, t)
            elif name == "scope_entered":
                times[section].setdefault("scope_entered", []).append(t)
            elif name.endswith(":end"):
                times[section]["end"] = t
        forward, backward = times["forward"], times["backward"]
        encode = sum(end - start for start, end in forward["encoder"])
        result = {"encoder_forward_s": encode, "decoder_forward_s": forward["end"] - forward["start"] - encode,
                  "backward_s": backward["end"] - backward["start"],
                  "optimizer_s": times["optimizer"]["end"] - times["optimizer"]["start"]}
        model_end = backward.get("embedding_grad", backward["end"])
        result["epilogue_s"] = backward["end"] - model_end
        if backward["encoder"]:  # cached: decoder backward, then the recompute + encoder backward
            starts = [start for start, _ in backward["encoder"]]
            result["decoder_backward_s"] = starts[0] - backward["start"]
            result["recompute_backward_s"] = backward["end"] - starts[0]
            # a group's encoder pass, its backward and its gradient sums: up to the next group's pass
            result["recompute_group_s"] = [b - a for a, b in zip(starts, [*starts[1:], model_end])]
        # the decoder's own backward (both methods), and CachED's setup before its first recompute
        decoder_done = backward.get("states_grad", backward.get("cached_backward_entry"))
        if decoder_done is not None:  # streaming layers give the states no autograd gradient: CachED's entry then
            result["decoder_only_backward_s"] = decoder_done - backward["start"]
        if "cached_backward_entry" in backward:
            entry = backward["cached_backward_entry"]
            result["states_grad_to_cached_entry_s"] = entry - backward.get("states_grad", entry)
            scoped = [t for t in backward.get("scope_entered", []) if t >= entry]
            if scoped:
                result["encoder_gather_s"] = scoped[0] - entry
                if backward["encoder"]:
                    result["cache_and_first_group_setup_s"] = backward["encoder"][0][0] - scoped[0]
        if forward.get("scope_entered"):
            result["forward_gather_marks"] = len(forward["scope_entered"])
        return result


def _find_node(root, name: str):
    """The first autograd node named ``name`` reachable from ``root`` (breadth first), or None."""
    from collections import deque

    seen, queue = set(), deque([root])
    while queue:
        node = queue.popleft()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == name:
            return node
        queue.extend(next_node for next_node, _ in node.next_functions)
    return None


def profile_step(engine, batch, top: int = 25, trace: Path | None = None) -> dict:
    """One more step under ``torch.profiler``, summarised by ``profile_summary``. The profiler
    slows the host, so ``wall_s`` is not a step time to compare. ``trace``: also the step's
    timeline there (Chrome trace; gzipped where the name ends in .gz), to see where the device idles."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = torch.cuda.is_available()
    synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        with record_function("step:forward"):
            loss = engine(**batch).loss
        with record_function("step:backward"):
            engine.backward(loss)
        with record_function("step:optimizer"):
            engine.step()
        synchronize()
    wall = time.perf_counter() - start
    summary = profile_summary(prof.key_averages(), wall, cuda, top)
    if trace is not None:
        try:
            prof.export_chrome_trace(str(trace))
            summary["trace_file"] = trace.name
        except Exception as error:  # noqa: BLE001 - a failed export must not cost the point
            summary["trace_error"] = f"{type(error).__name__}: {error}"[:300]
    return summary


def profile_summary(events, wall: float, cuda: bool, top: int = 25) -> dict:
    """The ``top`` host-side ops by self device time (CPU: host time), each phase's host time,
    how busy the device was over the step's wall time (low: the GPU waits on Python, e.g.
    hooks), and the library's labelled spans (``cached_ds:...``) with their inclusive times.
    And the host's side: its ops by self host time (``host_top``: CUDA launches, Python-heavy
    ops) and the calls in which it waited for the device (``host_waits``: synchronisations, and
    copies, which wait inside the call when they read pageable memory). A device that idles
    while the host waits in a sync has lost the host's lead: every launch after it is late.

    On CUDA the profiler lists every kernel twice: under the op that launched it (its self
    device time) and as a device-side event of its own; a ``record_function`` span too, once on
    the host and once as a device annotation with no host time. So ops and phases are read from
    host-side events only, and busy time from device-side events only (summing both counted each
    kernel twice: the 2026-11-27 H200 profiles' 67% and 111% were double)."""
    from torch.autograd import DeviceType

    def device_us(event):  # renamed from self_cuda_time_total in recent torch
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)

    host = [e for e in events if e.device_type == DeviceType.CPU]
    phases = {e.key.split(":")[1]: e.cpu_time_total / 1e6 for e in host if e.key.startswith("step:")}
    time_of = device_us if cuda else (lambda event: event.self_cpu_time_total)
    ops = [e for e in host if not e.key.startswith(("step:", "cached_ds:"))]
    by_device = sorted((e for e in ops if time_of(e) > 0), key=time_of, reverse=True)
    summary = {"wall_s": wall, "phase_host_s": phases, "ops_counted_by": "device time" if cuda else "host time",
               "top": [{"name": e.key, "calls": e.count, "self_ms": time_of(e) / 1e3, "host_ms": e.self_cpu_time_total / 1e3}
                       for e in by_device[:top]]}

    def host_ms(selected):
        return [{"name": e.key, "calls": e.count, "host_ms": e.self_cpu_time_total / 1e3}
                for e in sorted(selected, key=lambda e: e.self_cpu_time_total, reverse=True)]

    summary["host_top"] = host_ms(ops)[:top]
    summary["host_waits"] = host_ms(e for e in ops if "Synchronize" in e.key or e.key.startswith("cudaMemcpy"))
    # spans the library labels (``record_function("cached_ds:...")``), with the device time of
    # everything launched inside them: compiled kernels share names across call sites
    summary["spans"] = [{"name": e.key, "calls": e.count, "host_ms": e.cpu_time_total / 1e3,
                         **({"device_ms": e.device_time_total / 1e3} if cuda else {})}
                        for e in host if e.key.startswith("cached_ds:")]
    if cuda:
        kernels = (e for e in events if e.device_type != DeviceType.CPU and not e.key.startswith("step:"))
        summary["device_busy_s"] = sum(device_us(e) for e in kernels) / 1e6
    return summary


def encoder_saved_peak(engine, encoder, batch) -> int:
    """Peak bytes the encoder saves for backward during one step ([core]'s SavedTensorMeter)."""
    from cached_ds.memory import SavedTensorMeter

    meter = SavedTensorMeter()
    with meter.watch(encoder):
        train_step(engine, batch)
    return meter.peak_bytes


def measure(spec: dict) -> dict:
    import transformers as hf

    from cached_ds.model_zoo import model_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(spec.get("seed", 0))
    config = model_config(spec.get("shipped_model", spec["model"]), **(spec.get("config_overrides") or {}))
    with device:  # random init straight on the device: seconds, not minutes, for BART-large
        model = hf.AutoModelForSeq2SeqLM.from_config(config)
    model.train()
    if spec.get("no_attention_dropout"):
        without_attention_dropout(model)
    window = window_for(model, spec.get("window"))
    result = {"attn_implementation": attn_implementation(model), "window": window,
              "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
              "parameters": sum(p.numel() for p in model.parameters())}
    flops = step_flops(model, spec["tokens"], spec["target_tokens"], window)
    encoder = model.get_encoder()
    zero_config = ds_config(spec["zero_stage"], spec["dtype"], config.d_model)
    if spec.get("reduce_bucket_size"):  # an A/B of the config's value, for every method alike
        zero_config["zero_optimization"]["reduce_bucket_size"] = spec["reduce_bucket_size"]
    if spec.get("memory_efficient_linear") is not None:  # an A/B of zero3.json's false, for every method alike
        zero_config["zero_optimization"]["memory_efficient_linear"] = spec["memory_efficient_linear"]
    engine = build_engine(spec["method"], model, zero_config, window, spec["group_tokens"], cached_settings(spec))
    result["zero_reduce_bucket_size"] = engine.zero_reduce_bucket_size()  # what the engine runs with, the config's or an A/B's
    result["linear_function"] = torch.nn.functional.linear.__name__  # ZeRO-3's wrapper ("zero3_linear_wrap") or torch's
    batch = random_document(spec["method"], spec["tokens"], spec["target_tokens"], config.vocab_size, engine.device)
    for _ in range(spec["warmup"]):
        train_step(engine, batch)
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_times, losses = [], []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        losses.append(train_step(engine, batch))
        synchronize()
        step_times.append(time.perf_counter() - start)
    step_s = statistics.median(step_times)
    if spec["method"] == "cached":  # window groups whose graph the budget kept (not recomputed)
        result["kept_groups"] = engine.module.last_kept_groups
    result.update(step_s=step_s, step_times=step_times, losses=losses, tokens_per_s=spec["tokens"] / step_s,
                  model_tflops=flops / 1e12, model_tflops_per_s=flops / step_s / 1e12)
    if device.type == "cuda":
        result.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                      peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB)
    save_partial(spec, result, "the timed steps")  # a point stopped in the steps below keeps its timing
    if spec.get("breakdown_step", True):
        result["breakdown"] = PhaseClock(encoder).run(engine, batch)
        save_partial(spec, result, "the breakdown step")
    if spec.get("saved_tensor_meter"):
        result["encoder_saved_peak_bytes"] = encoder_saved_peak(engine, encoder, batch)
    if spec.get("profile"):
        # PROFILE_TRACE_TOKENS=N: the timeline of profiled points up to N tokens, beside the result
        # file (sweep.py's logs/, which device_sweep.sh tars): a 64K step is a few MB gzipped
        limit = int(os.environ.get("PROFILE_TRACE_TOKENS", 0))
        trace = Path(spec["result_file"]).with_suffix(".trace.json.gz") if limit and spec["tokens"] <= limit and spec.get("result_file") else None
        result["profile"] = profile_step(engine, batch, trace=trace)
        save_partial(spec, result, "the profiled step")
    if spec.get("memory_trace") and device.type == "cuda":
        try:  # what is live at the peak, by site: one more step, its host slowed by the trace
            result["peak_sites"] = traced_step(lambda: train_step(engine, batch))
        except Exception as error:  # noqa: BLE001 - a failed trace must not cost the point
            result["peak_sites_error"] = f"{type(error).__name__}: {error}"[:300]
    return result


def save_partial(spec: dict, result: dict, done: str) -> None:
    """The result so far, marked ``partial`` (what it has done last), where sweep.py reads it if the
    point is stopped (its timeout, the session's deadline) before it writes the whole result."""
    if spec.get("result_file"):
        write_result(spec["result_file"], {"oom": False, **result, "partial": f"stopped after {done}"})


def write_result(path: str, result: dict) -> None:
    """Written aside and swapped in: a point stopped mid-write leaves the previous, whole file."""
    staging = Path(path + ".tmp")
    staging.write_text(json.dumps(result) + "\n")
    staging.replace(path)


def is_oom(error: BaseException) -> bool:
    """The device's out-of-memory, or the host's (torch's CPU allocator: "can't allocate memory")."""
    text = str(error).lower()
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text or "can't allocate memory" in text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="JSON object: method, model, tokens, target_tokens, ...")
    parser.add_argument("--result", required=True, help="where to write the JSON result")
    args = parser.parse_args()
    spec = {**json.loads(args.spec), "result_file": args.result}
    from cached_ds.distributed import init_process_group

    init_process_group()
    try:
        result = {"oom": False, **measure(spec)}
    except Exception as error:  # noqa: BLE001 - an OOM is a measurement; anything else is reported
        if not is_oom(error):
            raise
        result = {"oom": True, "error": str(error).splitlines()[0][:300]}
        if torch.cuda.is_available():
            result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
    write_result(args.result, result)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    os._exit(0)  # skip interpreter teardown (NCCL/gloo groups can hang in destructors)
