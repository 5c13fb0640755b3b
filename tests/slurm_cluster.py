"""A real single-node Slurm for tests: munge, slurmctld and slurmd from Debian's packages,
configured in a temporary directory on free ports, stopped by pid afterwards.

`start(tmp)` installs the packages when they are missing and this process may (root, apt-get),
and returns a `Cluster`, or raises `Unavailable` saying why not (the tests skip with that reason).
Another Slurm already running on the machine is left alone: ours has its own ports, state and
`SLURM_CONF`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
_WORLD = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class Unavailable(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _install() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable("Slurm is not installed and this process cannot install it (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    for cmd in (["apt-get", *lock, "update", "-qq"], ["apt-get", *lock, "install", "-y", "-qq", *PACKAGES]):
        deadline = time.monotonic() + 300
        while True:  # another apt process (a machine's start-up updates) may hold the lock for a while
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if p.returncode == 0 or "Could not get lock" not in p.stderr + p.stdout or time.monotonic() > deadline:
                break
            time.sleep(5)
        if p.returncode:
            raise Unavailable(f"{' '.join(cmd)} failed: {(p.stderr or p.stdout)[-500:]}")


def _munge_works() -> bool:
    p = subprocess.run("munge -n | unmunge", shell=True, capture_output=True, text=True)
    return p.returncode == 0 and "Success" in p.stdout


@dataclass
class Cluster:
    dir: Path
    conf: Path
    procs: list = field(default_factory=list)  # what we started, in start order
    env: dict = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(list(cmd), env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                           timeout=kw.pop("timeout", 60), **kw)
        if check and p.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (empty once Slurm has forgotten the job)."""
        p = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(kv.split("=", 1) for kv in p.stdout.split() if "=" in kv) if p.returncode == 0 else {}

    def wait_for(self, job_id: str, states: set, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s: {self.job(job_id)}\n"
                           f"{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.dir.glob("*.log")))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def start(tmp: Path) -> Cluster:
    _install()
    tmp.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(dir=tmp, conf=tmp / "slurm.conf")
    try:
        if not _munge_works():
            key = Path("/etc/munge/munge.key")
            if not key.exists():
                subprocess.run(["mungekey", "--create"], check=True, capture_output=True)
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            cluster.procs.append(subprocess.Popen(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--foreground"],
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for _ in range(50):
                if _munge_works():
                    break
                time.sleep(0.1)
            else:
                raise Unavailable("munged did not start")
        host = socket.gethostname().split(".")[0]
        mem = subprocess.run(["slurmd", "-C"], capture_output=True, text=True).stdout
        real_memory = next((w.split("=")[1] for w in mem.split() if w.startswith("RealMemory=")), "1000")
        for d in ("state", "spool"):
            (tmp / d).mkdir(exist_ok=True)
        cluster.conf.write_text("\n".join([
            "ClusterName=glmtest", f"SlurmctldHost={host}", "SlurmUser=root",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            # a requeued job waits out its job credential's lifetime before it starts again: 120 s
            # by default, 10 s here
            "AuthType=auth/munge", "AuthInfo=cred_expire=10",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "JobRequeue=1",
            "ReturnToService=2", "MpiDefault=none",
            f"StateSaveLocation={tmp / 'state'}", f"SlurmdSpoolDir={tmp / 'spool'}",
            f"SlurmctldPidFile={tmp / 'slurmctld.pid'}", f"SlurmdPidFile={tmp / 'slurmd.pid'}",
            f"SlurmctldLogFile={tmp / 'slurmctld.log'}", f"SlurmdLogFile={tmp / 'slurmd.log'}",
            f"NodeName={host} CPUs={os.cpu_count()} RealMemory={real_memory} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
        # not this test process's own torch.distributed world (a fixture may have set one up)
        cluster.env = {**{k: v for k, v in os.environ.items() if k not in _WORLD}, "SLURM_CONF": str(cluster.conf)}
        for daemon in ("slurmctld", "slurmd"):
            cluster.procs.append(subprocess.Popen([daemon, "-D", "-f", str(cluster.conf)], env=cluster.env,
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            p = cluster.run("sinfo", "-h", "-o", "%T", check=False)
            if p.returncode == 0 and p.stdout.strip() in ("idle", "mixed", "allocated"):
                return cluster
            time.sleep(1)
        raise Unavailable(f"the Slurm node did not become idle in 60 s:\n{cluster.logs()}")
    except BaseException:
        cluster.stop()
        raise
