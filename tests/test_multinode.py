"""Many nodes under a real Slurm: three simulated nodes on this machine (tests/slurm_cluster.py:
each its own network, hostname and slurmd; the run directory on the file system they share). The
launcher across nodes trains as on one node; a node that vanishes (every process of it killed at a
random step, or rank 0's node cut from the network) ends the job in bounded time naming the node;
the job comes back on the nodes left with the same global batch, delivers no document twice (the
delivery record, data.record), and grows back once the node returns."""

from __future__ import annotations

import math
import os
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.slurm_cluster import ENDED
from tests.test_train import scalars

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

# 12 sequences of 64 tokens, micro-batches of 2: the same global batch on 1, 2 and 3 replicas
ELASTIC = ["train.global_batch_tokens=768", "train.batch_start_tokens=768"]
STEPS = 16  # the tiny experiment's 12,288 tokens at 768 per step


@pytest.fixture(scope="module")
def nodes(slurm):
    if not slurm.nodes:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"no namespace nodes under CI=true: {slurm.why_not_nodes}")
        pytest.skip(f"no namespace nodes here: {slurm.why_not_nodes}")
    slurm.restore()
    yield slurm
    slurm.restore()  # for the tests after these: every node back and idle


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tests.data_helpers import tiny_corpus

    return tiny_corpus(tmp_path_factory.mktemp("data"))


def _submit(cluster, corpus, run_dir: Path, *overrides: str, sbatch=("--nodes=2-3",), batch=ELASTIC, **env) -> str:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {"EXPERIMENT": "tiny", "RUN_DIR": str(run_dir), "PYTHON": sys.executable, "GLM_DATA_ROOT": str(corpus),
           "PYTHONPATH": str(ROOT), "TASKS_PER_NODE": "1", **env}
    p = cluster.run("sbatch", "--parsable", *sbatch, str(ROOT / "slurm" / "smoke.sbatch"), *batch, *overrides,
                    env=env, cwd=run_dir.parent)
    return p.stdout.strip().split(";")[0]


def _output(run_dir: Path, job_id: str) -> str:
    out = run_dir.parent / f"glm-smoke-{job_id}.out"
    log = run_dir / "log.txt"
    return "\n".join(f"--- {p}\n{p.read_text()[-4000:]}" for p in (out, log) if p.exists())


def _wait_log(cluster, run_dir: Path, job_id: str, pattern: str, timeout: float) -> re.Match:
    log, deadline = run_dir / "log.txt", time.monotonic() + timeout
    while True:
        m = re.search(pattern, log.read_text()) if log.exists() else None
        if m:
            return m
        assert time.monotonic() < deadline and not cluster.ended(job_id), \
            f"no {pattern!r} in the log after {timeout} s (job {cluster.job(job_id).get('JobState')})\n" \
            f"{_output(run_dir, job_id)}"
        time.sleep(0.3)


def _hosts(run_dir: Path, restart: int) -> dict[int, str]:
    """Rank -> node in the launch of that restart, from its supervisors' entries (pretrain/watchdog.py)."""
    import json

    out = {}
    for f in (run_dir / "watchdog").glob("launch-*/ranks/rank-*"):
        e = json.loads(f.read_text())
        if e.get("restart") == restart:
            out[e["rank"]] = e["host"]
    return out


def _run_processes_on(cluster, node: str, run_dir: Path) -> list[int]:
    """The run's supervisors and training processes (and their children) on `node`; not srun, which
    waits for the lost node's task until Slurm ends the job."""
    mark = f"run.dir={run_dir}".encode()
    out = []
    for pid in cluster.node_pids(node):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if mark in argv and not argv[0].endswith(b"srun"):
            out.append(pid)
    return out


