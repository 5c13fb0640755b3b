"""The GLM model family as data: a structured config and its validation, and the parallel layout
the model is built for (checked against the model and the world size before any process group
exists, so an impossible layout fails in seconds with a message that names the field).

Field names follow the Hugging Face `glm4_moe` config where one exists, so a reader can hold the
two side by side; `model/hf_mapping.py` converts between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING


# Layer implementations (model/spec.py says what each is); `auto` picks one of them at build time.
IMPLS = ("te", "torch", "local")


class ConfigError(ValueError):
    """A configuration value that cannot work. The message names the field, the value and why."""


@dataclass
class ModelConfig:
    # Architecture: no defaults (configs/model/*.yaml set every one); a missing field is an error
    # that names it, never some model's number.
    name: str = MISSING
    vocab_size: int = MISSING
    hidden_size: int = MISSING
    num_layers: int = MISSING  # main decoder layers, MTP layers not included
    num_attention_heads: int = MISSING
    num_query_groups: int = MISSING  # key/value heads (GQA)
    head_dim: int = MISSING  # explicit: GLM-4.5 does not use hidden_size / heads
    ffn_hidden_size: int = MISSING  # dense (first-k) layers
    moe_ffn_hidden_size: int = MISSING  # each routed expert, and each shared expert
    num_experts: int = MISSING
    num_shared_experts: int = MISSING
    moe_router_topk: int = MISSING
    first_k_dense: int = MISSING
    routed_scaling_factor: float = MISSING
    qk_norm: bool = MISSING
    partial_rotary_factor: float = MISSING  # rotary on the first part of each head, rotate-half style
    rope_theta: float = MISSING  # the first stage's; a stage can change it (pretrain/stages.py)
    max_position_embeddings: int = MISSING
    mtp_num_layers: int = MISSING
    norm_topk_prob: bool = True  # must be true for top-k > 1 and false for top-1 (validate says why)
    qkv_bias: bool = True  # q/k/v carry a bias; the output projection never does
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    # Training recipe (GLM-4.5's first stage); stages change the first and the last.
    mtp_loss_weight: float = 0.3
    aux_loss_coeff: float = 1e-4  # sequence-level auxiliary balance loss
    expert_bias_update_rate: float = 1e-3  # loss-free balance: step of the expert-bias update

    # What training does not change: the fields that decide the weights' shapes and meaning. A
    # checkpoint resumes only into a config that agrees on all of them (name, init, the RoPE base,
    # context length and the recipe fields are free to differ).
    ARCHITECTURE = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                    "head_dim", "ffn_hidden_size", "moe_ffn_hidden_size", "num_experts", "num_shared_experts",
                    "moe_router_topk", "first_k_dense", "routed_scaling_factor", "qk_norm",
                    "partial_rotary_factor", "mtp_num_layers", "norm_topk_prob", "qkv_bias", "rms_norm_eps")

    def architecture_differences(self, other: "ModelConfig") -> list[str]:
        """'field: ours vs theirs' for every architecture field on which the two configs differ."""
        return [f"{f}: {getattr(self, f)!r} vs {getattr(other, f)!r}" for f in self.ARCHITECTURE
                if getattr(self, f) != getattr(other, f)]

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
        if self.norm_topk_prob != (self.moe_router_topk > 1):
            if self.moe_router_topk > 1:
                fail("norm_topk_prob", f"must be true with moe_router_topk={self.moe_router_topk}: "
                     "Megatron-Core's sigmoid router always normalises the top-k weights to sum to 1")
            fail("norm_topk_prob", "must be false with moe_router_topk=1: Megatron-Core's sigmoid router "
                 "weights a single expert by its score, while a normalised single weight is the constant 1")
        if self.routed_scaling_factor <= 0:
            fail("routed_scaling_factor", "must be positive")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "must be positive")
        return self


@dataclass
class ParallelConfig:
    tensor: int = 1
    expert: int = 1
    expert_tensor: int = 1  # tensor parallelism inside each expert; 1 keeps experts whole
    pipeline: int = 1
    # Model chunks per pipeline rank (Megatron's virtual pipeline stages, the interleaved
    # schedule); 1 = one chunk, the 1F1B schedule.
    virtual_stages: int = 1
    # Decoder layers on the first and last pipeline stages; unset = chosen by model/pipeline.py so
    # that the stage holding the output layer and MTP is not the slowest.
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    context: int = 1
    # Megatron-Core requires sequence parallelism for MoE with tensor > 1; it is on by default and
    # only takes effect when tensor > 1.
    sequence_parallel: bool = True

    def data(self, world_size: int) -> int:
        return world_size // (self.tensor * self.pipeline * self.context)

    def describe(self, world_size: int | None = None) -> str:
        """'tensor 2, pipeline 8, expert 16, context 2[, data 2]': the sizes that are not 1."""
        sizes = {"tensor": self.tensor, "pipeline": self.pipeline, "virtual stages": self.virtual_stages,
                 "expert": self.expert, "expert tensor": self.expert_tensor, "context": self.context}
        out = [f"{k} {v}" for k, v in sizes.items() if v > 1]
        if world_size is not None:
            out.append(f"data {self.data(world_size)}")
        return ", ".join(out) or "one GPU per replica"

    def expert_data(self, world_size: int) -> int:
        """Replicas of each routed expert (Megatron's expert-data-parallel size)."""
        return world_size // (self.expert * self.expert_tensor * self.pipeline)

    def validate(self, model: ModelConfig, world_size: int | None = None,
                 source: str = "parallel") -> "ParallelConfig":
        """What must divide what, and the world size. Whether the layers can be placed on the
        pipeline stages is model/pipeline.py's: `pipeline.check_layout` does both."""
        def fail(field: str, why: str):
            raise ConfigError(f"{source}: parallel.{field}={getattr(self, field)!r} {why}")

        for f in ("tensor", "expert", "expert_tensor", "pipeline", "virtual_stages", "context"):
            if getattr(self, f) < 1:
                fail(f, "must be at least 1")
        tp = self.tensor
        checks = [
            ("tensor", model.num_attention_heads, "model.num_attention_heads"),
            ("tensor", model.num_query_groups, "model.num_query_groups"),
            ("tensor", model.ffn_hidden_size, "model.ffn_hidden_size"),
            ("tensor", model.vocab_size, "model.vocab_size"),
            ("expert", model.num_experts, "model.num_experts"),
            ("expert_tensor", model.moe_ffn_hidden_size, "model.moe_ffn_hidden_size"),
        ]
        for field, total, name in checks:
            if total % getattr(self, field):
                fail(field, f"does not divide {name}={total}")
        if tp > 1 and model.num_experts and not self.sequence_parallel:
            fail("sequence_parallel", "must be true with tensor > 1: Megatron-Core requires it for MoE")
        if world_size is not None:
            dense = tp * self.pipeline * self.context
            if world_size % dense:
                raise ConfigError(f"{source}: world size {world_size} is not divisible by "
                                  f"tensor*pipeline*context={dense}")
            experts = self.expert * self.expert_tensor * self.pipeline
            if world_size % experts:
                raise ConfigError(f"{source}: world size {world_size} is not divisible by "
                                  f"expert*expert_tensor*pipeline={experts}")
        return self
