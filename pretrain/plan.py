"""glm-plan: what a parallel layout needs per GPU, and which layouts fit a cluster.

Given a model (or an experiment, whose stages give the sequence lengths and recomputation), a
layout and the GPUs, it reports for each pipeline stage, per GPU:
  - parameters, and the bytes of weights (bf16), gradients (Megatron DDP's fp32 buffers) and
    optimizer state (fp32 master weights, Muon momentum or the two AdamW moments), owned under
    ZeRO-1: parameters are dealt over the data-parallel group exactly as optim/owners.py deals
    them, and the rank that owns the most is reported;
  - activations per micro-batch with no, selective and full recomputation (model/memory.py),
    times the micro-batches the pipeline schedule holds at once, plus what full recomputation
    rebuilds during the backward pass and the output logits' gradient;
  - whether it fits in the GPU memory less a reserve (CUDA context, NCCL buffers, allocator
    fragmentation: not modelled) and, for a phase that does not fit, the recomputation or the
    context parallelism it would need.
Each phase is planned under its stages' own layout (stages.<name>.parallel).
Then FLOPs per token (model/accounting.py) and time per trillion tokens at a given MFU, and an
estimate of a step: compute (slowest stage), pipeline bubble, and the TP, EP (all-to-all), DP
and PP traffic over NVLink inside a node and InfiniBand between nodes, none of it overlapped.

With only a GPU count and memory (no parallel.* override, no experiment layout) it lists the
valid layouts that fit, ranked by that estimate.

What it does not count: the Muon step's Newton-Schulz workspace (about 2 GiB at most, and activations are
freed before the step), expert-load imbalance (loss-free balancing keeps it small; the worst
expert's rows scale the routed-expert activations), and Transformer Engine's slightly smaller
fused norms. tests/test_plan.py checks the memory figures against measured bytes on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from model import memory, pipeline, quiet_megatron_warnings
from model.config import ConfigError, ModelConfig, ParallelConfig

GiB = 2**30

HELP_EPILOG = """\
examples:
  glm-plan experiment=glm45 --gpus 128                  the production layout, every stage
  glm-plan model=glm45 parallel.tensor=2 parallel.pipeline=8 parallel.expert=16 --gpus 128 --gpu-memory 80
  glm-plan experiment=glm45_air --gpus 32 --search      layouts that fit 32 GPUs, fastest first
  glm-plan model=glm45_air --gpus 64 --gpu-memory 141 --gpu H200
  glm-plan experiment=smoke --gpus 1 --gpu-memory 24 train.dtype=fp32

