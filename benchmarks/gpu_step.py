"""Forward + backward of a GLM stack on one device, layer implementation against implementation
in the same run: Megatron-Core's local modules (`local`: unfused attention, experts in a Python
loop) against the fused PyTorch path (`torch`: SDPA / FlexAttention, grouped expert GEMMs).
Prints tokens/s, TFLOP/s (Megatron's training-FLOP formula, model/accounting.py), MFU against
the device's bf16 dense peak, peak memory, and the ratio of each implementation to the first.

Default on a GPU: GLM-4.5-Air widths (128 experts, top-8, 96 query / 8 KV heads), 4 layers (one
dense) and the MTP layer, 1 x 4096 tokens, bf16. On a CPU: the smoke model, 2 x 512 tokens, fp32.
No optimizer step (see benchmarks/muon_step.py) and no data loading (benchmarks/train_step.py).

  python benchmarks/gpu_step.py [--model glm45_air] [--layers 4] [--batch 1] [--seq 4096]
                                [--impls torch,local] [--packed] [--steps 5] [--profile]
"""

from __future__ import annotations

import argparse
import ast
import gc
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from model import quiet_megatron_warnings  # noqa: E402
from model.accounting import train_flops_per_token  # noqa: E402
from model.build import build_model, position_ids  # noqa: E402
from pretrain.config import compose  # noqa: E402
from pretrain.metrics import peak_flops  # noqa: E402
from pretrain.parallel import single_process  # noqa: E402

CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def packed_segments(batch: int, seq: int, device) -> torch.Tensor:
    """Best-fit-like rows: documents of 1/16 to 1/2 of the row, deterministic."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch):
        lengths, left = [], seq
        while left > 0:
            lengths.append(min(left, int(torch.randint(seq // 16, seq // 2, (1,), generator=g))))
            left -= lengths[-1]
        rows.append(torch.repeat_interleave(torch.arange(1, len(lengths) + 1), torch.tensor(lengths)))
    return torch.stack(rows).to(device)


def timed(step, steps: int) -> tuple[float, float]:
    """Seconds per call of `step` over `steps` calls after two warm-up calls (allocator, kernel
    choice, compilation), and the peak GPU memory they reached in GiB (NaN on a CPU)."""
    for _ in range(2):
        step()
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps, torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")


def measure(cfg, impl: str, dtype, batch: int, seq: int, steps: int, packed: bool, profile: bool,
            config_fields: dict) -> dict:
    device = torch.device("cuda" if CUDA else "cpu")
    torch.manual_seed(0)
    model = build_model(cfg, impl=impl, dtype=dtype)
    for field, value in config_fields.items():
        if not hasattr(model.config, field):
            raise SystemExit(f"--set {field}: not a TransformerConfig field")
        setattr(model.config, field, value)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    pos = position_ids(ids)
    segments = packed_segments(batch, seq, device) if packed else None

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, pos, segments, labels=ids).float().mean().backward()

    seconds, peak = timed(step, steps)
    out = {"s": seconds, "tokens/s": batch * seq / seconds, "peak GiB": peak,
           "parameters": sum(p.numel() for p in model.parameters())}
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
        with torch_profile(activities=activities) as prof:
            step()
            sync()
        key = "self_cuda_time_total" if CUDA else "self_cpu_time_total"
        print(f"\n--- profile of one step, impl={impl} (top 40 by {key}) ---")
        print(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="glm45_air" if CUDA else "smoke")
    ap.add_argument("--layers", type=int, default=4 if CUDA else None, help="decoder layers (default: the model's)")
    ap.add_argument("--batch", type=int, default=1 if CUDA else 2)
    ap.add_argument("--seq", type=int, default=4096 if CUDA else 512)
    ap.add_argument("--impls", default="torch,local", help="comma-separated; ratios are against the first")
    ap.add_argument("--packed", action="store_true", help="packed documents (segment ids) instead of one causal row")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="also print a profile of one step of each implementation")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="set a Megatron TransformerConfig field on the built model (an experiment, e.g. "
                         "cross_entropy_loss_fusion=False); repeatable")
    ap.add_argument("overrides", nargs="*", help="model overrides, e.g. model.num_experts=32")
    args = ap.parse_args(argv)
    quiet_megatron_warnings()
    overrides = [f"model={args.model}", *args.overrides]
    if args.layers:
        overrides.append(f"model.num_layers={args.layers}")
    cfg = compose(overrides).model
    config_fields = {}
    for item in args.set:
        field, _, value = item.partition("=")
        config_fields[field] = ast.literal_eval(value)
    dtype = torch.bfloat16 if CUDA else torch.float32
    device = torch.device("cuda" if CUDA else "cpu")
    peak, peak_source = peak_flops(device, dtype)
    flops_per_token = train_flops_per_token(cfg, args.seq)
    where = torch.cuda.get_device_name() if CUDA else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}; torch {torch.__version__}; {cfg.name} widths, {cfg.num_layers} layers "
          f"({cfg.first_k_dense} dense), {cfg.num_experts} experts top-{cfg.moe_router_topk}, MTP {cfg.mtp_num_layers}; "
          f"{args.batch} x {args.seq} tokens{' packed' if args.packed else ''}; {str(dtype)[6:]}; "
          f"{flops_per_token / 1e9:.2f} GFLOP/token; peak {peak / 1e12:.2f} TFLOP/s ({peak_source})"
          + (f"; config set: {config_fields}" if config_fields else ""))
    rows = []
    with single_process():
        for impl in args.impls.split(","):
            try:
                r = measure(cfg, impl, dtype, args.batch, args.seq, args.steps, args.packed, args.profile, config_fields)
            except torch.OutOfMemoryError:
                r = None
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()
            rows.append((impl, r))
    base = next((r for _, r in rows if r), None)
    print(f"\n{'impl':<7}{'step':>10}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>8}{'peak mem':>11}{'speed vs ' + rows[0][0]:>16}")
    for impl, r in rows:
        if r is None:
            print(f"{impl:<7}{'out of memory':>10}")
            continue
        tflops = r["tokens/s"] * flops_per_token / 1e12
        mfu = f"{100 * tflops * 1e12 / peak:.1f}%" if peak else "-"
        ratio = f"{base['s'] / r['s']:.2f}x" if base else "-"
        memory = f"{r['peak GiB']:.1f}Gi" if CUDA else "-"
        print(f"{impl:<7}{1000 * r['s']:>8.0f}ms{r['tokens/s']:>11,.0f}{tflops:>9.1f}{mfu:>8}{memory:>11}{ratio:>16}")


if __name__ == "__main__":
    main()
