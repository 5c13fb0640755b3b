"""One optimizer step on the matrices of a GLM-4.5-Air layer stack: our Muon against
`torch.optim.Muon` looping over the same matrices (Q, K, V, gate, up, ... as separate tensors)
and against AdamW (torch, foreach), in the same run, on the same gradients.

The layer shapes are GLM-4.5-Air's; --layers and --experts keep fewer of them, and --shrink
divides every width (hidden, heads, FFN sizes) for machines where full shapes take minutes.
Target: our step >= 2x faster than the torch.optim.Muon loop on the expert matrices.
Also printed: Newton-Schulz throughput on the expert shapes, and (--smoke) the optimizer step
against one forward/backward of the smoke model.

  .venv/bin/python benchmarks/muon_step.py [--layers 2] [--experts 8] [--shrink 8] [--smoke]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from model.build import build_model  # noqa: E402
from optim import newton_schulz  # noqa: E402
from optim.optimizer import Optimizer  # noqa: E402
from pretrain.config import compose  # noqa: E402
from pretrain.parallel import single_process  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeat


def air_stack(layers: int, experts: int, shrink: int) -> list[str]:
    s = shrink
    return ["model=glm45_air", f"model.num_layers={layers}", f"model.num_experts={experts}",
            f"model.moe_router_topk={min(8, experts)}", "model.mtp_num_layers=0", "model.vocab_size=1024",
            f"model.hidden_size={4096 // s}", f"model.num_attention_heads={96 // s}",
            f"model.num_query_groups={max(1, 8 // s)}", f"model.ffn_hidden_size={10944 // s}",
            f"model.moe_ffn_hidden_size={1408 // s}"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (the first is dense)")
    ap.add_argument("--experts", type=int, default=8, help="routed experts kept per MoE layer (Air: 128)")
    ap.add_argument("--shrink", type=int, default=1 if torch.cuda.is_available() else 8,
                    help="divide all widths by this (default 8 on CPU, 1 on GPU)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="also time the smoke model's step vs its forward/backward")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with single_process():
        cfg = compose(air_stack(args.layers, args.experts, args.shrink))
        model = build_model(cfg.model, impl="local", dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        opt = Optimizer(model, cfg.optim)
        roles = [r for r in opt.roles if r.side == "muon"]
        grads = [torch.randn_like(r.param, dtype=torch.float32) for r in roles]
        print(f"device {device}; GLM-4.5-Air shapes / {args.shrink}, {args.layers} layers, {args.experts} experts "
              f"per MoE layer; Newton-Schulz in {opt.ns_dtype} (ours), bfloat16 (torch.optim.Muon)")
        print(f"{'matrices':<10} {'count':>5} {'params':>12} {'ours':>10} {'torch Muon':>11} {'AdamW':>10} "
              f"{'vs Muon':>8} {'vs AdamW':>9}")
        for label, keep in (("experts", lambda r: r.expert), ("all", lambda r: True)):
            rs = [r for r in roles if keep(r)]
            gs = [g for r, g in zip(roles, grads) if keep(r)]
            ours = timed(lambda: opt.muon_update(1e-4, rs, gs), device, args.repeat)
            blocks = [torch.nn.Parameter(b.detach().float().clone()) for r in rs for b in r.split.blocks(r.param)]
            for b, g in zip(blocks, [gb for r, g in zip(rs, gs) for gb in r.split.blocks(g)]):
                b.grad = g.clone()
            muon = torch.optim.Muon(blocks, lr=1e-4, adjust_lr_fn="match_rms_adamw")
            theirs = timed(muon.step, device, 1 if device.type == "cpu" else args.repeat)
            flat = [torch.nn.Parameter(r.param.detach().float().clone()) for r in rs]
            for p, g in zip(flat, gs):
                p.grad = g
            adamw = torch.optim.AdamW(flat, lr=1e-4, foreach=True)
            adam_t = timed(adamw.step, device, args.repeat)
            n = sum(r.param.numel() for r in rs)
            print(f"{label:<10} {len(rs):>5} {n:>12,} {ours * 1e3:>8.1f}ms {theirs * 1e3:>9.1f}ms {adam_t * 1e3:>8.1f}ms "
                  f"{theirs / ours:>7.2f}x {adam_t / ours:>8.2f}x")
        if opt.ns_dtype != torch.bfloat16:  # the same dtype as torch.optim.Muon: batching alone
            rs = [r for r in roles if r.expert]
            gs = [g for r, g in zip(roles, grads) if r.expert]
            opt.ns_dtype, fp32 = torch.bfloat16, opt.ns_dtype
            t = timed(lambda: opt.muon_update(1e-4, rs, gs), device, 1)
            opt.ns_dtype = fp32
            print(f"experts with our Newton-Schulz forced to bfloat16 (emulated here): {t * 1e3:.1f}ms")
        e = next(r for r in roles if r.expert)
        rows, cols = e.block_shapes()[0]
        x = torch.randn(args.experts, rows, cols, device=device)
        t = timed(lambda: newton_schulz.orthogonalize(x, opt.coefficients, opt.ns_dtype), device, args.repeat)
        fl = args.experts * newton_schulz.flops(rows, cols, len(opt.coefficients))
        print(f"Newton-Schulz on {args.experts} x {rows}x{cols} in {opt.ns_dtype}: {fl / t / 1e12:.2f} TFLOP/s")
        if args.smoke:
            smoke(device)


def smoke(device) -> None:
    """The optimizer step against one forward/backward of the smoke model (4 x 1024 tokens)."""
    from tests.megatron_helpers import positions

    cfg = compose(["model=smoke"])
    model = build_model(cfg.model, impl="local", dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    opt = Optimizer(model, cfg.optim)
    ids = torch.randint(0, cfg.model.vocab_size, (4, 1024), device=device)

    def fwd_bwd():
        model(ids, positions(ids), None, labels=ids).mean().backward()

    fb = timed(fwd_bwd, device, 2)
    step = timed(opt.step, device, 2)
    print(f"smoke model: forward/backward of 4x1024 tokens {fb * 1e3:.0f}ms, optimizer step {step * 1e3:.0f}ms "
          f"({step / fb:.2f}x)")


if __name__ == "__main__":
    main()