Without an experiment the phases are sequence lengths (--seq-len, default 4096, 32768, 131072).
Bandwidths are achievable bus bandwidths per GPU, not link peaks; MFU is that of the compute
alone (bubble and communication come on top in the estimate).
"""


@dataclass
class Hardware:
    gpus: int
    memory_gib: float = 80.0
    per_node: int = 8
    name: str = "H100"
    mfu: float = 0.40
    nvlink_gbs: float = 360.0
    ib_gbs: float = 45.0
    reserve_gib: float = 6.0

    @property
    def peak(self) -> float:
        from pretrain.metrics import GPU_PEAK_TFLOPS

        key = next((k for k in GPU_PEAK_TFLOPS if k.lower() == self.name.lower()), None)
        if key is None:
            raise ConfigError(f"--gpu {self.name!r}: not in pretrain/metrics.py GPU_PEAK_TFLOPS "
                              f"({', '.join(GPU_PEAK_TFLOPS)})")
        return GPU_PEAK_TFLOPS[key] * 1e12

    @property
    def usable(self) -> float:
        return (self.memory_gib - self.reserve_gib) * GiB


@dataclass
class Phase:
    """Consecutive stages that train at one sequence length with one recomputation setting and one
    parallel layout."""
    names: list[str]
    seq_len: int
    recompute: str | None  # None: not configured, the least that fits is reported
    tokens: float = 0.0
    parallel: ParallelConfig | None = None  # None: the layout given to the report


@dataclass
class StageState:
    """Per GPU of one pipeline stage: what does not depend on the batch."""
    rank: int
    layers: list[int]
    chunks: list[dict]
    params: float = 0.0
    expert_params: float = 0.0
    weights: float = 0.0
    grads: float = 0.0
    optimizer: dict = field(default_factory=lambda: {"muon": 0.0, "adam": 0.0})
    # what the optimizer step allocates beside the static memory (optim/optimizer.py), once the
    # activations are freed
    workspace: float = 0.0

    @property
    def static(self) -> float:
        return self.weights + self.grads + sum(self.optimizer.values())

    def total(self, act: "Activations", recompute: str) -> float:
        """The peak: the forward and backward passes', or the optimizer step's."""
        return self.static + max(act.peak(recompute), self.workspace)


@dataclass
class Activations:
    """Per recomputation setting: bytes of one micro-batch on this stage, the most the schedule
    holds at once, and what is rebuilt or created during the backward pass."""
    per_micro_batch: dict
    held: dict
    transient: dict

    def peak(self, recompute: str) -> float:
        return self.held[recompute] + self.transient[recompute]

    def in_flight(self, recompute: str) -> float:
        """Micro-batches held at the peak, in whole-stage units."""
        return self.held[recompute] / self.per_micro_batch[recompute]


class Planner:
    """A model built once on the meta device; layouts evaluated against it."""

    def __init__(self, m: ModelConfig, dtype: torch.dtype, micro_batch: int, global_batch_tokens: int,
                 optim_name: str = "muon", qkv_split: str = "qkv", ns_steps: int = 5, ns_dtype: str = "auto"):
        from model.build import build_model
        from optim import roles
        from pretrain.parallel import single_process

        self.m, self.dtype, self.micro_batch = m, dtype, micro_batch
        self.global_batch_tokens, self.ns_steps = global_batch_tokens, ns_steps
        # Newton-Schulz on a GPU: bf16 unless fp32 is asked for (optim/newton_schulz.py)
        self.ns_dtype = torch.float32 if ns_dtype == "fp32" else torch.bfloat16
        self.act_bytes = torch.finfo(dtype).bits // 8
        with single_process():
            self.model = build_model(m, ParallelConfig(), meta=True, impl="torch")
            self.roles = roles.assign(self.model, muon=optim_name == "muon", qkv_split=qkv_split)

    # ---- state that does not depend on the batch -----------------------------------------

    def stages(self, p: ParallelConfig, world: int) -> list[StageState]:
        from model import sharding
        from model.accounting import numel_per_gpu, stages_holding
        from model.build import stage_plans
        from optim import owners
        from optim.optimizer import state_bytes, step_workspace_bytes
        from pretrain.train import DDP_SETTINGS

        out = [StageState(r, [i for c in plans for i in c["layers"]], plans)
               for r, plans in enumerate(stage_plans(self.m, p))]
        stage_of = {i: s.rank for s in out for i in s.layers}
        grad_bytes = 4 if DDP_SETTINGS["grad_reduce_in_fp32"] else self.act_bytes
        local_experts = self.m.num_experts // p.expert
        groups = {(r, e): [] for r in range(p.pipeline) for e in (False, True)}
        tp_split = {}  # role name -> this GPU's elements of a tensor-parallel piece
        for role in self.roles:
            n = numel_per_gpu(role.name, role.param, p)
            if role.expert:  # this GPU's experts: the first expert-parallel rank's, all alike
                if sharding.expert_id(role.name) >= local_experts:
                    continue
                n *= p.expert
            if n < role.param.numel() and role.side == "muon":
                tp_split[role.name] = n
            for r in stages_holding(role.name, self.m, p, stage_of.__getitem__):
                s = out[r]
                s.params += n
                s.expert_params += n if role.expert else 0.0
                s.weights += n * self.act_bytes
                s.grads += n * grad_bytes
                groups[r, role.expert].append((role, n))
        dp, edp = _zero_groups(p, world)
        # per stage: the largest owner's Newton-Schulz blocks by shape and tensor-parallel elements
        # (dense and expert owners together), and the elements each rank owns, per group
        blocks = {r: defaultdict(int) for r in range(p.pipeline)}
        tp_elements = {r: 0.0 for r in range(p.pipeline)}
        owned = {r: [] for r in range(p.pipeline)}
        for (r, expert), items in groups.items():
            if not items:
                continue
            # ZeRO-1 as the optimizer does it: whole parameters dealt by update cost (adam's on
            # the local piece), and the rank that owns the most bytes is the one that counts
            costs = [dataclasses.replace(role, param=torch.empty(int(n), device="meta")).cost(self.ns_steps)
                     for role, n in items]
            ranks = edp if expert else dp
            deal = owners.deal(costs, ranks)
            per_rank = [{"muon": 0.0, "adam": 0.0} for _ in range(ranks)]
            shapes = [defaultdict(int) for _ in range(ranks)]
            split = [0.0] * ranks
            numel = [0.0] * ranks
            for (role, n), o in zip(items, deal):
                per_rank[o][role.side] += state_bytes(role.side, n, self.dtype)
                for shape in role.block_shapes():
                    shapes[o][shape] += 1
                split[o] += tp_split.get(role.name, 0.0)
                numel[o] += n
            worst = max(per_rank, key=lambda d: d["muon"] + d["adam"])
            for side in worst:
                out[r].optimizer[side] += worst[side]
            for shape in {k for d in shapes for k in d}:
                blocks[r][shape] += max(d[shape] for d in shapes)
            tp_elements[r] += max(split)
            owned[r].append(numel)
        tp = max(p.tensor, p.expert_tensor)
        for s in out:
            s.workspace = step_workspace_bytes(blocks[s.rank], self.ns_dtype, tp_elements[s.rank], tp,
                                               owned[s.rank], self.act_bytes)
        return out

    # ---- activations ---------------------------------------------------------------------

    def microbatches(self, p: ParallelConfig, world: int, seq_len: int) -> int:
        seqs = self.global_batch_tokens // seq_len
        return max(1, seqs // (self.micro_batch * p.data(world)))

    def activations(self, p: ParallelConfig, world: int, stage: StageState, seq_len: int) -> Activations:
        shape = memory.Shape(seq_len, self.micro_batch, self.act_bytes)
        output = stage.rank == p.pipeline - 1
        chunks = {rc: [sum(memory.stage_bytes(self.m, p, shape, rc, c["layers"], c["embedding"],
                                              c["output"]).values()) for c in stage.chunks]
                  for rc in memory.RECOMPUTE}
        microbatches = self.microbatches(p, world, seq_len)
        logits_grad = memory.output_backward_bytes(self.m, p, shape) if output else 0.0
        rebuild = memory.recompute_working_set(self.m, p, shape, stage.layers, output)
        gathered = memory.context_parallel_working_set(self.m, p, shape)
        transient = {rc: logits_grad + gathered + (rebuild if rc == "full" else 0.0) for rc in memory.RECOMPUTE}
        return Activations({rc: sum(c) for rc, c in chunks.items()},
                           {rc: memory.held(p, stage.rank, microbatches, c) for rc, c in chunks.items()},
                           transient)

    def phase(self, p: ParallelConfig, world: int, states: list[StageState], seq_len: int) -> list[Activations]:
        return [self.activations(p, world, s, seq_len) for s in states]

    @staticmethod
    def least_fitting(states: list[StageState], acts: list[Activations], hw: Hardware) -> str | None:
        """The least recomputation with which every stage fits, or None."""
        for rc in memory.RECOMPUTE:
            if all(s.total(a, rc) <= hw.usable for s, a in zip(states, acts)):
                return rc
        return None

    def context_needed(self, p: ParallelConfig, world: int, seq_len: int, hw: Hardware) -> int | None:
        """The smallest larger context parallelism (full recomputation) that fits, or None up to 32."""
        for cp in (c for c in (2, 4, 8, 16, 32) if c > p.context):
            q = dataclasses.replace(p, context=cp)
            if world % (q.tensor * q.pipeline * cp) or q.data(world) < 1 or seq_len % (2 * cp):
                return None
            states = self.stages(q, world)
            if self.least_fitting(states, self.phase(q, world, states, seq_len), hw):
                return cp
        return None

    # ---- time ----------------------------------------------------------------------------

    def step_estimate(self, p: ParallelConfig, world: int, seq_len: int, recompute: str, hw: Hardware,
                      states: list[StageState]) -> dict:
        """Seconds of one step at the full global batch: compute of the slowest stage at the given
        MFU, pipeline bubble, and each kind of communication at its link's bandwidth."""
        from model.accounting import train_flops_per_token

        m, a = self.m, self.act_bytes
        flops = train_flops_per_token(m, seq_len) * self.global_batch_tokens / world
        costs = pipeline.layout_costs(m, p, seq_len)
        compute = flops * max(costs) / (sum(costs) / len(costs)) / (hw.peak * hw.mfu)  # the slowest stage
        if recompute == "full":
            compute *= 4 / 3  # one more forward pass
        mb = self.microbatches(p, world, seq_len)
        tokens = seq_len * self.micro_batch / p.context  # one micro-batch on one GPU
        layers = max(len(s.layers) for s in states)
        moe_layers = max(sum(i >= m.first_k_dense for i in s.layers) for s in states) + m.mtp_num_layers

        def bw(group: int, stride: int) -> float:
            return (hw.nvlink_gbs if group * stride <= hw.per_node else hw.ib_gbs) * 1e9

        t, e, etp = p.tensor, p.expert, p.expert_tensor
        passes = 3 if recompute == "full" else 2  # forward (again) and backward
        out = {"compute": compute, "bubble": compute * memory.bubble(p, mb)}
        tp_bytes = 4 * passes * (t - 1) / t * tokens * m.hidden_size * a * layers * mb
        out["TP"] = tp_bytes / bw(t, 1) if t > 1 else 0.0
        ep_group = e * etp
        ep_bytes = 2 * passes * m.moe_router_topk * tokens / t * m.hidden_size * a * moe_layers * mb
        if ep_group > 1:
            inside = min(ep_group, hw.per_node) / ep_group
            ep_bytes *= (ep_group - 1) / ep_group
            out["EP"] = ep_bytes * inside / (hw.nvlink_gbs * 1e9) + ep_bytes * (1 - inside) / (hw.ib_gbs * 1e9)
        else:
            out["EP"] = 0.0
        dp, edp = _zero_groups(p, world)
        worst = max(states, key=lambda s: s.grads)
        share = worst.expert_params / max(worst.params, 1.0)

        def ring(n: int) -> float:  # all-reduce traffic per byte per GPU; an all-gather is half
            return 2 * (n - 1) / n

        dense_bw, expert_bw = bw(dp, t * p.context), bw(edp, ep_group)
        out["DP"] = (worst.grads * ((1 - share) * ring(dp) / dense_bw + share * ring(edp) / expert_bw)
                     + worst.weights * ((1 - share) * ring(dp) / 2 / dense_bw + share * ring(edp) / 2 / expert_bw))
        stage_gpus = world // p.pipeline
        # each micro-batch crosses every stage boundary forwards and backwards (per model chunk)
        out["PP"] = (2 * tokens / t * m.hidden_size * a * mb * p.virtual_stages
                     / bw(2, stage_gpus)) if p.pipeline > 1 else 0.0
        # context parallelism: each attention all-gathers the sequence's keys and values, again
        # in its backward pass (recomputed), and reduce-scatters their gradient
        kv = m.num_query_groups * m.head_dim
        cp_bytes = 3 * (p.context - 1) / p.context * 2 * kv * seq_len * self.micro_batch / t * a \
            * (layers + m.mtp_num_layers) * mb
        out["CP"] = cp_bytes / bw(p.context, t) if p.context > 1 else 0.0
        out["total"] = sum(out.values())
        out["mfu"] = flops / (hw.peak * out["total"])
        return out


