"""Two ranks started as plain processes (no torchrun to end the others when one dies, as in a
multi-node deepspeed/pdsh launch), rank 0 hosting the rendezvous store:

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/stalled_rank_case.py dead|working

``dead``: rank 1 exits without reaching the wait; rank 0, waiting with a 3 s ``stall``, stops with
an error naming rank 1 instead of waiting for days. ``working``: rank 1 takes 8 s, reporting
progress every second, and rank 0 waits for it past the stall time.
"""

import os
import sys
import time
from datetime import timedelta

import torch.distributed as dist

from cached_ds.distributed import patient_barrier, progress_beat

dist.init_process_group("gloo", timeout=timedelta(seconds=60))
me = dist.get_rank()
if me == 1:
    if sys.argv[1] == "dead":
        os._exit(3)  # as a rank killed by the out-of-memory killer mid-evaluation
    for _ in range(8):
        time.sleep(1)
        progress_beat()
started = time.monotonic()
try:
    patient_barrier("evaluation-summaries", stall=timedelta(seconds=3))
    print(f"rank {me} waited {time.monotonic() - started:.0f} s", flush=True)
except RuntimeError as error:
    print(f"rank {me} stopped after {time.monotonic() - started:.0f} s: {error}", flush=True)
if sys.argv[1] == "working":
    dist.barrier()
os._exit(0)  # (a dead peer would make the group's teardown wait)
