"""One optimizer step on the matrices of a GLM-4.5-Air layer stack: our Muon, with Newton-Schulz in
fp32 and in bf16, against `torch.optim.Muon` looping over the same matrices (Q, K, V, gate, up, ...
as separate tensors; always bf16) and against AdamW (torch, foreach), in the same run, on the same
gradients.

Which dtype wins depends on the hardware, so every run prints both and says whether this CPU
multiplies bf16 natively (AVX512-BF16 / AMX) or emulates it. Where bf16 is emulated (an AVX2 CPU)
fp32 is ~200x faster, and that alone made ours look 35x faster than torch's bf16 loop; the fair
batching comparison is ours in bf16 against torch in bf16. Measured (benchmarks/RESULTS.md): 1.7x
on the expert matrices and 1.1x on all of them on an AVX512-BF16/AMX Xeon, 1.3x / 1.0x on an H100.
Batching matters where there are many small same-shaped matrices (experts); on the few large
ones a loop already fills the machine.

The layer shapes are GLM-4.5-Air's; --layers and --experts keep fewer of them, and --shrink
divides every width (hidden, heads, FFN sizes) for machines where full shapes take minutes.
Contenders run one after another and each one's copies and state are freed before the next, so
Air's 128 experts at full width fit one 80 GB GPU.

  .venv/bin/python benchmarks/muon_step.py [--layers 2] [--experts 8] [--shrink 8] [--smoke]
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from model.build import build_model, position_ids  # noqa: E402
from optim import newton_schulz  # noqa: E402
from optim.optimizer import Optimizer  # noqa: E402
from pretrain.config import compose  # noqa: E402
from pretrain.parallel import single_process  # noqa: E402

CUDA = torch.cuda.is_available()


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


def _free():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def hardware(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()} (bf16 native)"
    kind = "native" if newton_schulz.cpu_bf16_detected() else "emulated (no AVX512-BF16 / AMX)"
    forced = newton_schulz.native_bf16(device) != newton_schulz.cpu_bf16_detected()
    return (f"CPU {cpu_name()}, {torch.get_num_threads()} threads, "
            f"bf16 {kind}" + (" (GLM_CPU_BF16 overrides it for ns_dtype=auto)" if forced else ""))


def air_stack(layers: int, experts: int, shrink: int) -> list[str]:
    s = shrink
    return ["model=glm45_air", f"model.num_layers={layers}", f"model.num_experts={experts}",
            f"model.moe_router_topk={min(8, experts)}", "model.mtp_num_layers=0", "model.vocab_size=1024",
            f"model.hidden_size={4096 // s}", f"model.num_attention_heads={96 // s}",
            f"model.num_query_groups={max(1, 8 // s)}", f"model.ffn_hidden_size={10944 // s}",
            f"model.moe_ffn_hidden_size={1408 // s}"]


def torch_muon_step(rs, gs, device, repeat) -> float:
    """torch.optim.Muon over the same blocks (bf16 Newton-Schulz, its only choice)."""
    blocks = [torch.nn.Parameter(b.detach().float().clone()) for r in rs for b in r.split.blocks(r.param)]
    for b, g in zip(blocks, [gb for r, g in zip(rs, gs) for gb in r.split.blocks(g)]):
        b.grad = g
    muon = torch.optim.Muon(blocks, lr=1e-4, adjust_lr_fn="match_rms_adamw")
    t = timed(muon.step, device, repeat)
    del blocks, muon
    _free()
    return t


def adamw_step(rs, gs, device, repeat) -> float:
    flat = [torch.nn.Parameter(r.param.detach().float().clone()) for r in rs]
    for p, g in zip(flat, gs):
        p.grad = g
    adamw = torch.optim.AdamW(flat, lr=1e-4, foreach=True)
    t = timed(adamw.step, device, repeat)
    del flat, adamw
    _free()
    return t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (the first is dense)")
    ap.add_argument("--experts", type=int, default=128 if CUDA else 8,
                    help="routed experts kept per MoE layer (default Air's 128 on GPU, 8 on CPU)")
    ap.add_argument("--shrink", type=int, default=1 if CUDA else 8,
                    help="divide all widths by this (default 8 on CPU, 1 on GPU)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="also time the smoke model's step vs its forward/backward")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if CUDA else "cpu")
    torch.manual_seed(0)
    with single_process():
        cfg = compose(air_stack(args.layers, args.experts, args.shrink))
        model = build_model(cfg.model, impl="local", dtype=torch.bfloat16 if CUDA else torch.float32)
        opt = Optimizer(model, cfg.optim)
        roles = [r for r in opt.roles if r.side == "muon"]
        grads = [torch.randn_like(r.param, dtype=torch.float32) for r in roles]
        # emulated bf16 takes seconds per step: time it once
        slow = 1 if device.type == "cpu" and not newton_schulz.cpu_bf16_detected() else args.repeat
        print(f"{hardware(device)}; torch {torch.__version__}")
        print(f"GLM-4.5-Air shapes / {args.shrink}, {args.layers} layers, {args.experts} experts per MoE layer; "
              f"ns_dtype=auto picks {str(opt.ns_dtype).replace('torch.', '')} here")
        print(f"{'matrices':<9} {'count':>5} {'params':>13} {'ours fp32':>10} {'ours bf16':>10} "
              f"{'torch Muon':>11} {'AdamW':>9}  {'Muon/ours (bf16 both)':>21} {'Muon/ours fp32':>14}")
        for label, keep in (("experts", lambda r: r.expert), ("all", lambda r: True)):
            rs = [r for r in roles if keep(r)]
            gs = [g for r, g in zip(roles, grads) if keep(r)]
            ours = {}
            for dtype in (torch.float32, torch.bfloat16):
                opt.ns_dtype = dtype
                ours[dtype] = timed(lambda: opt.muon_update(1e-4, rs, gs), device,
                                    slow if dtype == torch.bfloat16 else args.repeat)
                _free()
            theirs = torch_muon_step(rs, gs, device, slow)
            adam_t = adamw_step(rs, gs, device, args.repeat)
            fp32, bf16 = ours[torch.float32], ours[torch.bfloat16]
            n = sum(r.param.numel() for r in rs)
            print(f"{label:<9} {len(rs):>5} {n:>13,} {fp32 * 1e3:>8.1f}ms {bf16 * 1e3:>8.1f}ms "
                  f"{theirs * 1e3:>9.1f}ms {adam_t * 1e3:>7.1f}ms  {theirs / bf16:>20.2f}x {theirs / fp32:>13.2f}x")
        # memory: what one bf16 update of all matrices allocates beside parameters, gradients and
        # state (it works in place: the gradients become the updates), against the stated bound
        opt.ns_dtype = torch.bfloat16
        stated = opt.workspace_bytes()
        if CUDA:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            opt.muon_update(1e-4, roles, grads)
            torch.cuda.synchronize()
            print(f"bf16 update of all matrices: allocated at most {(torch.cuda.max_memory_allocated() - before) / 2**30:.2f} "
                  f"GiB beside parameters, gradients and state; Optimizer.workspace_bytes() {stated / 2**30:.2f} GiB")
        else:
            print(f"bf16 update of all matrices: Optimizer.workspace_bytes() {stated / 2**30:.3f} GiB "
                  "(measured op by op in tests/test_optim.py)")
        e = next(r for r in roles if r.expert)
        rows, cols = e.block_shapes()[0]
        x = torch.randn(args.experts, rows, cols, device=device)
        fl = args.experts * newton_schulz.flops(rows, cols, len(opt.coefficients))
        for dtype in (torch.float32, torch.bfloat16):
            t = timed(lambda: newton_schulz.orthogonalize(x, opt.coefficients, dtype), device,
                      slow if dtype == torch.bfloat16 else args.repeat)
            print(f"Newton-Schulz on {args.experts} x {rows}x{cols} in {str(dtype).replace('torch.', '')}: "
                  f"{fl / t / 1e12:.3f} TFLOP/s")
        if args.smoke:
            del model, opt, roles, grads, x
            _free()
            smoke(device)


def smoke(device) -> None:
    """The optimizer step against one forward/backward of the smoke model (4 x 1024 tokens)."""
    cfg = compose(["model=smoke"])
    model = build_model(cfg.model, impl="local", dtype=torch.bfloat16 if CUDA else torch.float32)
    opt = Optimizer(model, cfg.optim)
    ids = torch.randint(0, cfg.model.vocab_size, (4, 1024), device=device)

    def fwd_bwd():
        model(ids, position_ids(ids), None, labels=ids).mean().backward()

    fb = timed(fwd_bwd, device, 2)
    step = timed(opt.step, device, 2)
    print(f"smoke model: forward/backward of 4x1024 tokens {fb * 1e3:.0f}ms, optimizer step {step * 1e3:.0f}ms "
          f"({step / fb:.2f}x, Newton-Schulz in {str(opt.ns_dtype).replace('torch.', '')})")


if __name__ == "__main__":
    main()
