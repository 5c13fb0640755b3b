"""The optimizer as data: Muon for matrices, AdamW for what Muon excludes (Hydra group `optim`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from model.config import ConfigError


@dataclass
class MuonConfig:
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    # One (a, b, c) per Newton-Schulz step; a single triple is used for every step.
    ns_coefficients: list = field(default_factory=lambda: [[3.4445, -4.7750, 2.0315]])
    # "auto": bf16 where the hardware multiplies bf16 natively (CUDA, or a CPU with AVX512-BF16 /
    # AMX), else fp32; the input is normalised in fp32 first either way.
    ns_dtype: str = "auto"
    # Update RMS: each orthogonalised block is scaled by rms_scale * sqrt(max(rows, cols)), which
    # gives it the RMS of a typical AdamW update, so both sides can share one learning rate.
    rms_scale: float = 0.2
    # The fused QKV weight is split into Q, K and V (each a whole matrix across query groups, as in
    # a model with separate projections); "fused" orthogonalises it as one matrix.
    qkv_split: str = "qkv"


@dataclass
class AdamConfig:
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8


@dataclass
class OptimConfig:
    # "muon": Muon for matrices, AdamW for embedding, output layer, biases and norms.
    # "adamw": AdamW for everything (the baseline).
    name: str = "muon"
    lr: float = 2.5e-4
    weight_decay: float = 0.1
    clip_grad: float = 1.0  # global L2 norm over both sides; 0 turns clipping off
    # A step whose gradient norm is inf/NaN is skipped with a warning; this many in a row stop
    # the run, so a broken run never carries on without updating.
    max_skipped_steps: int = 8
    muon: MuonConfig = field(default_factory=MuonConfig)
    adam: AdamConfig = field(default_factory=AdamConfig)

    def validate(self, source: str = "optim") -> "OptimConfig":
        def fail(name: str, value, why: str):
            raise ConfigError(f"{source}: optim.{name}={value!r} {why}")

        if self.name not in ("muon", "adamw"):
            fail("name", self.name, "must be muon or adamw")
        for name in ("lr", "weight_decay", "clip_grad"):
            if getattr(self, name) < 0:
                fail(name, getattr(self, name), "must be >= 0")
        if self.max_skipped_steps < 1:
            fail("max_skipped_steps", self.max_skipped_steps, "must be at least 1")
        m = self.muon
        if not 0 <= m.momentum < 1:
            fail("muon.momentum", m.momentum, "must be in [0, 1)")
        if m.ns_steps < 1:
            fail("muon.ns_steps", m.ns_steps, "must be at least 1")
        if not m.ns_coefficients or any(len(c) != 3 for c in m.ns_coefficients):
            fail("muon.ns_coefficients", m.ns_coefficients, "must be a list of [a, b, c] triples")
        if len(m.ns_coefficients) not in (1, m.ns_steps):
            fail("muon.ns_coefficients", m.ns_coefficients,
                 f"must hold one triple or one per step (ns_steps={m.ns_steps})")
        if m.ns_dtype not in ("auto", "bf16", "fp32"):
            fail("muon.ns_dtype", m.ns_dtype, "must be auto, bf16 or fp32")
        if m.rms_scale <= 0:
            fail("muon.rms_scale", m.rms_scale, "must be > 0")
        if m.qkv_split not in ("qkv", "fused"):
            fail("muon.qkv_split", m.qkv_split, "must be qkv or fused")
        a = self.adam
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(a, name) < 1:
                fail(f"adam.{name}", getattr(a, name), "must be in [0, 1)")
        if a.eps <= 0:
            fail("adam.eps", a.eps, "must be > 0")
        return self

    def coefficients(self) -> list[tuple[float, float, float]]:
        c = [tuple(map(float, t)) for t in self.muon.ns_coefficients]
        return c * self.muon.ns_steps if len(c) == 1 else c
