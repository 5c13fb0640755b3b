"""Small random Hugging Face glm4_moe models, the independent reference for numerics."""

import json

import torch
from safetensors.torch import load_file
from transformers import Glm4MoeConfig, Glm4MoeForCausalLM
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeDecoderLayer, Glm4MoeRMSNorm


def hf_config(qk_norm: bool = True, routed_scaling_factor: float = 2.5, **kw) -> Glm4MoeConfig:
    args = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, n_shared_experts=1,
                routed_scaling_factor=routed_scaling_factor, use_qk_norm=qk_norm, attention_bias=True,
                partial_rotary_factor=0.5, rope_theta=10000.0, max_position_embeddings=256,
                num_nextn_predict_layers=1, initializer_range=0.1, attn_implementation="sdpa")
    args.update(kw)
    return Glm4MoeConfig(**args)


def _randomise(t: torch.Tensor, name: str, g: torch.Generator) -> None:
    if name.endswith("e_score_correction_bias"):
        t.copy_(0.1 * torch.randn(t.shape, generator=g))  # large enough to change the chosen experts
    elif "norm" in name:
        t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
    elif name.endswith("bias"):
        t.copy_(0.1 * torch.randn(t.shape, generator=g))


def mtp_layer(config: Glm4MoeConfig, seed: int) -> torch.nn.ModuleDict:
    """The MTP layer as plain HF modules: enorm, hnorm, eh_proj, a MoE decoder layer, shared_head.norm."""
    torch.manual_seed(seed)
    h, eps = config.hidden_size, config.rms_norm_eps
    m = torch.nn.ModuleDict({
        "enorm": Glm4MoeRMSNorm(h, eps), "hnorm": Glm4MoeRMSNorm(h, eps),
        "eh_proj": torch.nn.Linear(2 * h, h, bias=False),
        "layer": Glm4MoeDecoderLayer(config, layer_idx=config.num_hidden_layers),
        "shared_head_norm": Glm4MoeRMSNorm(h, eps),
    })
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(m.named_parameters()) + list(m.named_buffers()):
            if name.endswith(("gate_up_proj", "down_proj", "weight")) and "norm" not in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            _randomise(p, name, g)
    return m.eval()


def mtp_hf_weights(m: torch.nn.ModuleDict, config: Glm4MoeConfig) -> dict:
    """The MTP layer's weights under the released checkpoint names (model.layers.<L>.*)."""
    pre = f"model.layers.{config.num_hidden_layers}."
    out = {pre + "enorm.weight": m["enorm"].weight, pre + "hnorm.weight": m["hnorm"].weight,
           pre + "eh_proj.weight": m["eh_proj"].weight, pre + "shared_head.norm.weight": m["shared_head_norm"].weight}
    for name, t in m["layer"].state_dict().items():
        if name == "mlp.experts.gate_up_proj":
            for e, w in enumerate(t):
                gate, up = w.chunk(2, dim=0)
                out[f"{pre}mlp.experts.{e}.gate_proj.weight"] = gate
                out[f"{pre}mlp.experts.{e}.up_proj.weight"] = up
        elif name == "mlp.experts.down_proj":
            for e, w in enumerate(t):
                out[f"{pre}mlp.experts.{e}.down_proj.weight"] = w
        else:
            out[pre + name] = t
    return {k: v.detach().clone() for k, v in out.items()}


def random_model(config: Glm4MoeConfig, seed: int) -> Glm4MoeForCausalLM:
    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            _randomise(t, name, g)
    return model


def random_checkpoint(path, config: Glm4MoeConfig, seed: int = 0):
    """Save a random Glm4MoeForCausalLM (+ an MTP layer) like a released checkpoint.

    Returns (hf_model, mtp_modules, state_dict as saved on disk, config.json as a dict).
    """
    model = random_model(config, seed)
    model.save_pretrained(path)
    state = load_file(str(path / "model.safetensors"))
    mtp = mtp_layer(config, seed + 2)
    state.update(mtp_hf_weights(mtp, config))
    return model, mtp, state, json.loads((path / "config.json").read_text())


