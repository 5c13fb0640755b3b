"""Megatron <-> Hugging Face `glm4_moe`: one declarative table of weight names, used both ways.

Megatron names are those of the local layer spec with global expert ids, for a whole (unsharded)
model; `model/sharding.py` maps them to and from what each rank holds. Hugging Face names are
those of the released checkpoints (experts one by one; the MTP layer as `model.layers.<L+m>`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from model.config import ModelConfig

COPY, QKV, GATE_UP = "copy", "qkv", "gate_up"

# (Megatron suffix, Hugging Face suffix(es), how they relate); per decoder layer.
ATTENTION = [
    ("input_layernorm.weight", "input_layernorm.weight", COPY),
    ("self_attention.linear_qkv.weight",
     ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), QKV),
    ("self_attention.linear_qkv.bias",
     ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), QKV),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight", COPY),
    ("self_attention.q_layernorm.weight", "self_attn.q_norm.weight", COPY),
    ("self_attention.k_layernorm.weight", "self_attn.k_norm.weight", COPY),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", COPY),
]
DENSE_MLP = [
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GATE_UP),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight", COPY),
]
MOE = [
    ("mlp.router.weight", "mlp.gate.weight", COPY),
    ("mlp.router.expert_bias", "mlp.gate.e_score_correction_bias", COPY),
    ("mlp.shared_experts.linear_fc1.weight",
     ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"), GATE_UP),
    ("mlp.shared_experts.linear_fc2.weight", "mlp.shared_experts.down_proj.weight", COPY),
]
EXPERT = [  # {e}: global expert id
    ("mlp.experts.local_experts.{e}.linear_fc1.weight",
     ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"), GATE_UP),
    ("mlp.experts.local_experts.{e}.linear_fc2.weight", "mlp.experts.{e}.down_proj.weight", COPY),
]
MTP = [  # around the MTP layer's own decoder layer
    ("enorm.weight", "enorm.weight", COPY),
    ("hnorm.weight", "hnorm.weight", COPY),
    ("eh_proj.weight", "eh_proj.weight", COPY),
    ("final_layernorm.weight", "shared_head.norm.weight", COPY),
]
GLOBAL = [
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight", COPY),
    ("decoder.final_layernorm.weight", "model.norm.weight", COPY),
    ("output_layer.weight", "lm_head.weight", COPY),
]
# Some exporters repeat the shared embedding and head inside the MTP layer; they are copies of the
# main model's and are not read.
HF_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


@dataclass(frozen=True)
class Entry:
    megatron: str
    hf: tuple[str, ...]
    kind: str


def _as_tuple(names) -> tuple[str, ...]:
    return names if isinstance(names, tuple) else (names,)


def _present(cfg: ModelConfig, megatron_suffix: str) -> bool:
    if ".shared_experts." in megatron_suffix:
        return cfg.num_shared_experts > 0
    if "q_layernorm" in megatron_suffix or "k_layernorm" in megatron_suffix:
        return cfg.qk_norm
    if megatron_suffix.endswith(".bias"):
        return cfg.qkv_bias
    return True


def _layer_entries(cfg: ModelConfig, moe: bool, mg: str, hf: str) -> list[Entry]:
    rules = [r for r in ATTENTION if _present(cfg, r[0])]
    if moe:
        rules += [r for r in MOE if _present(cfg, r[0])]
        rules += [(m.format(e=e), tuple(h.format(e=e) for h in _as_tuple(hs)), k)
                  for e in range(cfg.num_experts) for m, hs, k in EXPERT]
    else:
        rules += DENSE_MLP
    return [Entry(mg + m, tuple(hf + h for h in _as_tuple(hs)), k) for m, hs, k in rules]


def entries(cfg: ModelConfig) -> list[Entry]:
    """Every weight of the model, as (Megatron name, Hugging Face names, relation)."""
    out = [Entry(m, (h,), k) for m, h, k in GLOBAL]
    for i in range(cfg.num_layers):
        out += _layer_entries(cfg, i >= cfg.first_k_dense, f"decoder.layers.{i}.", f"model.layers.{i}.")
    for j in range(cfg.mtp_num_layers):
        hf = f"model.layers.{cfg.num_layers + j}."
        out += [Entry(f"mtp.layers.{j}.{m}", (hf + h,), k) for m, h, k in MTP]
        out += _layer_entries(cfg, True, f"mtp.layers.{j}.transformer_layer.", hf)
    return out


def _qkv_groups(cfg: ModelConfig, t: torch.Tensor) -> torch.Tensor:
    # Megatron stores q/k/v interleaved per query group: [group][q heads of group, k, v][head_dim].
    return t.reshape(cfg.num_query_groups, -1, *t.shape[1:])


def _split(cfg: ModelConfig, e: Entry, t: torch.Tensor) -> list[torch.Tensor]:
    if e.kind == COPY:
        return [t]
    if e.kind == GATE_UP:
        return list(t.chunk(2, dim=0))
    d = cfg.head_dim
    q_per_group = cfg.num_attention_heads // cfg.num_query_groups * d
    q, k, v = _qkv_groups(cfg, t).split([q_per_group, d, d], dim=1)
    return [x.reshape(-1, *t.shape[1:]) for x in (q, k, v)]


def _merge(cfg: ModelConfig, e: Entry, ts: list[torch.Tensor]) -> torch.Tensor:
    if e.kind == COPY:
        return ts[0]
    if e.kind == GATE_UP:
        return torch.cat(ts, dim=0)
    return torch.cat([_qkv_groups(cfg, x) for x in ts], dim=1).reshape(-1, *ts[0].shape[1:])


def empty_shared_experts(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """HF names and shapes of the zero-size shared-expert weights that transformers' glm4_moe holds
    (and saves) in every MoE layer when n_shared_experts is 0; Megatron builds no shared expert."""
    if cfg.num_shared_experts:
        return {}
    h = cfg.hidden_size
    layers = [*range(cfg.first_k_dense, cfg.num_layers), *(cfg.num_layers + j for j in range(cfg.mtp_num_layers))]
    return {f"model.layers.{i}.mlp.shared_experts.{name}.weight": shape for i in layers
            for name, shape in (("gate_proj", (0, h)), ("up_proj", (0, h)), ("down_proj", (h, 0)))}


def megatron_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Whole-model Megatron state dict -> Hugging Face state dict (released checkpoint names)."""
    table = entries(cfg)
    _check_names({e.megatron for e in table}, state.keys(), "Megatron")
    out = {}
    for e in table:
        for name, t in zip(e.hf, _split(cfg, e, state[e.megatron])):
            out[name] = t.contiguous()
    dtype = state[GLOBAL[0][0]].dtype
    out.update({name: torch.empty(shape, dtype=dtype) for name, shape in empty_shared_experts(cfg).items()})
    return out


