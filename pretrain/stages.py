"""Training stages: which one a run is in, by consumed tokens, and what a switch changes.

A stage (configs/experiment/*.yaml, `stages:`) sets the data mixture, sequence length, packing,
RoPE base, loss-free balance rate, MTP loss weight and recomputation. `apply()` puts those values
into the live model, including what Megatron-Core caches at construction: the rotary `inv_freq`
(and the lru_cache over RotaryEmbedding.forward that holds embeddings computed from it) and the
MTP block's copy of `mtp_loss_scaling_factor`. Where the MTP weight, the RoPE base or the bias
rate changes between stages is this file.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from pretrain.config import Config, StageConfig


@dataclass
class Stage:
    index: int
    name: str
    cfg: StageConfig
    start_tokens: float
    end_tokens: float


class Stages:
    def __init__(self, cfg: Config):
        self.list: list[Stage] = []
        start = 0.0
        for i, (name, st) in enumerate(cfg.stages.items()):
            self.list.append(Stage(i, name, st, start, start + st.tokens))
            start += st.tokens
        self._ends = [s.end_tokens for s in self.list]

    @property
    def total_tokens(self) -> float:
        return self._ends[-1]

    def at(self, tokens: float) -> Stage | None:
        """The stage that trains the next batch after `tokens` consumed tokens (None: all done)."""
        i = bisect.bisect_right(self._ends, tokens)
        return self.list[i] if i < len(self.list) else None


def settings(stages: Stages, upto: Stage, model_cfg) -> dict:
    """The values in force in stage `upto`: each field's last setting up to it, else the model's."""
    values = {"rope_theta": model_cfg.rope_theta, "expert_bias_update_rate": model_cfg.expert_bias_update_rate,
              "mtp_loss_weight": model_cfg.mtp_loss_weight, "recompute": "none"}
    for st in stages.list[:upto.index + 1]:
        for k in values:
            v = getattr(st.cfg, k)
            if v is not None:
                values[k] = v
    return values


def _rotary_modules(model):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    return [m for m in model.modules() if isinstance(m, RotaryEmbedding)]


def apply(values: dict, model) -> None:
    """Put a stage's values into the live model chunk `model` (unwrapped GPTModel)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    config = model.config
    for rope in _rotary_modules(model):
        dim = rope.inv_freq.numel() * 2
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=rope.inv_freq.device) / dim
        rope.inv_freq = 1.0 / (values["rope_theta"] ** exponents)
    RotaryEmbedding.forward.cache_clear()  # embeddings cached from the old inv_freq
    config.moe_router_bias_update_rate = values["expert_bias_update_rate"]
    if config.mtp_num_layers:
        config.mtp_loss_scaling_factor = values["mtp_loss_weight"]
        mtp = getattr(model, "mtp", None)
        if mtp is not None:
            mtp.mtp_loss_scaling_factor = values["mtp_loss_weight"]
    # Recomputation: "full" is read from the config at each forward; "selective" (Megatron's default
    # modules: the core attention) is a flag each attention module (and block) sets at construction.
    recompute = values["recompute"]
    config.recompute_granularity = None if recompute == "none" else recompute
    config.recompute_method = "uniform" if recompute == "full" else None
    config.recompute_num_layers = 1 if recompute == "full" else None
    config.recompute_modules = ["core_attn"]
    # Under context parallelism the core attention holds the whole sequence's gathered keys and
    # values: it runs inside a recomputed region always (checkpointed itself unless the whole layer
    # is), so they are gathered again in the backward pass instead of kept for every layer.
    attention = recompute == "selective" or (recompute == "none" and config.context_parallel_size > 1)
    for module in model.modules():
        if hasattr(module, "checkpoint_core_attention"):
            module.checkpoint_core_attention = attention


def live_values(model) -> dict:
    """What the live model chunk uses now (for logs and tests)."""
    config = model.config
    ropes = _rotary_modules(model)
    theta = None
    if ropes:
        inv = ropes[0].inv_freq
        dim = inv.numel() * 2
        theta = float((1.0 / inv[1]) ** (dim / 2)) if inv.numel() > 1 else math.nan
    return {"rope_theta": theta, "expert_bias_update_rate": config.moe_router_bias_update_rate,
            "mtp_loss_weight": config.mtp_loss_scaling_factor if config.mtp_num_layers else None,
            "mtp_block_loss_weight": getattr(getattr(model, "mtp", None), "mtp_loss_scaling_factor", None),
            "recompute": config.recompute_granularity or "none",
            "checkpoint_core_attention": [b.checkpoint_core_attention for b in model.modules()
                                          if hasattr(b, "checkpoint_core_attention")]}