def _zero_groups(p: ParallelConfig, world: int) -> tuple[int, int]:
    """The optimizer's data-parallel groups (optim/optimizer.py): data x context parallel ranks for
    dense parameters, expert data parallel ranks for routed experts."""
    return p.data(world) * p.context, p.expert_data(world)


# ---- phases and layouts ----------------------------------------------------------------------


def phases_of(cfg, seq_lens: list[int] | None) -> list[Phase]:
    """The experiment's stages, merged where sequence length, recomputation and layout agree; or
    the given sequence lengths (under the top-level layout)."""
    from pretrain import stages as stages_mod

    if seq_lens or not cfg.stages:
        return [Phase([f"seq {s}"], s, None) for s in (seq_lens or [4096, 32768, 131072])]
    st = stages_mod.Stages(cfg)
    out: list[Phase] = []
    for s in st.list:
        seq = cfg.stage_data[s.name].seq_length
        rc = stages_mod.settings(st, s, cfg.model)["recompute"]
        layout = cfg.layout_of(s.name)
        if out and (out[-1].seq_len, out[-1].recompute, out[-1].parallel) == (seq, rc, layout):
            out[-1].names.append(s.name)
            out[-1].tokens += s.cfg.tokens
        else:
            out.append(Phase([s.name], seq, rc, s.cfg.tokens, layout))
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(m: ModelConfig, world: int, per_node: int) -> list[ParallelConfig]:
    """Every layout Megatron-Core accepts for this model and world size: tensor within a node,
    experts whole (expert_tensor 1), one model chunk per stage, no context parallelism."""
    out = []
    for t in _divisors(per_node):
        for pp in (d for d in _divisors(world) if d <= m.num_layers):
            for e in _divisors(m.num_experts):
                p = ParallelConfig(tensor=t, pipeline=pp, expert=e)
                try:
                    out.append(pipeline.check_layout(m, p, world))
                except ConfigError:
                    continue
    return out