@torch.no_grad()
def mtp_reference_logits(model, mtp, input_ids: torch.Tensor) -> torch.Tensor:
    """MTP logits by the formula: lm_head(norm(layer(eh_proj([enorm(emb(next)), hnorm(h)]))))."""
    out = model.model(input_ids=input_ids)
    h = out.last_hidden_state  # after the final norm, as Megatron-Core feeds its MTP block
    nxt = torch.roll(input_ids, -1, dims=1)
    nxt[:, -1] = 0  # Megatron-Core fills the rolled-in position with token 0 (its loss is masked)
    x = mtp["eh_proj"](torch.cat([mtp["enorm"](model.model.embed_tokens(nxt)), mtp["hnorm"](h)], dim=-1))
    pos = torch.arange(input_ids.shape[1])[None].expand_as(input_ids)
    x = mtp["layer"](x, attention_mask=None, position_ids=pos,
                     position_embeddings=model.model.rotary_emb(x, pos))
    return model.lm_head(mtp["shared_head_norm"](x))


_FP32 = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


def write_hf_dir(path, config: Glm4MoeConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                 max_shard_size: str = "200KB"):
    """A random glm4_moe directory as released checkpoints are laid out: sharded safetensors with an
    index written by transformers, plus the MTP layer's tensors in a shard of their own.

    Returns (hf_model, mtp_modules, config.json as a dict)."""
    from safetensors.torch import save_file

    model = random_model(config, seed).to(dtype)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(_FP32):  # as the released checkpoints store the router (and transformers loads it)
            t.data = t.data.float()
    model.save_pretrained(path, max_shard_size=max_shard_size)
    mtp = mtp_layer(config, seed + 2)
    index_path = path / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:  # one shard: make it an indexed one
        (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
        from safetensors import safe_open

        with safe_open(str(path / "model-00001-of-00001.safetensors"), "pt") as f:
            index = {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in f.keys()}}
    pre = f"model.layers.{config.num_hidden_layers}."
    copies = {pre + "embed_tokens.weight": model.model.embed_tokens.weight,  # as released checkpoints repeat them
              pre + "shared_head.head.weight": model.lm_head.weight}
    weights = {k: v.detach().to(torch.float32 if k.endswith(_FP32) else dtype).contiguous()
               for k, v in {**mtp_hf_weights(mtp, config), **copies}.items()}
    save_file(weights, str(path / "model-mtp.safetensors"), metadata={"format": "pt"})
    index["weight_map"].update({k: "model-mtp.safetensors" for k in weights})
    index_path.write_text(json.dumps(index))
    return model, mtp.to(dtype), json.loads((path / "config.json").read_text())


def mtp_from_hf(state: dict, config: Glm4MoeConfig) -> torch.nn.ModuleDict:
    """The MTP layer as plain HF modules, with the weights `state` holds under the released names."""
    m = mtp_layer(config, seed=0)
    pre = f"model.layers.{config.num_hidden_layers}."
    own = {"enorm.weight": pre + "enorm.weight", "hnorm.weight": pre + "hnorm.weight",
           "eh_proj.weight": pre + "eh_proj.weight", "shared_head_norm.weight": pre + "shared_head.norm.weight"}
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if name in own:
                t.copy_(state[own[name]])
            elif name == "layer.mlp.experts.gate_up_proj":
                for e in range(t.shape[0]):
                    t[e].copy_(torch.cat([state[f"{pre}mlp.experts.{e}.gate_proj.weight"],
                                          state[f"{pre}mlp.experts.{e}.up_proj.weight"]]))
            elif name == "layer.mlp.experts.down_proj":
                for e in range(t.shape[0]):
                    t[e].copy_(state[f"{pre}mlp.experts.{e}.down_proj.weight"])
            else:
                t.copy_(state[pre + name.removeprefix("layer.")])
    return m
