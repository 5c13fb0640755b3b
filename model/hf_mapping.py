"""Megatron <-> Hugging Face `glm4_moe`: one declarative table of weight names, used both ways.

Each row names one weight three ways:
  - Megatron: the local layer spec's name for a whole (unsharded) model, global layer and expert
    ids (`model/sharding.py` maps them to and from what each rank holds in memory);
  - Hugging Face: the released checkpoints' name(s) (experts one by one; the MTP layer as
    `model.layers.<L+m>`), with each HF tensor's shape in named dimensions;
  - dist checkpoint: the key of Megatron's `sharded_state_dict`, which is what a Megatron
    distributed checkpoint stores. The checkpoint holds every tensor at its whole-model (global)
    shape and reassembles tensor-parallel pieces itself, so no tensor-parallel join is needed on
    disk; routed experts are one [experts, ...] tensor per layer, indexed by global expert id.
and how the HF tensors relate to the Megatron one: a copy, Q/K/V interleaved per query group, or
gate/up stacked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from model.config import ModelConfig

COPY, QKV, GATE_UP = "copy", "qkv", "gate_up"

# Per decoder layer: (Megatron suffix, HF suffix(es), relation, HF shape(s), dist checkpoint suffix
# or None for the Megatron one). Shapes are in the dimensions of `dims()`.
ATTENTION = [
    ("input_layernorm.weight", "input_layernorm.weight", COPY, ("h",),
     "self_attention.linear_qkv.layer_norm_weight"),
    ("self_attention.linear_qkv.weight",
     ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), QKV,
     (("q", "h"), ("kv", "h"), ("kv", "h")), None),
    ("self_attention.linear_qkv.bias",
     ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), QKV,
     (("q",), ("kv",), ("kv",)), None),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight", COPY, ("h", "q"), None),
    ("self_attention.q_layernorm.weight", "self_attn.q_norm.weight", COPY, ("d",), None),
    ("self_attention.k_layernorm.weight", "self_attn.k_norm.weight", COPY, ("d",), None),
]
DENSE_MLP = [  # the first_k_dense layers
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", COPY, ("h",), "mlp.linear_fc1.layer_norm_weight"),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GATE_UP,
     (("f", "h"), ("f", "h")), None),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight", COPY, ("h", "f"), None),
]
MOE = [
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", COPY, ("h",), None),
    ("mlp.router.weight", "mlp.gate.weight", COPY, ("e", "h"), None),
    ("mlp.router.expert_bias", "mlp.gate.e_score_correction_bias", COPY, ("e",), None),
    ("mlp.shared_experts.linear_fc1.weight",
     ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"), GATE_UP,
     (("s", "h"), ("s", "h")), None),
    ("mlp.shared_experts.linear_fc2.weight", "mlp.shared_experts.down_proj.weight", COPY, ("h", "s"), None),
]
EXPERT = [  # {e}: global expert id; the dist checkpoint stacks a layer's experts (index e)
    ("mlp.experts.local_experts.{e}.linear_fc1.weight",
     ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"), GATE_UP,
     (("x", "h"), ("x", "h")), "mlp.experts.experts.linear_fc1.weight"),
    ("mlp.experts.local_experts.{e}.linear_fc2.weight", "mlp.experts.{e}.down_proj.weight", COPY, ("h", "x"),
     "mlp.experts.experts.linear_fc2.weight"),
]
MTP = [  # around the MTP layer's own decoder layer
    ("enorm.weight", "enorm.weight", COPY, ("h",), None),
    ("hnorm.weight", "hnorm.weight", COPY, ("h",), None),
    ("eh_proj.weight", "eh_proj.weight", COPY, ("h", "2h"), None),
    ("final_layernorm.weight", "shared_head.norm.weight", COPY, ("h",), None),
]
GLOBAL = [
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight", COPY, ("v", "h"), None),
    ("decoder.final_layernorm.weight", "model.norm.weight", COPY, ("h",), None),
    ("output_layer.weight", "lm_head.weight", COPY, ("v", "h"), None),
]
# The released checkpoints repeat the shared embedding and output head inside each MTP layer
# (vLLM's and SGLang's MTP drafters read them from there): written on export as copies of the main
# model's, not read on import.
HF_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
# Router weights Hugging Face's glm4_moe keeps (and saves) in fp32 whatever the model's dtype.
HF_FP32 = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


def dims(cfg: ModelConfig) -> dict[str, int]:
    return {"h": cfg.hidden_size, "2h": 2 * cfg.hidden_size, "v": cfg.vocab_size, "d": cfg.head_dim,
            "q": cfg.num_attention_heads * cfg.head_dim, "kv": cfg.num_query_groups * cfg.head_dim,
            "f": cfg.ffn_hidden_size, "x": cfg.moe_ffn_hidden_size,
            "s": cfg.moe_ffn_hidden_size * cfg.num_shared_experts, "e": cfg.num_experts}


@dataclass(frozen=True)
class Entry:
    megatron: str
    hf: tuple[str, ...]
    kind: str
    hf_shapes: tuple[tuple[int, ...], ...]
    dist: str  # the dist checkpoint key
    expert: int | None = None  # index into the dist tensor (a layer's stacked routed experts)

    @property
    def shape(self) -> tuple[int, ...]:
        """The whole Megatron tensor's shape."""
        if self.kind == COPY:
            return self.hf_shapes[0]
        return (sum(s[0] for s in self.hf_shapes), *self.hf_shapes[0][1:])


