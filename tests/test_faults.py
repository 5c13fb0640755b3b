"""Faults of long runs, injected for real into runs of the tiny experiment: a stopped rank, a stopped
DataLoader worker, a rank stuck in C holding the GIL, a rank killed in the middle of a collective
(the watchdog, pretrain/watchdog.py); a straggler; loss spikes (pretrain/spikes.py); a save into a
full disk (pretrain/checkpoint.py). Timeouts are fixed in seconds here (faults.watchdog.*_s), not
calibrated. The hang under the real Slurm, requeued and resumed, is in tests/test_slurm.py."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.faults import EXIT_HUNG, EXIT_RESUME, EXIT_SAVE_FAILED, EXIT_UNSTABLE, TEST_FAULTS_ENV
from pretrain.watchdog import HEARTBEAT_ENV, descendants
from tests.test_train import ROOT, _env, final_model, scalars

pytestmark = pytest.mark.xdist_group("faults")

# a step, a validation or a save of the tiny model takes well under a second (the first step ~2 s);
# 12 s leaves room for a loaded 2-core machine
WATCH = [f"faults.watchdog.{section}_s=12" for section in ("step", "validation", "checkpoint")] + [
    "faults.watchdog.first_s=120", "faults.watchdog.poll_s=1", "faults.watchdog.grace_s=10"]
BOUND_S = 12 + 3 * 1 + 2 + 10 + 20  # the timeout, polls and the wait before killing, the reports' grace, stack dumps and torchrun's own ending


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from tests.data_helpers import tiny_corpus

    return tiny_corpus(tmp_path_factory.mktemp("data"))


def _command(run_dir: Path, *overrides: str, nproc: int, monitor_s: float = 0) -> list[str]:
    launch = [sys.executable, "-m", "pretrain"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
         *([f"--monitor-interval={monitor_s}"] if monitor_s else []), "-m", "pretrain"]
    return [*launch, "experiment=tiny", f"run.dir={run_dir}", *overrides]


def _start(data_root, run_dir, *overrides, nproc=2, faults="", monitor_s=0) -> subprocess.Popen:
    env = {**_env(data_root), TEST_FAULTS_ENV: faults}
    return subprocess.Popen(_command(run_dir, *overrides, nproc=nproc, monitor_s=monitor_s), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(p: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        out, _ = p.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # whatever is left (asserted empty by the tests that care)
        except ProcessLookupError:
            pass
    return p.returncode, out


def _run(data_root, run_dir, *overrides, nproc=1, faults="", expect=0) -> str:
    code, out = _finish(_start(data_root, run_dir, *overrides, nproc=nproc, faults=faults))
    assert code == expect, f"exit {code}\n{out[-4000:]}"
    return out


def _processes_of(run_dir: Path) -> list[int]:
    """Every process of a run: launcher, supervisors, training processes, loader workers, writers."""
    mark = f"run.dir={run_dir}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if mark in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0"):
                    out.append(int(entry))
            except OSError:
                pass
    return out


def _process_of(run_dir: Path, rank: int, training: bool) -> int:
    """Rank `rank`'s training process (it has a heartbeat), or its supervisor (it has none). The
    training process's loader workers and writers inherit its environment: of the processes that
    match, the one whose parent does not (process ids wrap, so a child's may be the lower one)."""
    found = {}
    for pid in _processes_of(run_dir):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        beats = any(v.startswith(HEARTBEAT_ENV.encode() + b"=") for v in env)
        if f"RANK={rank}".encode() in env and beats == training:
            found[pid] = parent
    top = [pid for pid, parent in found.items() if parent not in found]
    if len(top) != 1:
        raise AssertionError(f"{len(top)} {'training process' if training else 'supervisor'}(s) of rank {rank} "
                             f"for {run_dir}: {found}")
    return top[0]


def _training_process(run_dir: Path, rank: int) -> int:
    return _process_of(run_dir, rank, training=True)


def _hang(data_root, run_dir, *overrides, at_step: int, act, nproc=2, faults="", monitor_s=0) -> tuple[int, str, float]:
    """Start a run, call `act()` once step `at_step` is logged; returns (exit code, output, seconds from
    the act to the end of the whole job)."""
    p = _start(data_root, run_dir, "train.max_steps=27", *WATCH, *overrides, nproc=nproc, faults=faults,
               monitor_s=monitor_s)
    lines, acted = [], None
    for line in p.stdout:
        lines.append(line)
        if acted is None and f"step {at_step:>6} " in line:
            act()
            acted = time.monotonic()
    code, rest = _finish(p, timeout=BOUND_S * 3)
    return code, "".join(lines) + rest, time.monotonic() - (acted or time.monotonic())


def _assert_ended_naming(run_dir: Path, out: str, pattern: str, elapsed: float, ranks=(0, 1)) -> str:
    log = (run_dir / "log.txt").read_text()
    assert re.search(pattern, log), log[-3000:] + out[-3000:]
    assert re.search(pattern, out)  # the console too
    assert elapsed < BOUND_S, f"the job took {elapsed:.0f} s to end after the fault (bound {BOUND_S} s)"
    launches = list((run_dir / "watchdog").glob("launch-*"))
    assert len(launches) == 1
    for rank in ranks:  # every rank's stacks (its threads, its workers)
        stacks = (launches[0] / f"stacks-rank-{rank}.txt").read_text()
        assert "==== training process" in stacks and 'File "' in stacks, stacks[:2000]
    assert _processes_of(run_dir) == [], "processes left behind"
    return (launches[0] / "stacks-rank-1.txt").read_text() if 1 in ranks else ""


# ---- hangs and dead ranks ----------------------------------------------------------------------

def test_a_stopped_rank_ends_the_job_naming_it_with_every_ranks_stacks(data_root, tmp_path):
    """SIGSTOP to rank 1's training process at a random step, from outside (as the OS or a debugger
    would): before the watchdog the job hung for good, silently."""
    run_dir = tmp_path / "run"
    # (acting after step 8 at the latest: the stop lands before the first validation, after step 10,
    # which like every first occurrence gets first_s)
    at = random.Random().randint(3, 8)
    code, out, elapsed = _hang(data_root, run_dir, at_step=at,
                               act=lambda: os.kill(_training_process(run_dir, 1), signal.SIGSTOP))
    assert code != 0
    # wherever the signal lands: in a step, or in the validation or save that follows a logged step
    _assert_ended_naming(run_dir, out, r"watchdog: rank 1 is stopped \(training process in state T\) in step \d+ "
                         r"\((step|validation|checkpoint)", elapsed)
    assert re.search(r"exitcode\s*: 76", out)  # torchrun's summary gives each worker's exit code


def test_a_stopped_dataloader_worker_ends_the_job_naming_its_rank(data_root, tmp_path):
    """A hung file-system read stands behind this one: training goes on from prefetched batches, then
    rank 1 waits for its loader for good; the watchdog says so."""
    run_dir = tmp_path / "run"

    def stop_worker():
        workers = descendants(_training_process(run_dir, 1))
        assert workers
        os.kill(workers[0], signal.SIGSTOP)

    code, out, elapsed = _hang(data_root, run_dir, "data.num_workers=1", at_step=3, act=stop_worker)
    assert code != 0
    stacks = _assert_ended_naming(run_dir, out, r"rank 1 is stopped \(its child \d+ in state T\) in step \d+ "
                                  r"\(step, micro-batch \d+, waiting for a batch from its loader\)", elapsed)
    assert stacks.count("==== ") >= 2 and "state T" in stacks  # the training process and its worker


@pytest.mark.parametrize("fault, pattern", [
    # ctypes.PyDLL keeps the GIL through the C call: no thread of the process could run a watchdog
    ("hold_gil@rank=1,step=5", r"rank 1 did not arrive: it is in step 5 \(step\) since \d+ s; the others got to "
                               r"step 5 \(step, micro-batch \d"),
    # rank 0 is in the gradient all-reduce of step 5, waiting for rank 1, when rank 1 dies
    ("kill@rank=1,step=5", r"rank 1 died \(signal SIGKILL\) in step 5 \(step, micro-batch \d+\)"),
], ids=["gil_held_in_c", "killed_in_a_collective"])
def test_a_rank_stuck_in_c_or_killed_ends_the_job_naming_it(data_root, tmp_path, fault, pattern):
    run_dir = tmp_path / "run"
    code, out, elapsed = _hang(data_root, run_dir, at_step=4, act=lambda: None, faults=fault)
    assert code != 0
    # (a rank that died has no stacks to read; rank 0 may be on its way out of gloo's error by then)
    stacks = _assert_ended_naming(run_dir, out, pattern, elapsed, ranks=(0, 1) if "hold" in fault else ())
    if "hold" in fault:  # its stack was read where it is stuck, in the middle of the C call
        assert re.search(r'faults.py", line \d+ in inject', stacks), stacks[:3000]
    else:  # the dead rank's supervisor gives its child's signal as 128+9; rank 0 ends with 76, or 1 when
        # gloo reported the lost peer before the abort mark was seen
        launch = next((run_dir / "watchdog").glob("launch-*"))
        assert (launch / "report-rank-1.json").is_file()
        # rank 0 saw the abort mark, or its all-reduce failed first: then its report says it lost a peer
        survivor = json.loads((launch / "report-rank-0.json").read_text())
        assert survivor["kind"] == "aborted" or survivor["peer_lost"], survivor
        assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: 137", out), out[-3000:]


def _report(rank: int, kind: str, at: float, **kw) -> dict:
    return {"rank": rank, "host": f"n{rank}", "section": "step", "step": 5, "micro": 1, "waiting_for_data": False,
            "since_s": 1.0, "at": at, "kind": kind, "exit": "", **kw}


def test_the_verdict_never_blames_a_rank_that_died_of_its_lost_peer():
    """Which supervisor notices its death first is the scheduler's choice: a rank whose collective failed
    because its peer died (gloo's 'Connection closed by peer', exit 1) may be reported a moment before the
    peer's own death. The verdict names the peer whatever the order; with the peer gone without a report
    (its node lost), it names the missing rank and says the others lost a peer."""
    from pretrain.watchdog import lost_a_peer, verdict

    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:6069. This is "
                        "typically caused by a remote worker crashing.")
    assert lost_a_peer(gloo) and not lost_a_peer(RuntimeError("CUDA out of memory")) and not lost_a_peer(gloo.__class__("x"))
    survivor = _report(0, "died", at=100.0, exit="exit 1", peer_lost=True)
    killed = _report(1, "died", at=100.4, exit="signal SIGKILL")
    for reports in ({0: survivor, 1: killed}, {1: killed, 0: survivor}):
        assert verdict(reports, 2).startswith("rank 1 died (signal SIGKILL) in step 5 (step, micro-batch 1) on n1")
    # a genuine error on one rank and its peer's lost connection: the error, though reported later
    error = _report(1, "died", at=100.4, exit="exit 1")
    assert verdict({0: survivor, 1: error}, 2).startswith("rank 1 died (exit 1)")
    # rank 1's node vanished with its supervisor: no report; rank 0 only lost a peer
    text = verdict({0: survivor}, 2)
    assert text.startswith("an unknown node, rank 1: no report (the node or its supervisor is gone); rank 0 lost a "
                           "peer in a collective (exit 1) in step 5"), text
    assert "rank 0 died" not in text
    # with the supervisors' entries (launch-<id>/ranks/) the missing ranks are named by node, with the
    # node's state in Slurm; a lost rank 0 is named like any other
    hosts = {0: "p1", 1: "p1", 2: "p3", 3: "p3", 4: "p4"}
    lost = {r: _report(r, "died", at=100.0 + r, exit="exit 1", peer_lost=True) for r in (1, 3)}
    text = verdict(lost, 5, hosts, {"p3": "DOWN+NOT_RESPONDING (Not responding)"})
    assert text.startswith("Slurm has node p3 DOWN+NOT_RESPONDING (Not responding): ranks 2-3; node p1, rank 0; node "
                           "p3, rank 2; node p4, rank 4: no report (the node or its supervisor is gone); ranks 1, 3 lost "
                           "a peer"), text
    assert verdict({0: survivor}, 4, {1: "p2", 2: "p3", 3: "p3"}).startswith("node p2, rank 1; node p3, ranks 2-3: ")
    # a supervisor that went silent, named by the rank that watched it
    silent = _report(0, "silent", at=100.0, silent_rank=1, silent_host="p2", silent_s=61.0)
    text = verdict({0: silent}, 2, {0: "p1", 1: "p2"})
    assert text.startswith("the supervisor of rank 1 on p2 stopped answering (its entry unchanged for 61 s: stopped, "
                           "or its node gone); node p2, rank 1: no report"), text


