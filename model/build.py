"""Build a GLM model: ModelConfig + ParallelConfig -> TransformerConfig -> Megatron-Core GPTModel."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from model import context_parallel, cpu_support
from model.config import IMPLS, ModelConfig, ParallelConfig
from model.attention import accept_segment_ids
from model.spec import decoder_specs, have_transformer_engine, mtp_block_spec


def resolve_impl(impl: str) -> str:
    """'auto' | 'te' | 'torch' | 'local' -> the implementation the layer spec uses (model/spec.py).
    auto is the fast PyTorch path, the one this project tests and measures (CPU and GPU), whether or
    not Transformer Engine imports: no machine here has Transformer Engine, so nothing checks its
    path (packed documents, context parallelism) the way the `torch` path is checked. `te` has to
    be asked for."""
    if impl not in ("auto", *IMPLS):
        raise ValueError(f"impl={impl!r}: expected one of auto, {', '.join(IMPLS)}")
    if impl == "te" and not have_transformer_engine():
        raise RuntimeError("impl=te but transformer_engine does not import; use impl=torch or auto")
    return "torch" if impl == "auto" else impl


def transformer_config(m: ModelConfig, p: ParallelConfig, *, dtype: torch.dtype = torch.float32,
                       impl: str = "local", initialize: bool = True) -> TransformerConfig:
    from model import pipeline

    cuda = torch.cuda.is_available()
    first, last = pipeline.split(m, p)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        gated_linear_unit=True,  # SwiGLU: fc1 holds [gate; up]
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        qk_layernorm=m.qk_norm,
        normalization="RMSNorm",
        layernorm_epsilon=m.rms_norm_eps,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        # MoE: sigmoid scores, top-k chosen on score + expert_bias, weights from the unbiased scores.
        num_moe_experts=m.num_experts,
        moe_layer_freq=[0] * m.first_k_dense + [1] * m.num_moe_layers,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=(m.moe_ffn_hidden_size * m.num_shared_experts) or None,
        moe_router_topk=m.moe_router_topk,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=m.expert_bias_update_rate,
        moe_router_topk_scaling_factor=m.routed_scaling_factor,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=m.aux_loss_coeff,
        moe_grouped_gemm=impl == "te",
        # alltoall is the fast dispatcher but needs CUDA streams; allgather gives the same result.
        moe_token_dispatcher_type="alltoall" if cuda else "allgather",
        mtp_num_layers=m.mtp_num_layers or None,
        mtp_loss_scaling_factor=m.mtp_loss_weight,
        tensor_model_parallel_size=p.tensor,
        expert_model_parallel_size=p.expert,
        expert_tensor_parallel_size=p.expert_tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_stages if p.virtual_stages > 1 else None,
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
        # The interleaved schedule posts sends to both neighbours at once; with two stages both are
        # the same rank, and batched p2p (one stream per peer, matched in order) can pair an
        # activation with a gradient. Megatron-LM's defaults for it: unbatched p2p, which sends
        # the two directions over different process groups, overlapped with compute.
        batch_p2p_comm=p.virtual_stages == 1,
        overlap_p2p_comm=p.virtual_stages > 1,
        context_parallel_size=p.context,
        sequence_parallel=p.sequence_parallel and p.tensor > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not cuda,
        perform_initialization=initialize,
        # Fusions that need CUDA kernels stay off; the unfused paths give the same numbers.
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        # Megatron's native fused cross-entropy (torch.compile'd pieces, no Transformer Engine):
        # 5% of an Air-width step on an H200. Its backward returns the logits' gradient in bf16
        # whatever their dtype (fusions/fused_cross_entropy.py), so only where logits are bf16.
        cross_entropy_loss_fusion=cuda and impl == "torch" and dtype == torch.bfloat16,
        cross_entropy_fusion_impl="native",
    )


def stage_layer_ids(config: TransformerConfig, pp_rank: int, vp_stage: int | None = None) -> list[int]:
    """Global (0-based) ids of the decoder layers that pipeline stage `pp_rank` (model chunk
    `vp_stage` of it, under virtual stages) holds."""
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return list(range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)))


def stage_plan(m: ModelConfig, p: ParallelConfig, pp_rank: int, vp_stage: int | None = None) -> dict:
    """What pipeline stage `pp_rank` (its model chunk `vp_stage`) holds: decoder layers (global
    ids), embedding, output head, MTP.

    Megatron-Core's placement: embedding on the first chunk of the first stage; final norm,
    output layer and MTP on the last chunk of the last stage (MTP reads the embedding, which
    Megatron duplicates there and keeps in sync with the first stage's).
    """
    config = transformer_config(m, p, initialize=False)
    if p.virtual_stages > 1 and vp_stage is None:
        raise ValueError("vp_stage must be given with parallel.virtual_stages > 1")
    first_chunk = vp_stage is None or vp_stage == 0
    last_chunk = vp_stage is None or vp_stage == p.virtual_stages - 1
    last = pp_rank == p.pipeline - 1 and last_chunk
    return dict(layers=stage_layer_ids(config, pp_rank, vp_stage if p.virtual_stages > 1 else None),
                embedding=pp_rank == 0 and first_chunk, output=last, mtp=bool(m.mtp_num_layers) and last)


def stage_plans(m: ModelConfig, p: ParallelConfig) -> list[list[dict]]:
    """`stage_plan` of every pipeline stage: per stage, one plan per model chunk."""
    chunks = p.virtual_stages
    return [[stage_plan(m, p, r, v if chunks > 1 else None) for v in range(chunks)] for r in range(p.pipeline)]


def build_model(m: ModelConfig, p: ParallelConfig | None = None, *, dtype: torch.dtype = torch.float32,
                impl: str = "auto", meta: bool = False, pp_rank: int | None = None,
                vp_stage: int | None = None) -> GPTModel:
    """Build this rank's part of the model (with virtual stages, model chunk `vp_stage` of it).
    Megatron's process groups must exist (init_distributed).

    meta=True builds on the meta device: shapes and counts, no memory, no initialisation.
    """
    from megatron.core import parallel_state

    cpu_support.install()
    context_parallel.install()  # MTP's loss over the whole sequence's tokens under CP
    p = p or ParallelConfig()
    impl = resolve_impl(impl)
    config = transformer_config(m, p, dtype=dtype, impl=impl, initialize=not meta)
    if pp_rank is None:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    plan = stage_plan(m, p, pp_rank, vp_stage)
    block, moe_layer, backend = decoder_specs(config, impl, m.first_k_dense, plan["layers"])
    mtp = mtp_block_spec(config, moe_layer, backend) if plan["mtp"] else None
    device = torch.device("meta") if meta else contextlib.nullcontext()
    with device:
        model = GPTModel(
            config=config,
            transformer_layer_spec=block,
            vocab_size=m.vocab_size,
            max_sequence_length=m.max_position_embeddings,
            pre_process=plan["embedding"],
            post_process=plan["output"],
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_percent=m.partial_rotary_factor,
            rotary_base=m.rope_theta,
            mtp_block_spec=mtp,
            vp_stage=vp_stage,
        )
    _mark_expert_parameters(model)
    if meta:
        _mark_tensor_parallel(model)
    accept_segment_ids(model)  # packed documents: segment ids as the attention mask, for every impl
    if torch.cuda.is_available() and not meta:
        model.cuda(torch.cuda.current_device())
    return model


def build_chunks(m: ModelConfig, p: ParallelConfig, *, dtype: torch.dtype = torch.float32,
                 impl: str = "auto") -> list[GPTModel]:
    """This rank's model chunks: one, or `parallel.virtual_stages` under the interleaved schedule."""
    if p.virtual_stages == 1:
        return [build_model(m, p, dtype=dtype, impl=impl)]
    return [build_model(m, p, dtype=dtype, impl=impl, vp_stage=v) for v in range(p.virtual_stages)]


def _mark_tensor_parallel(model: GPTModel) -> None:
    """Mark the weights split over tensor parallelism, which Megatron-Core does only while it
    initialises them (a meta build does not): the accounting of a layout reads the marks."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        dim = 0 if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)) else \
            1 if isinstance(module, RowParallelLinear) else None
        weight = getattr(module, "weight", None)
        if dim is not None and weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)


def _mark_expert_parameters(model: GPTModel) -> None:
    """Mark every routed-expert weight as an expert parameter (allreduce=False).

    Megatron-Core marks them only when expert parallelism is on. With tensor > 1, expert_tensor = 1
    and expert = 1, each tensor-parallel rank routes its own part of the sequence through the
    experts, so their gradients must be summed over the expert-data-parallel group (which holds
    the TP peers); DDP does that only for parameters marked as expert parameters.
    """
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False


def position_ids(tokens: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... along the sequence for each row of a [batch, seq] token tensor (no packing)."""
    return torch.arange(tokens.shape[1], device=tokens.device)[None].expand_as(tokens)
