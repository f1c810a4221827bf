"""Train a Hugging Face encoder–decoder on whole long documents with CachED inside DeepSpeed.

    deepspeed launchers/train.py --deepspeed ds_configs/zero3.json          # the embedded default
    deepspeed --num_gpus 2 launchers/train.py --deepspeed ds_configs/zero3.json
    deepspeed launchers/train.py --deepspeed ds_configs/zero3.json --model facebook/bart-large \\
        --dataset ccdv/govreport-summarization --text_column report --max_steps 1000
    python launchers/train.py --help
"""

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cached_ds.run_config import parse_args  # noqa: E402


def main(argv=None) -> None:
    try:
        run = parse_args(argv)
    except ValueError as error:  # bad flags or config: one clear line, no traceback
        sys.exit(f"train.py: error: {error}")
    if run.embedded:
        from cached_ds.embedded import train_embedded_default

        train_embedded_default(run)
    else:
        from cached_ds.trainer import Trainer

        Trainer(run).train()
    from cached_ds.distributed import shutdown

    shutdown()  # only after success: a failed rank must not leave the others waiting in a barrier


if __name__ == "__main__":
    main()
    # Done on every rank and the process group ended: skip interpreter teardown. Its C++ thread
    # destructors run in no fixed order, and two-rank CPU runs have twice ended with "terminate
    # called without an active exception" (exit -6) after all their work, checkpoints and
    # evaluation were written, the second time after the group was already destroyed (as
    # bench/point.py does for the same reason). Errors still exit through the interpreter.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)
