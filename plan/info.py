"""glm-model-info: parameter counts, active parameters and training FLOPs of any model config.

The model is built on the meta device (no memory, no initialisation), so GLM-4.5 at full size
takes seconds on a laptop.
"""

from __future__ import annotations

import argparse
import sys

from model import quiet_megatron_warnings

HELP_EPILOG = """\
overrides use Hydra syntax, e.g.:
  glm-model-info model=glm45
  glm-model-info model=glm45_air parallel.tensor=2 parallel.expert=8 parallel.pipeline=4
  glm-model-info experiment=glm45            (its production layout: pipeline 8, uneven stages)
  glm-model-info experiment=glm45_air parallel.virtual_stages=2
  glm-model-info model=smoke model.num_layers=24 --seq-len 8192

The default "total" follows the Hugging Face model (decoder + embedding/output, no MTP layer) and
the default "active" counts the decoder's weights used per token without embeddings: together the
conventions closest to the published 355B/32B (GLM-4.5) and 106B/12B (GLM-4.5-Air). Every
convention is printed and labelled. Training FLOPs use Megatron-Core's per-token formula.
"""

PART_LABELS = {
    "attention": "attention (q/k/v/o, biases, QK-Norm)",
    "dense_mlp": "dense MLP (first-k layers)",
    "experts": "routed experts",
    "shared_experts": "shared experts",
    "router": "router",
    "norms": "RMSNorm weights",
    "mtp_proj": "MTP eh_proj",
}


