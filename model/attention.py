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

Under context parallelism (model/context_parallel.py) `SDPAttention` attends with this rank's
queries to the whole sequence's keys and values, gathered over the CP ranks, with the same masks
built from global positions: FlexAttention's block mask (queries S/N, keys S) on a GPU, a dense
[b, 1, S/N, S] mask for SDPA on a CPU.
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from model import context_parallel

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


def document_block_mask(segments: torch.Tensor, block: int = BLOCK, q_positions: torch.Tensor | None = None):
    """FlexAttention block mask for packed rows: query q sees key k iff k <= q and both lie in the
    same document (equal segment id). Built from per-tile minimum and maximum segment ids and
    positions in O(s + (s/block)^2), never an s x s tensor: a tile is skipped when its id ranges are
    disjoint or all its keys come after all its queries, taken whole (no mask evaluated) when both
    tiles are complete and hold one and the same document with every key at or before every query,
    and masked element-wise otherwise.

    `q_positions` (context parallelism, model/context_parallel.py): the sequence positions of the
    queries, fewer than the keys; the keys are the whole sequence. Default: queries are the keys."""
    from torch.nn.attention.flex_attention import BlockMask

    b, s = segments.shape
    device = segments.device
    qpos = torch.arange(s, device=device) if q_positions is None else q_positions.to(device)
    sq = qpos.numel()
    q_segments = segments if q_positions is None else segments[:, qpos]
    nq, nk = -(-sq // block), -(-s // block)
    big = 2**40  # above any position or segment id; exact as the float F.pad takes

    def tiles(values, n):  # per-tile (min, max) of [..., length] values; padding counts in neither
        pad = n * block - values.shape[-1]
        values = values.long()
        lo = F.pad(values, (0, pad), value=big).view(*values.shape[:-1], n, block).amin(-1)
        hi = F.pad(values, (0, pad), value=-big).view(*values.shape[:-1], n, block).amax(-1)
        return lo, hi

    q_lo, q_hi = (t[:, :, None] for t in tiles(q_segments, nq))
    k_lo, k_hi = (t[:, None, :] for t in tiles(segments, nk))
    qp_lo, qp_hi = (t[:, :, None] for t in tiles(qpos[None], nq))
    kp_lo, kp_hi = (t[:, None, :] for t in tiles(torch.arange(s, device=device)[None], nk))
    complete = (torch.arange(nq, device=device) < sq // block)[None, :, None] & \
        (torch.arange(nk, device=device) < s // block)[None, None, :]
    overlap = (k_lo <= q_hi) & (q_lo <= k_hi)
    some_before = kp_lo <= qp_hi  # some key at or before some query
    all_before = kp_hi <= qp_lo  # every key at or before every query
    full = complete & all_before & (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
    partial = overlap & some_before & ~full

    def listed(tiles_):  # per query tile: how many key tiles, and which (those first)
        order = torch.argsort((~tiles_).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return tiles_.sum(-1, dtype=torch.int32)[:, None], order[:, None]

    # the kernel may read the last tiles' padding: padded keys belong to no document; padded
    # queries sit after the sequence
    k_ids = F.pad(segments, (0, nk * block - s), value=-1)
    q_ids = F.pad(q_segments, (0, nq * block - sq), value=-1)
    q_at = torch.arange(nq * block, device=device) if q_positions is None else \
        F.pad(qpos, (0, nq * block - sq), value=s)

    def same_document(b_, h_, q, k):
        return (k_ids[b_, k] == q_ids[b_, q]) & (k <= q_at[q])

    return BlockMask.from_kv_blocks(*listed(partial), *listed(full), BLOCK_SIZE=block,
                                    mask_mod=same_document, seq_lengths=(sq, s))


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
    not applied. Under context parallelism the queries are this rank's chunks and the keys and
    values the whole sequence's (`_context_parallel`). Attention dropout, sliding windows, attention
    sinks and Megatron's packed-sequence (THD) format are refused at construction or call."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        refused = {
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
        self.cp_group = None
        if config.context_parallel_size > 1:
            if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
                self.cp_group = pg_collection.cp
            else:
                from megatron.core import parallel_state

                self.cp_group = parallel_state.get_context_parallel_group()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention: packed_seq_params (THD) and attention_bias are not supported; "
                             "packed documents come as segment ids in attention_mask")
        sq, b, heads, d = query.shape
        if self.cp_group is not None and self.cp_group.size() > 1:
            return self._context_parallel(query, key, value, attention_mask, attn_mask_type)
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

    def _context_parallel(self, query, key, value, attention_mask, attn_mask_type):
        """This rank's queries against the whole sequence's keys and values (gathered over the CP
        group, model/context_parallel.py), masked by global positions: causal, and the same
        document when `attention_mask` holds a packed row's segment ids (whole rows)."""
        if (attn_mask_type or self.attn_mask_type) != AttnMaskType.causal:
            raise ValueError("SDPAttention: context parallelism supports causal attention only")
        if attention_mask is not None and not _is_segments(attention_mask):
            raise ValueError("SDPAttention: under context parallelism packed documents come as segment ids "
                             "[b, s] of the whole sequence, not as a dense mask")
        sq, b, heads, d = query.shape
        key, value = context_parallel.gather_keys_values(key, value, self.cp_group)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        out = attend_as_context_rank(q, k, v, attention_mask, self.cp_group.size(), self.cp_group.rank(),
                                     self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * d)


def attend_as_context_rank(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor | None,
                           cp: int, rank: int, scale: float) -> torch.Tensor:
    """Context-parallel rank `rank` of `cp`: its queries [b, heads, S/cp, d] (chunks rank and
    2cp-1-rank) against the whole sequence's keys and values [b, groups, S, d], causal and, with a
    packed row's segment ids [b, S], within each document. FlexAttention with a block mask on a GPU,
    SDPA with a dense mask elsewhere; [b, heads, S/cp, d]."""
    gqa = k.shape[1] != q.shape[1]
    s = k.shape[2]
    if q.is_cuda:
        mask = (_cp_causal_blocks(s, cp, rank, q.device) if segments is None
                else _cp_mask(_cp_block, segments, cp, rank))
        return _flex_attention()(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
    mask = (context_parallel.visible(context_parallel.positions(s, cp, rank, q.device), s, None) if segments is None
            else _cp_mask(_cp_dense, segments, cp, rank))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _cp_dense(segments: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    return context_parallel.visible(where, segments.shape[1], segments)


def _cp_block(segments: torch.Tensor, where: torch.Tensor):
    return document_block_mask(segments, q_positions=where)


# per micro-batch under context parallelism: a mask of this rank's queries against the whole row,
# by (builder, cp, rank)
_cp_masks: dict = {}


def _cp_mask(build, segments: torch.Tensor, cp: int, rank: int):
    if (build, cp, rank) not in _cp_masks:
        _cp_masks[build, cp, rank] = _PerMicroBatch(
            lambda seg: build(seg, context_parallel.positions(seg.shape[1], cp, rank, seg.device)))
    return _cp_masks[build, cp, rank](segments)


@functools.lru_cache(maxsize=8)
def _cp_causal_blocks(seq_len: int, cp: int, rank: int, device: torch.device):
    one_document = torch.zeros(1, seq_len, dtype=torch.int32, device=device)
    return document_block_mask(one_document, q_positions=context_parallel.positions(seq_len, cp, rank, device))


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
