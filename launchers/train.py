"""Train a Hugging Face encoder–decoder on whole long documents with CachED inside DeepSpeed.

    deepspeed launchers/train.py --deepspeed ds_configs/zero3.json          # the embedded default
    deepspeed --num_gpus 2 launchers/train.py --deepspeed ds_configs/zero3.json
    deepspeed launchers/train.py --deepspeed ds_configs/zero3.json --model facebook/bart-large \\
        --dataset ccdv/govreport-summarization --text_column report --max_steps 1000
    python launchers/train.py --help

A bad flag value, config, data file or model ends the run with one line, ``train.py: error:
<what to fix>``, and exit status 1 (CACHED_DS_TRACEBACK=1 adds the Python traceback); a flag
argparse itself rejects (unknown, or not one of its choices) prints the usage and exits 2.
"""

import logging
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cached_ds.run_config import parse_args  # noqa: E402

# Errors that carry a message for the user (bad flags, config, data, model or an earlier run's
# files; a NaN/inf loss): printed as one line, without Python's frames, when cached-ds itself
# raised them. A ValueError raised inside torch, HF or DeepSpeed is more likely a bug than a
# message, and keeps its traceback, as does any other exception. CACHED_DS_TRACEBACK=1 shows the
# frames of these too.
USER_ERRORS = (ValueError, FloatingPointError)
OURS = tuple(str(Path(__file__).resolve().parents[1] / folder) + os.sep for folder in ("cached_ds", "launchers"))


def raised_here(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is in cached-ds's own code."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(OURS)


def exit_now(status: int) -> None:
    """Flush and end the process without interpreter teardown: once a process group exists, its
    C++ thread destructors run in no fixed order, and two-rank CPU runs have twice ended with
    "terminate called without an active exception" (exit -6) after all their work was written,
    the second time after the group was already destroyed (bench/point.py does the same)."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)


def fail(error: BaseException, message: str | None = None) -> None:
    """Print ``train.py: error: <message>`` and end this process with status 1 at once: a rank
    that failed alone must end so that the launcher (deepspeed or torchrun) sees it and stops the
    other ranks, which may be waiting for it in a collective."""
    if os.environ.get("CACHED_DS_TRACEBACK", "") not in ("", "0"):
        traceback.print_exception(error)
    print(f"train.py: error: {message or error}", file=sys.stderr)
    import torch.distributed as dist

    if not dist.is_initialized():
        sys.exit(1)  # nothing to tear down yet: an in-process caller gets SystemExit, not a dead process
    exit_now(1)


# What gloo's collectives raise on the ranks left waiting when another rank's process has ended.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")


def peer_failed(error: RuntimeError) -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_world_size() > 1 and any(text in str(error) for text in PEER_GONE)


def main(argv=None) -> None:
    try:
        run = parse_args(argv)
    except ValueError as error:  # bad flags or config: one clear line, no traceback
        sys.exit(f"train.py: error: {error}")
    try:
        try:
            if run.embedded:
                from cached_ds.embedded import train_embedded_default

                train_embedded_default(run)
            else:
                from cached_ds.trainer import Trainer

                Trainer(run).train()
        except SystemExit as stop:  # stopped by SIGTERM after a checkpoint (cached_ds/stop_signals.py)
            from cached_ds.distributed import shutdown

            shutdown()  # every rank stopped at the same step
            exit_now(stop.code if isinstance(stop.code, int) else 1)
    except USER_ERRORS as error:  # data, model, batch plan, earlier run, NaN loss: the message says what to fix
        if not raised_here(error):
            raise
        fail(error)
    except RuntimeError as error:
        if not peer_failed(error):
            raise
        # This rank waited in a collective for a rank that has ended: one line here, not a
        # traceback that looks like a second failure, with what the collective said.
        fail(error, f"another rank ended (see the other ranks' output); this rank stopped waiting for it: {error}")
    from cached_ds.distributed import shutdown

    shutdown()  # only after success: a failed rank must not leave the others waiting in a barrier


if __name__ == "__main__":
    main()
    exit_now(0)  # done on every rank and the process group ended (errors other than fail()'s raise through the interpreter)
