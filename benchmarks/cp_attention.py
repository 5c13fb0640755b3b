"""One context-parallel rank's core attention on one device: its S/N queries against the whole
sequence's gathered keys and values (model/attention.py `attend_as_context_rank`), forward and
backward, against the whole sequence's attention on the same device divided by N (a perfectly
balanced split, the baseline), for every rank r of N simulated in turn. Prints time, TFLOP/s,
the slowest rank over the baseline, and peak memory above the inputs beside what glm-plan
counts for it (model/memory.py: the gathered keys and values as a transient of three copies, the
rank's queries, output and gradients).

Default on a GPU: GLM-4.5-Air's attention widths (96 query / 8 KV heads of 128), bf16, one
micro-batch, causal and packed documents, at 32K with N = 8 and at 128K with N = 8.
`--smoke` runs a tiny shape on the CPU (fp32), as CI could.

  python benchmarks/cp_attention.py [--seq 32768 131072] [--cp 8] [--heads 96 --groups 8 --dim 128]
                                    [--steps 5] [--smoke]
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

from benchmarks.gpu_step import CUDA, packed_segments, sync  # noqa: E402
from model import context_parallel  # noqa: E402
from model.attention import attend_as_context_rank, document_block_mask, _flex_attention  # noqa: E402


def visible_pairs(where: torch.Tensor, segments: torch.Tensor | None) -> float:
    """(query, key) pairs the mask lets through for queries at positions `where`: each sees the keys
    from the start of its document (of the row, without segment ids) up to itself."""
    if segments is None:
        return float((where + 1).sum())
    seg = segments[0].cpu()
    positions = torch.arange(seg.numel())
    starts = torch.where(torch.cat([torch.tensor([True]), seg[1:] != seg[:-1]]), positions, 0).cummax(0).values
    return float((where.cpu() - starts[where.cpu()] + 1).sum())


def attention_flops(pairs: float, heads: int, dim: int) -> float:
    """Forward + backward FLOPs of the visible score pairs: two GEMMs forward (QK^T, PV), and
    flash attention's backward counted as 2.5 forwards (it computes the scores again): 3.5 x 4 x d."""
    return 3.5 * 4 * pairs * heads * dim


def timed(fn, steps: int) -> tuple[float, int]:
    """(seconds per call, peak bytes above what was allocated before) of fn()."""
    fn()
    sync()
    base = torch.cuda.memory_allocated() if CUDA else 0
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    seconds = (time.perf_counter() - start) / steps
    return seconds, (torch.cuda.max_memory_allocated() - base) if CUDA else 0


def run(seq: int, cp: int, heads: int, groups: int, dim: int, packed: bool, steps: int, dtype) -> list[str]:
    device = torch.device("cuda" if CUDA else "cpu")
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, heads, seq, dim, generator=g, dtype=torch.float32).to(device, dtype)
    k, v = (torch.randn(1, groups, seq, dim, generator=g, dtype=torch.float32).to(device, dtype) for _ in range(2))
    segments = packed_segments(1, seq, device) if packed else None
    scale = dim ** -0.5
    a = torch.finfo(dtype).bits // 8

    def whole():
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        if CUDA:
            seg = segments if segments is not None else torch.zeros(1, seq, dtype=torch.int32, device=device)
            out = _flex_attention()(*x, block_mask=document_block_mask(seg), scale=scale, enable_gqa=True)
        else:
            allowed = context_parallel.visible(torch.arange(seq), seq, segments)
            out = torch.nn.functional.scaled_dot_product_attention(*x, attn_mask=allowed, scale=scale, enable_gqa=True)
        out.backward(torch.ones_like(out))

    base_s, base_mem = timed(whole, steps)
    lines = [f"seq {seq} {'packed' if packed else 'causal'}, {heads}/{groups} heads x {dim}, {str(dtype)[6:]}: "
             f"whole sequence {base_s * 1e3:.1f} ms, {base_mem / 2**30:.2f} GiB; per rank (S/{cp} queries):"]
    slowest = 0.0
    for rank in range(cp):
        where = context_parallel.positions(seq, cp, rank).to(device)
        q_r = q[:, :, where]

        def step():
            x = [t.detach().requires_grad_() for t in (q_r, k, v)]
            out = attend_as_context_rank(*x, segments, cp, rank, scale)
            out.backward(torch.ones_like(out))

        seconds, peak = timed(step, steps)
        slowest = max(slowest, seconds)
        # glm-plan's count beside the inputs: the gathered keys and values (three copies: as
        # gathered, in sequence order, their gradient; here the inputs are already in sequence order,
        # so two) and the rank's queries, output and their gradients
        planned = (2 * 2 * groups * dim * seq + 4 * heads * dim * seq / cp) * a
        tflops = attention_flops(visible_pairs(where, segments), heads, dim) / seconds / 1e12
        lines.append(f"  rank {rank}: {seconds * 1e3:8.2f} ms, {tflops:.1f} TFLOP/s, peak above inputs "
                     f"{peak / 2**30:.2f} GiB (planned {planned / 2**30:.2f})")
    lines.append(f"  slowest rank / (whole / {cp}) = {slowest / (base_s / cp):.2f}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=None)
    ap.add_argument("--cp", type=int, default=8)
    ap.add_argument("--heads", type=int, default=96)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="a tiny shape, fp32, on whatever device there is")
    args = ap.parse_args(argv)
    if args.smoke:
        seqs, cp, heads, groups, dim, dtype, steps = args.seq or [256], 2, 4, 2, 16, torch.float32, 1
    else:
        seqs, cp, heads, groups, dim, steps = args.seq or [32768, 131072], args.cp, args.heads, args.groups, args.dim, \
            args.steps
        dtype = torch.bfloat16 if CUDA else torch.float32
    print(f"device: {torch.cuda.get_device_name() if CUDA else 'CPU'}, torch {torch.__version__}")
    for seq in seqs:
        for packed in (False, True):
            print("\n".join(run(seq, cp, heads, groups, dim, packed, steps, dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