def _as_tuple(names) -> tuple:
    return names if isinstance(names, tuple) else (names,)


def _present(cfg: ModelConfig, megatron_suffix: str) -> bool:
    if ".shared_experts." in megatron_suffix:
        return cfg.num_shared_experts > 0
    if "q_layernorm" in megatron_suffix or "k_layernorm" in megatron_suffix:
        return cfg.qk_norm
    if megatron_suffix.endswith(".bias"):
        return cfg.qkv_bias
    return True


def _entry(cfg: ModelConfig, row, mg: str, hf: str, expert: int | None = None) -> Entry:
    m, hs, kind, shapes, dist = row
    d = dims(cfg)
    hs = _as_tuple(hs)
    shapes = shapes if kind != COPY else (shapes,)
    fmt = (lambda x: x.format(e=expert)) if expert is not None else (lambda x: x)
    return Entry(mg + fmt(m), tuple(hf + fmt(h) for h in hs), kind,
                 tuple(tuple(d[k] for k in s) for s in shapes), mg + (dist or m), expert)


def _layer_entries(cfg: ModelConfig, moe: bool, mg: str, hf: str) -> list[Entry]:
    rows = [r for r in ATTENTION + (MOE if moe else DENSE_MLP) if _present(cfg, r[0])]
    out = [_entry(cfg, r, mg, hf) for r in rows]
    if moe:
        out += [_entry(cfg, r, mg, hf, e) for e in range(cfg.num_experts) for r in EXPERT]
    return out


def entries(cfg: ModelConfig) -> list[Entry]:
    """Every weight of the model, in the released checkpoints' order (embedding, layers, MTP, head)."""
    glob = [_entry(cfg, r, "", "") for r in GLOBAL]
    out = glob[:1]
    for i in range(cfg.num_layers):
        out += _layer_entries(cfg, i >= cfg.first_k_dense, f"decoder.layers.{i}.", f"model.layers.{i}.")
    out += glob[1:]
    for j in range(cfg.mtp_num_layers):
        hf = f"model.layers.{cfg.num_layers + j}."
        out += [_entry(cfg, r, f"mtp.layers.{j}.", hf) for r in MTP]
        out += _layer_entries(cfg, True, f"mtp.layers.{j}.transformer_layer.", hf)
    return out


def mtp_copies(cfg: ModelConfig) -> list[Entry]:
    """The MTP layers' copies of the embedding and the output head, as entries that read the main
    model's tensors (export only)."""
    rows = {r[0]: r for r in GLOBAL}
    out = []
    for j in range(cfg.mtp_num_layers):
        for mg, copy in zip(("embedding.word_embeddings.weight", "output_layer.weight"), HF_MTP_COPIES):
            out.append(_entry(cfg, (mg, f"model.layers.{cfg.num_layers + j}.{copy}", COPY, rows[mg][3], None), "", ""))
    return out


def dist_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every model tensor of a dist checkpoint: key -> global shape."""
    out = {}
    for e in entries(cfg):
        out[e.dist] = e.shape if e.expert is None else (cfg.num_experts, *e.shape)
    return out


def _qkv_groups(cfg: ModelConfig, t: torch.Tensor) -> torch.Tensor:
    # Megatron stores q/k/v interleaved per query group: [group][q heads of group, k, v][head_dim].
    return t.reshape(cfg.num_query_groups, -1, *t.shape[1:])


def split(cfg: ModelConfig, e: Entry, t: torch.Tensor) -> list[torch.Tensor]:
    """The whole Megatron tensor of `e` -> its Hugging Face tensors (views), in `e.hf` order."""
    if e.kind == COPY:
        return [t]
    if e.kind == GATE_UP:
        return list(t.chunk(2, dim=0))
    d = cfg.head_dim
    q_per_group = cfg.num_attention_heads // cfg.num_query_groups * d
    q, k, v = _qkv_groups(cfg, t).split([q_per_group, d, d], dim=1)
    return [x.reshape(-1, *t.shape[1:]) for x in (q, k, v)]


def merge(cfg: ModelConfig, e: Entry, ts: list[torch.Tensor]) -> torch.Tensor:
    """The Hugging Face tensors of `e`, in `e.hf` order -> the whole Megatron tensor."""
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
        for name, t in zip(e.hf, split(cfg, e, state[e.megatron])):
            out[name] = t.contiguous()
    dtype = state[GLOBAL[0][0]].dtype
    out.update({name: torch.empty(shape, dtype=dtype) for name, shape in empty_shared_experts(cfg).items()})
    return out


def hf_ignored(cfg: ModelConfig) -> set[str]:
    """Hugging Face names a directory may hold that are not read: the MTP layer's copies of the
    embedding and head, and the zero-size shared experts of a model without any."""
    copies = {f"model.layers.{cfg.num_layers + j}.{c}" for j in range(cfg.mtp_num_layers) for c in HF_MTP_COPIES}
    return copies | set(empty_shared_experts(cfg))


def hf_to_megatron(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face state dict -> whole-model Megatron state dict."""
    table = entries(cfg)
    shared = empty_shared_experts(cfg)
    ignored = {k for k in hf_ignored(cfg) if k not in shared or (k in state and state[k].numel() == 0)}
    _check_names({h for e in table for h in e.hf}, set(state.keys()) - ignored, "Hugging Face")
    return {e.megatron: merge(cfg, e, [state[h] for h in e.hf]) for e in table}


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
