"""Core attention for the local (no Transformer Engine) layer spec, on PyTorch's fused kernels,
and the document masks of packed sequences.

Megatron-Core 0.16's local `DotProductAttention` materialises the [b, heads, s, s] scores in fp32:
at GLM-4.5-Air's shape and 4,096 tokens that is +30 GiB for one layer's forward and backward.
`SDPAttention` takes the same arguments and gives the same result through
`F.scaled_dot_product_attention` (flash / memory-efficient kernels, GQA without repeating K and V).

Packed sequences (mid-training's best-fit packing) keep each document to itself. The model is
handed the packed rows' `segment_ids` [b, s] as its `attention_mask` (None: one causal sequence
per row); each core attention turns them into what it needs, once per micro-batch:
- `SDPAttention` on a GPU: FlexAttention with a block mask built from the segment ids, so memory
  stays linear in the sequence length (32K and 128K stages);
- `SDPAttention` on a CPU (FlexAttention has no backward there): SDPA with a dense boolean mask;
- Megatron's own core attentions (`impl=local`, Transformer Engine): their dense
  [b, 1, s, s] mask with True = masked, through a forward pre-hook (`accept_segment_ids`).
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

# FlexAttention's tile: a block mask records, per 128 x 128 tile, whether it is empty, full or
# partly masked.
BLOCK = 128


def _is_segments(mask) -> bool:
    return mask is not None and mask.dim() == 2 and not mask.dtype.is_floating_point and mask.dtype != torch.bool


class _PerMicroBatch:
    """The last value computed from one segment-id tensor: every layer (and MTP, and recompute) of
    a micro-batch is handed the same tensor, so its mask is built once."""

    def __init__(self, build):
        self.build, self.key, self.value = build, None, None

    def __call__(self, segments: torch.Tensor):
        key = (segments._version, segments.device)
        if self.key is None or self.key[0]() is not segments or self.key[1:] != key:
            self.value = self.build(segments)
            self.key = (weakref.ref(segments), *key)
        return self.value


def dense_document_mask(segments: torch.Tensor) -> torch.Tensor:
    """Megatron's dense mask for packed rows: [b, 1, s, s] bool, True where a query may *not* see a
    key (a later position, or another document). Memory quadratic in s: the reference path."""
    s = segments.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return ~(same & causal)[:, None]


def document_block_mask(segments: torch.Tensor, block: int = BLOCK):
    """FlexAttention block mask for packed rows: query q sees key k iff k <= q and both lie in the
    same document (equal segment id). Built from per-tile minimum and maximum segment ids in
    O(s + (s/block)^2), never an s x s tensor: a tile is skipped when its id ranges are disjoint,
    taken whole (no mask evaluated) when both tiles hold one and the same document below the
    diagonal, and masked element-wise otherwise."""
    from torch.nn.attention.flex_attention import BlockMask

    b, s = segments.shape
    n = -(-s // block)
    pad = n * block - s
    big = torch.iinfo(segments.dtype).max
    lo = F.pad(segments, (0, pad), value=big).view(b, n, block).amin(-1)
    hi = F.pad(segments, (0, pad), value=-big).view(b, n, block).amax(-1)
    i = torch.arange(n, device=segments.device)
    below, diagonal = i[:, None] > i[None, :], i[:, None] == i[None, :]
    q_lo, q_hi, k_lo, k_hi = lo[:, :, None], hi[:, :, None], lo[:, None, :], hi[:, None, :]
    overlap = (k_lo <= q_hi) & (q_lo <= k_hi)
    full = below & (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
    partial = overlap & (below | diagonal) & ~full

    def listed(tiles):  # per query tile: how many key tiles, and which (those first)
        order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return tiles.sum(-1, dtype=torch.int32)[:, None], order[:, None]

    ids = F.pad(segments, (0, pad), value=-1)  # the kernel may read the last tile's padding

    def same_document(b_, h_, q, k):
        return (ids[b_, q] == ids[b_, k]) & (q >= k)

    return BlockMask.from_kv_blocks(*listed(partial), *listed(full), BLOCK_SIZE=block,
                                    mask_mod=same_document, seq_lengths=(s, s))


_dense = _PerMicroBatch(dense_document_mask)
_allowed = _PerMicroBatch(lambda segments: ~dense_document_mask(segments))
_blocks = _PerMicroBatch(document_block_mask)
_compiled_flex = None


def _flex_attention():
    # FlexAttention is a template for torch.compile: uncompiled it materialises the scores.
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class SDPAttention(MegatronModule):
    """Megatron's core-attention interface (query [sq, b, heads, d], key/value [sk, b, groups, d]
    -> [sq, b, heads * d]) on PyTorch's fused attention. Softmax scale as Megatron's (1/sqrt(d)
    unless the config sets one); query-key layer scaling cancels out in exact arithmetic and is
    not applied. Context parallelism, attention dropout, sliding windows, attention sinks and
    Megatron's packed-sequence (THD) format are refused at construction or call."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        refused = {
            "context_parallel_size": (config.context_parallel_size, 1,
                                      "context parallelism needs Transformer Engine's attention"),
            "attention_dropout": (config.attention_dropout if attention_dropout is None else attention_dropout, 0.0,
                                  "GLM-4.5 trains without attention dropout"),
            "window_size": (config.window_size, None, "sliding-window attention is not supported"),
            "softmax_type": (config.softmax_type, "vanilla", "attention sinks are not supported"),
        }
        for field, (value, want, why) in refused.items():
            if value != want:
                raise ValueError(f"SDPAttention: {field}={value!r}: {why} (impl=torch); use impl=te")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention: packed_seq_params (THD) and attention_bias are not supported; "
                             "packed documents come as segment ids in attention_mask")
        sq, b, heads, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        gqa = key.shape[2] != heads
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.softmax_scale, enable_gqa=gqa)
        elif _is_segments(attention_mask):
            if q.is_cuda:
                out = _flex_attention()(q, k, v, block_mask=_blocks(attention_mask), scale=self.softmax_scale,
                                        enable_gqa=gqa)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=_allowed(attention_mask),
                                                     scale=self.softmax_scale, enable_gqa=gqa)
        else:  # Megatron's dense mask, True = masked
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask.bool(),
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * d)


def _segments_to_dense_mask(module, args, kwargs):
    if len(args) > 3 and _is_segments(args[3]):
        args = (*args[:3], _dense(args[3]), *args[4:])
    elif _is_segments(kwargs.get("attention_mask")):
        kwargs = {**kwargs, "attention_mask": _dense(kwargs["attention_mask"])}
    return args, kwargs


def accept_segment_ids(model: torch.nn.Module) -> None:
    """Let every core attention of `model` that is not an SDPAttention (Megatron's unfused one,
    Transformer Engine's) take segment ids as its attention mask, converted to its dense mask."""
    for name, module in model.named_modules():
        if name.endswith("core_attention") and not isinstance(module, SDPAttention):
            module.register_forward_pre_hook(_segments_to_dense_mask, with_kwargs=True)