def test_the_next_launch_gives_the_verdict_of_one_ended_from_outside(tmp_path, monkeypatch):
    """Slurm ended the last launch before its supervisors could say anything (a node failure): rank 0's
    supervisor of the next launch writes its verdict from the entries and reports it left, naming the
    ranks without a report by node and those that ended by themselves; only the launch just before
    (an older one left without a verdict is not it), and never one that ended cleanly."""
    from pretrain.config import WatchdogConfig
    from pretrain.watchdog import Supervisor

    run_dir = tmp_path / "run"

    def launch(name: str, entries: dict, reports=()) -> Path:
        d = run_dir / "watchdog" / name
        (d / "ranks").mkdir(parents=True)
        for r, e in entries.items():
            (d / "ranks" / f"rank-{r}").write_text(json.dumps({"rank": r, "restart": 0, **e}))
        for rep in reports:
            (d / f"report-rank-{rep['rank']}.json").write_text(json.dumps(rep))
        return d

    older = launch("launch-old", {0: {"host": "p1"}})  # never reviewed, long ago
    time.sleep(0.05)
    last = launch("launch-last", {0: {"host": "p1", "ended": 4}, 1: {"host": "p2"}, 2: {"host": "p3"},
                                  3: {"host": "p3"}},
                  [_report(1, "died", at=1.0, exit="exit 1", peer_lost=True) | {"host": "p2"}])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # (no Slurm to ask about the nodes)
    Supervisor([], WatchdogConfig(), run_dir)._register()
    text = (last / "VERDICT").read_text()
    assert text.startswith("the previous launch (launch-last, 4 rank(s) on p1, p2, p3) ended without a verdict: its "
                           "job was ended from outside"), text
    assert "node p3, ranks 2-3: no report" in text and "rank 0 ended by itself (exit 4)" in text
    assert "rank 1 lost a peer in a collective" in text
    assert not (older / "VERDICT").exists()
    Supervisor([], WatchdogConfig(), run_dir)._register()  # once reviewed, the last launch is done with
    assert not (older / "VERDICT").exists()
    # a launch whose every supervisor ended by itself needs none
    clean = launch("launch-clean", {0: {"host": "p1", "ended": 0}, 1: {"host": "p2", "ended": 0}})
    Supervisor([], WatchdogConfig(), run_dir)._register()
    assert not (clean / "VERDICT").exists() and not (older / "VERDICT").exists()


