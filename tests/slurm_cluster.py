"""A real Slurm for tests: munge, slurmctld and slurmd from Debian's packages, configured in a
temporary directory on free ports, stopped by pid afterwards.

`start(tmp)` gives one node, this machine. `start(tmp, nodes=3)` gives three (p1, p2, p3), each a
network + UTS + mount namespace of its own (`unshare`; ../shared/SLURM_LOCAL.md has the recipe and
what it measured): its own hostname and address on a bridge the cluster makes, its own /etc/hosts
(bind-mounted) and munged, and a stock slurmd. slurmctld runs on the bridge's host side. The nodes
share this machine's file system, as cluster nodes share Lustre or NFS. `kill_node` takes every
process of a node at once (a node that vanishes), `cut_node` its network, `start_node` brings it
back. Addresses only ever live on that bridge and in those namespaces (a random 10.231.x.0/24).

Both install the packages when they are missing and this process may (root, apt-get), and return a
`Cluster`, or raise `Unavailable` saying why not (the tests skip with that reason). Another Slurm
already running on the machine is left alone: ours has its own ports, state and `SLURM_CONF`.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
_WORLD = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# the states a job does not leave (a requeued job is PENDING again, whatever it passed through)
ENDED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE"})


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


def _netns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _munge_works() -> bool:
    p = subprocess.run("munge -n | unmunge", shell=True, capture_output=True, text=True)
    return p.returncode == 0 and "Success" in p.stdout


@dataclass
class Cluster:
    dir: Path
    conf: Path
    procs: list = field(default_factory=list)  # what we started, in start order
    env: dict = field(default_factory=dict)
    nodes: dict = field(default_factory=dict)  # name -> address (namespace nodes only)
    bridge: str = ""  # the bridge's name, also the prefix of its veth ends
    bridge_net: str = ""  # its /24: nodes at .1, .2, ..., this machine (slurmctld) at .254
    node_procs: dict = field(default_factory=dict)  # name -> its unshare process
    why_not_nodes: str = ""  # a one-node cluster: why it has no namespace nodes
    munge_dir: str = ""

    @property
    def host_address(self) -> str:
        return self.bridge_net + ".254"

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

    def ended(self, job_id: str) -> bool:
        """Whether the job is over (or forgotten): its requeues pass through states such as COMPLETING
        and REQUEUED, which a test waiting across them must not take for its end."""
        return self.job(job_id).get("JobState", "COMPLETED") in ENDED

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

    # ---- namespace nodes ----
    def _node_script(self, name: str) -> str:
        addr, veth = self.nodes[name], f"{self.bridge}{name}n"
        d = self.dir
        return f"""
