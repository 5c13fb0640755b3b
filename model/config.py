"""The GLM model family as data: a structured config, its validation, and its TransformerConfig.

Field names follow the Hugging Face `glm4_moe` config where one exists, so a reader can hold the
two side by side; `model/hf_mapping.py` converts between them.
"""

from __future__ import annotations

from dataclasses import dataclass


class ConfigError(ValueError):
    """A configuration value that cannot work. The message names the field, the value and why."""


@dataclass
class ModelConfig:
    name: str = "???"
    vocab_size: int = 151552
    hidden_size: int = 4096
    num_layers: int = 46  # main decoder layers, MTP layers not included
    num_attention_heads: int = 96
    num_query_groups: int = 8  # key/value heads (GQA)
    head_dim: int = 128  # explicit: GLM-4.5 does not use hidden_size / heads
    ffn_hidden_size: int = 10944  # dense (first-k) layers
    moe_ffn_hidden_size: int = 1408  # each routed expert, and each shared expert
    num_experts: int = 128
    num_shared_experts: int = 1
    moe_router_topk: int = 8
    first_k_dense: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    qk_norm: bool = False
    qkv_bias: bool = True  # q/k/v carry a bias; the output projection never does
    partial_rotary_factor: float = 0.5  # rotary on the first half of each head, rotate-half style
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    mtp_num_layers: int = 1
    mtp_loss_weight: float = 0.3
    aux_loss_coeff: float = 1e-4  # sequence-level auxiliary balance loss
    expert_bias_update_rate: float = 1e-3  # loss-free balance: step of the expert-bias update
    init_std: float = 0.02

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def validate(self, source: str = "model") -> "ModelConfig":
        """Raise ConfigError naming the first impossible field; return self when all is well."""

        def fail(field: str, why: str):
            raise ConfigError(f"{source}: model.{field}={getattr(self, field)!r} {why}")

        for f in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                  "num_query_groups", "head_dim", "ffn_hidden_size", "moe_ffn_hidden_size",
                  "num_experts", "moe_router_topk", "max_position_embeddings"):
            if getattr(self, f) <= 0:
                fail(f, "must be positive")
        for f in ("num_shared_experts", "first_k_dense", "mtp_num_layers", "mtp_loss_weight",
                  "aux_loss_coeff", "expert_bias_update_rate"):
            if getattr(self, f) < 0:
                fail(f, "must not be negative")
        if self.num_attention_heads % self.num_query_groups:
            fail("num_query_groups", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.moe_router_topk > self.num_experts:
            fail("moe_router_topk", f"exceeds num_experts={self.num_experts}")
        if self.first_k_dense > self.num_layers:
            fail("first_k_dense", f"exceeds num_layers={self.num_layers}")
        if self.mtp_num_layers and self.first_k_dense == self.num_layers:
            fail("mtp_num_layers", "needs at least one MoE layer to copy the MTP layer's shape from")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            fail("partial_rotary_factor", "must lie in (0, 1]")
        if self.rotary_dim % 2:
            fail("partial_rotary_factor", f"gives an odd rotary dim {self.rotary_dim} of head_dim={self.head_dim}")
        if not self.norm_topk_prob:
            fail("norm_topk_prob", "must be true: Megatron-Core's sigmoid router always normalises the top-k")
        if self.routed_scaling_factor <= 0:
            fail("routed_scaling_factor", "must be positive")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "must be positive")
        return self
