"""A real one-node SLURM cluster for tests: munged + slurmctld + slurmd on this machine.

    with OneNodeSlurm() as slurm:
        rc, job_id, out = slurm.sbatch_wait("launchers/slurm/train.sbatch",
                                            env={**os.environ, "GPUS_PER_NODE": "2"})

Everything SLURM writes (config, state, spool, logs, job output) lives in a temp dir.
Needs root: it installs the Debian packages if missing, runs slurmctld/slurmd as root (jobs run
as the submitting user, root) and munged as the munge user.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from cached_ds.distributed import free_port  # fresh ports per cluster: a daemon left by a killed run can't answer

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_SOCKET_DIR = Path("/run/munge")  # the default socket, so slurm's auth/munge finds it unconfigured


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def install_packages():
    if shutil.which("sbatch") and shutil.which("slurmd") and shutil.which("munged"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"],
                ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        p = _run(cmd, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"installing SLURM failed: {' '.join(cmd)} exited {p.returncode}\n"
                               f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def _munge_works():
    return _run("munge -n | unmunge", shell=True).returncode == 0


class OneNodeSlurm:
    def __init__(self, start_timeout=30.0):
        self.start_timeout = start_timeout
        self.procs = {}  # name -> Popen, exactly the daemons we started
        self.dir = None
        self.host = None

    # ---------------------------------------------------------------- start / stop

    def __enter__(self):
        install_packages()
        self.dir = Path(tempfile.mkdtemp(prefix="slurm-"))
        try:
            self._start_munge()
            self.conf = self._write_conf()
            self._old_slurm_conf = os.environ.get("SLURM_CONF")
            os.environ["SLURM_CONF"] = str(self.conf)
            # -D: foreground, so the Popen pid is the daemon's pid and we can stop exactly it
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
            self._wait_idle()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        # reverse start order: slurmd, slurmctld, then munged (which they authenticate through)
        for name, p in reversed(list(self.procs.items())):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        if hasattr(self, "_old_slurm_conf"):
            if self._old_slurm_conf is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = self._old_slurm_conf
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _spawn(self, name, cmd, **kw):
        log = open(self.dir / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kw)
        log.close()  # the child holds its own copy

    def _start_munge(self):
        if not MUNGE_KEY.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={MUNGE_KEY}"], check=True)
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o600)
        if _munge_works():  # a munged is already serving this machine: use it, don't own it
            return
        # munged refuses a socket dir others can write to; 755 owned by munge is what it accepts
        MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        MUNGE_SOCKET_DIR.chmod(0o755)
        # as the munge user (owner of the key), in the foreground so the pid is munged's own
        log = self.dir / "munged.log"
        log.touch()
        shutil.chown(log, "munge", "munge")
        self._spawn("munged", ["munged", "-F", f"--log-file={log}"],
                    user="munge", group="munge", extra_groups=[])
        deadline = time.monotonic() + self.start_timeout
        while not _munge_works():
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("munged did not start\n" + self._logs())
            time.sleep(0.1)

    def _write_conf(self):
        self.host = host = socket.gethostname().split(".")[0]  # what slurmd calls itself
        mem_kb = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1])
        d = self.dir
        for sub in ("state", "spool", "jobs"):
            (d / sub).mkdir()
        conf = d / "slurm.conf"
        conf.write_text(f"""\
ClusterName=cachedds
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# no cgroups in containers/CI VMs: track processes by parent pid, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# trust the node line below instead of what slurmd detects (else a mismatch drains the node)
SlurmdParameters=config_overrides
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
# sbatch --wait polls after 2s, then 8s, 32s... while the sleep is < MinJobAge/2 (default 300):
# 4 keeps every poll at 2s; finished jobs are forgotten after ~4s, sbatch_wait doesn't need them
MinJobAge=4
MailProg=/bin/true
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={mem_kb // 1024} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        return conf

    def _wait_idle(self):
        deadline = time.monotonic() + self.start_timeout
        while True:
            p = _run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env())
            if p.returncode == 0 and p.stdout.strip() == "idle":
                return
            dead = [n for n, pr in self.procs.items() if pr.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"SLURM node not idle after {self.start_timeout}s "
                                   f"(exited: {dead}; sinfo: {p.stdout.strip()!r} {p.stderr.strip()!r})\n"
                                   + self._logs())
            time.sleep(0.2)

    def _logs(self):
        out = []
        for f in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.stdout")):
            out.append(f"----- {f.name}\n{f.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)

    # ---------------------------------------------------------------- use

    def env(self, env=None):
        """`env` (default: os.environ) with SLURM_CONF pointing at this cluster."""
        env = dict(os.environ if env is None else env)
        # a test run inside a real SLURM job must not leak that job's SLURM_* into ours
        env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def sbatch_wait(self, script, *args, env=None, cwd=REPO_ROOT, sbatch_options=(), timeout=600):
        """Submit `script args...` with `sbatch --wait`, the job inheriting `env` (--export=ALL)
        and running in `cwd` (default: the repo root). Returns (job exit code, job id, job output)."""
        out_file = self.dir / "jobs" / f"job-{time.monotonic_ns()}.out"
        cmd = ["sbatch", "--wait", "--parsable", "--export=ALL", f"--output={out_file}",
               *sbatch_options, str(script), *map(str, args)]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=self.env(env), cwd=cwd)
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
            job_id = stdout.strip().split(";")[0]
            if job_id:
                _run(["scancel", job_id], env=self.env())
            raise RuntimeError(f"job {job_id} did not finish in {timeout}s\n"
                               + (out_file.read_text(errors="replace") if out_file.exists() else ""))
        job_id = stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"
        if not job_id:
            raise RuntimeError(f"sbatch failed ({p.returncode}): {stderr}\n" + self._logs())
        text = out_file.read_text(errors="replace") if out_file.exists() else ""
        return p.returncode, job_id, text
