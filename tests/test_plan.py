"""glm-plan's memory figures against what training actually holds on CPU: the bytes of weights,
Megatron DDP's gradient buffers and the optimizer's state, and the bytes autograd saves for the
backward pass (`torch.autograd.graph.saved_tensors_hooks`), single-process and under TP/EP/DP."""

import weakref

import pytest
import torch

from model import memory
from model.config import ParallelConfig
from tests import spawn

# The stated margins (README): activations within 2% of the saved bytes, state within 1%
# (Megatron DDP pads its gradient buffers).
ACTIVATION_MARGIN = 0.02
STATE_MARGIN = 0.01
SEQ = {"smoke": (256, 4), "tiny": (64, 2)}  # sequence length, micro-batch


def _saved_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd keeps for one forward pass, parameters excluded."""
    from model.build import position_ids

    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, position_ids(ids), None, labels=ids)
    return sum(seen.values())


def _set_recompute(model, cfg, recompute: str) -> None:
    from pretrain import stages

    stages.apply({"rope_theta": cfg.rope_theta, "expert_bias_update_rate": 0.0,
                  "mtp_loss_weight": cfg.mtp_loss_weight, "recompute": recompute}, model)


def _measure(model_cfg, parallel, dtype, seq, micro, recomputes, seed=0) -> dict:
    """On this rank: weights, gradient buffers and optimizer state (bytes), and saved activations
    per recomputation setting, of the model under `parallel` (process groups must exist)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from model.build import build_model
    from optim.config import OptimConfig
    from optim.optimizer import Optimizer
    from pretrain.train import DDP_SETTINGS

    # Megatron's balance-loss tracker is process-wide and sized by the first model that logs to
    # it; this worker may have run a model of another depth before
    get_moe_layer_wise_logging_tracker().clear()
    torch.manual_seed(seed)
    model = build_model(model_cfg, parallel, dtype=dtype, impl="torch")
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(**DDP_SETTINGS), model)
    cfg = OptimConfig()
    cfg.muon.ns_dtype = "bf16"  # as on a GPU, which the planner plans for
    opt = Optimizer(model, cfg)
    out = {"weights": sum(p.nbytes for p in model.parameters()),
           "grads": sum(b.grad_data.nbytes for b in [*ddp.buffers, *ddp.expert_parallel_buffers]),
           "optimizer": sum(t.nbytes for s in opt.state.values() for t in s.values()),
           "step workspace": opt.workspace_bytes()}
    ids = torch.randint(0, model_cfg.vocab_size, (micro, seq))
    if parallel.context > 1:  # this rank's chunks of each sequence (model/context_parallel.py)
        from megatron.core import parallel_state as ps

        from model.context_parallel import split_batch

        ids = split_batch({"tokens": ids}, parallel.context, ps.get_context_parallel_rank())["tokens"]
    for rc in recomputes:
        _set_recompute(model, model_cfg, rc)
        out[rc] = _saved_bytes(model, ids)
    return out


def _planned(model_cfg, parallel, world, dtype, seq, micro) -> tuple:
    from plan.planner import Planner

    planner = Planner(model_cfg, dtype, micro, seq * micro * parallel.data(world))
    (stage,) = planner.stages(parallel, world)
    return planner, stage, planner.activations(parallel, world, stage, seq)


def _close(got: float, want: float, margin: float, what: str) -> None:
    assert abs(want - got) <= margin * got, \
        f"{what}: planned {want:,.0f} bytes, measured {got:,.0f} ({want / got - 1:+.2%})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["smoke", "tiny"])
def test_single_gpu_memory_matches_measured(world1, name, dtype):
    from pretrain.config import compose

    m = compose([f"model={name}"]).model
    seq, micro = SEQ[name]
    got = _measure(m, ParallelConfig(), dtype, seq, micro, memory.RECOMPUTE)
    _, stage, act = _planned(m, ParallelConfig(), 1, dtype, seq, micro)
    _close(got["weights"], stage.weights, 0.0, "weights")
    _close(got["grads"], stage.grads, STATE_MARGIN, "gradient buffers")
    _close(got["optimizer"], sum(stage.optimizer.values()), 0.0, "optimizer state")
    # what the step allocates: the optimizer's own count, measured in tests/test_optim.py
    _close(got["step workspace"], stage.workspace, 0.0, "optimizer step workspace")
    for rc in memory.RECOMPUTE:
        _close(got[rc], act.per_micro_batch[rc], ACTIVATION_MARGIN, f"activations, recompute {rc}")
    # and the whole: what the CPU holds at the end of the forward pass
    peak = got["weights"] + got["grads"] + got["optimizer"] + got["none"]
    _close(peak, stage.static + act.per_micro_batch["none"], ACTIVATION_MARGIN, "peak")