def human(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> "0-2, 5-6"."""
    out, start = [], None
    for i, x in enumerate(ids):
        start = x if start is None else start
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            out.append(f"{start}-{x}" if x != start else str(x))
            start = None
    return ", ".join(out)


def placement(m, p, model) -> list[str]:
    """Per pipeline stage: the decoder layers the model builds there (per model chunk under
    virtual stages), what else it holds, its share of the compute and its weights per GPU."""
    from model import pipeline
    from model.accounting import stage_parameters_per_gpu
    from model.build import stage_plans

    chunks = p.virtual_stages
    plans = stage_plans(m, p)
    stage = {i: r for r, plan in enumerate(plans) for c in plan for i in c["layers"]}
    per_gpu = stage_parameters_per_gpu(model, m, p, stage.__getitem__)
    first, last = pipeline.split(m, p)
    how = "even split" if first is None else f"first stage {first} layers, last {last}" + \
        (" (given)" if p.first_stage_layers is not None or p.last_stage_layers is not None else " (chosen)")
    lines = [f"layout tensor={p.tensor} expert={p.expert} expert_tensor={p.expert_tensor} pipeline={p.pipeline}"
             + (f" x {chunks} virtual stages" if chunks > 1 else "") + f": {how}"]
    costs = pipeline.layout_costs(m, p)
    for r, plan in enumerate(plans):
        layers = [i for c in plan for i in c["layers"]]
        dense = sum(i < m.first_k_dense for i in layers)
        extra = (["embedding"] if plan[0]["embedding"] else []) + \
            (["output", f"MTP x{m.mtp_num_layers}"] if plan[-1]["output"] and m.mtp_num_layers else
             ["output"] if plan[-1]["output"] else [])
        where = " | ".join(_ranges(c["layers"]) for c in plan) if chunks > 1 else _ranges(layers)
        share = f", compute {costs[r] / max(costs):.2f} of the slowest" if chunks == 1 and p.pipeline > 1 else ""
        lines.append(f"  stage {r}: layers {where} ({len(layers)}, {dense} dense)"
                     f"{' + ' + ', '.join(extra) if extra else ''}{share}: "
                     f"{human(per_gpu[r])} = {2 * per_gpu[r] / 2**30:.1f} GiB bf16 weights per GPU")
    return lines


def stage_layouts(cfg) -> list[str]:
    """The parallel layout of each stage, where the stages do not all share one (stages.<name>.parallel)."""
    if len({str(p) for p in cfg.stage_parallel.values()}) < 2:
        return []
    lines = ["", "layout per stage (stages.<name>.parallel; a switch saves, exits 75 and restarts under the next):"]
    for name, p in cfg.stage_parallel.items():
        seq = cfg.stage_data[name].seq_length
        per_rank = f", {seq // p.context} tokens per context-parallel rank" if p.context > 1 else ""
        lines.append(f"  {name:24s} seq {seq:>6d}: {p.describe()}{per_rank}")
    return lines


def flops_table(m, seq_len: int) -> list[str]:
    """Where the training FLOPs of a token go, part by part (main and MTP layers together)."""
    from model.accounting import flops_by_part

    parts = flops_by_part(m, seq_len)
    total = sum(parts.values())
    return [f"  {part:36s} {f / 1e9:8.2f} GFLOP {100 * f / total:5.1f}%"
            for part, f in sorted(parts.items(), key=lambda kv: -kv[1]) if f]


def report(cfg, seq_len: int, optimizer: bool = False) -> str:
    """Build cfg.model on the meta device and return the printed report."""
    from model.accounting import count_parameters, train_flops_per_token
    from model.build import build_model
    from pretrain.parallel import ParallelConfig, single_process

    m, p = cfg.model, cfg.parallel
    with single_process():
        model = build_model(m, ParallelConfig(), meta=True)
        if optimizer:
            from optim import roles

            optimizer_table = roles.table(roles.assign(model, muon=cfg.optim.name == "muon",
                                                       qkv_split=cfg.optim.muon.qkv_split))
    counts = count_parameters(model, m)
    scale, unit = (1e9, "B") if counts.default_total >= 1e9 else (1e6, "M")

    def _b(n: float) -> str:
        return f"{n / scale:10.3f}{unit}"

    lines = [f"model {m.name}: {m.num_layers} layers ({m.first_k_dense} dense, {m.num_moe_layers} MoE)"
             f" + {m.mtp_num_layers} MTP, hidden {m.hidden_size}, {m.num_attention_heads}/"
             f"{m.num_query_groups} heads x {m.head_dim}, {m.num_experts} experts top-{m.moe_router_topk}"
             f" + {m.num_shared_experts} shared, vocab {m.vocab_size}", ""]
    lines.append(f"{'part':40s} {'main':>11s} {'MTP':>11s}")
    for part in sorted(set(counts.main) | set(counts.mtp), key=list(PART_LABELS).index):
        lines.append(f"{PART_LABELS[part]:40s} {_b(counts.main[part])} {_b(counts.mtp[part])}")
    lines.append(f"{'embedding':40s} {_b(counts.embedding)}")
    lines.append(f"{'output layer':40s} {_b(counts.output)}")
    lines += ["", f"{'convention':62s} {'total':>11s} {'active':>11s}"]
    for label, total, active in counts.conventions():
        lines.append(f"{label:62s} {_b(total)} {_b(active)}")
    lines += ["", f"total parameters:  {human(counts.default_total)}",
              f"active per token:  {human(counts.default_active)}",
              f"training FLOPs per token at seq {seq_len}: {train_flops_per_token(m, seq_len) / 1e9:.1f} GFLOP"]
    lines += flops_table(m, seq_len)
    if p.pipeline > 1 or p.tensor > 1 or p.expert > 1:
        lines += ["", *placement(m, p, model)]
    lines += stage_layouts(cfg)
    if optimizer:
        lines += ["", f"optimizer {cfg.optim.name}: what each parameter gets", optimizer_table]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glm-model-info", description=__doc__,
                                     epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (group=choice, group.field=value)")
    parser.add_argument("--seq-len", type=int, default=4096, help="sequence length for the FLOP count (default 4096)")
    parser.add_argument("--optimizer", action="store_true",
                        help="also print which optimizer each kind of parameter gets (optim=muon|adamw)")
    parser.add_argument("--config-dir", default=None, help="config tree to use instead of the bundled configs/")
    args = parser.parse_args(argv)
    quiet_megatron_warnings()

    from model.config import ConfigError
    from pretrain.config import compose

    try:
        cfg = compose(args.overrides, config_dir=args.config_dir)
    except ConfigError as e:
        print(f"glm-model-info: {e}", file=sys.stderr)
        return 2
    print(report(cfg, args.seq_len, args.optimizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
