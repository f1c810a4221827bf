"""Two ranks whose process group times out after 3 s; rank 0 works for 8 s before the barrier:

    torchrun --nproc_per_node 2 tests/patient_wait_case.py patient|plain

``patient`` waits on ``distributed.patient_group`` (rank 1 prints "waited"); ``plain`` on the
process group's own barrier (rank 1 times out), showing the wait really outlasts its timeout.
"""

import sys
import time
from datetime import timedelta

import torch.distributed as dist

from cached_ds.distributed import patient_barrier, patient_group

dist.init_process_group("gloo", timeout=timedelta(seconds=3))
with patient_group() as group:
    if dist.get_rank() == 0:
        time.sleep(8)  # as rank 0 tokenizing a corpus
    if sys.argv[1] == "patient":
        patient_barrier(group)
    else:
        dist.barrier()
print(f"rank {dist.get_rank()} waited", flush=True)
