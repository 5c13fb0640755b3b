"""The sbatch launchers: a dry run without Slurm (one node, and inside a multi-node allocation), the
failure bound, and jobs on one node of the session's real Slurm (tests/slurm_cluster.py, shared with
tests/test_multinode.py): the smoke launcher on the tiny experiment with two CPU
tasks runs to the end, requeueing itself once where a stage switches to its own layout, and a job
sent the preemption signal mid-run saves, requeues itself, resumes and ends with the same losses."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import ENDED
from tests.test_train import TINY_STEPS, scalars

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]


def _plain_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def test_dry_run_prints_the_launch_without_slurm(tmp_path):
    """DRY_RUN=1 outside a job, with no Slurm command on PATH: the srun line from the script's
    header (16 nodes x 8 tasks for GLM-4.5), the container flags, the environment, and the config
    resolved and checked against 128 processes."""
    bin_dir = tmp_path / "bin"  # only the tools the launcher needs, none of Slurm's
    bin_dir.mkdir()
    for tool in ("bash", "sed", "dirname", "realpath", "env", "grep", "sort", "head", "cat", "mkdir"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    env = _plain_env(DRY_RUN="1", PATH=str(bin_dir), PYTHON=sys.executable, RUN_DIR=str(tmp_path / "run"),
                     CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.01-py3")
    p = subprocess.run(["bash", "slurm/glm45.sbatch", "train.micro_batch_size=2"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "srun --nodes=16 --ntasks-per-node=8 --kill-on-bad-exit=0 --wait=120" in out
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" in out and "--container-mounts=" in out
    assert f"-m pretrain experiment=glm45 run.dir={tmp_path / 'run'} train.micro_batch_size=2" in out
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in out and "world size 128" in out
    assert "micro_batch_size: 2" in out and "pipeline: 8" in out and "expert: 16" in out
    assert not (tmp_path / "run").exists(), "a dry run created the run directory"

    env["RUN_DIR"] = str(tmp_path / "run")
    p = subprocess.run(["bash", "slurm/glm45_air.sbatch", "parallel.expert=7"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "parallel.expert=7 does not divide model.num_experts=128" in p.stderr


def test_multi_node_dry_runs_print_the_srun_line_the_master_and_the_node_counts(tmp_path):
    """Each launcher under DRY_RUN=1 inside a multi-node allocation (Slurm's variables, no Slurm
    command on PATH): the srun line over the allocation's nodes, the address its tasks rendezvous at
    (the first node), and which node counts the run fits. A header's node range is read as its top,
    and the headers name no --ntasks-per-node (with it Slurm gives a range its minimum)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sed", "dirname", "realpath", "env", "grep", "sort", "head", "cat", "mkdir"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    base = _plain_env(DRY_RUN="1", PATH=str(bin_dir), PYTHON=sys.executable, RUN_DIR=str(tmp_path / "run"))
    cases = [("glm45.sbatch", {"SLURM_JOB_NODELIST": "gpu[003-018]", "SLURM_JOB_NUM_NODES": "16"},
              "srun --nodes=16 --ntasks-per-node=8", "gpu003", "world size 128"),
             ("glm45_air.sbatch", {"SLURM_JOB_NODELIST": "dgx-a[7,9-11]", "SLURM_JOB_NUM_NODES": "4",
                                   "SLURM_GPUS_PER_NODE": "h100:8"},
              "srun --nodes=4 --ntasks-per-node=8", "dgx-a7", "world size 32"),
             ("smoke.sbatch", {"SLURM_JOB_NODELIST": "p[1-3]", "SLURM_JOB_NUM_NODES": "3", "EXPERIMENT": "tiny"},
              "srun --nodes=3 --ntasks-per-node=1", "p1", "world size 3")]
    for script, env, srun, master, world in cases:
        assert "--ntasks-per-node" not in "".join(
            ln for ln in (ROOT / "slurm" / script).read_text().splitlines(True) if ln.startswith("#SBATCH"))
        p = subprocess.run(["bash", f"slurm/{script}"], cwd=ROOT, env={**base, **env}, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        assert srun in p.stdout and f"# master address: {master} " in p.stdout and world in p.stdout, p.stdout
    # the tiny experiment's batch (4 and 8 sequences of 2) does not divide over 3 replicas
    assert "that run it: 1, 2; 3: " in p.stdout and "not a multiple of train.micro_batch_size=2 x 3" in p.stdout

    # a node range in the header: the dry run shows the top of it, and the counts that work in it
    ranged = tmp_path / "glm45_air.sbatch"
    ranged.write_text((ROOT / "slurm" / "glm45_air.sbatch").read_text().replace("#SBATCH --nodes=4", "#SBATCH --nodes=4-8"))
    p = subprocess.run(["bash", str(ranged)], cwd=ROOT, env={**base, "GLM_REPO": str(ROOT)}, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "srun --nodes=8 --ntasks-per-node=8" in p.stdout and "world size 64" in p.stdout, \
        p.stdout + p.stderr
    assert "# master address: the first node of the job" in p.stdout
    assert "node counts up to 8 (x 8 process(es)) that run it: 4, 8" in p.stdout


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs the tests to run in a virtual environment")
def test_dry_run_as_the_readme_gives_it_uses_the_repositorys_venv(tmp_path):
    """`DRY_RUN=1 bash slurm/glm45.sbatch` with no PYTHON set: the interpreter is the repository's
    .venv, which the README's set-up made (a plain python3 lacks the packages), unless a container
    is given. The repository here is a copy of links whose .venv is this test's own environment."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for entry in ROOT.iterdir():
        if entry.name != ".venv":
            (repo / entry.name).symlink_to(entry)
    (repo / ".venv").symlink_to(sys.prefix)
    env = _plain_env(DRY_RUN="1", RUN_DIR=str(tmp_path / "run"), GLM_REPO=str(repo))
    env.pop("PYTHON", None)
    p = subprocess.run(["bash", str(repo / "slurm" / "glm45.sbatch")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and f"{repo}/.venv/bin/python -m pretrain experiment=glm45" in p.stdout, \
        p.stdout[-2000:] + p.stderr[-2000:]
    p = subprocess.run(["bash", str(repo / "slurm" / "glm45.sbatch")], cwd=tmp_path, capture_output=True, text=True,
                       env={**env, "CONTAINER_IMAGE": "nvcr.io#nvidia/pytorch:25.01-py3"}, timeout=120)
    assert " python3 -m pretrain experiment=glm45" in p.stdout  # the container's interpreter


def test_failed_runs_requeue_a_bounded_number_of_times(tmp_path):
    """The job script's decision after its run, with srun and scontrol stood in for: a run that keeps
    failing at the same checkpoint is requeued MAX_FAILURES times and then given up; a new checkpoint
    in between starts the count again; exit 75 always requeues; a bad config never."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/bash\nexit $FAKE_EXIT\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"$*\" >> {tmp_path}/scontrol.calls\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step-00000005\n")

    def job(code: int, **extra) -> subprocess.CompletedProcess:
        env = _plain_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_EXIT=str(code), RUN_DIR=str(run_dir),
                         SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS_PER_NODE="2", MAX_FAILURES="2",
                         GLM_REPO=str(ROOT), **extra)
        return subprocess.run(["bash", "slurm/smoke.sbatch"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60)

    def requeues() -> int:
        calls = tmp_path / "scontrol.calls"
        return calls.read_text().count("requeue 42") if calls.exists() else 0

    assert job(1).returncode == 0 and job(1).returncode == 0 and requeues() == 2
    last = job(1)
    assert last.returncode == 1 and requeues() == 2
    assert "3 times in a row at checkpoint step-00000005: giving up" in last.stderr
    (run_dir / "checkpoints" / "latest").write_text("step-00000010\n")  # progress: counting starts again
    assert job(1).returncode == 0 and requeues() == 3
    assert job(75).returncode == 0 and requeues() == 4
    bad = job(2)
    assert bad.returncode == 2 and requeues() == 4 and "not requeued" in bad.stderr
    for code, why in ((3, "unstable"), (4, "could not be written")):
        stop = job(code)
        assert stop.returncode == code and requeues() == 4 and why in stop.stderr and "not requeued" in stop.stderr
    # a step that hangs at every restart: the watchdog's exit 76 requeues, bounded like any failure
    (run_dir / "checkpoints" / "latest").write_text("step-00000015\n")
    hung = [job(76) for _ in range(3)]
    assert [h.returncode for h in hung] == [0, 0, 76] and requeues() == 6
    assert "the watchdog ended the run (exit 76)" in hung[0].stderr and "giving up" in hung[2].stderr
    # an interpreter out here that cannot compose the config (a container's packages): the job asks
    # no node counts and runs on all its nodes
    (bin_dir / "nopython").write_text("#!/bin/bash\nexit 1\n")
    (bin_dir / "nopython").chmod(0o755)
    p = job(75, PYTHON=str(bin_dir / "nopython"))
    assert p.returncode == 0 and requeues() == 7 and "could not ask `glm-pretrain --fit-nodes`" in p.stderr, p.stderr


# ---- under a real Slurm ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(slurm):
    """The session's Slurm (tests/conftest.py): these jobs run on one of its nodes."""
    slurm.restore()
    return slurm


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tests.data_helpers import tiny_corpus

    return tiny_corpus(tmp_path_factory.mktemp("data"))


def _submit(cluster, corpus, run_dir: Path, *overrides: str, **env_extra: str) -> str:
    env = {"EXPERIMENT": "tiny", "RUN_DIR": str(run_dir), "PYTHON": sys.executable, "GLM_DATA_ROOT": str(corpus),
           "PYTHONPATH": str(ROOT), **env_extra}
    p = cluster.run("sbatch", "--parsable", "-N", "1", "-n", "2", "--ntasks-per-node=2", "--cpus-per-task=1",
                    str(ROOT / "slurm" / "smoke.sbatch"), *overrides, env=env, cwd=run_dir.parent)
    return p.stdout.strip().split(";")[0]


def _job_output(run_dir: Path, job_id: str) -> str:
    out = run_dir.parent / f"glm-smoke-{job_id}.out"
    logs = sorted((run_dir / "logs").glob("job-*/task-0.log")) if (run_dir / "logs").exists() else []
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in [out, *logs] if p.exists())