def _ranked(rank, layout):
    from pretrain.config import compose
    from pretrain.parallel import init_distributed, shutdown_distributed

    parallel = ParallelConfig(**layout)
    init_distributed(parallel)
    try:
        m = compose(["model=tiny"]).model
        seq, micro = SEQ["tiny"]
        return _measure(m, parallel, torch.float32, seq, micro, ("none", "full"), seed=rank)
    finally:
        shutdown_distributed()


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [dict(expert=2), dict(tensor=2, expert=2), dict(context=2)],
                         ids=["ep2-dp2", "tp2-ep2", "cp2"])
def test_parallel_memory_matches_measured(tmp_path, layout):
    """Two gloo ranks: data parallelism deals the optimizer state (the planner reports the rank that
    owns the most), sequence and tensor parallelism split activations, expert parallelism deals the
    experts and their rows (routing decides each rank's rows, so activations compare on average),
    context parallelism halves each rank's tokens and recomputes the core attention (the whole
    sequence's gathered keys and values are not kept)."""
    from pretrain.config import compose

    m = compose(["model=tiny"]).model
    parallel = ParallelConfig(**layout)
    got = spawn.run(_ranked, 2, layout, out_dir=str(tmp_path))
    seq, micro = SEQ["tiny"]
    _, stage, act = _planned(m, parallel, 2, torch.float32, seq, micro)
    for r in got:
        _close(r["weights"], stage.weights, 0.0, "weights")
        _close(r["grads"], stage.grads, STATE_MARGIN, "gradient buffers")
    _close(max(r["optimizer"] for r in got), sum(stage.optimizer.values()), 0.0, "optimizer state, largest owner")
    _close(max(r["step workspace"] for r in got), stage.workspace, 0.0, "optimizer step workspace, largest")
    for rc in ("none", "full"):
        mean = sum(r[rc] for r in got) / len(got)
        _close(mean, act.per_micro_batch[rc], ACTIVATION_MARGIN, f"activations per rank, recompute {rc}")


class _LiveSaved:
    """Bytes of the storages autograd holds for backward right now, and their peak: a storage
    counts from its first save until the last tensor saved on it is freed."""

    def __init__(self, model_chunks):
        self.params = {t.untyped_storage().data_ptr() for c in model_chunks for t in [*c.parameters(), *c.buffers()]}
        self.refs, self.size, self.live, self.peak = {}, {}, 0, 0

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.params:
            return t
        if not self.refs.get(ptr):
            self.refs[ptr], self.size[ptr] = 0, t.untyped_storage().nbytes()
            self.live += self.size[ptr]
            self.peak = max(self.peak, self.live)
        self.refs[ptr] += 1
        weakref.finalize(t, self._release, ptr)
        return t

    def _release(self, ptr):
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            self.live -= self.size[ptr]