def _supervisor_process(run_dir: Path, rank: int) -> int:
    return _process_of(run_dir, rank, training=False)


def test_a_supervisor_that_stops_answering_ends_the_job_naming_it(data_root, tmp_path):
    """SIGSTOP to rank 1's supervisor itself (not its training process) once step 3 is logged: the
    supervisors watch each other's entries (a ring), so rank 0's ends the job within silent_s and
    names rank 1 and its node. Before, such a run was still running 300 s later."""
    run_dir = tmp_path / "run"
    silent = ["faults.watchdog.alive_s=1", "faults.watchdog.silent_s=8", "faults.watchdog.grace_s=4"]
    stopped = []

    def stop_supervisor():
        pid = _supervisor_process(run_dir, 1)
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)

    # steps of 1 s from step 4 on: the run outlasts silent_s (the stopped supervisor's own training
    # process goes on without it)
    code, out, elapsed = _hang(data_root, run_dir, *silent, at_step=3, act=stop_supervisor,
                               faults="slow@step=4,until=27,seconds=1")
    assert stopped and code != 0, out[-3000:]
    log = (run_dir / "log.txt").read_text()
    host = re.escape(socket.gethostname())
    assert re.search(rf"the supervisor of rank 1 on {host} has not answered for \d+ s", log), log[-3000:]
    assert re.search(rf"the supervisor of rank 1 on {host} stopped answering \(its entry unchanged for \d+ s", log), \
        log[-3000:]
    assert re.search(rf"node {host}, rank 1: no report", log), log[-3000:]
    # silent_s, the reports' grace, and torchrun's own ending (it kills the stopped supervisor)
    assert elapsed < 8 + 2 + 4 + 40, f"the job took {elapsed:.0f} s to end after the supervisor stopped"
    assert _processes_of(run_dir) == [], "processes left behind"


