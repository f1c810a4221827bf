"""Two ranks checking that they share an output folder:

    torchrun --nproc_per_node 2 tests/shared_directory_case.py BASE shared|per-rank

``shared``: both name BASE/out (prints "shared" on each rank); ``per-rank``: each names its own
BASE/rank<r>, as ranks on two nodes do with a node-local path (each prints the error).
"""

import sys
from pathlib import Path

import torch.distributed as dist

from cached_ds.distributed import require_shared_directory

dist.init_process_group("gloo")
base, kind = Path(sys.argv[1]), sys.argv[2]
folder = base / "out" if kind == "shared" else base / f"rank{dist.get_rank()}"
try:
    require_shared_directory(folder, "--output_dir")
    print(f"rank {dist.get_rank()} shared", flush=True)
except ValueError as error:
    print(f"rank {dist.get_rank()} refused: {error}", flush=True)
dist.destroy_process_group()
