"""The hang watchdog: every rank runs under a small supervisor process that ends the job when the
rank stops making progress or dies, says which rank and where, and leaves nothing behind.

Why a process of its own: a thread of the training process cannot run while the training thread
holds the GIL in C (a blocking call that does not release it), nor when the process is stopped;
the supervisor is the parent of the training process and shares nothing with it but a heartbeat.

    glm-pretrain (supervisor: this module)          exit code: the child's, or EXIT_HUNG (76)
      └─ python -m pretrain (training: the child)   writes its heartbeat; SIGUSR2 dumps its stacks
           └─ DataLoader workers, checkpoint writers

- **Heartbeat**: the training process writes (section, step, micro-batch, waiting-for-data, time
  entered) into a small memory-mapped file at each section boundary and each micro-batch fetch (a
  struct write, no system call). Sections: startup, step, validation, checkpoint, shutdown.
- **Timeouts** follow the observed durations: per section, `factor` x the longest seen, at least
  `floor_s`; the first occurrence in a launch (and the first step of a stage) gets at least
  `first_s`; `<section>_s` fixes one. The longest durations are saved in
  `run.dir/watchdog/timeouts.json` by rank 0's supervisor and reloaded on restart.
- **On a timeout** (or the child's death by a signal or an error): the supervisor writes a report
  and an abort marker into `run.dir/watchdog/launch-<id>/`, dumps the Python stacks of its child and
  of every descendant (SIGUSR2 to faulthandler, which needs no GIL; SIGCONT first for a stopped one)
  into `stacks-rank-<r>.txt` there, kills them all, and exits 76 (the dead rank's supervisor exits
  with its child's code). Every other supervisor sees the marker within `poll_s` and does the same.
  Rank 0's supervisor gathers the reports (at most `grace_s`) and logs the verdict: the rank that
  died first, or the stopped one, or the one(s) behind the others, with its section and step.
- The training process dies with its supervisor (PR_SET_PDEATHSIG), so a launcher that kills the
  supervisor (torchrun, srun) leaves no orphan.
- **Supervisors watch each other**: each one writes its entry (rank, host, pid) under
  `launch-<id>/ranks/` at the start, refreshes it every `alive_s` and watches the next rank's (a ring:
  one stat each). An entry unchanged for `silent_s` (its supervisor stopped, its node gone) ends the
  run like a hang, naming that rank and its node. A supervisor that ends writes how into its entry.
- **The verdict** is written by rank 0's supervisor, or, when rank 0's is gone (its node lost), by the
  lowest rank that reported. Ranks with no report are named by node ("node p3, ranks 2-3: no
  report"), with the node's state in Slurm where the job runs under it. A launch that ended with
  neither verdict nor a clean end (Slurm ended the job first: a node failure) gets one at the start of
  the next launch, from what it left.

A supervisor kills its live training process only 2 x poll_s + 2 s after freezing it, once every
other supervisor has seen the marker and frozen its own: killing one rank breaks its peers'
collectives at once, and a peer still running would fail and exit before its stacks are taken.

Bound: a hang ends every rank within timeout + 3 x poll_s + 2 s + grace_s + the stack dumps.
The process group's own timeout (`backstop_s`) is twice the longest timeout: a backstop only.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

SECTIONS = ("startup", "step", "validation", "checkpoint", "shutdown")
_ORDER = {"startup": 0, "step": 1, "validation": 2, "checkpoint": 3, "shutdown": 4}
HEARTBEAT_ENV = "GLM_WATCHDOG_HEARTBEAT"  # set for the child: the heartbeat file it writes
STACKS_FD_ENV = "GLM_WATCHDOG_STACKS_FD"  # set for the child: where faulthandler writes on SIGUSR2
STACKS_SIGNAL = signal.SIGUSR2
# magic, section, flags, step, micro-batches fetched, entered, beat, then per section the longest
# duration seen (not counting first occurrences)
_FORMAT = struct.Struct("<4sIIqqdd" + "d" * len(SECTIONS))
_MAGIC = b"GLMW"
WAITING_FOR_DATA, FIRST, PEER_LOST = 1, 2, 4  # flags
# what a collective raises when a peer is gone (its process died, its node or the network went away):
# gloo's "Connection closed / reset by peer", NCCL's aborted communicator, a collective's own timeout
_PEER_LOST_SIGNS = ("closed by peer", "reset by peer", "Broken pipe", "Connection refused", "remote process exited",
                    "communicator was aborted", "Timed out waiting", "DistNetworkError", "DistBackendError")


# ---- the training side -------------------------------------------------------------------------

class _Beat:
    def __init__(self, path: str):
        fd = os.open(path, os.O_RDWR)
        self.map = mmap.mmap(fd, _FORMAT.size)
        os.close(fd)
        self.section, self.flags, self.step, self.micro, self.entered = 0, FIRST, -1, 0, time.monotonic()
        self.longest = [0.0] * len(SECTIONS)
        self._seen: set[str] = set()

    def seen(self, section: str) -> bool:
        """Whether `section` was entered before (and from now on it was)."""
        was = section in self._seen
        self._seen.add(section)
        return was

    def write(self) -> None:
        self.map[:_FORMAT.size] = _FORMAT.pack(_MAGIC, self.section, self.flags, self.step, self.micro,
                                               self.entered, time.monotonic(), *self.longest)


_beat: _Beat | None = None


def start_beating() -> bool:
    """In the training process under a supervisor: open the heartbeat, write stacks to the supervisor on
    SIGUSR2, and die with the supervisor. False (and nothing done) without one."""
    global _beat
    path = os.environ.get(HEARTBEAT_ENV)
    if not path or _beat is not None:
        return _beat is not None
    import faulthandler

    faulthandler.register(STACKS_SIGNAL, file=int(os.environ[STACKS_FD_ENV]), all_threads=True, chain=False)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor's kill of the tree is all there is
    _beat = _Beat(path)
    enter("startup", -1)
    return True


def enter(section: str, step: int, first: bool = False) -> None:
    """This rank enters `section` (of SECTIONS) at `step`; `first`: its first occurrence since the
    start or a stage switch, which gets the first-occurrence allowance."""
    b = _beat
    if b is None:
        return
    now = time.monotonic()
    if not b.flags & FIRST and SECTIONS[b.section] not in ("startup", "shutdown"):  # calibrates the timeouts
        b.longest[b.section] = max(b.longest[b.section], now - b.entered)
    b.section, b.step, b.micro, b.entered = _ORDER[section], step, 0, now
    b.flags = FIRST if first or not b.seen(section) else 0
    b.write()


def fetching(waiting: bool) -> None:
    """Around each micro-batch fetch: True before (waiting for the loader), False once it came."""
    b = _beat
    if b is None:
        return
    if waiting:
        b.micro += 1
        b.flags |= WAITING_FOR_DATA
    else:
        b.flags &= ~WAITING_FOR_DATA
    b.write()


def failed(error: BaseException) -> None:
    """The training process is failing with `error`: when a collective raised it because a peer went
    away, the heartbeat says so, and the verdict looks past this rank for the one that was lost
    (which may have died a moment later, or left no report at all)."""
    b = _beat
    if b is None or not lost_a_peer(error):
        return
    b.flags |= PEER_LOST
    b.write()


def lost_a_peer(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return any(sign in text for sign in _PEER_LOST_SIGNS)


def beating(iterator):
    """The loader's micro-batches, with a heartbeat around each fetch."""
    while True:
        fetching(True)
        try:
            batch = next(iterator)
        except StopIteration:
            return
        fetching(False)
        yield batch