set -e
hostname {name}
mount --bind {d}/hosts /etc/hosts
mount -t tmpfs -o mode=0755 tmpfs /run/munge
chown munge:munge /run/munge
runuser -u munge -- /usr/sbin/munged --seed-file={self.munge_dir}/{name}.seed --log-file={self.munge_dir}/{name}.log
for i in $(seq 200); do ip link show {veth} >/dev/null 2>&1 && break; sleep 0.05; done
ip link set lo up
ip addr add {addr}/24 dev {veth}
ip link set {veth} up
exec slurmd -D -f {self.conf} -N {name}
"""

    def start_node(self, name: str) -> None:
        """Start node `name` (again): its namespace, munged and slurmd, wired to the bridge."""
        (self.dir / f"spool-{name}").mkdir(exist_ok=True)
        if not self.munge_dir:  # where munged (user munge) writes its log and seed: a directory it can reach
            # (munged refuses a path through a directory only root may enter, as pytest's tmp_path is)
            self.munge_dir = tempfile.mkdtemp(prefix="glm-munge-")
            shutil.chown(self.munge_dir, "munge", "munge")
        proc = subprocess.Popen(["unshare", "--net", "--uts", "--mount", "--propagation", "private", "bash", "-c",
                                 self._node_script(name)], env=self.env, stdout=subprocess.DEVNULL,
                                stderr=open(self.dir / f"node-{name}.err", "a"), start_new_session=True)
        self.node_procs[name] = proc
        host_end, node_end = f"{self.bridge}{name}", f"{self.bridge}{name}n"
        deadline = time.monotonic() + 10
        while _netns(proc.pid) in (None, _netns(os.getpid())):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise Unavailable(f"node {name}: unshare did not make its namespace: "
                                  f"{(self.dir / f'node-{name}.err').read_text()[-500:]}")
            time.sleep(0.02)
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)  # a former life's end
        for cmd in (["ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end],
                    ["ip", "link", "set", node_end, "netns", str(proc.pid)],
                    ["ip", "link", "set", host_end, "master", self.bridge, "up"]):
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                subprocess.run(["ip", "link", "del", host_end], capture_output=True)  # (its peer goes with it)
                raise Unavailable(f"node {name}: {' '.join(cmd)}: {p.stderr.strip()}")

    def node_pids(self, name: str) -> list[int]:
        """Every process of node `name`: those in its network namespace."""
        proc = self.node_procs.get(name)
        if proc is None or proc.poll() is not None:
            return []
        ns = _netns(proc.pid)
        return [int(e) for e in os.listdir("/proc") if e.isdigit() and ns and _netns(int(e)) == ns]

    def kill_node(self, name: str) -> list[int]:
        """Every process of node `name` killed at once (SIGKILL): a node that loses its power."""
        pids = self.node_pids(name)
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        proc = self.node_procs.get(name)
        if proc is not None:
            proc.wait(timeout=30)
        return pids

    def cut_node(self, name: str, up: bool = False) -> None:
        """Node `name`'s network cut (its end of the bridge down), or back (`up`)."""
        self.run("ip", "link", "set", f"{self.bridge}{name}", "up" if up else "down")

    def node_state(self, name: str) -> str:
        return self.run("sinfo", "-h", "-n", name, "-o", "%T", check=False).stdout.strip()

    def wait_nodes(self, states: tuple = ("idle",), timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = {n: self.node_state(n) for n in self.nodes}
            if all(v in states for v in now.values()):
                return
            time.sleep(0.5)
        raise TimeoutError(f"nodes not {states} after {timeout} s: {now}\n{self.logs()}")

    def restore(self, timeout: float = 90) -> None:
        """Every namespace node back (a killed one started again, a cut one reconnected) and idle."""
        for name in self.nodes:
            if not self.node_pids(name):
                self.start_node(name)
            else:
                self.cut_node(name, up=True)
        if self.nodes:
            self.wait_nodes(("idle",), timeout)

    def stop(self) -> None:
        for name in list(self.node_procs):
            self.kill_node(name)
        if self.bridge:
            for name in self.nodes:  # a veth pair left on this side (a node whose start failed half-way)
                subprocess.run(["ip", "link", "del", f"{self.bridge}{name}"], capture_output=True)
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        if self.munge_dir:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _namespaces_work() -> str:
    """Why namespace nodes cannot be made here, or "" when they can."""
    if os.geteuid() != 0:
        return "namespace nodes need root"
    for tool in ("unshare", "ip", "runuser"):
        if not shutil.which(tool):
            return f"namespace nodes need `{tool}`"
    p = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True)
    return "" if p.returncode == 0 else f"unshare --net --uts --mount fails here: {p.stderr.strip()}"