# ---- printing --------------------------------------------------------------------------------


def _g(x: float) -> str:
    return f"{x / GiB:.1f}"


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n:g}"


def _duration(seconds: float) -> str:
    return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds / 3600:.1f} h"


def layout_name(p: ParallelConfig, world: int) -> str:
    return (f"TP{p.tensor} PP{p.pipeline}" + (f"x{p.virtual_stages}v" if p.virtual_stages > 1 else "")
            + f" EP{p.expert}" + (f" ETP{p.expert_tensor}" if p.expert_tensor > 1 else "")
            + (f" CP{p.context}" if p.context > 1 else "") + f" DP{p.data(world)}")


def report(planner: Planner, p: ParallelConfig, hw: Hardware, phases: list[Phase]) -> str:
    from model.accounting import count_parameters, train_flops_per_token
    from pretrain.info import human, placement

    m, world = planner.m, hw.gpus
    counts = count_parameters(planner.model, m)
    dtype = str(planner.dtype).replace("torch.", "")
    lines = [f"model {m.name}: {human(counts.default_total)} total, {human(counts.default_active)} active; "
             f"{world} x {hw.name} {hw.memory_gib:g} GiB ({hw.per_node} per node), {_g(hw.usable)} GiB usable "
             f"({hw.reserve_gib:g} GiB reserved)"]
    layouts = list({repr(ph.parallel or p): ph.parallel or p for ph in phases}.values())  # in phase order, once
    states_of, shown = {}, {}
    for q in layouts:
        states_of[repr(q)] = states = planner.stages(q, world)
        used_by = [n for ph in phases if (ph.parallel or p) == q for n in ph.names]
        lines += ["", f"layout {layout_name(q, world)} (expert data {q.expert_data(world)})"
                  + (f", stages {', '.join(used_by)}" if len(layouts) > 1 else "")
                  + f"; {dtype} weights, fp32 gradients, optimizer state ZeRO-1 over data (x context) parallelism"]
        table = [*placement(m, q, planner.model), ""] if q.pipeline > 1 else []
        table += ["per GPU (GiB)    params   weights  grads  optimizer (muon + adam)  static   optimizer step"]
        for s in states:
            table.append(f"  stage {s.rank:<3d} {human(s.params):>10s} {_g(s.weights):>8s} {_g(s.grads):>6s} "
                         f"{_g(sum(s.optimizer.values())):>9s} ({_g(s.optimizer['muon'])} + "
                         f"{_g(s.optimizer['adam'])}){_g(s.static):>12s}   + {_g(s.workspace)} = "
                         f"{_g(s.static + s.workspace)}")
        same = shown.get("\n".join(table))
        lines += [f"  placement and state per GPU as under {same}"] if same else ["", *table]
        shown.setdefault("\n".join(table), layout_name(q, world))
    for ph in phases:
        q = ph.parallel or p
        states = states_of[repr(q)]
        mb = planner.microbatches(q, world, ph.seq_len)
        acts = planner.phase(q, world, states, ph.seq_len)
        fit = planner.least_fitting(states, acts, hw)
        rc = ph.recompute or fit or "full"
        cp = f", {ph.seq_len // q.context} tokens per context-parallel rank" if q.context > 1 else ""
        lines += ["", f"phase {', '.join(ph.names)}: seq {ph.seq_len}{cp}, micro-batch {planner.micro_batch}, "
                      f"{mb} micro-batches per step, bubble {memory.bubble(q, mb):.1%}, recompute {rc}"
                      + ("" if ph.recompute else " (least that fits)")
                      + (f", layout {layout_name(q, world)}" if len(layouts) > 1 else ""),
                  "  activations (GiB)  per micro-batch: none / selective / full   in flight  "
                  "held + transient   total   of usable"]
        for s, act in zip(states, acts):
            total = s.total(act, rc)
            pm = act.per_micro_batch
            lines.append(f"  stage {s.rank:<3d} {_g(pm['none']):>26s} / {_g(pm['selective']):>6s} / "
                         f"{_g(pm['full']):>6s} {act.in_flight(rc):>9.1f} {_g(act.held[rc]):>11s} + "
                         f"{_g(act.transient[rc]):<6s}{_g(total):>8s}   {total / hw.usable:5.0%}"
                         + ("" if total <= hw.usable else "  DOES NOT FIT"))
        stage = ph.names[0] if ph.parallel is not None else "<name>"
        if fit is None:
            more = planner.context_needed(q, world, ph.seq_len, hw)
            lines.append("  does not fit with any recomputation: " + (
                f"stages.{stage}.parallel.context={more} with full recomputation fits" if more else
                "no context parallelism fits this layout either; more tensor or pipeline parallelism, or more GPUs, "
                "would (glm-plan --search)"))
        elif ph.recompute and memory.RECOMPUTE.index(fit) > memory.RECOMPUTE.index(ph.recompute):
            lines.append(f"  recompute {ph.recompute} does not fit; {fit} does (stages.{stage}.recompute={fit})")
        flops = train_flops_per_token(m, ph.seq_len)
        est = planner.step_estimate(q, world, ph.seq_len, rc, hw, states)
        ideal = 1e12 * flops / (world * hw.peak * hw.mfu)
        lines.append(f"  {flops / 1e9:.1f} GFLOP per token; 1T tokens in {_duration(ideal)} at {hw.mfu:.0%} MFU"
                     f" on {world} GPU{'s' if world > 1 else ''}")
        per_token = est["total"] / planner.global_batch_tokens
        lines.append("  step estimate: " + ", ".join(f"{k} {v:.3g} s" for k, v in est.items()
                                                   if k not in ("total", "mfu") and (k != "CP" or v))
                     + f" = {est['total']:.4g} s ({est['mfu']:.0%} MFU): 1T tokens in {_duration(per_token * 1e12)}"
                     + (f", this phase ({_count(ph.tokens)} tokens) {_duration(per_token * ph.tokens)}"
                        if ph.tokens else ""))
    return "\n".join(lines)


