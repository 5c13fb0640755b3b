"""What a parallel layout needs per GPU and how long its step takes: the arithmetic behind glm-plan
(plan/cli.py prints it).

A model is built once on the meta device; each layout is evaluated against it, per pipeline stage
and per GPU: parameters and the bytes of weights, gradients and ZeRO-1 optimizer state
(optim/owners.py deals them as the optimizer does), activations per micro-batch under each
recomputation setting (model/memory.py) and what the schedule holds at once, the optimizer step's
own workspace, and an estimate of a step (compute, bubble, and TP / EP / DP / PP traffic, none of
it overlapped). tests/test_plan.py checks the memory figures against measured bytes on CPU.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from model import memory, pipeline
from model.config import ConfigError, ModelConfig, ParallelConfig

GiB = 2**30


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