# The tiny experiment's second stage under its own layout (context parallelism 2 where the first
# stage runs two data-parallel replicas): the job saves at the boundary, exits 75, requeues itself
# and goes on under the new layout.
STAGE_LAYOUT = ["stages.mixed.parallel.context=2"]


@pytest.fixture(scope="module")
def smoke_job(cluster, corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("jobs") / "smoke"
    # submitted from a shell that holds another torch.distributed world's variables (a port in use,
    # an address that routes nowhere): the launcher must give the tasks Slurm's ranks and its own
    # rendezvous instead
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        stale = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="203.0.113.1",
                     MASTER_PORT=str(taken.getsockname()[1]))
        job_id = _submit(cluster, corpus, run_dir, *STAGE_LAYOUT, **stale)
        info = cluster.wait_for(job_id, ENDED, timeout=600)
    assert info["JobState"] == "COMPLETED", _job_output(run_dir, job_id)
    return run_dir, job_id


def test_smoke_launcher_runs_to_the_end_under_slurm_switching_layout_with_the_stage(cluster, smoke_job):
    """Two tasks: the first stage as two data-parallel replicas, then the job requeues itself once
    at the stage whose layout is context parallelism 2, and finishes under it."""
    run_dir, job_id = smoke_job
    ckpts = run_dir / "checkpoints"
    latest = ckpts / (ckpts / "latest").read_text().strip()
    log = (run_dir / "log.txt").read_text()
    steps = max(scalars(run_dir)["lm loss"])  # two data-parallel ranks: the batch ramp in steps of 2 sequences
    assert TINY_STEPS <= steps <= TINY_STEPS + 2 and f"done: step {steps}," in log
    assert latest.name == f"step-{steps:08d}" and (latest / "meta.json").is_file()
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["parallel"]["context"] == 2
    assert "stage 1 'mixed' runs under another layout (context 2, data 1) than this one (data 2)" in log
    assert "layout context 2, data 1 (stage 'mixed')" in log
    out = (run_dir.parent / f"glm-smoke-{job_id}.out").read_text()
    assert "exit 75): requeueing job" in out and "run finished (exit 0)" in out
    for restart in (0, 1):
        task_logs = sorted((run_dir / "logs" / f"job-{job_id}-restart-{restart}").glob("task-*.log"))
        assert [p.name for p in task_logs] == ["task-0.log", "task-1.log"]