def test_two_nodes_train_as_two_tasks_on_one_node(nodes, corpus, tmp_path):
    """A job given 3 nodes for a run whose global batch of 8 sequences cannot be split over 3 replicas
    of micro-batch 2: the launcher uses 2 of them and gives the third back to Slurm, where a 1-node job
    of 2 tasks then runs. The two give the same losses at every step, bit for bit; the 2-node job's
    tasks rendezvous at its first node's address, each node runs one."""
    batch = ["train.global_batch_tokens=512", "train.batch_start_tokens=512"]
    multi = _submit(nodes, corpus, tmp_path / "multi" / "run", sbatch=("--nodes=3",), batch=batch)
    single = _submit(nodes, corpus, tmp_path / "single" / "run", batch=batch,
                     sbatch=("--nodes=1", "-n", "2", "--ntasks-per-node=2", "--cpus-per-task=1"))
    for job, run_dir in ((multi, tmp_path / "multi" / "run"), (single, tmp_path / "single" / "run")):
        info = nodes.wait_for(job, ENDED, timeout=300)
        assert info["JobState"] == "COMPLETED", _output(run_dir, job)
    out = (tmp_path / "multi" / f"glm-smoke-{multi}.out").read_text()
    assert "node counts up to 3 (x 1 process(es)) that run it: 1, 2; 3: " in out, out
    m = re.search(r"using 2 of the job's 3 nodes, gave (p\d) back to Slurm", out)
    assert m, out
    m = re.search(r"on 2 node\(s\) x 1 task\(s\) \((p\d) (p\d); master (p\d):\d+\)", out)
    assert m and m[1] != m[2] and m[3] == m[1], out
    hosts = _hosts(tmp_path / "multi" / "run", 0)
    assert hosts == {0: m[1], 1: m[2]}, hosts
    logs = sorted((tmp_path / "multi" / "run" / "logs" / f"job-{multi}-restart-0").glob("task-*.log"))
    assert [p.name for p in logs] == ["task-0.log", "task-1.log"]
    want, got = scalars(tmp_path / "single" / "run"), scalars(tmp_path / "multi" / "run")
    assert len(got["lm loss"]) == STEPS * 3 // 2 and got["lm loss"] == want["lm loss"]
    assert got["params-norm"] == want["params-norm"]


def test_a_lost_node_the_job_goes_on_with_the_nodes_left_and_grows_back(nodes, corpus, tmp_path):
    """`--nodes=2-3` on 3 idle nodes starts on 3. At a random step, with a background save in flight,
    every process of one node (not rank 0's) is killed: the ranks on the others end at once (their collective loses its peer), the
    verdict names the node and its rank, Slurm marks the node down and requeues the job, which comes
    back on the 2 nodes left, resumes from the last complete checkpoint with the same global batch (the data-
    parallel size 3 -> 2) and runs to step 13. The node returns; a preemption (USR1) there requeues
    the job, which grows back to 3 nodes and ends. Across the three launches no stored sample is
    delivered twice (the delivery record), and the samples dropped at each size change are counted."""
    run_dir = tmp_path / "run"
    # saves in the background (train.async_save), every 2 steps; the lost rank's writer of step
    # `stalled` stalls after its first tensor, so that save is in flight when its node is killed, one
    # step later (the save of step stalled - 2 is complete then: a save waits for the one before)
    stalled, lost_rank = random.choice([4, 6]), random.choice([1, 2])
    kill_at = stalled + 1
    job = _submit(nodes, corpus, run_dir, "train.save_every=2", "train.async_save=true", "data.record=true",
                  "faults.watchdog.grace_s=10",
                  GLM_TEST_FAULTS=f"slow@step=2,until=99,seconds=0.5,restart=0;stall@rank={lost_rank},step={stalled},"
                                  "restart=0;pause@step=13,restart=1")
    _wait_log(nodes, run_dir, job, rf"step +{kill_at} ", timeout=240)
    hosts = _hosts(run_dir, 0)
    assert sorted(hosts.values()) == ["p1", "p2", "p3"], hosts
    lost = hosts[lost_rank]
    survivors = [n for n in nodes.nodes if n != lost]
    assert nodes.kill_node(lost)
    killed = time.monotonic()
    # the others end within seconds: their collective fails on the lost peer, their supervisors report
    # and rank 0's waits grace_s (10 s) for the lost rank's report (Slurm's node-failure kill would end
    # them ~30 s after the loss: SlurmdTimeout=10)
    while any(_run_processes_on(nodes, n, run_dir) for n in survivors):
        assert time.monotonic() - killed < 45, f"processes left on the surviving nodes\n{_output(run_dir, job)}"
        time.sleep(0.5)
    ended_s = time.monotonic() - killed
    _wait_log(nodes, run_dir, job, rf"node {lost}, rank {lost_rank}: no report", timeout=60)
    m = _wait_log(nodes, run_dir, job, r"world size changed from 3 to 2 processes at step (\d+)", timeout=240)
    resumed_s = time.monotonic() - killed
    resumed = int(m[1])
    # the save in flight never became `latest`, nor a checkpoint: the run resumed from the one before
    assert resumed == stalled - 2, m[0]
    assert f"resumed from {run_dir}/checkpoints/step-{resumed:08d}" in (run_dir / "log.txt").read_text()
    assert not (run_dir / "checkpoints" / f"step-{stalled:08d}").exists()
    assert sorted(_hosts(run_dir, 1).values()) == survivors

    _wait_log(nodes, run_dir, job, r"rank 0 waits at the start of step 13 for a stop signal", timeout=120)
    nodes.start_node(lost)
    nodes.wait_nodes(("idle", "allocated", "mixed"), timeout=60)
    nodes.run("scancel", "--signal=USR1", job)
    info = nodes.wait_for(job, ENDED, timeout=300)
    out = _output(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "2", out
    log = (run_dir / "log.txt").read_text()
    assert "world size changed from 2 to 3 processes at step 13" in log, out
    assert sorted(_hosts(run_dir, 2).values()) == ["p1", "p2", "p3"]
    for restart, n in ((0, 3), (1, 2), (2, 3)):
        assert len(list((run_dir / "logs" / f"job-{job}-restart-{restart}").glob("task-*.log"))) == n

    s = scalars(run_dir)
    assert sorted(s["lm loss"]) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in s["lm loss"].values())
    assert s["world-size"][STEPS] == 3 and s["world-size"][13] == 2 and s["world-size"][1] == 3
    assert s["batch-size"][STEPS] == s["batch-size"][13] == s["batch-size"][1] == 12  # the same global batch
    drops = [int(d.replace(",", "")) for d in re.findall(r"the loader dropped ([\d,]+) stored sample", log)]
    assert len(drops) == 2 and s["data-dropped-samples"][STEPS] == drops[-1] >= drops[0] >= 0

    from pretrain.deliveries import effective

    rows = effective(run_dir)
    seen = Counter(r[1:] for r in rows)
    assert rows and not [k for k, n in seen.items() if n > 1], "a stored sample was delivered twice"
    assert {r[0] for r in rows} & set(range(resumed + 1, 13)) and max(r[0] for r in rows) > 13
    print(f"node {lost} killed at step {kill_at}: the survivors ended {ended_s:.0f} s later; training went on "
          f"on 2 nodes {resumed_s:.0f} s after the kill, from step {resumed}; dropped {drops}")


