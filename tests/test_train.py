"""The training loop through its real entry point (`python -m pretrain experiment=tiny`): schedules,
stage switches on the live model, TensorBoard scalars, exact resume after SIGTERM and SIGKILL,
tensor parallelism against one process."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain import schedules
from pretrain.faults import EXIT_RESUME, TEST_FAULTS_ENV

# one pytest worker runs this whole module: its runs share the data and the uninterrupted reference
pytestmark = pytest.mark.xdist_group("train")

ROOT = Path(__file__).resolve().parents[1]
TINY_STEPS = 27  # 12,416 tokens of the tiny experiment's two stages (ramp included)


# ---- schedules ----------------------------------------------------------------------------------

def test_learning_rate_warms_up_then_follows_the_cosine_to_its_minimum():
    lr = lambda t: schedules.learning_rate(t, peak=2.5e-4, minimum=2.5e-5, warmup_tokens=100, total_tokens=1100)
    assert lr(0) == 0 and lr(50) == pytest.approx(1.25e-4) and lr(100) == pytest.approx(2.5e-4)
    assert lr(600) == pytest.approx((2.5e-4 + 2.5e-5) / 2)  # half-way through the decay
    assert lr(1100) == pytest.approx(2.5e-5) and lr(5000) == pytest.approx(2.5e-5)
    assert all(lr(t) >= lr(t + 10) for t in range(100, 1100, 10))


def test_batch_ramps_in_tokens_and_rounds_to_whole_micro_batches_per_rank():
    b = lambda t, seq=4096, granule=8: schedules.batch_sequences(t, 16 * 2**20, 64 * 2**20, 500e9, seq, granule)
    assert b(0) == 4096 and b(500e9) == b(1e15) == 16384  # 16M -> 64M tokens at 4K
    assert b(250e9) == 10240  # 40M tokens half-way
    assert b(0, seq=32768) * 32768 == 16 * 2**20  # the same tokens at another sequence length
    assert b(123e9, granule=24) % 24 == 0
    assert schedules.batch_sequences(0, 10, 10, 0, 4096, 8) == 8  # never below one micro-batch per rank


def test_batch_ramp_with_an_increment_is_the_same_batch_at_every_data_parallel_size(monkeypatch):
    """train.batch_ramp_increment_tokens: the ramp climbs in whole increments, evenly spaced, whatever
    the granule; a size whose micro-batch x DP does not divide the start, the increment or the end is
    refused (by the launcher's node count, at launch, at a resume), never rounded."""
    from model.config import ConfigError
    from pretrain import elastic
    from pretrain import train as train_mod
    from pretrain.config import compose

    ramp = lambda t, granule: schedules.batch_sequences(t, 16 * 2**20, 64 * 2**20, 480e9, 4096, granule, 2**20)
    for t in (0, 10e9 - 1, 10e9, 123e9, 250e9, 479.9e9, 480e9, 1e15):
        assert ramp(t, 8) == ramp(t, 64) == ramp(t, 256) == 4096 + 256 * min(48, int(t // 10e9))
    assert {ramp(t, 1) for t in range(0, int(480e9), int(1e9))} == set(range(4096, 16384, 256))  # 48 climbs

    fits = lambda *o: {n: why for n, why in elastic.node_counts(compose(["experiment=tiny", *o]), 1, 2).items()}
    assert fits("train.batch_ramp_increment_tokens=256")[2] is None
    why = fits("train.batch_ramp_increment_tokens=128")[2]
    assert "train.batch_ramp_increment_tokens=128 is 2 sequence(s) of 64 (stages.general), not a multiple of " \
           "train.micro_batch_size=2 x 2 data-parallel replica(s) = 4" in why, why
    # a stage that starts after the ramp only needs the final batch (here 2 sequences of 128 at the start)
    longer = ("train.batch_ramp_increment_tokens=256", "stages.mixed.seq_length=128")
    assert fits(*longer)[2] is None
    assert "train.batch_start_tokens=256 is 2 sequence(s) of 128 (stages.mixed)" in \
           fits(*longer, "train.batch_ramp_tokens=8192")[2]
    # no increment: a resize inside the ramp changes the rounding, so it is refused; after it, not
    tiny = compose(["experiment=tiny"])
    assert "has no train.batch_ramp_increment_tokens" in elastic.ramp_problem(tiny, 1, 2, "general", 1000)
    assert elastic.ramp_problem(tiny, 1, 2, "general", 2048) is None
    assert elastic.ramp_problem(compose(["experiment=tiny", "train.batch_ramp_increment_tokens=256"]),
                                1, 2, "general", 1000) is None
    # a launch at a size the batch does not split over fails before any process group starts
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="global_batch_tokens=512 is 8 sequence.*must split evenly over the 3 proc"):
        train_mod.preflight(tiny)


# ---- Slurm's environment ------------------------------------------------------------------------

def test_slurm_environment_gives_rank_world_and_master():
    from pretrain.parallel import first_host, slurm_environment

    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[003-004,9],login1"}
    got = slurm_environment(env)
    assert got == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu003",
                   "MASTER_PORT": str(20000 + 4242)}
    assert slurm_environment({**env, "RANK": "0"}) == {}  # torchrun's variables win
    assert first_host("node7") == "node7" and first_host("a1,b2") == "a1"


# ---- runs of the tiny experiment ----------------------------------------------------------------

@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from tests.data_helpers import tiny_corpus

    return tiny_corpus(tmp_path_factory.mktemp("data"))


def _command(run_dir: Path, *overrides: str, nproc: int = 1) -> list[str]:
    launch = [sys.executable, "-m", "pretrain"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
         "-m", "pretrain"]
    return [*launch, "experiment=tiny", f"run.dir={run_dir}", *overrides]


def _env(data_root: Path) -> dict:
    # not this pytest process's own world (the world1 fixture sets these while it runs)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "GLM_DATA_ROOT": str(data_root), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run(data_root, run_dir, *overrides, nproc=1, expect=0) -> str:
    p = subprocess.run(_command(run_dir, *overrides, nproc=nproc), env=_env(data_root), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == expect, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def _interrupt(data_root, run_dir, at_step: int, sig: int, *overrides) -> tuple[int, str]:
    """Start a run and send `sig` while it waits at the start of step `at_step` (the test-only `pause`
    fault: the run goes no further until it is signalled, however fast its steps are or however late
    this process reads its output); returns its exit code and its output up to then. A stop signal
    lets it train step `at_step` and stop after it; SIGKILL goes to the whole process group, as
    Slurm kills a job step (the checkpoint writer keeps a helper process)."""
    env = {**_env(data_root), TEST_FAULTS_ENV: f"pause@step={at_step}"}
    p = subprocess.Popen(_command(run_dir, *overrides), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        for line in p.stdout:
            lines.append(line)
            if f"waits at the start of step {at_step} for a stop signal" in line:
                if sig == signal.SIGKILL:
                    os.killpg(p.pid, sig)
                else:
                    p.send_signal(sig)
                break
        code = p.wait(timeout=600)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # whatever the run left behind
        except ProcessLookupError:
            pass
        p.stdout.close()
    return code, "".join(lines)


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """TensorBoard scalars by name and step (the last value written for a step wins, as TensorBoard
    shows a run that went back to a checkpoint)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model tensors of the run's latest checkpoint, read offline (torch DCP format)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    out = run_dir / "final.pt"
    dcp_to_torch_save(str(latest), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)
            and k.startswith(("decoder.", "embedding.", "output_layer.", "mtp.", "optimizer."))}


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "uninterrupted"
    out = _run(data_root, run_dir)
    return run_dir, out


def test_tiny_run_trains_through_both_stages_and_logs_the_scalars(uninterrupted):
    run_dir, out = uninterrupted
    assert "switched to stage 1 'mixed' from 4,096 tokens" in out and f"done: step {TINY_STEPS}," in out
    s = scalars(run_dir)
    for name in ("lm loss", "mtp_1 loss", "seq_load_balancing_loss", "learning-rate", "batch-size", "grad-norm",
                 "params-norm", "iteration-time", "throughput", "tokens-per-second", "consumed-tokens", "stage",
                 "skipped-iterations", "mfu", "moe/max_over_mean_tokens_per_expert_layer_1",
                 "moe/expert_bias_std_layer_2", "lm loss vs tokens"):
        assert name in s, name
        assert len(s[name]) == TINY_STEPS, name
    loss = s["lm loss"]
    assert loss[1] == pytest.approx(math.log(512), abs=0.3)  # uniform over the vocabulary at start
    assert loss[TINY_STEPS] < loss[1] - 0.3  # 27 short steps: learning, not converging
    assert [s["batch-size"][i] for i in (1, 5, 8)] == [4, 6, 8]  # the ramp, in whole micro-batches
    assert s["learning-rate"][1] == 0 and max(s["learning-rate"].values()) == pytest.approx(0.01)
    assert s["stage"][11] == 0 and s["stage"][12] == 1
    # loss-free balance moves the biases in stage 0 (rate 1e-3) and leaves them in stage 1 (rate 0)
    std = s["moe/expert_bias_std_layer_1"]
    assert std[2] > 0 and std[11] > std[2] and std[TINY_STEPS] == std[12]
    # validation on the held-out last shard of each source, every 10 steps
    val = s["lm loss validation"]
    assert sorted(val) == [10, 20] and val[20] < math.log(512)
    assert s["validation ppl"][20] == pytest.approx(math.exp(val[20]), rel=1e-5)
    assert "validation: lm loss" in out
    config = (run_dir / "config.yaml").read_text()
    assert "experiment: tiny" in config and (run_dir / "log.txt").is_file()


def test_sigterm_saves_and_exits_for_resume_then_the_run_continues_exactly(uninterrupted, data_root, tmp_path):
    ref_dir, _ = uninterrupted
    run_dir = tmp_path / "run"
    assert _interrupt(data_root, run_dir, 10, signal.SIGTERM)[0] == EXIT_RESUME
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-00000010"  # the step it was signalled in, then saved
    out = _run(data_root, run_dir)
    assert f"resumed from {run_dir / 'checkpoints' / latest}" in out
    want, got = scalars(ref_dir), scalars(run_dir)
    for name in ("lm loss", "mtp_1 loss", "grad-norm", "params-norm", "moe/expert_bias_std_layer_1",
                 "lm loss validation"):
        assert got[name] == want[name], name
    ref, resumed = final_model(ref_dir), final_model(run_dir)
    assert ref.keys() == resumed.keys() and ref
    for k in ref:
        assert torch.equal(ref[k], resumed[k]), k


SAVES = pytest.mark.parametrize("saving", ["train.async_save=false", "train.async_save=true"], ids=["sync", "async"])


@SAVES
def test_sigkill_loses_only_the_steps_since_the_last_checkpoint(uninterrupted, data_root, tmp_path, saving):
    ref_dir, _ = uninterrupted
    run_dir = tmp_path / "run"
    code, out = _interrupt(data_root, run_dir, 14, signal.SIGKILL, "train.save_every=5", saving)
    assert code == -signal.SIGKILL
    # killed before step 14, after 13; step 10's background save, if it has not finished (its writer's pace
    # is the machine's), never becomes `latest`: the run loses the steps since step 5
    done = "async" not in saving or "saved " + str(run_dir / "checkpoints" / "step-00000010") in out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == ("step-00000010" if done else "step-00000005")
    out = _run(data_root, run_dir, "train.save_every=5", saving)
    assert f"resumed from {run_dir / 'checkpoints' / ('step-00000010' if done else 'step-00000005')}" in out
    want, got = scalars(ref_dir), scalars(run_dir)
    assert got["lm loss"] == want["lm loss"] and got["params-norm"] == want["params-norm"]
    # keep_last=2: only the newest two complete checkpoints remain, and no temporary directory
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["latest", "step-00000025", f"step-{TINY_STEPS:08d}"]


@SAVES
def test_sigkill_in_the_middle_of_a_save_keeps_latest_and_resumes_exactly(uninterrupted, data_root, tmp_path, saving):
    """A real SIGKILL to the whole run while it writes the step-10 checkpoint (tensor data in its
    temporary directory, the checkpoint not complete; in the background while training goes on, for
    an asynchronous save): `latest` still names step 5, the resumed run starts there and ends
    bit-identical to the uninterrupted one, and the torn save is cleared. The write stops after its
    first tensor (the test-only `stall` fault), so the kill lands inside it however fast the disk is."""
    ref_dir, _ = uninterrupted
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    torn, done = ckpts / ".tmp-step-00000010", ckpts / "step-00000010"
    p = subprocess.Popen(_command(run_dir, "train.save_every=5", saving), cwd=ROOT,
                         env={**_env(data_root), TEST_FAULTS_ENV: "stall@step=10"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        def writing() -> bool:  # the writer has put tensor data on disk (the metadata comes last)
            try:
                return any(f.suffix == ".distcp" for f in torn.iterdir())
            except FileNotFoundError:
                assert not done.exists(), "the save of step 10 finished before the kill"
                return False

        while not writing():
            assert p.poll() is None, f"the run ended (exit {p.returncode}) before it saved step 10"
            assert time.monotonic() < deadline, "no save of step 10 within 600 s"
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGKILL)
        assert p.wait(timeout=60) == -signal.SIGKILL
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert torn.is_dir() and not done.exists(), "the kill did not land inside the save"
    assert (ckpts / "latest").read_text().strip() == "step-00000005"
    out = _run(data_root, run_dir, "train.save_every=5", saving)
    assert f"resumed from {ckpts / 'step-00000005'}" in out
    assert not torn.exists()
    want, got = scalars(ref_dir), scalars(run_dir)
    assert got["lm loss"] == want["lm loss"] and got["params-norm"] == want["params-norm"]
    ref, resumed = final_model(ref_dir), final_model(run_dir)
    assert ref.keys() == resumed.keys() and ref
    for k in ref:
        assert torch.equal(ref[k], resumed[k]), k


def test_an_unreadable_latest_falls_back_to_the_newest_checkpoint_that_loads(uninterrupted, data_root, tmp_path):
    """Saves at steps 2 and 4, then a storage fault truncates one of step 4's shards: started again,
    the run says it cannot load step 4, resumes from step 2 (never from step 0), sets step 4 aside,
    points `latest` at step 2 and trains on exactly as the uninterrupted run; with every checkpoint
    damaged it stops with exit 2, naming each one it tried."""
    ref_dir, _ = uninterrupted
    run_dir, saves = tmp_path / "run", ["train.save_every=2", "train.keep_last=0"]
    ckpts = run_dir / "checkpoints"

    def truncate(step: int) -> None:
        shard = max((ckpts / f"step-{step:08d}").glob("*.distcp"), key=lambda p: p.stat().st_size)
        shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])

    _run(data_root, run_dir, "train.max_steps=4", *saves)
    truncate(4)
    out = _run(data_root, run_dir, "train.max_steps=6", *saves)
    assert f"cannot resume from {ckpts / 'step-00000004'}: " in out
    assert "resumed from step-00000002 instead of the newer step-00000004 (" in out
    assert f"resumed from {ckpts / 'step-00000002'} at step 2" in out
    assert (ckpts / ".unreadable-step-00000004").is_dir() and (ckpts / "step-00000004" / "meta.json").is_file()
    want, got = scalars(ref_dir), scalars(run_dir)
    for name in ("lm loss", "mtp_1 loss", "grad-norm", "params-norm"):
        assert [got[name][s] for s in range(1, 7)] == [want[name][s] for s in range(1, 7)], name

    for step in (2, 4, 6):
        truncate(step)
    p = subprocess.run(_command(run_dir, "train.max_steps=8", *saves), env=_env(data_root), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert re.search(r"no checkpoint loads: step-00000006: \w+.*; step-00000004: .*; step-00000002: ", p.stdout), \
        p.stdout[-2000:]


def test_a_run_resumed_on_fewer_replicas_inside_the_batch_ramp_keeps_the_ramps_batch(data_root, tmp_path):
    """Two data-parallel replicas to step 3, inside the batch ramp, then one process. With
    train.batch_ramp_increment_tokens=256 the tiny ramp is 4 sequences until 2,048 tokens (steps 1-8),
    then 8, at both sizes, and so is every step's batch across the resize. Without an increment the
    ramp is rounded at each size (2 sequences at one process, 4 at two): the resume stops with exit 2
    naming the field instead of training another batch."""
    from pretrain import cli

    run_dir, inc = tmp_path / "run", "train.batch_ramp_increment_tokens=256"
    _run(data_root, run_dir, inc, "train.max_steps=3", nproc=2)
    # the launchers' question, with one node of one process left: a fit with the increment, none without
    fit = lambda *o: cli.main(["experiment=tiny", f"run.dir={run_dir}", *o, "--fit-nodes", "1", "1"])
    assert fit(inc) == 0 and fit() == 2
    p = subprocess.run(_command(run_dir, "train.max_steps=12"), env=_env(data_root), cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 2 and "has no train.batch_ramp_increment_tokens" in p.stdout + p.stderr, \
        p.stdout[-2000:] + p.stderr[-2000:]
    out = _run(data_root, run_dir, inc, "train.max_steps=12")
    assert "world size changed from 2 to 1 processes at step 3" in out, out[-2000:]
    batch = scalars(run_dir)["batch-size"]
    assert {step: batch[step] for step in range(1, 13)} == {step: 4 if step <= 8 else 8 for step in range(1, 13)}


def test_timer_stops_the_run_like_a_signal(data_root, tmp_path):
    out = _run(data_root, tmp_path / "run", "run.exit_after_minutes=0.0001", expect=EXIT_RESUME)
    assert "stopping early (run.exit_after_minutes): saving step 1" in out


def test_bad_config_and_data_fail_before_starting(data_root, tmp_path):
    p = subprocess.run(_command(tmp_path / "r", "train.micro_batch_sizes=2"), env=_env(data_root), cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "experiment/tiny.yaml" in p.stderr and "micro_batch_sizes" in p.stderr
    p = subprocess.run(_command(tmp_path / "r", "model.vocab_size=256"), env=_env(data_root), cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "stages.general" in p.stderr and "512" in p.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.distributed
def test_tensor_parallel_run_gives_the_single_process_losses(uninterrupted, data_root, tmp_path):
    ref_dir, _ = uninterrupted
    run_dir = tmp_path / "tp2"
    _run(data_root, run_dir, "parallel.tensor=2", "optim.muon.ns_dtype=fp32", nproc=2)
    want, got = scalars(ref_dir)["lm loss"], scalars(run_dir)["lm loss"]
    assert got.keys() == want.keys()
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), step


@pytest.mark.distributed
def test_checkpoint_from_tensor_parallel_resumes_in_one_process(uninterrupted, data_root, tmp_path):
    """Saved under TP2 (2 processes) at step 9, continued by one process to the end: the same losses
    as the uninterrupted single-process run (model, both optimizer sides, loader, counters)."""
    ref_dir, _ = uninterrupted
    run_dir = tmp_path / "run"
    _run(data_root, run_dir, "parallel.tensor=2", "train.max_steps=9", nproc=2)
    out = _run(data_root, run_dir)
    assert "resumed from" in out and "step-00000009" in out
    want, got = scalars(ref_dir)["lm loss"], scalars(run_dir)["lm loss"]
    assert got.keys() == want.keys()
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), step


def test_stage_switch_reaches_the_live_model_and_loader(world1, data_root, monkeypatch, tmp_path):
    """At a switch the RoPE frequencies (and Megatron's cached embeddings), MTP weight (the config
    and the MTP block's own copy), bias rate and the loader's sequence layout all change."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from pretrain import stages as stages_mod
    from pretrain.config import compose
    from pretrain.train import Trainer

    monkeypatch.setenv("GLM_DATA_ROOT", str(data_root))
    cfg = compose(["experiment=tiny"])
    trainer = Trainer(cfg, tmp_path)
    first, second = trainer.stages.list
    trainer.enter(first)
    rope = next(m for m in trainer.chunks[0].modules() if isinstance(m, RotaryEmbedding))
    before = rope(64).clone()
    live = stages_mod.live_values(trainer.chunks[0])
    assert live.pop("recompute") == "none" and not any(live.pop("checkpoint_core_attention"))
    assert live == pytest.approx({"rope_theta": 1e4, "expert_bias_update_rate": 1e-3, "mtp_loss_weight": 0.3,
                                  "mtp_block_loss_weight": 0.3}, rel=1e-5)
    assert "segment_ids" not in next(trainer.iterator)
    trainer.enter(second)
    live = stages_mod.live_values(trainer.chunks[0])
    assert live.pop("recompute") == "selective" and all(live.pop("checkpoint_core_attention"))
    assert live == pytest.approx({"rope_theta": 1e6, "expert_bias_update_rate": 0.0, "mtp_loss_weight": 0.1,
                                  "mtp_block_loss_weight": 0.1}, rel=1e-5)
    after = rope(64)  # not the embedding cached for the old base
    half = rope.inv_freq.numel()
    want = 1e6 ** (-torch.arange(0, 2 * half, 2, dtype=torch.float32) / (2 * half))
    torch.testing.assert_close(after[1, 0, 0, :half], want)  # position 1: the frequencies themselves
    assert not torch.equal(before, after)
    assert "segment_ids" in next(trainer.iterator)  # best_fit packing in the second stage


def test_non_finite_losses_skip_steps_then_stop_the_run(world1, data_root, monkeypatch, tmp_path):
    """NaN injected into the loss of chosen steps: each such step is skipped and counted (parameters
    untouched), training goes on; optim.max_skipped_steps in a row stop the run with the reason."""
    from model.sharding import gather_whole
    from pretrain import train as train_mod
    from pretrain.config import compose

    monkeypatch.setenv("GLM_DATA_ROOT", str(data_root))
    poisoned, seen = {3, 5, 6}, []
    real = train_mod.forward_step

    def forward_step(data_iterator, model):
        losses, loss_func = real(data_iterator, model)
        step = len(seen)
        return (losses * float("nan") if step in poisoned else losses), loss_func

    def train_step(self, n_micro, lr):
        before = {k: v.clone() for k, v in gather_whole(self.chunks).items()}
        loss, info, spike = type(self).train_step.__wrapped__(self, n_micro, lr)
        seen.append(info.skipped)
        after = gather_whole(self.chunks)
        assert lr == 0 or info.skipped == all(torch.equal(before[k], after[k]) for k in before
                                   if not k.endswith(("expert_bias", "local_tokens_per_expert")))
        return loss, info, spike

    train_step.__wrapped__ = train_mod.Trainer.train_step
    monkeypatch.setattr(train_mod, "forward_step", forward_step)
    monkeypatch.setattr(train_mod.Trainer, "train_step", train_step)
    cfg = compose(["experiment=tiny", "train.max_steps=8", "optim.max_skipped_steps=3"])
    trainer = train_mod.Trainer(cfg, tmp_path / "a")
    assert trainer.run() == 0
    assert seen == [i in poisoned for i in range(8)] and trainer.skipped == 3
    poisoned.update({7, 8, 9})
    seen.clear()
    cfg = compose(["experiment=tiny", "train.max_steps=12", "optim.max_skipped_steps=3"])
    with pytest.raises(FloatingPointError, match="3 in a row, limit optim.max_skipped_steps=3"):
        train_mod.Trainer(cfg, tmp_path / "b").run()


# ---- the loop under data, expert and tensor parallelism (gloo, in spawned processes) -----------

DP_STEPS = 6
# a fixed batch of 4 micro-batches per replica; clipping on at every step (gradient norms ~1.1-1.6),
# so a norm that counts a parameter twice or misses one changes the update
FIXED_BATCH = ["train.batch_start_tokens=512", "optim.muon.ns_dtype=fp32", f"train.max_steps={DP_STEPS}",
               "optim.clip_grad=0.5"]


def _loop(rank, overrides, data_root, run_dir, state_path, save_state, as_two_replicas):
    """DP_STEPS steps of the tiny experiment; returns (the scalars of each step, this rank's expert
    biases, this rank's final parameters by whole-model name).

    save_state (one process only): save the initial weights at state_path; otherwise load them from
    there (Megatron initialises each rank's experts, and each pipeline stage's layers, from that
    rank's generator, so other layouts start from other weights).
    as_two_replicas (one process only): feed each global batch as two data-parallel replicas would
    see it, replica 0's micro-batches then replica 1's, so one process computes what two replicas
    compute together."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ["GLM_DATA_ROOT"] = data_root
    from data.loader import TokenLoader
    from model.sharding import gather_whole, load_whole_state
    from pretrain import train as train_mod
    from pretrain.config import compose
    from pretrain.parallel import init_distributed, shutdown_distributed

    cfg = compose(["experiment=tiny", *FIXED_BATCH, *overrides])
    init_distributed(cfg.parallel)
    try:
        trainer = train_mod.Trainer(cfg, Path(run_dir))
        if save_state:
            torch.save(gather_whole(trainer.chunks), state_path)
        else:
            load_whole_state(trainer.chunks, torch.load(state_path))
        if as_two_replicas:
            enter = trainer.enter

            def enter_as_two(stage):
                enter(stage)
                micro = cfg.train.micro_batch_size
                its = [iter(TokenLoader(cfg.stage_data[stage.name], micro, rank=r, n_ranks=2,
                                        model_vocab=cfg.model.vocab_size)) for r in range(2)]
                per_replica = cfg.train.global_batch_tokens // cfg.stage_data[stage.name].seq_length // micro // 2

                def batches():
                    while True:
                        for it in its:
                            for _ in range(per_replica):
                                yield next(it)
                trainer.iterator = batches()

            trainer.enter = enter_as_two
        steps = {}
        write = trainer.metrics.write
        trainer.metrics.write = lambda s, step, tokens: (steps.__setitem__(step, dict(s)), write(s, step, tokens))
        trainer.run()
        biases = {n: m.expert_bias.clone() for n, m in trainer.load.routers}
        return steps, biases, gather_whole(trainer.chunks)
    finally:
        shutdown_distributed()


def _losses(steps: dict) -> dict:
    return {step: s["lm loss"] for step, s in steps.items()}


@pytest.fixture(scope="module")
def two_replicas_in_one(data_root, tmp_path_factory):
    from tests import spawn

    d = tmp_path_factory.mktemp("one")
    (result,) = spawn.run(_loop, 1, [], str(data_root), str(d / "run"), str(d / "state.pt"), True, True,
                          out_dir=str(d / "out"))
    return result, str(d / "state.pt")


@pytest.fixture(scope="module")
def one_replica(two_replicas_in_one, data_root, tmp_path_factory):
    """One process from the same initial weights, each batch as one replica sees it."""
    from tests import spawn

    _, state_path = two_replicas_in_one
    d = tmp_path_factory.mktemp("one_replica")
    (result,) = spawn.run(_loop, 1, [], str(data_root), str(d / "run"), state_path, False, False,
                          out_dir=str(d / "out"))
    return result, state_path


@pytest.mark.distributed
@pytest.mark.parametrize("overrides", [[], ["parallel.expert=2"]], ids=["DP2", "EP2+DP2"])
def test_data_parallel_loop_gives_the_single_process_losses_and_identical_biases(
        two_replicas_in_one, data_root, tmp_path, overrides):
    from tests import spawn

    (want_steps, want_biases, _), state_path = two_replicas_in_one
    want_losses = _losses(want_steps)
    results = spawn.run(_loop, 2, overrides, str(data_root), str(tmp_path / "run"), state_path, False, False,
                        out_dir=str(tmp_path / "o"))
    (steps0, biases0, _), (steps1, biases1, _) = results
    losses0 = _losses(steps0)
    assert losses0.keys() == want_losses.keys() and len(want_losses) == DP_STEPS
    for step, want in want_losses.items():
        assert losses0[step] == pytest.approx(want, rel=1e-5), step
    # loss-free balance counts tokens over all replicas: every replica holds the same biases,
    # and they are the single process's
    assert biases0.keys() == biases1.keys() == want_biases.keys() and biases0
    for name in biases0:
        assert torch.equal(biases0[name], biases1[name]), name
        torch.testing.assert_close(biases0[name], want_biases[name], rtol=0, atol=1e-6)
    assert any(b.abs().max() > 0 for b in biases0.values())


def test_a_save_that_dies_midway_leaves_latest_on_the_previous_checkpoint(world1, data_root, monkeypatch, tmp_path):
    from megatron.core import dist_checkpointing

    from pretrain.config import compose
    from pretrain.train import Trainer

    monkeypatch.setenv("GLM_DATA_ROOT", str(data_root))
    cfg = compose(["experiment=tiny", "train.max_steps=2"])
    first = Trainer(cfg, tmp_path)
    assert first.run() == 0
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000002"

    real_save = dist_checkpointing.save

    def dies_after_writing(state, path, *args, **kwargs):
        real_save(state, path, *args, **kwargs)  # the tensors are on disk ...
        raise SystemExit("killed")  # ... but the process dies before the checkpoint is complete

    monkeypatch.setattr(dist_checkpointing, "save", dies_after_writing)
    first.step = 3
    with pytest.raises(SystemExit):
        first.checkpoints.save()
    assert (ckpts / "latest").read_text().strip() == "step-00000002"
    assert (ckpts / ".tmp-step-00000003").is_dir() and not (ckpts / "step-00000003").exists()
    monkeypatch.setattr(dist_checkpointing, "save", real_save)

    again = Trainer(compose(["experiment=tiny", "train.max_steps=3"]), tmp_path)
    assert again.checkpoints.resume() and again.step == 2
    assert again.run() == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000002", "step-00000003"]


def test_asynchronous_save_writes_its_steps_state_while_training_goes_on(world1, data_root, monkeypatch, tmp_path):
    """A background save holds the state of the step it was asked at: the parameters are changed in
    place while the writer (held back here until the test lets it go) has not written yet, and the
    checkpoint, once complete, holds the old values. `latest` moves only when every writer is done. Runs on CUDA in
    the GPU tier (staging to host memory), on a CPU here (the forked writer's snapshot)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from model.sharding import gather_whole
    from pretrain.config import compose
    from pretrain.train import Trainer

    monkeypatch.setenv("GLM_DATA_ROOT", str(data_root))
    write = FileSystemWriterAsync.write_preloaded_data_multiproc

    gate = tmp_path / "writers-may-write"
    gate.touch()

    def slow_write(*args, **kwargs):  # runs in the writer process: writes once the gate is open
        deadline = time.monotonic() + 300
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return write(*args, **kwargs)

    monkeypatch.setattr(FileSystemWriterAsync, "write_preloaded_data_multiproc", staticmethod(slow_write))
    cfg = compose(["experiment=tiny", "train.max_steps=2", "train.async_save=true"])
    trainer = Trainer(cfg, tmp_path)
    assert trainer.checkpoints.storage.asynchronous
    assert trainer.run() == 0  # the end of a run waits for its save
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000002" and trainer.checkpoints.storage.pending is None

    want = {k: v.detach().cpu().clone() for k, v in gather_whole(trainer.chunks).items()}
    gate.unlink()
    trainer.step = 3
    trainer.checkpoints.save()
    assert trainer.checkpoints.storage.pending == ckpts / "step-00000003"
    with torch.no_grad():
        for chunk in trainer.chunks:
            for param in chunk.parameters():
                param.add_(1.0)
    assert trainer.checkpoints.storage.poll() is None  # the writers wait at the gate
    assert (ckpts / "latest").read_text().strip() == "step-00000002"
    gate.touch()
    trainer.checkpoints.finish(wait=True)
    assert (ckpts / "latest").read_text().strip() == "step-00000003" and not (ckpts / ".tmp-step-00000003").exists()

    again = Trainer(compose(["experiment=tiny", "train.max_steps=3"]), tmp_path)
    assert again.checkpoints.resume() and again.step == 3
    got = {k: v.detach().cpu() for k, v in gather_whole(again.chunks).items()}
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.distributed
def test_tensor_and_expert_parallel_loop_gives_the_single_process_losses(one_replica, data_root, tmp_path):
    """TP2+EP2 on two processes (one data-parallel replica) against one process, both from the same
    initial weights."""
    from tests import spawn

    (want_steps, _, _), state_path = one_replica
    want = _losses(want_steps)
    results = spawn.run(_loop, 2, ["parallel.tensor=2", "parallel.expert=2"], str(data_root), str(tmp_path / "run"),
                        state_path, False, False, out_dir=str(tmp_path / "o2"))
    for rank, (steps, _, _) in enumerate(results):
        losses = _losses(steps)
        assert losses.keys() == want.keys() and len(want) == DP_STEPS
        for step in want:
            assert losses[step] == pytest.approx(want[step], rel=1e-5), (rank, step)


# ---- the loop under pipeline parallelism (gloo, in spawned processes) ---------------------------

def _by_rank(results) -> tuple[dict, dict]:
    """(the scalars rank 0 writes, every stage's final parameters merged by whole-model name)."""
    params = {}
    for _, _, p in results:
        params.update(p)
    return results[0][0], params


def _assert_same_run(got_steps, got_params, want_steps, want_params, rel=1e-5):
    assert got_steps.keys() == want_steps.keys() and len(want_steps) == DP_STEPS
    for step, want in want_steps.items():
        names = ["lm loss", "mtp_1 loss", "grad-norm", "params-norm", "seq_load_balancing_loss"] + \
            [k for k in want if k.startswith("moe/")]
        for name in names:
            assert got_steps[step][name] == pytest.approx(want[name], rel=rel, abs=1e-6), (step, name)
    assert got_params.keys() == want_params.keys()
    for name, want in want_params.items():
        torch.testing.assert_close(got_params[name], want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [["parallel.pipeline=2"], ["parallel.pipeline=2", "parallel.first_stage_layers=1"],
                                    ["parallel.pipeline=2", "parallel.tensor=2"]],
                         ids=["PP2", "PP2-dense-first-stage", "PP2+TP2"])
def test_pipeline_parallel_loop_gives_the_single_process_run(one_replica, data_root, tmp_path, layout):
    """Two pipeline stages (the tiny model's 3 layers placed 2 + 1, the output layer and MTP on
    the last stage, the word embedding on both): the losses, the MTP loss, the gradient and
    parameter norms (the duplicated embedding counted once), the per-layer expert load and the
    final parameters of one process; with the first stage holding only the dense layer (no MoE
    layer, so no entry of its own in Megatron's balance-loss tracker); with TP2 on four processes."""
    from tests import spawn

    (want_steps, _, want_params), state_path = one_replica
    world = 2 * (2 if "parallel.tensor=2" in layout else 1)
    results = spawn.run(_loop, world, layout, str(data_root), str(tmp_path / "run"), state_path, False, False,
                        out_dir=str(tmp_path / "o"))
    _assert_same_run(*_by_rank(results), want_steps, want_params)


@pytest.mark.distributed
def test_pipeline_and_expert_parallel_loop_gives_the_two_replica_run(two_replicas_in_one, data_root, tmp_path):
    """PP2 + EP2 on four processes, two data-parallel replicas: one process fed both replicas'
    micro-batches; the expert biases too (loss-free balance counts every replica's tokens)."""
    from tests import spawn

    (want_steps, want_biases, want_params), state_path = two_replicas_in_one
    results = spawn.run(_loop, 4, ["parallel.pipeline=2", "parallel.expert=2"], str(data_root),
                        str(tmp_path / "run"), state_path, False, False, out_dir=str(tmp_path / "o"))
    _assert_same_run(*_by_rank(results), want_steps, want_params)
    biases = {}
    for _, b, _ in results:
        biases.update(b)
    assert biases.keys() == want_biases.keys()
    for name in biases:
        torch.testing.assert_close(biases[name], want_biases[name], rtol=0, atol=1e-6)


@pytest.mark.distributed
def test_virtual_pipeline_stages_give_the_single_process_run(data_root, tmp_path):
    """PP2 with two virtual stages (the interleaved schedule): four layers in four model chunks,
    one each, the embedding in the first chunk of stage 0, output and MTP in the last of stage 1."""
    from tests import spawn

    four = ["model.num_layers=4"]
    state = str(tmp_path / "state.pt")
    (want_steps, _, want_params), = spawn.run(_loop, 1, four, str(data_root), str(tmp_path / "one"), state, True,
                                              False, out_dir=str(tmp_path / "o1"))
    results = spawn.run(_loop, 2, [*four, "parallel.pipeline=2", "parallel.virtual_stages=2"], str(data_root),
                        str(tmp_path / "run"), state, False, False, out_dir=str(tmp_path / "o2"))
    _assert_same_run(*_by_rank(results), want_steps, want_params)


@pytest.mark.distributed
def test_checkpoints_move_between_context_pipeline_and_single_process_layouts(uninterrupted, data_root, tmp_path):
    """Context parallelism 2 to step 7, one process to 14, two pipeline stages to 21, context
    parallelism 2 to the end (packed documents and selective recomputation in the second stage), one
    data-parallel replica throughout: the uninterrupted single-process run's losses and TensorBoard
    scalars, the pipeline part logged like the rest."""
    ref_dir, _ = uninterrupted
    run_dir = tmp_path / "run"
    _run(data_root, run_dir, "parallel.context=2", "train.max_steps=7", nproc=2)
    out = _run(data_root, run_dir, "train.max_steps=14")
    assert "resumed from" in out and "step-00000007" in out
    out = _run(data_root, run_dir, "parallel.pipeline=2", "train.max_steps=21", nproc=2)
    assert "resumed from" in out and "step-00000014" in out
    # the console shows the last stage's losses from rank 0, as without pipelining
    console = re.findall(r"step     15 \[mixed\] loss (\d\.\d{4}) mtp (\d\.\d{3}) lr", out)
    ref = scalars(ref_dir)
    assert len(console) == 1, out[-2000:]  # one line: rank 0's
    assert float(console[0][0]) == pytest.approx(ref["lm loss"][15], abs=1e-4)
    assert float(console[0][1]) == pytest.approx(ref["mtp_1 loss"][15], abs=1e-3)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000021"
    out = _run(data_root, run_dir, "parallel.context=2", nproc=2)
    assert "step-00000021" in out and f"done: step {TINY_STEPS}," in out
    want, got = scalars(ref_dir), scalars(run_dir)
    # every scalar of the one-process run; with more than one rank, the stragglers' too (not at
    # every step: the one-process part of this run has none)
    assert {k for k in got if not k.startswith("straggler/")} == want.keys()
    for name in want:  # every scalar at every step
        assert got[name].keys() == want[name].keys(), name
    for name in ("lm loss", "mtp_1 loss", "grad-norm", "params-norm", "lm loss validation",
                 "moe/expert_bias_std_layer_2", "moe/max_over_mean_tokens_per_expert_layer_1"):
        for step in want[name]:
            assert got[name][step] == pytest.approx(want[name][step], rel=1e-4, abs=1e-6), (name, step)


def test_launch_layout_micro_batches_and_impl_are_checked_before_starting(data_root, monkeypatch):
    from model.config import ConfigError
    from pretrain.config import compose
    from pretrain.train import preflight

    monkeypatch.setenv("GLM_DATA_ROOT", str(data_root))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"world size 3 is not divisible by tensor\*pipeline\*context=2"):
        preflight(compose(["experiment=tiny", "parallel.pipeline=2"]))
    monkeypatch.setenv("WORLD_SIZE", "4")  # two replicas of two stages: 256 tokens = 2 micro-batches of 2 x 64
    vp = ["experiment=tiny", "model.num_layers=4", "parallel.pipeline=2", "parallel.virtual_stages=2"]
    preflight(compose([*vp, "train.batch_start_tokens=512"]))
    with pytest.raises(ConfigError, match=r"experiment/tiny.yaml: train.batch_start_tokens=256 gives 1 micro-batch"
                                          r".*needs at least parallel.pipeline=2"):
        preflight(compose([*vp, "train.batch_start_tokens=256"]))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"train.impl=te but transformer_engine does not import"):
        preflight(compose(["experiment=tiny", "train.impl=te"]))
    with pytest.raises(ConfigError, match=r"train.impl='fast' must be auto, te, torch or local"):
        preflight(compose(["experiment=tiny", "train.impl=fast"]))


def test_skipped_bad_data_reaches_tensorboard_and_the_log(data_root, tmp_path):
    """data.on_error=skip: a shard that fails its checksum is left out, and the run's scalars and
    log say how much (the manifest's numbers for it)."""
    import json
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    manifest_path = root / "tiny" / "general" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    out = _run(root, tmp_path / "run", "data.on_error=skip", "data.max_skip_fraction=0.5", "train.max_steps=6")
    s = scalars(tmp_path / "run")
    shard = manifest["shards"][0]
    assert s["skipped-data-shards"][6] == 1 and s["skipped-data-tokens"][6] == shard["tokens"]
    assert s["skipped-data-samples"][6] == shard["samples"]
    assert "data: 1 bad shard(s) skipped so far" in out


# ---- the main job ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded_root(tmp_path_factory) -> Path:
    """The embedded corpus prepared as `make data` does (its own tokenizer, vocabulary 16384)."""
    from data import cli

    root = tmp_path_factory.mktemp("embedded_root")
    general, code = root / "embedded" / "general", root / "embedded" / "code"
    assert cli.main(["prepare", "embedded:general", "-o", str(general), "-q", "--workers", "2"]) == 0
    assert cli.main(["prepare", "embedded:code", "--code", "-o", str(code), "--tokenizer",
                     str(general / "tokenizer.json"), "-q", "--workers", "2"]) == 0
    return root


def test_smoke_experiment_runs_through_the_real_entry_point(embedded_root, tmp_path):
    """`make smoke`'s job, short: a few steps from a clean start on the embedded corpus (the warm-up
    cut so the loss can move), its scalars in TensorBoard, a complete checkpoint."""
    run_dir = tmp_path / "smoke"
    p = subprocess.run([sys.executable, "-m", "pretrain", "experiment=smoke", f"run.dir={run_dir}",
                        "train.max_steps=4", "train.lr_warmup_tokens=0", "train.eval_every=4", "train.eval_batches=1"],
                       env=_env(embedded_root), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = scalars(run_dir)
    loss = s["lm loss"]
    assert sorted(loss) == [1, 2, 3, 4]
    assert loss[1] == pytest.approx(math.log(16384), abs=0.5) and loss[4] < loss[1] - 0.3
    for name in ("mtp_1 loss", "grad-norm", "throughput", "mfu", "lm loss validation", "skipped-data-tokens"):
        assert name in s, name
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-00000004" and (run_dir / "checkpoints" / latest / "meta.json").is_file()