def start(tmp: Path, nodes: int = 0) -> Cluster:
    """One node, this machine (`nodes=0`), or `nodes` namespace nodes p1, p2, ... (see the module)."""
    _install()
    if nodes:
        why = _namespaces_work()
        if why:
            raise Unavailable(why)
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
        for d in ("state", "spool"):
            (tmp / d).mkdir(exist_ok=True)
        common = [
            "ClusterName=glmtest", "SlurmUser=root",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            # a requeued job waits out its job credential's lifetime before it starts again: 120 s
            # by default, 10 s here
            "AuthType=auth/munge", "AuthInfo=cred_expire=10",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "JobRequeue=1",
            "ReturnToService=2", "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none",
            # a job step that does not end on SIGTERM is killed 5 s later (30 s by default)
            "KillWait=5",
            f"StateSaveLocation={tmp / 'state'}", f"SlurmctldPidFile={tmp / 'slurmctld.pid'}",
            f"SlurmctldLogFile={tmp / 'slurmctld.log'}"]
        if nodes:
            if not _munge_works_with_key():
                raise Unavailable("no munge key (/etc/munge/munge.key) for the nodes' munged")
            cluster.bridge_net = f"10.231.{random.randint(1, 250)}"
            cluster.bridge = f"glm{cluster.bridge_net.rsplit('.', 1)[1]}"
            cluster.nodes = {f"p{i}": f"{cluster.bridge_net}.{i}" for i in range(1, nodes + 1)}
            (tmp / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
                f"{a} {n}\n" for n, a in cluster.nodes.items()) + f"{cluster.host_address} {host}\n")
            for cmd in (["ip", "link", "add", cluster.bridge, "type", "bridge"],
                        ["ip", "addr", "add", f"{cluster.host_address}/24", "dev", cluster.bridge],
                        ["ip", "link", "set", cluster.bridge, "up"]):
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode:
                    raise Unavailable(f"{' '.join(cmd)}: {p.stderr.strip()}")
            conf = [f"SlurmctldHost={host}({cluster.host_address})", *common,
                    # a node whose slurmd stops answering is DOWN ~30 s later (300 s by default) and
                    # comes back by itself once its slurmd registers again
                    "SlurmdTimeout=10", f"SlurmdSpoolDir={tmp / 'spool-%n'}",
                    f"SlurmdPidFile={tmp / 'slurmd-%n.pid'}", f"SlurmdLogFile={tmp / 'slurmd-%n.log'}",
                    *(f"NodeName={n} NodeAddr={a} CPUs=2 RealMemory=2000 State=UNKNOWN"
                      for n, a in cluster.nodes.items())]
        else:
            mem = subprocess.run(["slurmd", "-C"], capture_output=True, text=True).stdout
            real_memory = next((w.split("=")[1] for w in mem.split() if w.startswith("RealMemory=")), "1000")
            conf = [f"SlurmctldHost={host}", *common, f"SlurmdSpoolDir={tmp / 'spool'}",
                    f"SlurmdPidFile={tmp / 'slurmd.pid'}", f"SlurmdLogFile={tmp / 'slurmd.log'}",
                    f"NodeName={host} CPUs={os.cpu_count()} RealMemory={real_memory} State=UNKNOWN"]
        cluster.conf.write_text("\n".join(
            [*conf, "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
        # not this test process's own torch.distributed world (a fixture may have set one up)
        cluster.env = {**{k: v for k, v in os.environ.items() if k not in _WORLD}, "SLURM_CONF": str(cluster.conf)}
        cluster.procs.append(subprocess.Popen(["slurmctld", "-D", "-f", str(cluster.conf)], env=cluster.env,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1)
        if nodes:
            for name in cluster.nodes:
                cluster.start_node(name)
        else:
            cluster.procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(cluster.conf)], env=cluster.env,
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            p = cluster.run("sinfo", "-h", "-o", "%T", check=False)
            states = p.stdout.split()
            if p.returncode == 0 and states and all(s in ("idle", "mixed", "allocated") for s in states) \
                    and len(states) >= 1:
                if not nodes or cluster.run("sinfo", "-h", "-t", "idle", "-o", "%D", check=False).stdout.strip() \
                        == str(nodes):
                    return cluster
            time.sleep(0.5)
        raise Unavailable(f"the Slurm node(s) did not become idle in 60 s:\n{cluster.logs()}")
    except BaseException:
        cluster.stop()
        raise


def _munge_works_with_key() -> bool:
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "--create"], capture_output=True)
    return key.exists()
