"""Parameter and FLOP accounting, read off a model built on the meta device.

Counts come from the real module tree (so they cannot drift from what is trained); the FLOP count
is Megatron's per-token training formula (see ../shared/GLM45_FACTS.md).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from model.config import ModelConfig

if TYPE_CHECKING:  # annotations only: the FLOP formula is used where torch is not imported
    import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def part_of(name: str) -> str:
    """The accounting part of a parameter, from its Megatron name (local or TE spec)."""
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("output_layer."):
        return "output"
    if "q_layernorm" in name or "k_layernorm" in name:  # QK-Norm is part of attention
        return "attention"
    if "layernorm" in name or "layer_norm" in name or re.search(r"\.[eh]norm\.", name):
        return "norms"
    for marker, part in ((".eh_proj.", "mtp_proj"), (".self_attention.", "attention"),
                         (".mlp.router.", "router"), (".mlp.shared_experts.", "shared_experts"),
                         (".mlp.experts.", "experts"), (".mlp.", "dense_mlp")):
        if marker in name:
            return part
    raise ValueError(f"cannot place parameter {name!r} in the accounting")


@dataclass
class ParamCounts:
    main: Counter  # part -> parameters in the main decoder (no embedding/output)
    mtp: Counter  # part -> parameters in the MTP layer(s), incl. eh_proj and its norms
    embedding: int
    output: int
    experts_active_fraction: float  # top-k / num_experts

    def total(self, *, mtp: bool, embeddings: bool) -> int:
        n = sum(self.main.values())
        n += sum(self.mtp.values()) if mtp else 0
        return n + (self.embedding + self.output if embeddings else 0)

    def active(self, *, mtp: bool, embeddings: bool) -> float:
        def act(c: Counter) -> float:
            return sum(c.values()) - c["experts"] * (1 - self.experts_active_fraction)

        n = act(self.main) + (act(self.mtp) if mtp else 0)
        return n + (self.embedding + self.output if embeddings else 0)

    def conventions(self) -> list[tuple[str, int, float]]:
        """(label, total, active) under each counting convention, the default first."""
        return [
            ("decoder + embedding/output, no MTP [default total: the HF model]",
             self.total(mtp=False, embeddings=True), self.active(mtp=False, embeddings=True)),
            ("decoder only [default active]",
             self.total(mtp=False, embeddings=False), self.active(mtp=False, embeddings=False)),
            ("decoder + MTP", self.total(mtp=True, embeddings=False), self.active(mtp=True, embeddings=False)),
            ("decoder + MTP + embedding/output [everything trained]",
             self.total(mtp=True, embeddings=True), self.active(mtp=True, embeddings=True)),
        ]

    @property
    def default_total(self) -> int:
        # Closest to the published 355B / 106B for both models (worst error 0.8%, Air): the
        # parameters of the Hugging Face model, which carries embeddings but ignores the MTP layer.
        return self.total(mtp=False, embeddings=True)

    @property
    def default_active(self) -> float:
        # The published 32B / 12B match the main decoder's active weights without embeddings.
        return self.active(mtp=False, embeddings=False)


def count_parameters(model: torch.nn.Module, cfg: ModelConfig) -> ParamCounts:
    main, mtp = Counter(), Counter()
    emb = out = 0
    for name, p in model.named_parameters():
        part = part_of(name)
        if part == "embedding":
            emb += p.numel()
        elif part == "output":
            out += p.numel()
        elif name.startswith("mtp."):
            mtp[part] += p.numel()
        else:
            main[part] += p.numel()
    return ParamCounts(main, mtp, emb, out, cfg.moe_router_topk / cfg.num_experts)


def stages_holding(name: str, cfg: ModelConfig, parallel, stage_of_layer) -> list[int]:
    """The pipeline stages that hold parameter `name` (whole-model name). `stage_of_layer(i)` gives
    the stage of decoder layer i. Embedding sits on the first stage; final norm, output layer and
    MTP on the last (Megatron-Core's placement), which also holds a copy of the embedding for MTP."""
    last = parallel.pipeline - 1
    m = _LAYER.match(name)
    if m:
        return [stage_of_layer(int(m.group(1)))]
    if name.startswith("embedding."):
        return [0, last] if cfg.mtp_num_layers and last > 0 else [0]
    return [last]


def numel_per_gpu(name: str, p: torch.nn.Parameter, parallel) -> float:
    """Elements of a whole-model parameter that one GPU of its stage holds: routed experts are
    dealt over expert parallelism (a fraction, on average) and split over expert tensor
    parallelism; other tensor-parallel weights are split over tensor parallelism."""
    n = float(p.numel())
    if part_of(name) == "experts":
        n /= parallel.expert
        if getattr(p, "tensor_model_parallel", False):
            n /= parallel.expert_tensor
    elif getattr(p, "tensor_model_parallel", False):
        n /= parallel.tensor
    return n


def stage_parameters_per_gpu(model: torch.nn.Module, cfg: ModelConfig, parallel, stage_of_layer) -> list[float]:
    """Parameters held by one GPU of each pipeline stage under the given layout (weights only)."""
    per_stage = [0.0] * parallel.pipeline
    for name, p in model.named_parameters():
        for stage in stages_holding(name, cfg, parallel, stage_of_layer):
            per_stage[stage] += numel_per_gpu(name, p, parallel)
    return per_stage


def _gemm_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward multiply-adds per token of each part of one layer (x 6 for training: 2 per
    multiply-add, forward + two backward GEMMs), Megatron's terms."""
    h, v = cfg.hidden_size, cfg.vocab_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_query_groups * cfg.head_dim
    mlp = 3 * h * cfg.moe_ffn_hidden_size  # one SwiGLU expert
    return {"attention projections": h * (q + 2 * kv) + q * h,
            "attention scores": q * seq_len,  # QK^T and AV over the causal half of the square
            "dense MLP": 3 * h * cfg.ffn_hidden_size,
            "routed experts": cfg.moe_router_topk * mlp,
            "shared experts": cfg.num_shared_experts * mlp,
            "MTP projection and norms": 3 * h + 2 * h * h,
            "output layer": h * v}


def flops_by_part(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token of each part of the whole model (main and MTP layers together;
    the MTP layers' own output logits under "output layer"); their sum is `train_flops_per_token`."""
    g = _gemm_flops_per_token(cfg, seq_len)
    layers, moe, mtp = cfg.num_layers, cfg.num_moe_layers, cfg.mtp_num_layers
    count = {"attention projections": layers, "attention scores": layers, "dense MLP": cfg.first_k_dense,
             "routed experts": moe + mtp, "shared experts": moe + mtp, "MTP projection and norms": mtp,
             "output layer": 1 + mtp}
    return {part: 6.0 * g[part] * count[part] for part in g}


def layer_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token of each kind of part: a dense layer, an MoE layer, one MTP layer,
    the output layer. `train_flops_per_token` is their sum; pipeline placement (model/pipeline.py)
    weighs stages with them.

    As in Megatron's accounting, each MTP layer adds an MoE MLP, its norms and eh_proj, and one
    more output-logit GEMM, but not its attention; causal attention counts half the full square.
    """
    g = _gemm_flops_per_token(cfg, seq_len)
    attention = g["attention projections"] + g["attention scores"]
    moe_mlp = g["routed experts"] + g["shared experts"]
    return {"dense": 6.0 * (g["dense MLP"] + attention),
            "moe": 6.0 * (moe_mlp + attention),
            "mtp": 6.0 * (moe_mlp + g["MTP projection and norms"] + g["output layer"]),
            "output": 6.0 * g["output layer"]}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token, Megatron-Core's formula.

    Reproduces 230.7 GFLOP (GLM-4.5) and 95.4 GFLOP (GLM-4.5-Air) per token at sequence 4096.
    """
    f = layer_flops_per_token(cfg, seq_len)
    return (cfg.first_k_dense * f["dense"] + cfg.num_moe_layers * f["moe"] + cfg.mtp_num_layers * f["mtp"]
            + f["output"])
