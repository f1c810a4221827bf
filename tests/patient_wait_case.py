"""Two ranks whose process group times out after 3 s; rank 0 works for 8 s before the barrier:

    torchrun --nproc_per_node 2 tests/patient_wait_case.py patient|plain

``patient`` waits at ``distributed.patient_barrier`` twice, rank 0 late the first time and rank
1 the second (each rank prints "waited" after both); ``plain`` on the process group's own barrier
(rank 1 times out), showing the wait really outlasts its timeout.
"""

import sys
import time
from datetime import timedelta

import torch.distributed as dist

from cached_ds.distributed import patient_barrier

dist.init_process_group("gloo", timeout=timedelta(seconds=3))
late = 0
for name in ("tokenize", "scores"):
    if dist.get_rank() == late:
        time.sleep(8)  # as rank 0 tokenizing a corpus, then rank 1 generating a long summary
    if sys.argv[1] == "patient":
        patient_barrier(name)
    else:
        dist.barrier()
    late = 1
print(f"rank {dist.get_rank()} waited", flush=True)
dist.barrier()  # both past the waits: the group still works
dist.destroy_process_group()