def test_with_rank_0_lost_the_lowest_rank_that_reported_writes_the_verdict(data_root, tmp_path):
    """Rank 0's supervisor and training process killed together at step 3 (its node lost: nobody of it
    writes anything): ranks 1 and 2 lose their peer, and rank 1, the lowest rank that reported, writes
    the verdict into log.txt naming rank 0 and its node. Three ranks started as srun starts them, each
    on its own (torchrun would end the others as soon as it sees rank 0 gone, at a time of its own)."""
    from tests.spawn import free_port

    run_dir = tmp_path / "run"
    env = {**_env(data_root), TEST_FAULTS_ENV: "slow@step=4,until=27,seconds=0.5", "WORLD_SIZE": "3",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    # a global batch of 12 sequences: whole micro-batches of 2 on each of 3 replicas
    cmd = _command(run_dir, "train.global_batch_tokens=768", "train.batch_start_tokens=768", *WATCH, nproc=1)
    ranks = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True) for r in range(3)]
    try:
        for line in ranks[0].stdout:
            if "step      3 " in line:
                break
        for pid in (_supervisor_process(run_dir, 0), _training_process(run_dir, 0)):
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        codes = [p.wait(timeout=BOUND_S * 3) for p in ranks[1:]]
        elapsed = time.monotonic() - killed
    finally:
        for p in ranks:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert all(c != 0 for c in codes), codes
    log = (run_dir / "log.txt").read_text()
    host = re.escape(socket.gethostname())
    # (ranks 1 and 2 each either lost their peer, or saw the abort mark first: every order is right)
    assert re.search(rf"\[rank 1\] watchdog: node {host}, rank 0: no report \(the node or its supervisor is gone\); "
                     r"ranks? (1, 2|1|2) lost a peer in a collective \(exit 1\).* \(written by rank 1: rank 0's supervisor "
                     r"did not report\)", log), log[-3000:]
    assert log.count("lost a peer in a collective") == 1  # rank 2 left it to rank 1
    assert elapsed < BOUND_S, f"the ranks left took {elapsed:.0f} s to end"
    assert _processes_of(run_dir) == [], "processes left behind"


