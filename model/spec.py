"""The GLM layer spec: which Megatron-Core module builds each part of a decoder layer.

Three implementations (`impl`) give the same numbers:
- `te`: Transformer Engine modules (fused norm+linear, grouped expert GEMMs, its attention);
- `torch`: Megatron-Core's local modules with PyTorch's fused attention (`model/attention.py`)
  and grouped expert GEMMs (`model/experts.py`): the fast path without Transformer Engine;
- `local`: Megatron-Core's local modules as shipped (unfused attention, experts in a Python
  loop): the reference the `torch` path is tested against.
All use our RMSNorm where Megatron's would refuse sequence parallelism.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlockSubmodules,
    get_mtp_layer_spec_for_backend,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from model.attention import SDPAttention
from model.experts import GroupedExperts
from model.norm import RMSNorm


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401

        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider  # noqa: F401
    except ImportError:
        return False
    return True


class LocalBackend(LocalSpecProvider):
    """Megatron's local modules, with an RMSNorm that works under sequence parallelism."""

    def layer_norm(self, rms_norm: bool = True, for_qk: bool = False) -> type:
        return RMSNorm


class TorchBackend(LocalBackend):
    """The local modules, with PyTorch's fused attention and grouped expert GEMMs."""

    def core_attention(self) -> type:
        return SDPAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool, moe_use_legacy_grouped_gemm: bool):
        _, submodules = super().grouped_mlp_modules(False, False)
        return GroupedExperts, submodules


def backend_for(impl: str):
    if impl == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return {"torch": TorchBackend, "local": LocalBackend}[impl]()


def layer_spec(backend, *, moe: bool, qk_norm: bool, num_experts: int, grouped_gemm: bool) -> ModuleSpec:
    fused = backend.fuse_layernorm_and_linear()  # TE folds the pre-norm into the next linear
    norm = backend.layer_norm(rms_norm=True)
    qk = backend.layer_norm(rms_norm=True, for_qk=True) if qk_norm else IdentityOp
    norm_linear = backend.column_parallel_layer_norm_linear() if fused else backend.column_parallel_linear()
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=norm_linear,
            core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=qk,
            k_layernorm=qk,
        ),
    )
    if moe:
        mlp = get_moe_module_spec_for_backend(
            backend=backend, num_experts=num_experts, moe_grouped_gemm=grouped_gemm)
    else:
        mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(
            linear_fc1=norm_linear, linear_fc2=backend.row_parallel_linear()))
    # Checkpoints use TE's names, so that local and TE runs can resume each other's checkpoints.
    keys_map = {}
    if not fused:
        keys_map["input_layernorm."] = "self_attention.linear_qkv.layer_norm_"
        if not moe:
            keys_map["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if fused else norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm if (moe or not fused) else IdentityOp,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def decoder_specs(config, impl: str, first_k_dense: int, layer_ids: list[int]):
    """Block spec for the given global layer ids (0-based), and the MoE layer spec for MTP."""
    backend = backend_for(impl)
    kw = dict(qk_norm=config.qk_layernorm, num_experts=config.num_moe_experts,
              grouped_gemm=config.moe_grouped_gemm)
    dense = layer_spec(backend, moe=False, **kw)
    moe = layer_spec(backend, moe=True, **kw)
    layers = [dense if i < first_k_dense else moe for i in layer_ids]
    block = TransformerBlockSubmodules(layer_specs=layers, layer_norm=backend.layer_norm(rms_norm=True))
    return block, moe, backend


def mtp_block_spec(config, moe_layer: ModuleSpec, backend) -> MultiTokenPredictionBlockSubmodules:
    layer = get_mtp_layer_spec_for_backend(transformer_layer_spec=moe_layer, backend=backend)
    return MultiTokenPredictionBlockSubmodules(layer_specs=[layer] * config.mtp_num_layers)