def _pipelined(rank, layout, overrides, microbatches):
    """One training step of Megatron's pipeline schedule on this rank; the peak bytes it saved."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from model.build import build_chunks, position_ids
    from pretrain.config import compose
    from pretrain.parallel import init_distributed, shutdown_distributed
    from pretrain.step import forward_step, per_chunk
    from pretrain.train import DDP_SETTINGS

    parallel = ParallelConfig(**layout)
    init_distributed(parallel)
    try:
        m = compose(["model=tiny", *overrides]).model
        seq, micro = SEQ["tiny"]
        chunks = build_chunks(m, parallel, impl="torch")
        ddp = [DistributedDataParallel(c.config, DistributedDataParallelConfig(**DDP_SETTINGS), c) for c in chunks]
        torch.manual_seed(0)  # every stage reads the same micro-batches
        batches = []
        for _ in range(microbatches):
            ids = torch.randint(0, m.vocab_size, (micro, seq))
            batches.append({"tokens": ids, "labels": ids, "position_ids": position_ids(ids),
                            "loss_mask": torch.ones(micro, seq)})
        live = _LiveSaved(chunks)
        with torch.autograd.graph.saved_tensors_hooks(live.pack, lambda t: t):
            get_forward_backward_func()(forward_step_func=forward_step,
                                        data_iterator=per_chunk(iter(batches), len(chunks)), model=ddp,
                                        num_microbatches=microbatches, seq_length=seq, micro_batch_size=micro,
                                        forward_only=False)
        return live.peak
    finally:
        shutdown_distributed()


@pytest.mark.distributed
@pytest.mark.parametrize("layout, overrides", [(dict(pipeline=2), []),
                                               (dict(pipeline=2, virtual_stages=2), ["model.num_layers=4"])],
                         ids=["1f1b", "interleaved"])
def test_pipeline_peak_matches_measured(tmp_path, layout, overrides):
    """A real step of Megatron's schedule on two gloo ranks: each stage's peak of saved bytes is the
    micro-batches in flight times what its layers (with embedding, or output heads and MTP) keep.
    The received stage input, which the schedule holds outside autograd, is not in the measurement."""
    from pretrain.config import compose

    m = compose(["model=tiny", *overrides]).model
    parallel = ParallelConfig(**layout)
    microbatches = 4
    got = spawn.run(_pipelined, 2, layout, overrides, microbatches, out_dir=str(tmp_path))
    seq, micro = SEQ["tiny"]
    planner, _, _ = _planned(m, ParallelConfig(), 1, torch.float32, seq, micro)
    planner.global_batch_tokens = seq * micro * microbatches
    shape = memory.Shape(seq, micro, 4)
    for rank, stage in enumerate(planner.stages(parallel, 2)):
        chunks = [sum(v for k, v in memory.stage_bytes(m, parallel, shape, "none", c["layers"], c["embedding"],
                                                      c["output"]).items() if k != "stage input")
                  for c in stage.chunks]
        _close(got[rank], memory.held(parallel, rank, microbatches, chunks), ACTIVATION_MARGIN,
               f"stage {rank} peak of saved activations")


def test_pipeline_schedules_hold_what_megatron_holds():
    """1F1B holds p - rank micro-batches; the interleaved schedule's warm-up, chunk by chunk."""
    p = ParallelConfig(pipeline=4)
    assert [memory.held(p, r, 64, [1.0]) for r in range(4)] == [4, 3, 2, 1]
    assert memory.held(p, 0, 2, [1.0]) == 2  # fewer micro-batches than stages
    v = ParallelConfig(pipeline=4, virtual_stages=2)
    # rank 0: 2 * 3 + 1 * 4 warm-up chunk forwards + 1: chunk 0 four times, chunk 1 four times, then
    # chunk 0 again (groups of 4 micro-batches per chunk)
    assert memory.held(v, 0, 64, [1.0, 1.0]) == 11 and memory.held(v, 3, 64, [1.0, 1.0]) == 5
    assert memory.held(v, 0, 64, [1.0, 10.0]) == 7 * 1 + 4 * 10
    assert memory.bubble(p, 64) == 3 / 64 and memory.bubble(v, 64) == 3 / 128


def test_cli_reports_the_production_layout(capsys):
    from plan import cli as plan

    assert plan.main(["experiment=glm45_air", "--gpus", "32"]) == 0
    out = capsys.readouterr().out
    for stage in range(4):
        assert f"stage {stage}" in out
    assert "phase general, code_reasoning: seq 4096" in out and "phase long_context_agent: seq 131072" in out
    assert "95.4 GFLOP per token" in out  # Megatron's formula, as model/accounting.py reproduces it
    assert "step estimate" in out


def test_cli_refuses_a_bad_layout_and_ranks_layouts(capsys):
    from plan import cli as plan

    assert plan.main(["model=tiny", "parallel.expert=3", "--gpus", "6"]) == 2
    assert "parallel.expert=3 does not divide model.num_experts=8" in capsys.readouterr().err
    assert plan.main(["model=tiny", "--gpus", "1", "--gpu-memory", "4", "--reserve", "8"]) == 2
    assert "--reserve" in capsys.readouterr().err

    assert plan.main(["model=tiny", "--gpus", "4", "--gpu-memory", "8", "--reserve", "1", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0:4] for line in out.splitlines()[2:] if line.startswith("  TP")]
    assert rows and all(r[-1] == "DP" + str(4 // (int(r[0][2:]) * int(r[1][2:]))) for r in rows), out
    steps = [float(line.split()[6]) for line in out.splitlines()[2:] if line.startswith("  TP")]
    assert steps == sorted(steps)


def test_cli_lists_the_node_counts_a_run_can_go_on_at(capsys):
    """--nodes MIN-MAX: a row per node count, refused as the launchers refuse it (the layout of every
    stage, the global batch; pretrain/elastic.py), else the memory and step time there: fewer
    data-parallel replicas hold bigger ZeRO-1 optimizer shards and take longer per step."""
    from plan import cli as plan

    assert plan.main(["experiment=glm45_air", "--nodes", "3-8"]) == 0
    rows = {int(line.split()[0]): line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert sorted(rows) == [3, 4, 5, 6, 7, 8]
    assert [n for n, r in rows.items() if r[4] == "yes"] == [4, 8]
    assert " ".join(rows[5][4:]) == "no world size 40 is not divisible by expert*expert_tensor*pipeline=32"
    assert float(rows[4][3]) > float(rows[8][3]) and float(rows[4][5]) > float(rows[8][5])
    assert plan.main(["experiment=glm45_air", "--nodes", "3-x"]) == 2 and "--nodes=3-x" in capsys.readouterr().err