def test_a_preemption_signal_to_every_process_of_the_job_saves_after_earlier_saves(data_root, tmp_path):
    """Slurm signals every process of a job step (`--signal=USR1@N`, `scancel --signal`), helpers
    included: the checkpoint writers' results manager, started by the first save, once died of it,
    and the save the signal asked for failed ("Broken pipe"). Here the signal goes to the whole
    process group while the run waits at step 5, after the saves of steps 2 and 4."""
    run_dir = tmp_path / "run"
    p = _start(data_root, run_dir, "train.save_every=2", nproc=1, faults="pause@step=5")
    lines = []
    for line in p.stdout:
        lines.append(line)
        if "waits at the start of step 5 for a stop signal" in line:
            os.killpg(p.pid, signal.SIGUSR1)
            break
    code, rest = _finish(p, timeout=120)
    out = "".join(lines) + rest
    assert code == EXIT_RESUME, out[-3000:]
    assert "stopping early (SIGUSR1): saving step 5" in out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000005"


def test_a_single_process_run_that_stops_ends_with_the_watchdogs_exit_code(data_root, tmp_path):
    run_dir = tmp_path / "run"
    code, out, elapsed = _hang(data_root, run_dir, at_step=3, nproc=1, faults="stop@step=5", act=lambda: None)
    assert code == EXIT_HUNG, out[-3000:]
    _assert_ended_naming(run_dir, out, r"rank 0 is stopped \(training process in state T\) in step 5", elapsed,
                         ranks=(0,))


