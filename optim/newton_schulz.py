"""Newton-Schulz orthogonalisation of stacks of same-shaped matrices: Muon's core."""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch


# Overrides what a CPU is taken to be, for `ns_dtype: auto`: "native" (bf16 GEMMs in hardware,
# as with AVX512-BF16 or AMX) or "emulated" (bf16 converted in software, far slower). The test
# suite sets it (`pytest --cpu-bf16=...`) to behave as the other kind of CPU; spawned processes
# inherit it through the environment.
CPU_BF16_ENV = "GLM_CPU_BF16"


def cpu_bf16_detected() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), ignoring the override."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def native_bf16(device: torch.device) -> bool:
    """Whether this device multiplies bf16 matrices natively (else bf16 is emulated, far slower).

    On a CPU without AVX512-BF16 or AMX, a bf16 GEMM ran at 0.8 GFLOP/s against 172 in fp32.
    On a CPU, the environment variable GLM_CPU_BF16=native|emulated overrides the detection.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        forced = os.environ.get(CPU_BF16_ENV, "")
        if forced not in ("", "native", "emulated"):
            raise ValueError(f"{CPU_BF16_ENV}={forced!r}: must be native, emulated or unset")
        return forced == "native" if forced else cpu_bf16_detected()
    return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "bf16" or (name == "auto" and native_bf16(device)):
        return torch.bfloat16
    return torch.float32


def orthogonalize(g: torch.Tensor, coefficients: Sequence[tuple[float, float, float]],
                  dtype: torch.dtype = torch.bfloat16, eps: float = 1e-7) -> torch.Tensor:
    """The nearest semi-orthogonal matrix, approximately, of each matrix in g [batch, rows, cols].

    Each matrix is normalised by its Frobenius norm in fp32 (so its singular values are <= 1), then
    the quintic iteration X <- aX + (bA + cA^2)X, A = XX^T, runs in `dtype` on the short side
    (tall matrices are transposed), one batched GEMM per product for the whole stack.
    Returns fp32.
    """
    x = g.float()
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    x = x.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    for a, b, c in coefficients:
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    if tall:
        x = x.mT
    return x.float()


def workspace_bytes(batch: int, rows: int, cols: int, dtype: torch.dtype) -> int:
    """The most memory one `orthogonalize` call on a [batch, rows, cols] fp32 stack holds at once,
    the stack and the fp32 result included: with bf16 iterations, the stack, the normalised fp32
    copy and its bf16 cast at the start, and at the end the stack, the last iterate, its fp32 result
    and the last Gram matrix and polynomial; in fp32 the normalised stack is the iterate, and the
    peak is inside the loop (two iterates, Gram matrix and polynomial, beside the stack)."""
    e = torch.finfo(dtype).bits // 8
    n = batch * rows * cols
    gram = batch * min(rows, cols) ** 2 * e
    if e == 4:
        return 4 * n + 2 * e * n + 2 * gram
    return max(4 * n + 4 * n + e * n, 4 * n + e * n + 4 * n + 2 * gram)


def update_scale(rows: int, cols: int, rms: float) -> float:
    """Factor giving an orthogonalised rows x cols update the RMS `rms` (Moonlight's matching)."""
    return rms * math.sqrt(max(rows, cols))


def flops(rows: int, cols: int, steps: int) -> int:
    """Multiply-add FLOPs of `steps` iterations on one rows x cols matrix (short side s, long l)."""
    s, l = sorted((rows, cols))
    return steps * (4 * s * s * l + 2 * s ** 3)