# ---- calibration -------------------------------------------------------------------------------

def _timeouts_file(run_dir: Path) -> Path:
    return Path(run_dir) / "watchdog" / "timeouts.json"


def load_longest(run_dir: Path) -> dict:
    try:
        return {k: float(v) for k, v in json.loads(_timeouts_file(run_dir).read_text())["longest_s"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def timeout_for(cfg, section: str, longest: dict, first: bool) -> float:
    """Seconds `section` may last: fixed by `<section>_s`, else factor x the longest seen (at least
    floor_s; first_s before one was seen). A first occurrence (the first step of a launch or a stage,
    the first validation, the first save: warm-up, lazy set-up, a cold file system) gets at least
    first_s either way; a fixed `startup_s` is start-up's own, whatever first_s is."""
    fixed = getattr(cfg, f"{section}_s", 0) or 0
    if fixed:
        return max(float(fixed), cfg.first_s) if first and section != "startup" else float(fixed)
    seen = longest.get(section)
    calibrated = max(cfg.floor_s, cfg.factor * seen) if seen else cfg.first_s
    return max(calibrated, cfg.first_s) if first or section == "startup" else calibrated


def backstop_s(cfg, run_dir: Path) -> float:
    """The process group timeout: twice the longest timeout the watchdog would apply."""
    longest = load_longest(run_dir)
    return 2 * max(timeout_for(cfg, s, longest, first=True) for s in SECTIONS)


# ---- processes ---------------------------------------------------------------------------------

def _proc_stat(pid: int) -> tuple[str, int, str] | None:
    """(state letter, parent pid, name) of a process, from /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = raw[raw.index("(") + 1:raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), name


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st:
                children.setdefault(st[1], []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in sorted(children.get(todo.pop(0), [])):
            out.append(c)
            todo.append(c)
    return out


def _kill_tree(pid: int) -> None:
    for p in [*descendants(pid), pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


_SYS_TGKILL = {"x86_64": 234, "aarch64": 131}.get(os.uname().machine)


def _signal_main_thread(pid: int, sig: int) -> None:
    """`sig` to the process's main thread (tgkill), so that a stack dump shows where that thread is,
    not where it got to while another thread took the signal; os.kill where tgkill is not known."""
    if _SYS_TGKILL is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(_SYS_TGKILL, pid, pid, sig) == 0:
            return
        if ctypes.get_errno() == errno.ESRCH:
            raise ProcessLookupError(pid)
    os.kill(pid, sig)


def _dump_stacks(pids: list[tuple[int, str]], states: dict[int, str], read_fd: int, out: Path) -> None:
    """Every thread's Python stack of each process (stopped, see _end) into `out`: SIGUSR2 to its main
    thread, then SIGCONT; faulthandler's handler writes into the pipe before any Python code runs
    again, and the process is stopped again as soon as the dump is in (tens of ms of progress at most:
    a hung rank must not train on, nor let the others, once the run is being ended)."""
    with open(out, "w") as f:
        for pid, role in pids:
            f.write(f"==== {role}, pid {pid}, state {states.get(pid, 'gone')} ====\n")
            try:
                _signal_main_thread(pid, STACKS_SIGNAL)
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                continue
            deadline, wrote = time.monotonic() + 3.0, False
            while time.monotonic() < deadline:
                ready, _, _ = select.select([read_fd], [], [], 0.05 if wrote else 0.5)
                if not ready:
                    if wrote:
                        break  # it wrote, then stopped writing
                    continue
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    break
                wrote = True
                f.write(chunk.decode(errors="replace"))
            else:
                f.write("(no stack written within 3 s)\n")
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            f.write("\n")


# ---- the supervisor ----------------------------------------------------------------------------

def launch_id() -> str:
    """The same for every rank of one launch, new for each start (the rendezvous port and Slurm's or
    torchrun's restart count)."""
    keys = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
            "TORCHELASTIC_RESTART_COUNT")
    if not os.environ.get("MASTER_PORT") and not os.environ.get("SLURM_JOB_ID"):
        return f"{socket.gethostname()}-{os.getpid()}"
    return hashlib.sha1("|".join(os.environ.get(k, "") for k in keys).encode()).hexdigest()[:10]


class _Heartbeat:
    """The supervisor's view of the child's heartbeat."""

    def __init__(self, path: Path):
        path.write_bytes(b"\0" * _FORMAT.size)
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self.map = mmap.mmap(self._fd, _FORMAT.size, prot=mmap.PROT_READ)

    def read(self) -> dict | None:
        for _ in range(3):  # a torn read (the child writing at that moment): read again
            a, b = self.map[:_FORMAT.size], self.map[:_FORMAT.size]
            if a == b:
                break
        magic, section, flags, step, micro, entered, beat, *longest = _FORMAT.unpack(a)
        if magic != _MAGIC:
            return None
        return {"section": SECTIONS[section], "flags": flags, "step": step, "micro": micro, "entered": entered,
                "beat": beat, "longest": dict(zip(SECTIONS, longest))}

    def close(self) -> None:
        self.map.close()
        os.close(self._fd)


def _position(report: dict) -> tuple:
    """How far a rank got: step, section, micro-batches fetched, and whether the last one arrived."""
    return (report.get("step", -1), _ORDER.get(report.get("section", "startup"), 0), report.get("micro", 0),
            0 if report.get("waiting_for_data") else 1)


def _where(report: dict) -> str:
    section, step = report.get("section", "startup"), report.get("step", -1)
    text = section if step < 0 else f"step {step} ({section}" + (
        f", micro-batch {report['micro']}" if section == "step" and report.get("micro") else "") + (
        ", waiting for a batch from its loader" if report.get("waiting_for_data") else "") + ")"
    if section == "startup":
        text = "start-up"
    return text


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, ranks = [], sorted(ranks)
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        out.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ", ".join(out)


def _by_node(ranks: list[int], hosts: dict[int, str]) -> str:
    """Ranks grouped by their node: "node p3, ranks 2-3; node p4, rank 4"."""
    nodes: dict[str, list[int]] = {}
    for r in ranks:
        nodes.setdefault(hosts.get(r, "?"), []).append(r)
    return "; ".join(f"{'node ' + h if h != '?' else 'an unknown node'}, rank{'s' if len(rs) > 1 else ''} "
                     f"{_ranges(rs)}" for h, rs in sorted(nodes.items(), key=lambda kv: min(kv[1])))


def slurm_node_states(hosts) -> dict[str, str]:
    """The state of each of `hosts` in Slurm that is not a healthy one ("DOWN+NOT_RESPONDING (Not
    responding)"), inside a Slurm job where scontrol answers; {} otherwise."""
    hosts = sorted(set(hosts) - {"?"})
    if not hosts or not os.environ.get("SLURM_JOB_ID"):
        return {}
    try:
        p = subprocess.run(["scontrol", "show", "node", "-o", ",".join(hosts)], capture_output=True, text=True,
                           timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in p.stdout.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        state = fields.get("State", "")
        if any(bad in state for bad in ("DOWN", "NOT_RESPONDING", "FAIL", "DRAIN")):
            reason = line.split("Reason=", 1)[1].split(" [")[0] if "Reason=" in line else ""
            out[fields.get("NodeName", "?")] = state + (f" ({reason})" if reason else "")
    return out


def verdict(reports: dict[int, dict], world: int, hosts: dict[int, str] | None = None,
            node_states: dict[str, str] | None = None, ended: dict[int, str] | None = None) -> str:
    """One line naming the rank(s) at fault, from every rank's report. A rank that died of a lost peer
    (its collective failed: `failed`) is never the culprit while another rank died of something else,
    whichever supervisor noticed first: a peer's error follows the death within milliseconds, and
    which of the two is reported first is up to the scheduler."""
    first = sorted((r for r in reports.values() if r["kind"] in ("died", "hang")),
                   key=lambda r: (bool(r.get("peer_lost")), r["at"]))
    if first and first[0]["kind"] == "died" and not first[0].get("peer_lost"):  # the others died of it, or
        # hung waiting for it
        r = first[0]
        return f"rank {r['rank']} died ({r['exit']}) in {_where(r)} on {r['host']}; the others were ended"
    hosts, ended = hosts or {}, ended or {}
    missing = [r for r in range(world) if r not in reports and r not in ended]
    stopped = [r for r in reports.values() if r.get("stopped")]
    lost = [r for r in reports.values() if r["kind"] == "died" and r.get("peer_lost")]
    parts = []
    for host, state in sorted((node_states or {}).items()):  # what the scheduler knows comes first
        on = [r for r, h in hosts.items() if h == host]
        parts.append(f"Slurm has node {host} {state}" + (f": rank{'s' if len(on) > 1 else ''} {_ranges(on)}" if on else ""))
    for r in reports.values():
        if r["kind"] == "silent" and r.get("silent_rank") in missing:
            parts.append(f"the supervisor of rank {r['silent_rank']} on {r.get('silent_host', '?')} stopped answering "
                         f"(its entry unchanged for {r.get('silent_s', 0):.0f} s: stopped, or its node gone)")
            break
    if stopped:
        parts += [f"rank {r['rank']} is stopped ({r['stopped']}) in {_where(r)}" for r in stopped]
    if missing:
        parts.append(f"{_by_node(missing[:64], hosts)}{' ...' if len(missing) > 64 else ''}: no report "
                     "(the node or its supervisor is gone)")
    for code in sorted(set(ended.values())):
        rs = [r for r, c in ended.items() if c == code]
        parts.append(f"rank{'s' if len(rs) > 1 else ''} {_ranges(rs)} ended by {'themselves' if len(rs) > 1 else 'itself'} "
                     f"({code})")
    if lost:  # every death was a peer's consequence: the lost one left no report, or is behind the others
        parts.append(f"rank{'s' if len(lost) > 1 else ''} {', '.join(str(r['rank']) for r in lost[:8])} lost a peer "
                     f"in a collective ({lost[0]['exit']}) in {_where(lost[0])}")
    known = list(reports.values())
    if known and not stopped:
        low = min(_position(r) for r in known)
        behind = [r for r in known if _position(r) == low]
        if len(behind) < len(known):
            ahead = max(known, key=_position)
            parts += [f"rank {r['rank']} did not arrive: it is in {_where(r)} since {r['since_s']:.0f} s"
                      for r in behind[:8]]
            parts.append(f"the others got to {_where(ahead)}")
        elif not missing:
            r = known[0]
            parts.append(f"every rank is in {_where(r)} (none behind the others): a collective, the network or "
                         "the file system stopped answering")
    return "; ".join(parts) or "no report"


class Supervisor:
    def __init__(self, argv: list[str], cfg, run_dir: Path):
        self.argv, self.cfg, self.run_dir = argv, cfg, Path(run_dir)
        env = os.environ
        self.rank = int(env.get("RANK") or env.get("SLURM_PROCID") or 0)
        self.world = int(env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or 1)
        self.launch = self.run_dir / "watchdog" / f"launch-{launch_id()}"
        self.abort = self.launch / "ABORT"
        self.entry = self.launch / "ranks" / f"rank-{self.rank}"  # this supervisor's entry: who, where, alive
        self.host = socket.gethostname()
        # the next rank's entry: its last change (mtime) and when this supervisor saw it change
        self.watched = (self.rank + 1) % self.world if self.world > 1 else None
        self._watched_seen: tuple[float, float] | None = None
        self.registered = False
        self.longest = load_longest(self.run_dir)
        self.saved_longest = dict(self.longest)
        self.child: subprocess.Popen | None = None
        self.signalled = 0  # a signal this supervisor got (from the launcher) and passed on
        # files of this launch older than this are a former launch's (a rendezvous port used again)
        self.not_before = time.time() - 120

    # -- output --
    def say(self, text: str, everywhere: bool = False, writer: bool = False) -> None:
        """To the console; `everywhere`: to log.txt too, from rank 0 (or from `writer`, the verdict's)."""
        stamp = time.strftime("%H:%M:%S")
        if self.rank == 0 or writer:
            line = f"{stamp} {'' if self.rank == 0 else f'[rank {self.rank}] '}watchdog: {text}"
            print(line, flush=True)
            if everywhere:
                try:
                    with open(self.run_dir / "log.txt", "a") as f:
                        f.write(line + "\n")
                except OSError:
                    pass
        else:
            print(f"{stamp} [rank {self.rank}] watchdog: {text}", file=sys.stderr, flush=True)

    # -- the run --
    def run(self) -> int:
        hb_dir = Path(os.environ.get("TMPDIR", "/tmp"))
        hb_path = hb_dir / f"glm-heartbeat-{os.getpid()}"
        heartbeat = _Heartbeat(hb_path)
        read_fd, write_fd = os.pipe()
        env = {**os.environ, HEARTBEAT_ENV: str(hb_path), STACKS_FD_ENV: str(write_fd)}
        forwarded = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
        code = None
        try:
            self._register()
            self.child = subprocess.Popen([sys.executable, "-m", "pretrain", *self.argv], env=env,
                                          pass_fds=(write_fd,))
            os.close(write_fd)
            for s in forwarded:  # to the training process (SIGINT: a terminal sends it to both)
                signal.signal(s, self._forward if s != signal.SIGINT else signal.SIG_IGN)
            code = self._watch(heartbeat, read_fd)
            return code
        except BaseException:
            if self.child is not None:
                _kill_tree(self.child.pid)
            raise
        finally:  # (the signal handlers stay: a launcher's SIGTERM now must not cut this exit short)
            if self.registered:
                self._write_entry({"ended": code if code is not None else "error"})
            heartbeat.close()
            hb_path.unlink(missing_ok=True)
            os.close(read_fd)
            if self.rank == 0:
                self._save_longest()

    def _forward(self, signum, frame) -> None:
        self.signalled = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def _watch(self, heartbeat: _Heartbeat, read_fd: int) -> int:
        from pretrain.faults import EXIT_CONFIG, EXIT_DONE, EXIT_HUNG, EXIT_RESUME, EXIT_SAVE_FAILED, EXIT_UNSTABLE

        cfg = self.cfg
        started = time.monotonic()
        last = {"section": "startup", "flags": FIRST, "step": -1, "micro": 0, "entered": started, "beat": started}
        next_abort_check = next_alive = 0.0
        while True:
            try:
                code = self.child.wait(timeout=min(cfg.poll_s, 1.0))
            except subprocess.TimeoutExpired:
                code = None
            now = time.monotonic()
            hb = heartbeat.read()
            if hb is not None:
                for k, v in hb["longest"].items():
                    if v > self.longest.get(k, 0.0):
                        self.longest[k] = v
                last = hb
            if code is not None:
                if code in (EXIT_DONE, EXIT_RESUME, EXIT_CONFIG, EXIT_UNSTABLE, EXIT_SAVE_FAILED):
                    return code  # every rank ends that way together
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
                if code < 0 and -code == self.signalled:  # the launcher ended it (another rank failed)
                    self.say(f"the training process was ended by {how} from the launcher in "
                             f"{_where(self._report_of(last, now))}")
                    self._end("aborted", last, now, read_fd, exit_text=how)
                else:
                    lost = ": a collective lost its peer" if last["flags"] & PEER_LOST else ""
                    self.say(f"the training process died ({how}) in {_where(self._report_of(last, now))}{lost}", True)
                    self._end("died", last, now, read_fd, exit_text=how)
                return 128 - code if code < 0 else code
            section, first = last["section"], bool(last["flags"] & FIRST)
            limit = timeout_for(cfg, section, self.longest, first)
            if now - last["entered"] > limit:
                self.say(f"no progress for {now - last['entered']:.0f} s in {_where(self._report_of(last, now))} "
                         f"(timeout {limit:.0f} s): ending the run", True)
                self._end("hang", last, now, read_fd, limit=limit)
                return EXIT_HUNG
            if now >= next_abort_check:
                next_abort_check = now + cfg.poll_s
                if self._fresh(self.abort):
                    self._end("aborted", last, now, read_fd)
                    return EXIT_HUNG
            if now >= next_alive:
                next_alive = now + cfg.alive_s
                if not self.registered:
                    self._register()
                try:
                    os.utime(self.entry)
                except OSError:
                    pass  # (a file system that stalls: the peer's watch allows silent_s)
                silent = self._silent_peer(now)
                if silent:
                    self.say(f"the supervisor of rank {silent['silent_rank']} on {silent['silent_host']} has not "
                             f"answered for {silent['silent_s']:.0f} s (faults.watchdog.silent_s={cfg.silent_s:g}): "
                             "ending the run", True)
                    self._end("silent", last, now, read_fd, extra=silent)
                    return EXIT_HUNG
            if self.rank == 0 and now - started > 30:
                self._save_longest()

    def _save_longest(self) -> None:
        grown = any(v > 1.1 * self.saved_longest.get(k, 0.0) for k, v in self.longest.items())
        if not grown:
            return
        path = _timeouts_file(self.run_dir)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"longest_s": self.longest, "factor": self.cfg.factor,
                                       "floor_s": self.cfg.floor_s}, indent=1) + "\n")
            os.replace(tmp, path)
            self.saved_longest = dict(self.longest)
        except OSError:
            pass  # a full disk: the timeouts stay calibrated in memory

    def _register(self) -> None:
        """This supervisor's entry, once the run directory exists (a bad config, refused before the
        training process creates it, leaves nothing behind); rank 0 first looks at the launch before."""
        if self.registered or not self.run_dir.is_dir():
            return
        self.registered = True
        if self.rank == 0:
            self._review_previous()
        self._write_entry({})

    def _write_entry(self, extra: dict) -> None:
        try:
            self.entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.entry.with_name(f".{self.entry.name}.tmp")
            restart = int(os.environ.get("SLURM_RESTART_COUNT") or os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
            tmp.write_text(json.dumps({"rank": self.rank, "host": self.host, "pid": os.getpid(), "restart": restart,
                                       **extra}) + "\n")
            os.replace(tmp, self.entry)
        except OSError:
            pass

    def _silent_peer(self, now: float) -> dict | None:
        """The watched rank, when its supervisor's entry has not changed for silent_s and it has not
        ended or reported (it is ending); None otherwise (also before it wrote an entry at all)."""
        if self.watched is None:
            return None
        entry = self.launch / "ranks" / f"rank-{self.watched}"
        try:
            mtime = entry.stat().st_mtime
        except OSError:
            return None
        if self._watched_seen is None or self._watched_seen[0] != mtime:
            self._watched_seen = (mtime, now)  # seen to change: clocks of other nodes do not matter
            return None
        if now - self._watched_seen[1] < self.cfg.silent_s:
            return None
        try:
            info = json.loads(entry.read_text())
        except (OSError, ValueError):
            info = {}
        if "ended" in info or (self.launch / f"report-rank-{self.watched}.json").exists():
            return None
        return {"silent_rank": self.watched, "silent_host": info.get("host", "?"),
                "silent_s": round(now - self._watched_seen[1], 1)}

    def _entries(self, launch: Path) -> dict[int, dict]:
        out = {}
        for f in (launch / "ranks").glob("rank-*"):
            try:
                info = json.loads(f.read_text())
                out[int(info["rank"])] = info
            except (OSError, ValueError, KeyError):
                pass
        return out

    def _reports(self, launch: Path, fresh_only: bool = True) -> dict[int, dict]:
        reports = {}
        for f in launch.glob("report-rank-*.json"):
            if fresh_only and not self._fresh(f):
                continue
            try:
                r = json.loads(f.read_text())
                reports[r["rank"]] = r
            except (OSError, ValueError, KeyError):
                pass
        return reports

    def _review_previous(self) -> None:
        """The launch before this one, when it ended with neither a verdict nor a clean end (its
        job was ended from outside first: a node failure, a cancel): its verdict, from what it left."""
        launches = [d for d in (self.run_dir / "watchdog").glob("launch-*") if d != self.launch
                    and (d / "ranks").is_dir()]
        if not launches:
            return
        last = max(launches, key=lambda d: (d / "ranks").stat().st_mtime)  # only the one just before this
        if (last / "VERDICT").exists():
            return
        entries = self._entries(last)
        if not entries or all("ended" in e for e in entries.values()):
            return
        world = max(entries) + 1
        reports = self._reports(last, fresh_only=False)
        hosts = {r: e.get("host", "?") for r, e in entries.items()}
        ended = {r: f"exit {e['ended']}" for r, e in entries.items() if "ended" in e and r not in reports}
        states = slurm_node_states(hosts.values())
        text = (f"the previous launch ({last.name}, {world} rank(s) on {', '.join(sorted(set(hosts.values())))}) "
                "ended without a verdict: its job was ended from outside (a node failure, a cancel, a time limit) "
                f"before its supervisors could; {verdict(reports, world, hosts, states, ended)}")
        self.say(text, True)
        try:
            (last / "VERDICT").write_text(text + "\n")
        except OSError:
            pass

    def _fresh(self, path: Path) -> bool:
        try:
            return path.stat().st_mtime >= self.not_before
        except OSError:
            return False

    def _report_of(self, hb: dict, now: float) -> dict:
        return {"rank": self.rank, "host": socket.gethostname(), "section": hb["section"], "step": hb["step"],
                "micro": hb["micro"], "waiting_for_data": bool(hb["flags"] & WAITING_FOR_DATA),
                "peer_lost": bool(hb["flags"] & PEER_LOST),
                "since_s": round(now - hb["entered"], 1), "at": time.time()}

    def _end(self, kind: str, hb: dict, now: float, read_fd: int, exit_text: str = "", limit: float = 0.0,
             extra: dict | None = None) -> None:
        """Report, mark the launch as aborted, dump the stacks, end the process tree; on rank 0 (or the
        lowest rank that reported), name the culprit from every rank's report."""
        report = {**self._report_of(hb, now), "kind": kind, "exit": exit_text, "timeout_s": limit, **(extra or {})}
        pid = self.child.pid
        tree = [(pid, "training process")] if self.child.poll() is None else []
        tree += [(p, f"child of the training process ({_proc_stat(p)[2] if _proc_stat(p) else '?'})")
                 for p in descendants(pid)]
        states = {p: (_proc_stat(p) or ("gone",))[0] for p, _ in tree}
        stopped = [f"{role.split(' (')[0] if p == pid else 'its child ' + str(p)} in state T"
                   for p, role in tree if states[p] == "T"]
        if stopped:
            report["stopped"] = ", ".join(stopped)
        for p, _ in tree:  # frozen first: nothing of this rank moves on while the run is being ended
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        frozen_at = time.monotonic()
        try:
            self.launch.mkdir(parents=True, exist_ok=True)
            if kind != "aborted":
                self.abort.touch()
            stacks = self.launch / f"stacks-rank-{self.rank}.txt"
            _dump_stacks(tree, states, read_fd, stacks)
            report["stacks"] = str(stacks)
            tmp = self.launch / f".report-rank-{self.rank}.json"
            tmp.write_text(json.dumps(report) + "\n")
            os.replace(tmp, self.launch / f"report-rank-{self.rank}.json")
        except OSError as e:
            self.say(f"cannot write under {self.launch}: {e}")
        if self.world > 1 and tree and tree[0][0] == pid:
            # A killed training process breaks its peers' collectives at once: a peer whose supervisor
            # has not frozen it yet would fail and exit, and its stacks would show its exit, not the
            # hang. Every supervisor freezes its tree within poll_s of the abort marker; kill after that.
            time.sleep(max(0.0, frozen_at + 2 * self.cfg.poll_s + 2.0 - time.monotonic()))
        _kill_tree(pid)
        try:
            self.child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self._verdict()

    def _lower_reported(self) -> bool:
        """Whether a lower rank than this one reported (then the verdict is that one's to write)."""
        return any(self._fresh(self.launch / f"report-rank-{r}.json") for r in range(self.rank))

    def _verdict(self) -> None:
        """Rank 0 writes the verdict; another rank only when no lower one reported within grace_s."""
        deadline = time.monotonic() + self.cfg.grace_s
        while True:
            if self.rank and self._lower_reported():
                return
            reports = self._reports(self.launch)
            if len(reports) >= self.world or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if self.rank and self._lower_reported():
            return
        from pretrain.faults import EXIT_HUNG

        hosts = {r: e.get("host", "?") for r, e in self._entries(self.launch).items()}
        by = "" if self.rank == 0 else f" (written by rank {self.rank}: rank 0's supervisor did not report)"
        text = (f"{verdict(reports, self.world, hosts, slurm_node_states(hosts.values()))}{by}. Stacks and reports: "
                f"{self.launch}. Exit {EXIT_HUNG}: start the same command again to resume from `latest` (the Slurm "
                "launcher requeues itself)")
        self.say(text, True, writer=True)
        try:
            (self.launch / "VERDICT").write_text(text + "\n")
        except OSError:
            pass


def supervise(argv: list[str], cfg, run_dir: Path) -> int:
    """Run `python -m pretrain argv` under a supervisor (see the module's docstring); its exit code."""
    return Supervisor(argv, cfg, run_dir).run()


def under_supervisor() -> bool:
    return bool(os.environ.get(HEARTBEAT_ENV))