def test_the_supervisor_does_not_import_torch(tmp_path):
    """Each rank's supervisor stays small (measured: 30 MB and 0.7 s to compose the config without
    torch, 246 MB and 3.4 s with it; 8 of them per node): up to the point where it starts the
    training process, `glm-pretrain` imports no torch, nor does the config's validation."""
    code = f"""
import sys
from pretrain import cli, watchdog
def supervise(argv, cfg, run_dir):
    print("torch" if "torch" in sys.modules else "no torch", sorted(m for m in sys.modules if m.startswith("torch"))[:5])
    return 0
watchdog.supervise = supervise
sys.exit(cli.main(["experiment=smoke", "run.dir={tmp_path / 'run'}"]))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("no torch"), out.stdout


def test_timeouts_are_calibrated_saved_and_give_the_process_groups_backstop(data_root, tmp_path):
    """Without fixed timeouts: the longest step and save seen are saved in run.dir, a restart reads
    them back, and the process group's timeout is twice the longest timeout."""
    from pretrain.config import WatchdogConfig
    from pretrain.watchdog import backstop_s, load_longest, timeout_for

    run_dir = tmp_path / "run"
    _run(data_root, run_dir, "train.max_steps=6", "train.save_every=2")
    longest = load_longest(run_dir)
    assert set(longest) == {"step", "checkpoint"} and all(0 < v < 30 for v in longest.values())
    cfg = WatchdogConfig(factor=4.0, floor_s=0.0, first_s=50.0)
    assert timeout_for(cfg, "step", longest, first=False) == pytest.approx(4 * longest["step"])
    assert timeout_for(cfg, "step", longest, first=True) == 50.0  # the first step of a launch or a stage
    assert timeout_for(cfg, "validation", longest, first=False) == 50.0  # never seen
    # a fixed timeout holds from the second occurrence on: the first (warm-up) still gets first_s
    assert timeout_for(WatchdogConfig(step_s=7), "step", longest, first=False) == 7.0
    assert timeout_for(WatchdogConfig(step_s=7), "step", longest, first=True) == 1800.0
    assert timeout_for(WatchdogConfig(startup_s=90), "startup", longest, first=True) == 90.0
    assert backstop_s(WatchdogConfig(), run_dir) == 2 * 1800


# ---- stragglers ------------------------------------------------------------------------------

def test_a_straggler_is_named_on_the_console_and_in_tensorboard_and_the_run_finishes(data_root, tmp_path):
    """Rank 1 sleeps 1.5 s in its own work of steps 3-8. The margins hold on a loaded machine: a step's
    own work of the tiny model takes tens of ms alone and a few hundred with both cores busy, and load
    alone has made either rank 1.5x the other now and then, so rank 1 may already be the slowest just
    before step 3, and the third step in a row comes at step 3, 4 or 5."""
    run_dir = tmp_path / "run"
    out = _run(data_root, run_dir, "train.max_steps=10", nproc=2, faults="slow@rank=1,step=3,until=8,seconds=1.5")
    named = re.search(r"straggler: rank 1 has been the slowest for 3 logged steps: its own work took ([\d.]+) s at "
                      r"step (\d+), [\d.]+x the median", out)
    assert named and 3 <= int(named.group(2)) <= 5 and float(named.group(1)) >= 1.5, out[-3000:]
    s = scalars(run_dir)
    assert all(s["straggler/slowest-rank"][step] == 1 for step in range(3, 9))
    assert all(s["straggler/slowest-over-median"][step] > 2 for step in range(3, 9))
    assert "done: step 10" in out


