"""A real one-node SLURM cluster (tests/slurm_cluster.py) and launchers/slurm/train.sbatch on it."""

import json
import os
import subprocess
import sys

import pytest

from launcher_helpers import free_port, launcher_env
from slurm_cluster import REPO_ROOT, OneNodeSlurm

TRAIN_SBATCH = REPO_ROOT / "launchers" / "slurm" / "train.sbatch"


@pytest.fixture(scope="module")
def slurm():
    # installs the Debian packages on first use; an install failure fails (not skips) the tests
    with OneNodeSlurm() as cluster:
        yield cluster


def test_srun_step_runs_torch(slurm, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
set -euo pipefail
echo "job $SLURM_JOB_ID on $SLURM_JOB_NODELIST in $PWD"
srun --ntasks=1 {sys.executable} -c "import torch.distributed.run; print('torchrun importable')"
""")
    rc, job_id, out = slurm.sbatch_wait(script)
    assert rc == 0, out
    assert f"job {job_id} on " in out
    assert f"in {REPO_ROOT}" in out  # default cwd: the repo root
    assert "torchrun importable" in out


def test_job_exit_code_is_returned(slurm, tmp_path):
    script = tmp_path / "fail.sh"
    script.write_text("#!/bin/bash\necho failing; exit 3\n")
    rc, _, out = slurm.sbatch_wait(script)
    assert (rc, out) == (3, "failing\n")


def test_train_sbatch_syntax():
    subprocess.run(["bash", "-n", str(TRAIN_SBATCH)], check=True)


def test_train_sbatch_wires_torchrun(slurm, tmp_path):
    # PYTHON stands in for the interpreter: it prints the argv it gets, so we check the wiring
    # of train.sbatch without training anything
    stub = tmp_path / "python_stub"
    stub.write_text('#!/bin/bash\necho "STUB ARGV: $*"\necho "STUB DS_ACCELERATOR=${DS_ACCELERATOR:-unset}"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "GPUS_PER_NODE": "2", "MASTER_PORT": "29123",
           "DS_CONFIG": "ds_configs/zero2.json", "TRAIN_ARGS": "--preset smoke --output_dir /tmp/x",
           "DS_ACCELERATOR": "cpu"}
    rc, job_id, out = slurm.sbatch_wait(TRAIN_SBATCH, env=env)
    assert rc == 0, out
    argv = [line for line in out.splitlines() if line.startswith("STUB ARGV: ")]
    assert len(argv) == 1, out  # one task on the one node
    assert argv[0] == ("STUB ARGV: -m torch.distributed.run --nnodes 1 --nproc_per_node 2 "
                       f"--rdzv_id {job_id} --rdzv_backend c10d --rdzv_endpoint {slurm.host}:29123 "
                       "launchers/train.py --deepspeed ds_configs/zero2.json "
                       "--preset smoke --output_dir /tmp/x"), out
    assert "STUB DS_ACCELERATOR=cpu" in out


def test_train_sbatch_takes_its_rendezvous_port_from_the_job_id(slurm, tmp_path):
    """Without MASTER_PORT, each job its own port: with a fixed 29500, two jobs whose first node is
    one machine met in one rendezvous store."""
    stub = tmp_path / "python_stub"
    stub.write_text('#!/bin/bash\necho "STUB ARGV: $*"\n')
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    env.update(PYTHON=str(stub), GPUS_PER_NODE="2", DS_CONFIG="ds_configs/zero2.json", TRAIN_ARGS="--preset smoke")
    rc, job_id, out = slurm.sbatch_wait(TRAIN_SBATCH, env=env)
    assert rc == 0, out
    assert f"--rdzv_endpoint {slurm.host}:{20000 + int(job_id) % 20000} " in out, out


def test_training_job_through_slurm(slurm, tmp_path):
    """The real recipe: sbatch --wait on the smoke preset, 1 node × 1 task × torchrun with 2 ranks."""
    out = tmp_path / "run"
    env = {**launcher_env(), "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()),
           "DS_CONFIG": "ds_configs/zero2.json", "TRAIN_ARGS": f"--preset smoke --output_dir {out}"}
    code, job, output = slurm.sbatch_wait("launchers/slurm/train.sbatch", env=env, timeout=600)
    assert code == 0, output[-5000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert json.loads((out / "ds_config.json").read_text())["train_batch_size"] == 2 * 2  # both ranks ran
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000004"
    assert (out / "eval_results.json").is_file() and "CachED lead" in output


def test_sweep_job_array_through_slurm(slurm, tmp_path):
    """launchers/slurm/sweep.sbatch as a 2-task job array: one length per task, one results folder.
    No SWEEP_TOKENS: with --smoke the array's lengths are the smoke's own two, not the GPU plan's."""
    out = tmp_path / "sweep"
    env = {**launcher_env(), "PYTHON": sys.executable, "SWEEP_OUT": str(out),
           "SWEEP_ARGS": "--smoke --methods cached,hf_ds_gc"}
    env.pop("SWEEP_TOKENS", None)
    code, _, output = slurm.sbatch_wait(REPO_ROOT / "launchers" / "slurm" / "sweep.sbatch", env=env, timeout=600,
                                        sbatch_options=("--array=0-1", "--open-mode=append"))
    assert code == 0, output[-5000:]
    # each task its own points file (appends from several nodes to one NFS file can interleave)
    assert sorted(f.name for f in out.glob("points*.jsonl")) == ["points.task0.jsonl", "points.task1.jsonl"]
    by_task = {task: [json.loads(line) for line in (out / f"points.task{task}.jsonl").read_text().splitlines()] for task in (0, 1)}
    assert {p["tokens"] for p in by_task[0]} == {1024} and {p["tokens"] for p in by_task[1]} == {4096}
    points = by_task[0] + by_task[1]
    assert sorted((p["method"], p["tokens"]) for p in points) == [
        ("cached", 1024), ("cached", 4096), ("hf_ds_gc", 1024), ("hf_ds_gc", 4096)]
    assert not any(p["oom"] or "error" in p for p in points), points
    assert "array task 0, 1024 tokens" in output and "array task 1, 4096 tokens" in output
    assert (out / "table.md").read_text().count("| tiny-bart |") == 2 * 4