def test_rank_0s_node_cut_from_the_network_is_named_and_the_job_goes_on(nodes, corpus, tmp_path):
    """The network of the node of rank 0 (the rendezvous store, the batch script, the verdict's
    writer) cut at a random step: the ranks hang in their collective; Slurm finds the node not
    responding, ends the job and requeues it; the next launch, on the two nodes left, names the lost
    node and its rank from the launch it follows, and the run ends there."""
    run_dir = tmp_path / "run"
    cut_at = random.randint(3, 8)
    # the cut node still sees the run directory here (one machine's file system): its own supervisors'
    # timeouts are set past the test, so that the verdict is the next launch's, as where a cut node
    # loses its file system with its network
    job = _submit(nodes, corpus, run_dir, "train.save_every=2", "faults.watchdog.step_s=600",
                  "faults.watchdog.silent_s=600",
                  GLM_TEST_FAULTS="slow@step=2,until=99,seconds=0.5,restart=0")
    _wait_log(nodes, run_dir, job, rf"step +{cut_at} ", timeout=240)
    hosts = _hosts(run_dir, 0)
    first = hosts[0]
    nodes.cut_node(first)
    cut = time.monotonic()
    try:
        m = _wait_log(nodes, run_dir, job, r"world size changed from 3 to 2 processes at step (\d+)", timeout=240)
        back_s = time.monotonic() - cut
        log = (run_dir / "log.txt").read_text()
        assert re.search(rf"the previous launch \(launch-\w+, 3 rank\(s\) on p1, p2, p3\) ended without a verdict.*"
                         rf"before its supervisors could; Slurm has node {first} DOWN\S* \(Not responding\): rank 0; node "
                         rf"{first}, rank 0; ", log), log[-3000:]
        info = nodes.wait_for(job, ENDED, timeout=300)
        assert info["JobState"] == "COMPLETED", _output(run_dir, job)
        assert first not in _hosts(run_dir, 1).values()
        s = scalars(run_dir)
        assert max(s["lm loss"]) == STEPS and all(math.isfinite(v) for v in s["lm loss"].values())
        print(f"node {first} (rank 0) cut at step {cut_at}: training went on on 2 nodes {back_s:.0f} s later, "
              f"from step {m[1]}")
    finally:
        for pid in _run_processes_on(nodes, first, run_dir):  # the cut node's orphans (its watchdog would
            os.kill(pid, 9)                                    # end them at step_s)
        nodes.cut_node(first, up=True)