# ---- loss spikes -------------------------------------------------------------------------------

SPIKES = ["faults.spike.window=5", "faults.spike.factor=3", "train.keep_last=0"]


def _model_state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    ckpts = run_dir / "checkpoints"
    (ckpts / "latest").write_text(f"step-{step:08d}\n")
    return final_model(run_dir)


def test_a_skipped_spike_changes_nothing_and_a_requeue_leaves_out_the_same_batch(data_root, tmp_path):
    """An injected x100 loss at step 8: parameters, expert biases and optimizer state after it equal
    those before; a run resumed from step 7 (a requeue) leaves out step 8's batch by the record and
    ends exactly where the run that met the spike ends."""
    run_dir = tmp_path / "run"
    out = _run(data_root, run_dir, "train.max_steps=10", "train.save_every=1", *SPIKES, faults="spike@step=8")
    assert re.search(r"loss spike at step 8: [\d.]+ > 3.0 x the median [\d.]+ of the last 5 steps: step 8 changed "
                     r"nothing", out), out[-3000:]
    record = json.loads((run_dir / "skipped_batches.json").read_text())
    assert record["skip"] == [8] and record["spikes"][0]["policy"] == "skip"
    s = scalars(run_dir)
    assert s["loss-spikes"][7] == 0 and s["loss-spikes"][8] == 1 and s["loss-spikes"][10] == 1
    assert s["lm loss"][8] > 50  # logged as it was
    end = final_model(run_dir)
    before, after = _model_state(run_dir, 7), _model_state(run_dir, 8)
    assert before.keys() == after.keys() and any("expert_bias" in k for k in before)
    assert any(k.startswith("optimizer.") for k in before)
    for k in before:
        assert torch.equal(before[k], after[k]), k

    requeued = tmp_path / "requeued"  # the same run directory as it was at step 7
    shutil.copytree(run_dir, requeued, ignore=shutil.ignore_patterns("tensorboard", "step-0000000[89]",
                                                                      "step-00000010", "final.pt"))
    (requeued / "checkpoints" / "latest").write_text("step-00000007\n")
    out = _run(data_root, requeued, "train.max_steps=10", "train.save_every=1", *SPIKES)
    assert "step      8 [general] left out: its batch is recorded in" in out
    got = final_model(requeued)
    for k in end:
        assert torch.equal(end[k], got[k]), k


def test_rewind_goes_back_to_the_checkpoint_and_leaves_out_the_batches_up_to_the_spike(data_root, tmp_path):
    run_dir = tmp_path / "run"
    out = _run(data_root, run_dir, "train.max_steps=10", "train.save_every=3", "faults.spike.policy=rewind",
               *SPIKES, faults="spike@step=8")
    assert "rewinding to step-00000006 and leaving out the batches of steps 7-8" in out, out[-3000:]
    assert json.loads((run_dir / "skipped_batches.json").read_text())["skip"] == [7, 8]
    # the reference: a clean run told to leave out the same batches from the start
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "skipped_batches.json").write_text(json.dumps({"skip": [7, 8], "spikes": []}))
    _run(data_root, ref, "train.max_steps=10", "train.save_every=3", *SPIKES)
    want, got = final_model(ref), final_model(run_dir)
    assert want.keys() == got.keys() and want
    for k in want:
        assert torch.equal(want[k], got[k]), k
    s_want, s_got = scalars(ref), scalars(run_dir)
    assert [s_got["lm loss"][i] for i in (9, 10)] == [s_want["lm loss"][i] for i in (9, 10)]