def hf_to_megatron(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face state dict -> whole-model Megatron state dict."""
    table = entries(cfg)
    mtp_copies = {f"model.layers.{cfg.num_layers + j}.{c}" for j in range(cfg.mtp_num_layers) for c in HF_MTP_COPIES}
    empty = {k for k in empty_shared_experts(cfg) if k in state and state[k].numel() == 0}
    _check_names({h for e in table for h in e.hf}, set(state.keys()) - mtp_copies - empty, "Hugging Face")
    return {e.megatron: _merge(cfg, e, [state[h] for h in e.hf]) for e in table}


def _check_names(expected: set[str], present, side: str) -> None:
    present = {k for k in present if not k.endswith("._extra_state")}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise KeyError(f"{side} weights do not match the model config: "
                       f"{len(missing)} missing (first: {missing[:3]}), "
                       f"{len(unexpected)} unexpected (first: {unexpected[:3]})")


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The `config.json` of the Hugging Face glm4_moe model for this config, whose weights are
    written in `dtype`."""
    return {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_hidden_size,
        "moe_intermediate_size": cfg.moe_ffn_hidden_size,
        "n_routed_experts": cfg.num_experts,
        "n_shared_experts": cfg.num_shared_experts,
        "num_experts_per_tok": cfg.moe_router_topk,
        "first_k_dense_replace": cfg.first_k_dense,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "norm_topk_prob": cfg.norm_topk_prob,
        "n_group": 1,
        "topk_group": 1,
        "use_qk_norm": cfg.qk_norm,
        "attention_bias": cfg.qkv_bias,
        "partial_rotary_factor": cfg.partial_rotary_factor,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                            "partial_rotary_factor": cfg.partial_rotary_factor},
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "num_nextn_predict_layers": cfg.mtp_num_layers,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def model_config_from_hf(hf: Mapping, name: str = "hf") -> ModelConfig:
    """ModelConfig from a Hugging Face glm4_moe config.json (a dict); refuses what we cannot build."""
    for key, want in (("n_group", 1), ("topk_group", 1), ("hidden_act", "silu"), ("tie_word_embeddings", False)):
        if hf.get(key, want) != want:
            raise ValueError(f"config.json: {key}={hf[key]!r} is not supported (expected {want!r})")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"config.json: RoPE scaling {rope_type!r} ({scaling or rope}) is not supported: GLM-4.5's "
                         f"stages change only the RoPE base (rope_theta); only the default rope type converts")
    return ModelConfig(
        name=name,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        ffn_hidden_size=hf["intermediate_size"],
        moe_ffn_hidden_size=hf["moe_intermediate_size"],
        num_experts=hf["n_routed_experts"],
        num_shared_experts=hf["n_shared_experts"],
        moe_router_topk=hf["num_experts_per_tok"],
        first_k_dense=hf["first_k_dense_replace"],
        routed_scaling_factor=float(hf["routed_scaling_factor"]),
        norm_topk_prob=hf.get("norm_topk_prob", True),
        qk_norm=hf.get("use_qk_norm", False),
        qkv_bias=hf.get("attention_bias", False),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        max_position_embeddings=hf["max_position_embeddings"],
        rms_norm_eps=float(hf["rms_norm_eps"]),
        mtp_num_layers=hf.get("num_nextn_predict_layers", 0),
        init_std=float(hf.get("initializer_range", 0.02)),
    ).validate("config.json")