def test_a_hung_rank_then_a_preemption_requeue_the_job_which_resumes_exactly(cluster, corpus, smoke_job, tmp_path):
    """One job, four launches, the uninterrupted job's losses at every step in the end:
    - launch 0: rank 1 stops itself (SIGSTOP) at step 6 (the test switch's restart=0); the watchdog
      ends both tasks naming rank 1, the job exits 76 and requeues itself;
    - launch 1 resumes from `latest` (step 4) and waits at the start of step 7 until a signal comes
      (the test-only `pause` fault: steps take tens of ms, Slurm's delivery longer, so the signal lands
      in step 7 whatever the machine's load); USR1 to the job's tasks (what `--signal=USR1@N` does
      before a time limit): it saves step 7 and exits 75, the job requeues itself; Slurm starts it
      again about 10 s later (the test cluster's job credentials live 10 s, tests/slurm_cluster.py;
      120 s by default);
    - launch 2 resumes from step 7 and requeues at the stage with its own layout;
    - launch 3 ends under it."""
    ref_dir, _ = smoke_job
    run_dir = tmp_path / "hung"
    watch = ["train.save_every=4", *(f"faults.watchdog.{section}_s=12" for section in ("step", "validation",
                                                                                        "checkpoint")),
             "faults.watchdog.first_s=120", "faults.watchdog.poll_s=1", "faults.watchdog.grace_s=10"]
    job_id = _submit(cluster, corpus, run_dir, *STAGE_LAYOUT, *watch,
                     GLM_TEST_FAULTS="stop@rank=1,step=6,restart=0;pause@step=7,restart=1")
    log = run_dir / "log.txt"
    deadline = time.monotonic() + 300
    while not (log.exists() and "waits at the start of step 7 for a stop signal" in log.read_text()):
        assert time.monotonic() < deadline and not cluster.ended(job_id), _job_output(run_dir, job_id)
        time.sleep(0.2)
    text = log.read_text()
    assert re.search(r"watchdog: rank 1 is stopped \(training process in state T\) in step 6", text), text[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step-00000004" in text, text[-3000:]
    assert list((run_dir / "watchdog").glob("launch-*/stacks-rank-1.txt"))
    cluster.run("scancel", "--signal=USR1", job_id)
    info = cluster.wait_for(job_id, ENDED, timeout=600)
    out = _job_output(run_dir, job_id)
    # the hang, the signal, then the layout of the second stage
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "3", out
    text = log.read_text()
    assert "the watchdog ended the run (exit 76)" in out and "exit 75): requeueing job" in out, out
    assert "stopping early (SIGUSR1): saving step 7" in text, out
    assert f"resumed from {run_dir}/checkpoints/step-00000007" in text, out
    assert (run_dir / "logs" / f"job-{job_id}-restart-3" / "task-0.log").is_file()
    want, got = scalars(ref_dir), scalars(run_dir)
    assert got["lm loss"] == want["lm loss"] and got["params-norm"] == want["params-norm"]


def _jsonl_inputs(directory: Path) -> Path:
    directory.mkdir(parents=True)
    for k in range(5):
        with open(directory / f"crawl-{k}.jsonl", "w") as f:
            for d in range(3 + 9 * k):
                f.write(json.dumps({"text": f"crawl {k} document {d}: " + "lorem ipsum dolor " * (d + 1)}) + "\n")
    return directory


def test_prepare_dry_run_prints_the_array_and_the_merge_without_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sed", "dirname", "realpath", "head", "nproc"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    env = _plain_env(DRY_RUN="1", PATH=str(bin_dir), PYTHON=sys.executable, PARTS="64",
                     SBATCH_ARGS="--partition=cpu --account=proj")
    p = subprocess.run(["bash", "slurm/prepare.sbatch", "crawl/*.jsonl", "-o", "/data/web"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "sbatch --parsable --array=0-63 --partition=cpu --account=proj --export=ALL\\,PREPARE_STEP=part" in out
    assert "-m data.cli prepare --workers 16 crawl/\\*.jsonl -o /data/web --part i/64" in out
    assert "--dependency=afterok:\\<array\\ job\\>" in out and "-o /data/web --merge 64" in out
    p = subprocess.run(["bash", "slurm/prepare.sbatch", "x", "-o", "y"], cwd=ROOT, env={**env, "PARTS": "0"},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "PARTS=0" in p.stderr


def test_prepare_array_and_merge_under_slurm_write_the_single_run(cluster, tmp_path):
    """Three array tasks tokenise a part each, the merge job waits for them and writes the dataset:
    the same bytes as one glm-data prepare over all inputs."""
    from data import cli

    from tests.data_helpers import bpe_tokenizer

    inputs = _jsonl_inputs(tmp_path / "in")
    args = [str(inputs), "--tokenizer", str(bpe_tokenizer(tmp_path / "tokenizer")), "--sample-tokens", "128",
            "--shard-tokens", "512", "--name", "web"]
    assert cli.main(["prepare", *args, "-o", str(tmp_path / "single"), "-q", "--workers", "1"]) == 0
    p = cluster.run("bash", str(ROOT / "slurm" / "prepare.sbatch"), *args, "-o", str(tmp_path / "web"), "-q",
                    env={"PARTS": "3", "SBATCH_ARGS": "--cpus-per-task=1", "PYTHON": sys.executable,
                         "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    merge_id = p.stdout.strip().rsplit("merge: job ", 1)[1].split()[0]
    info = cluster.wait_for(merge_id, ENDED, timeout=300)
    outs = "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted(tmp_path.glob("glm-prepare*.out")))
    assert info["JobState"] == "COMPLETED", outs
    assert len(list(tmp_path.glob("glm-prepare-*_*.out"))) == 3, outs  # one log per array task
    import filecmp

    cmp = filecmp.dircmp(tmp_path / "single", tmp_path / "web")
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only, outs
    assert len(json.loads((tmp_path / "web" / "manifest.json").read_text())["shards"]) > 3