def search(planner: Planner, hw: Hardware, phases: list[Phase], top: int) -> str:
    world, m = hw.gpus, planner.m
    main = max(phases, key=lambda ph: ph.tokens) if any(ph.tokens for ph in phases) else phases[0]
    rows = []
    for p in candidate_layouts(m, world, hw.per_node):
        states = planner.stages(p, world)
        if any(s.static > hw.usable for s in states):
            continue
        acts = planner.phase(p, world, states, main.seq_len)
        fit = planner.least_fitting(states, acts, hw)
        if fit is None:
            continue
        # each layout with the least recomputation it needs: the experiment's setting was chosen
        # for its own layout
        rc = fit
        est = planner.step_estimate(p, world, main.seq_len, rc, hw, states)
        peak = max(s.total(a, rc) for s, a in zip(states, acts))
        others = []
        for ph in phases:
            if ph is main:
                continue
            f = planner.least_fitting(states, planner.phase(p, world, states, ph.seq_len), hw)
            cp = None if f else planner.context_needed(p, world, ph.seq_len, hw)
            others.append(f"{ph.seq_len // 1024}K: " + (f or (f"CP{cp}" if cp else "no CP fits")))
        rows.append((est["total"], p, rc, peak, est, others))
    rows.sort(key=lambda r: r[0])
    if not rows:
        return f"no layout of {m.name} fits {world} x {hw.memory_gib:g} GiB at seq {main.seq_len}"
    lines = [f"{len(rows)} layouts of {m.name} fit {world} x {hw.name} {hw.memory_gib:g} GiB at seq {main.seq_len} "
             f"({', '.join(main.names)}), each with the least recomputation that fits; fastest first (estimate at "
             f"{hw.mfu:.0%} compute MFU):",
             f"  {'layout':24s} {'recompute':9s} {'peak GiB':>8s} {'step s':>7s} {'bubble':>6s} {'TP':>5s} {'EP':>5s} "
             f"{'DP':>5s} {'MFU':>4s}  other phases (least recompute, or CP needed)"]
    for total, p, rc, peak, est, others in rows[:top]:
        lines.append(f"  {layout_name(p, world):24s} {rc:9s} {_g(peak):>8s} {total:7.2f} {est['bubble']:6.2f} "
                     f"{est['TP']:5.2f} {est['EP']:5.2f} {est['DP']:5.2f} {est['mfu']:4.0%}  {'; '.join(others)}")
    if len(rows) > top:
        lines.append(f"  ... {len(rows) - top} more (--top)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glm-plan", description=__doc__, epilog=HELP_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: model=..., experiment=..., parallel.X=...")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the job (the world size)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--gpu", default="H100", help="GPU kind, for its bf16 peak FLOP/s (default H100)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="default 8")
    parser.add_argument("--mfu", type=float, default=0.40, help="compute efficiency for time estimates (default 0.40)")
    parser.add_argument("--nvlink-gbs", type=float, default=360.0, help="GB/s per GPU inside a node (default 360)")
    parser.add_argument("--ib-gbs", type=float, default=45.0, help="GB/s per GPU between nodes (default 45)")
    parser.add_argument("--reserve", type=float, default=6.0,
                        help="GiB per GPU kept free for the CUDA context, NCCL and fragmentation (default 6)")
    parser.add_argument("--seq-len", type=int, action="append",
                        help="phase sequence length (repeatable); default: the experiment's stages")
    parser.add_argument("--search", action="store_true", help="rank every layout that fits instead")
    parser.add_argument("--top", type=int, default=15, help="layouts listed by --search (default 15)")
    parser.add_argument("--config-dir", default=None, help="config tree to use instead of the bundled configs/")
    args = parser.parse_intermixed_args(argv)  # overrides before or after the options
    quiet_megatron_warnings()

    from pretrain.config import compose

    hw = Hardware(args.gpus, args.gpu_memory, args.gpus_per_node, args.gpu, args.mfu, args.nvlink_gbs,
                  args.ib_gbs, args.reserve)
    try:
        if args.gpus < 1 or args.gpu_memory <= args.reserve:
            raise ConfigError(f"--gpus={args.gpus} must be positive and --gpu-memory={args.gpu_memory:g} "
                              f"above --reserve={args.reserve:g}")
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu={args.mfu} must lie in (0, 1]")
        hw.peak  # noqa: B018 (validates --gpu)
        cfg = compose(args.overrides, config_dir=args.config_dir)
        layout_given = any(o.startswith(("parallel", "+parallel")) for o in args.overrides)
        searching = args.search or (not layout_given and cfg.parallel == ParallelConfig() and args.gpus > 1)
        if not searching:
            pipeline.check_layout(cfg.model, cfg.parallel, args.gpus, cfg.sources.get("parallel", "parallel"))
        dtype = torch.float32 if cfg.train.dtype == "fp32" else torch.bfloat16
        planner = Planner(cfg.model, dtype, cfg.train.micro_batch_size, cfg.train.global_batch_tokens,
                          cfg.optim.name, cfg.optim.muon.qkv_split, cfg.optim.muon.ns_steps, cfg.optim.muon.ns_dtype)
        phases = phases_of(cfg, args.seq_len)
    except ConfigError as e:
        print(f"glm-plan: {e}", file=sys.stderr)
        return 2
    print(search(planner, hw, phases, args.top) if searching else report(planner, cfg.parallel, hw, phases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
