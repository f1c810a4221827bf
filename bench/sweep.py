"""Memory and throughput against document length: CachED vs the baselines users have today.

    python bench/sweep.py --model bart-large --dtype bf16 --zero_stage 3          # GPU: 16K … 16M tokens
    python bench/sweep.py --model long-t5-tglobal-large --tokens 16384,32768,65536
    python bench/sweep.py --smoke                                                 # CPU: tiny model, 2 lengths

A deep, narrow proxy on CPU (BART-large's 12 + 12 layers at width 64: host time, not compute):

    python bench/sweep.py --model bart-large --dtype fp32 --tokens 4096 --target_tokens 64 --window 512 \
        --group_tokens 1024 --methods hf_ds_gc,cached --config_overrides \
        d_model=64,encoder_ffn_dim=256,decoder_ffn_dim=256,encoder_attention_heads=4,decoder_attention_heads=4,vocab_size=1000

Every (method, length) point runs in its own process (``point.py``): an out-of-memory error is
recorded as ``oom`` and the method is not tried at longer lengths. Each point is appended to
``points.jsonl`` (a SLURM array task: ``points.task<k>.jsonl``) as it finishes and ``table.md``, ``memory.png`` and ``throughput.png`` are
rewritten, so an interrupted sweep keeps what it measured. Output goes to
``bench/results/<date>-<device>/`` (``--out`` to change). Methods are described in ``methods.py``,
the FLOP count in ``flops.py``; ``launchers/slurm/sweep.sbatch`` runs one length per array task.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # cached_ds from a plain checkout too
from methods import METHODS  # noqa: E402
from report import label, points_file, read_points, status_of, timed_out, write_report, zero_ab  # noqa: E402

HERE = Path(__file__).resolve().parent
# The shipped configs, read as files here: cached_ds.model_zoo would import transformers for a listing
MODEL_CONFIGS = HERE.parent / "cached_ds" / "model_configs"
DEFAULT_TOKENS = [2**k for k in range(14, 25)]  # 16K … 16M
MIN_POINT_S = 10.0  # below it a point could not even start: the sweep stops at its deadline instead
SMOKE = dict(model="tiny-bart", tokens=[1024, 4096], target_tokens=64, dtype="fp32", group_tokens=512,
             steps=2, warmup=1, saved_tensor_meter=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bart-large", help="a shipped config (cached_ds/model_configs): bart-large, long-t5-tglobal-large, tiny-bart, tiny-long-t5")
    parser.add_argument("--config_overrides", default=None, metavar="KEY=VALUE,...",
                        help="change fields of the shipped config (numbers, true/false or text), e.g. d_model=64,encoder_ffn_dim=256 "
                             "for a deep, narrow CPU proxy of a large model's host time; rows name the model with them")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--tokens", default=None, help="comma-separated document lengths (default: doubling 16K…16M)")
    parser.add_argument("--target_tokens", type=int, default=None,
                        help="summary tokens per document (default: 1024, or the decoder's positions where fewer: tiny-bart 256)")
    parser.add_argument("--zero_stage", type=int, default=3, choices=[0, 1, 2, 3])
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--window", type=int, default=None, help="encoder window (default: the model's position limit; LongT5 4096)")
    parser.add_argument("--group_tokens", type=int, default=16384,
                        help="CachED window-group size in tokens (another than the default is named in the row's label)")
    parser.add_argument("--cross_attention_block", type=int, default=None, help="cached: streaming cross-attention key block (default: HF's module)")
    parser.add_argument("--plain_cross_attention", action="store_true",
                        help="cached: streaming cross-attention on plain PyTorch ops, not fused SDPA kernels (cross_attention_kernel)")
    parser.add_argument("--fast_t5_attention", action="store_true", help="cached: blocked T5/LongT5 self-attention")
    parser.add_argument("--blocked_t5_attention", action="store_true",
                        help="cached: fast T5 attention on our blocked PyTorch code, not flex_attention (t5_attention_kernel)")
    parser.add_argument("--local_sdpa_t5_attention", action="store_true",
                        help="cached: LongT5's encoder attention as one SDPA call over blocks (t5_attention_kernel='local_sdpa')")
    parser.add_argument("--offload", action="store_true",
                        help="cached: the gradient cache and fused states in host memory (needs --cross_attention_block)")
    parser.add_argument("--keep_graphs_gib", type=float, default=None,
                        help="cached: device memory (GiB) for encoder graphs kept from the forward instead of recomputed (keep_graphs_bytes)")
    parser.add_argument("--reduce_bucket_size", type=int, default=None,
                        help="every method: ZeRO's reduce_bucket_size in elements instead of the config's (5e7 in the shipped "
                             "configs; HF's \"auto\" is hidden²), for an A/B; rows are then labelled bucket=N and compared with hf_ds_gc's of the same size")
    parser.add_argument("--memory_efficient_linear", action="store_true",
                        help="every method: ZeRO-3's memory_efficient_linear on (DeepSpeed's default, a Python autograd Function "
                             "for every linear; zero3.json sets it off), for an A/B; rows are then labelled mem_efficient_linear "
                             "and compared with hf_ds_gc's of the same setting")
    parser.add_argument("--zero3_decoder_hooks", action="store_true",
                        help="cached, ZeRO-3: leave the decoder to ZeRO-3's per-submodule gathers and hooks (keep_decoder_gathered off), for an A/B")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per point (the median is reported)")
    parser.add_argument("--run_id", default=None,
                        help="what a row's ratio is measured within: rows compare with the hf_ds_gc row of the same run id, and "
                             "an OOM skips longer lengths only within it (default: a new id per invocation; give one id to "
                             "several invocations into one --out to compare across them)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--no_breakdown", action="store_true",
                        help="skip the separately clocked time-breakdown step (one step fewer: for the longest points)")
    parser.add_argument("--point_timeout", type=float, default=1800.0, help="seconds before a point is abandoned")
    parser.add_argument("--deadline", type=float, default=None,
                        help="Unix time by which every point ends (a lent GPU's session): a point's timeout is cut to it, "
                             "and a point stopped there keeps what it measured before (point.py saves as it goes)")
    parser.add_argument("--saved_tensor_meter", action="store_true", help="also record the encoder's saved-tensor peak (one more step)")
    parser.add_argument("--profile", action="store_true",
                        help="one more step under torch.profiler: top ops by device time and the device's busy share (table.md)")
    parser.add_argument("--memory_trace", action="store_true",
                        help="CUDA: one more step under the allocator's trace; what is live at its peak, by source line, and "
                             "what each line adds per token between traced lengths (memory_sites.py, table.md)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<date>-<device>)")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny-bart, 2 lengths, all methods, fp32")
    parser.add_argument("--list_tokens", action="store_true",
                        help="print the plan's document lengths (comma-separated) and exit: sweep.sbatch's default array")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--smoke" in argv:  # the smoke settings are defaults: flags given beside --smoke still win
        parser.set_defaults(**{k: ",".join(map(str, v)) if k == "tokens" else v for k, v in SMOKE.items()})
    args = parser.parse_args(argv)
    args.group_tokens_set = args.group_tokens != parser.get_default("group_tokens")  # the smoke's own default too
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    args.methods = methods
    if args.plain_cross_attention and args.cross_attention_block is None:
        parser.error("--plain_cross_attention needs --cross_attention_block (it picks how streaming cross-attention runs)")
    if (args.blocked_t5_attention or args.local_sdpa_t5_attention) and not args.fast_t5_attention:
        parser.error("--blocked_t5_attention / --local_sdpa_t5_attention need --fast_t5_attention (they pick how that attention runs)")
    if args.blocked_t5_attention and args.local_sdpa_t5_attention:
        parser.error("--blocked_t5_attention and --local_sdpa_t5_attention are two choices of one kernel: give one")
    shipped = sorted(path.stem for path in MODEL_CONFIGS.glob("*.json"))
    if args.model not in shipped:
        parser.error(f"--model {args.model!r} is not a shipped config; choose from {', '.join(shipped)} "
                     "(or --config_overrides to change one's fields)")
    try:
        args.config_overrides = config_overrides(args.model, args.config_overrides)
    except ValueError as error:
        parser.error(f"--config_overrides: {error}")
    args.model_name = args.model + ("(" + ",".join(f"{k}={v}" for k, v in args.config_overrides.items()) + ")" if args.config_overrides else "")
    if args.memory_efficient_linear and args.zero_stage != 3:
        parser.error("--memory_efficient_linear is a ZeRO-3 setting: give it with --zero_stage 3")
    if args.offload and args.cross_attention_block is None:
        parser.error("--offload needs --cross_attention_block (only streaming cross-attention reads host-memory states)")
    try:
        args.tokens = sorted({int(t) for t in args.tokens.split(",")}) if args.tokens is not None else DEFAULT_TOKENS
    except ValueError:
        parser.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    if min(args.tokens) < 1:
        parser.error("--tokens must be positive")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0 (the median is over the timed steps)")
    if args.point_timeout < MIN_POINT_S:
        parser.error(f"--point_timeout must be at least {MIN_POINT_S:g} s (a point builds its model and engine first)")
    for name in ("window", "group_tokens", "target_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    positions = model_positions(args.model, args.config_overrides)  # learned positions (BART-like), or None
    if positions is not None:
        if args.target_tokens is not None and args.target_tokens > positions:
            parser.error(f"--target_tokens {args.target_tokens} exceeds {args.model}'s {positions} decoder positions; give at most {positions}")
        if args.window is not None and args.window > positions:
            parser.error(f"--window {args.window} exceeds {args.model}'s {positions} encoder positions; give at most {positions}")
    if args.target_tokens is None:
        args.target_tokens = min(1024, positions or 1024)
    args.run_id = args.run_id or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return args


def model_positions(model: str, overrides: dict) -> int | None:
    """The learned position table's size of a shipped config (BART, mBART, PEGASUS), after
    ``overrides``; None for relative-position families (T5, LongT5), which bound neither length."""
    values = {**json.loads((MODEL_CONFIGS / f"{model}.json").read_text()), **overrides}
    return values.get("max_position_embeddings") if not values["model_type"].endswith("t5") else None


def config_overrides(model: str, text: str | None) -> dict:
    """``KEY=VALUE,...`` as a dict, each key a field of ``model``'s config class (HF would take
    any key silently, as an attribute nothing reads)."""
    if not text:
        return {}
    from cached_ds.model_zoo import model_config  # here: a sweep without overrides imports no transformers

    overrides = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE items separated by commas, got {item!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    base = model_config(model)
    unknown = sorted(set(overrides) - set(base.to_dict()))
    if unknown:
        raise ValueError(f"{unknown} are not fields of {model}'s config ({type(base).__name__})")
    return overrides


def device_name() -> str:
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def child_env(device: str) -> dict:
    """One rank of its own: no rendezvous variables inherited from a launcher or SLURM. On a GPU,
    PyTorch's expandable segments (unless PYTORCH_CUDA_ALLOC_CONF says otherwise) for every
    method alike: near the memory limit, fragmentation between the N-sized blocks and the rest
    would otherwise decide where a method runs out of memory; each point records the setting."""
    from cached_ds.distributed import fresh_rendezvous_env

    env = fresh_rendezvous_env()
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    else:
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


def run_point(spec: dict, out: Path, timeout: float, device: str, invocation: str) -> dict:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # the sweep's own invocation in the name: two sweeps into one folder (another ZeRO stage, a
    # rerun) keep their logs apart, and one never reads the other's result file
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{spec['model']}-{label(spec)}-{spec['tokens']}")
    if len(stem) > 120:  # many --config_overrides: a file name too long for the filesystem (255 bytes)
        stem = stem[:100] + "-" + hashlib.sha1(stem.encode()).hexdigest()[:10]
    stem += f".{invocation}"
    result_file, log_file = logs / f"{stem}.json", logs / f"{stem}.log"
    result_file.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log_file, "w") as log:
        try:
            proc = subprocess.run([sys.executable, str(HERE / "point.py"), "--spec", json.dumps(spec), "--result", str(result_file)],
                                  stdout=log, stderr=subprocess.STDOUT, env=child_env(device), timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    point = {**spec, "device": device, "wall_s": time.perf_counter() - start, "date": dt.date.today().isoformat()}
    if result_file.exists():
        point.update(json.loads(result_file.read_text()))
        if point.get("partial"):  # stopped (its timeout) after what it measured: kept, and said so
            point["partial"] += f" (exit {code})"
    else:  # the process died without a result: a host OOM kill (-9), a timeout, or a bug (see the log)
        tail = log_file.read_text().splitlines()[-5:]
        point.update(oom=code == -9, error=f"exit {code}: " + " / ".join(tail)[-500:])
    return point


def rerun_key(point: dict) -> tuple:
    """What makes a point the same measurement as one its run id already has (its window as
    asked: the point records the one it resolved); older points, without it, are measured again."""
    return (label(point), point["tokens"], point.get("dtype"), point.get("zero_stage"), point.get("target_tokens"),
            point.get("window_asked", "not recorded"), point.get("group_tokens"), zero_ab(point), point.get("steps"), point.get("warmup"),
            # a line asking for a profile, an allocator trace or a breakdown wants it measured (the
            # point keeps the profile's summary where the spec had True)
            bool(point.get("profile")), bool(point.get("memory_trace")), bool(point.get("breakdown_step")))


def stopped_by(point: dict) -> bool:
    """Out of memory or out of time at its length (or skipped for it): longer lengths would be too."""
    return bool(point.get("oom") or (timed_out(point) and not point.get("deadline_cut")) or point.get("skipped"))


def failed_at_timeout(points: list[dict], name: str) -> bool:
    """Whether the shortest length where ``name`` stopped ran out of time rather than memory."""
    stops = sorted((p["tokens"], not p.get("oom")) for p in points if label(p) == name and stopped_by(p))
    return bool(stops) and stops[0][1]


def kernels(args) -> dict:
    """The cached method's kernels (and the host offload, which needs streaming cross-attention).
    With any, every method runs without attention-probability dropout (the kernels have none), so
    the comparison stays like for like."""
    chosen = {"cross_attention_block": args.cross_attention_block, "fast_t5_attention": args.fast_t5_attention or None,
              "offload_gradient_cache": args.offload or None, "offload_encoder_states": args.offload or None,
              "cross_attention_kernel": "plain" if args.plain_cross_attention else None,
              "t5_attention_kernel": "blocked" if args.blocked_t5_attention else "local_sdpa" if args.local_sdpa_t5_attention else None}
    return {k: v for k, v in chosen.items() if v is not None}


def main(argv=None) -> Path | None:
    args = parse_args(argv)
    if args.list_tokens:
        print(",".join(map(str, args.tokens)))
        return None
    device = device_name()
    dtype = args.dtype or ("fp32" if device == "cpu" else "bf16")
    out = args.out or HERE / "results" / f"{dt.date.today().isoformat()}-{device}"
    if device == "cpu" and args.tokens == DEFAULT_TOKENS:
        sys.exit("sweep.py: error: the default plan (16K to 16M tokens) is for GPUs; on CPU give --smoke or --tokens")
    if device == "cpu" and not args.model.startswith("tiny") and not args.config_overrides:
        # e.g. an array task on a node without the GPU it did not request: hours per point, in fp32
        sys.exit(f"sweep.py: error: no GPU here, and {args.model} at its real size takes hours per point on CPU; request a "
                 "GPU (sbatch --gpus=1), or give --smoke, a tiny-* model or --config_overrides (a CPU proxy)")
    out.mkdir(parents=True, exist_ok=True)
    earlier = [p for p in read_points(out) if p["model"] == args.model_name and p.get("run_id") == args.run_id]
    # a method that ran out of memory or time at a length is not tried at longer ones
    failed_at = {label(p): p["tokens"] for p in earlier if stopped_by(p)}
    measured = {rerun_key(p) for p in earlier if status_of(p) == "ok"}  # a rerun of the run id skips these
    invocation = f"{dt.datetime.now():%H%M%S}-{os.getpid()}"  # this process: its points' baselines are its own
    plan = [(tokens, method) for tokens in args.tokens for method in args.methods]
    errors = 0
    for tokens, method in tqdm(plan, desc="sweep points", unit="point"):
        spec = dict(method=method, model=args.model_name, tokens=tokens, target_tokens=args.target_tokens,
                    zero_stage=args.zero_stage, dtype=dtype, window=args.window, group_tokens=args.group_tokens,
                    group_tokens_set=args.group_tokens_set,
                    steps=args.steps, warmup=args.warmup, breakdown_step=not args.no_breakdown, saved_tensor_meter=args.saved_tensor_meter,
                    profile=args.profile, memory_trace=args.memory_trace,
                    kernels=kernels(args) if method == "cached" else {},
                    keep_graphs_gib=args.keep_graphs_gib if method == "cached" else None, no_attention_dropout=bool(kernels(args)),
                    zero3_decoder_hooks=args.zero3_decoder_hooks and method == "cached", reduce_bucket_size=args.reduce_bucket_size,
                    memory_efficient_linear=args.memory_efficient_linear or None, run_id=args.run_id, window_asked=args.window)
        if args.config_overrides:  # ``model`` names the changed shape; point.py builds it from these
            spec.update(shipped_model=args.model, config_overrides=args.config_overrides)
        name = label(spec)
        timeout = args.point_timeout if args.deadline is None else min(args.point_timeout, args.deadline - time.time())
        if rerun_key(spec) in measured:
            tqdm.write(f"{name:>9} {tokens:>9} tokens: measured before in run {args.run_id} ({out}); not again")
            continue
        if name in failed_at and tokens > failed_at[name]:
            point = {**spec, "device": device, "skipped": "timeout" if failed_at_timeout(earlier, name) else "oom"}
            point["oom"] = point["skipped"] == "oom"
        elif timeout < MIN_POINT_S:  # recorded: the table says which points the deadline left out
            point = {**spec, "device": device, "oom": False, "not_run": "deadline"}
        else:
            point = run_point(spec, out, timeout, device, invocation)
            if timed_out(point) and timeout < args.point_timeout:
                point["deadline_cut"] = True  # stopped by the sweep's deadline: says nothing about longer lengths
        point["invocation"] = invocation
        if stopped_by(point):
            failed_at[name] = min(tokens, failed_at.get(name, tokens))
        earlier.append(point)
        with open(points_file(out), "a") as f:
            f.write(json.dumps(point) + "\n")
        write_report(out)
        errors += bool(point.get("error")) and not point.get("oom") and not timed_out(point)
        status = status_of(point)
        status = f"{point['tokens_per_s']:,.0f} tok/s" if status == "ok" else status
        tqdm.write(f"{name:>9} {tokens:>9} tokens: {status}")
    print(f"results in {out}")
    if errors:  # an OOM is a result; an error is not
        sys.exit(f"sweep.py: {errors} point(s) failed with an error; their logs are in {out / 'logs'}")
    return out


if __name__ == "__main__":
    main()