def test_a_clean_run_meets_no_spike_and_repeated_spikes_stop_the_run(data_root, tmp_path):
    out = _run(data_root, tmp_path / "clean", *SPIKES)  # both stages, through the switch and the ramp
    assert "loss spike" not in out and max(scalars(tmp_path / "clean")["loss-spikes"].values()) == 0
    out = _run(data_root, tmp_path / "spiky", "train.max_steps=12", "faults.spike.max_spikes=2", *SPIKES,
               faults="spike@step=8;spike@step=10", expect=EXIT_UNSTABLE)
    assert "2 loss spikes within 1000 steps (steps 8, 10; faults.spike.max_spikes=2): stopping" in out


# ---- saves that fail ---------------------------------------------------------------------------

def _small_disk(path: Path, size: str) -> bool:
    """A size-limited tmpfs at `path` (root only); False where mounting is refused."""
    path.mkdir(parents=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_save_into_a_full_disk_stops_the_run_with_latest_on_the_last_good_checkpoint(data_root, tmp_path):
    """Two ranks; checkpoints on a 5 MB tmpfs where one tiny checkpoint (3.3 MB) fits and a second does
    not (or ENOSPC injected on rank 1 where the mount is refused): the save of step 4 fails, every rank
    knows it, none is left waiting, `latest` stays on step 2, no partial directory is left."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    mounted = _small_disk(ckpts, "5m")
    try:
        code, out = _finish(_start(data_root, run_dir, "train.max_steps=8", "train.save_every=2", *WATCH,
                                   faults="" if mounted else "enospc@rank=1,step=4"), timeout=300)
        assert code != 0, out[-3000:]
        assert re.search(r"exitcode\s*: %d" % EXIT_SAVE_FAILED, out), out[-3000:]  # each worker's, as torchrun gives
        # the writer's error (ENOSPC, or torch's zip writer's "unexpected pos" when a write came up short),
        # then the free space, which says why
        assert re.search(rf"glm-pretrain: cannot save {ckpts / 'step-00000004'}: rank \d: \w+Error: .+; "
                         r"[\d.]+ \w?B free of [\d.]+ \w?B on its file system \(partial save included\); `latest` "
                         r"still names step-00000002 and the partial .tmp-step-00000004 was removed", out), out[-3000:]
        assert mounted or "No space left on device" in out
        assert (ckpts / "latest").read_text().strip() == "step-00000002"
        assert sorted(p.name for p in ckpts.iterdir() if p.name != "lost+found") == ["latest", "step-00000002"]
        assert _processes_of(run_dir) == []
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(ckpts)])


def test_a_failed_background_save_can_let_training_go_on(data_root, tmp_path):
    """faults.on_save_error=continue: the asynchronous save of step 4 fails on rank 1 (injected
    ENOSPC in its writer process); the run says so, trains on, saves step 6 and ends with exit 0."""
    run_dir = tmp_path / "run"
    out = _run(data_root, run_dir, "train.max_steps=6", "train.save_every=2", "train.async_save=true",
               "faults.on_save_error=continue", *WATCH, nproc=2, faults="enospc@rank=1,step=4")
    assert re.search(r"cannot save \S+step-00000004: rank 1: .*No space left on device.*training goes on "
                     r"\(faults.on_save_error=continue\)", out), out[-3000:]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000006"
    assert not list(ckpts.glob(".tmp-*")) and not (ckpts / "step-00000004").exists()
    # rank 1's writer fails whenever it gets there: the loop learns of it in the poll after step 5 or 6, or
    # when step 6's save waits for it; the count is written at the step where it became known, so by the
    # end of step 6 it is 1 whichever came first (a logged step's 0 at step 6 is followed by the 1)
    failures = scalars(run_dir)["checkpoint-save-failures"]
    assert failures[6] == 1 and max(failures.values()) == 1, failures
    assert all(failures[step] == 0 for step in range(1, 5)), failures  # logged before step 4's save began
