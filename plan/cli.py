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
import sys

import torch

from model import memory, pipeline, quiet_megatron_warnings
from model.config import ConfigError, ParallelConfig
from plan.planner import GiB, Hardware, Phase, Planner, candidate_layouts, phases_of

HELP_EPILOG = """\
examples:
  glm-plan experiment=glm45 --gpus 128                  the production layout, every stage
  glm-plan model=glm45 parallel.tensor=2 parallel.pipeline=8 parallel.expert=16 --gpus 128 --gpu-memory 80
  glm-plan experiment=glm45_air --gpus 32 --search      layouts that fit 32 GPUs, fastest first
  glm-plan model=glm45_air --gpus 64 --gpu-memory 141 --gpu H200
  glm-plan experiment=smoke --gpus 1 --gpu-memory 24 train.dtype=fp32
  glm-plan experiment=glm45 --nodes 8-40               which node counts the run can go on at (a lost node,
                                                        a node range): layout, batch, memory, step time

Without an experiment the phases are sequence lengths (--seq-len, default 4096, 32768, 131072).
Bandwidths are achievable bus bandwidths per GPU, not link peaks; MFU is that of the compute
alone (bubble and communication come on top in the estimate).
"""


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
    from plan.info import human, placement

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


def node_counts(planner: Planner, cfg, hw: Hardware, phases: list[Phase], low: int, high: int) -> str:
    """For `low`..`high` nodes: whether the run can go on there (every stage's layout and the global
    batch: pretrain/elastic.py, as the launchers decide), the most memory a GPU needs in any phase
    (ZeRO-1 optimizer shards grow as the data-parallel size shrinks) and the step time of each phase."""
    import dataclasses

    from pretrain import elastic

    lines = [f"node counts for {cfg.experiment or planner.m.name} on {hw.per_node} x {hw.name} {hw.memory_gib:g} GiB "
             f"per node ({_g(hw.usable)} GiB usable); the same layout per stage, only data parallelism changes, "
             f"the global batch stays {_count(planner.global_batch_tokens)} tokens",
             f"  {'nodes':>5s} {'GPUs':>5s} {'DP':>4s} {'peak GiB':>8s}  {'fits':4s}  step s per phase "
             f"({', '.join('/'.join(ph.names) for ph in phases)})"]
    for n in range(low, high + 1):
        world = n * hw.per_node
        why = elastic.problem(cfg, world)
        if why:
            lines.append(f"  {n:>5d} {world:>5d}    -        -  no    {why.split(': ', 1)[-1]}")
            continue
        at = dataclasses.replace(hw, gpus=world)
        peak, steps, dp = 0.0, [], set()
        for ph in phases:
            q = ph.parallel or cfg.parallel
            dp.add(q.data(world))
            states = planner.stages(q, world)
            acts = planner.phase(q, world, states, ph.seq_len)
            rc = ph.recompute or planner.least_fitting(states, acts, at) or "full"
            peak = max(peak, max(st.total(a, rc) for st, a in zip(states, acts)))
            steps.append(planner.step_estimate(q, world, ph.seq_len, rc, at, states)["total"])
        lines.append(f"  {n:>5d} {world:>5d} {'/'.join(map(str, sorted(dp))):>4s} {_g(peak):>8s}  "
                     f"{'yes' if peak <= hw.usable else 'NO':4s}  {' / '.join(f'{t:.3g}' for t in steps)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glm-plan", description=__doc__, epilog=HELP_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: model=..., experiment=..., parallel.X=...")
    parser.add_argument("--gpus", type=int, help="GPUs in the job (the world size)")
    parser.add_argument("--nodes", metavar="MIN-MAX",
                        help="instead of --gpus: for each node count in the range (of --gpus-per-node GPUs), "
                             "whether the run can go on there and at what memory and step time")
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

    node_range = None
    if args.nodes:
        try:
            low, _, high = args.nodes.partition("-")
            node_range = (int(low), int(high or low))
            if not 1 <= node_range[0] <= node_range[1]:
                raise ValueError
        except ValueError:
            print(f"glm-plan: --nodes={args.nodes}: give MIN-MAX (or N), 1 <= MIN <= MAX", file=sys.stderr)
            return 2
        args.gpus = node_range[1] * args.gpus_per_node
    elif args.gpus is None:
        parser.error("give --gpus (the world size) or --nodes MIN-MAX")
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
        searching = not node_range and (args.search or (not layout_given and cfg.parallel == ParallelConfig()
                                                         and args.gpus > 1))
        if not searching and not node_range:
            pipeline.check_layout(cfg.model, cfg.parallel, args.gpus, cfg.sources.get("parallel", "parallel"))
        dtype = torch.float32 if cfg.train.dtype == "fp32" else torch.bfloat16
        planner = Planner(cfg.model, dtype, cfg.train.micro_batch_size, cfg.train.global_batch_tokens,
                          cfg.optim.name, cfg.optim.muon.qkv_split, cfg.optim.muon.ns_steps, cfg.optim.muon.ns_dtype)
        phases = phases_of(cfg, args.seq_len)
    except ConfigError as e:
        print(f"glm-plan: {e}", file=sys.stderr)
        return 2
    if node_range:
        print(node_counts(planner, cfg, hw, phases, *node_range))
    else:
        print(search(planner, hw, phases, args.top) if searching else report(planner, cfg.parallel, hw, phases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
