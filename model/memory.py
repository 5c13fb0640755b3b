"""Activation memory of training: the bytes autograd keeps for the backward pass on one GPU, per
micro-batch and part of the model, and how many micro-batches a pipeline stage holds at once.

Counted tensor by tensor, in the manner of Megatron-LM's activation formula (Korthikanti et al.
2022, "Reducing Activation Recomputation in Large Transformer Models"), for this model's layers as
model/spec.py builds them: GQA with QK-Norm and partial RoPE, flash attention (queries, keys,
values, output and the log-sum-exp are kept, never the s x s scores), SwiGLU dense and expert
MLPs, the sigmoid router, the MTP layer, and the vocab-parallel loss (which keeps the fp32
softmax of the logits). Per token of a micro-batch, with h hidden, q = heads x head_dim,
kv = groups x head_dim, A the activation bytes (2 in bf16), 4 for fp32:

  RMSNorm of width w         w*4 + 4 + w*A   its fp32 input, 1/rms, the normalised input
  attention                  norm(h) + h*A (the QKV GEMM's input) + (q + 2kv)*A (QKV output)
                             + QK-Norm: q*4 + heads*4 + q*A, and for K the same (its fp32 copy
                               only when A != 4) + (2q + kv)*A (rotated Q and K, output)
                             + heads*4 (log-sum-exp; dropped by selective recomputation)
  dense MLP                  norm(h) + h*A + 5 * ffn*A (gate/up output, SiLU, product)
  MoE MLP                    norm(h) + h*A + 5 * shared_ffn*A + router and dispatch (scores,
                             top-k ids and weights, routing map: 3*experts*4 + experts + 28*topk + 8)
                             + topk * (h + 5 * moe_ffn)*A + topk*4 (routed copies, probabilities)
  output head                h*A + vocab*4 (+ labels, mask)   per head: main and each MTP layer

Everything per token is divided over tensor parallelism (sequence parallelism covers the
norms and the residual stream; heads, FFN widths and the vocabulary are split), and context
parallelism divides the tokens; under it the core attention is a recomputed region of its own
(no log-sum-exp kept), and the whole sequence's gathered keys and values are a transient of each
layer's attention (`context_parallel_working_set`). Full recomputation keeps only each layer's
input (h*A), and recomputes one layer at a time during the backward pass (`recompute_working_set`).

tests/test_plan.py checks these numbers against what `torch.autograd.graph.saved_tensors_hooks`
sees on the CPU (`torch` layer path). Transformer Engine's fused LayerNormLinear keeps one h*A
fewer per norm, so on its path the figures are an upper bound by a few per cent.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig, ParallelConfig

RECOMPUTE = ("none", "selective", "full")
F32 = 4
ID = 8  # int64 token ids, labels, expert indices


@dataclass(frozen=True)
class Shape:
    """One micro-batch on one GPU: tokens per context-parallel rank and activation bytes."""
    seq_len: int
    micro_batch: int
    act_bytes: int  # 2 (bf16) or 4 (fp32)

    def tokens(self, p: ParallelConfig) -> float:
        return self.seq_len * self.micro_batch / p.context


def _norm(w: int, a: int) -> int:
    return w * F32 + F32 + w * a


def attention_per_token(m: ModelConfig, p: ParallelConfig, a: int, recompute: str) -> float:
    t, h = p.tensor, m.hidden_size
    q, kv = m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    sp = _norm(h, a) + h * a  # input norm + QKV GEMM input, sequence-parallel
    heads = (q + 2 * kv) * a + (2 * q + kv) * a  # QKV output; rotated Q and K, the output
    if m.qk_norm:
        # the norms' fp32 inputs are copies, except in fp32 where K (and Q, with one query group
        # per GPU, when its reshape needs no copy) is a view of the QKV output
        q_copy = a != F32 or m.num_query_groups // t > 1
        heads += q * F32 * q_copy + m.num_attention_heads * F32 + q * a
        heads += kv * F32 * (a != F32) + m.num_query_groups * F32 + kv * a
    if not attention_checkpointed(p, recompute):
        heads += m.num_attention_heads * F32
    return (sp + heads) / t


def attention_checkpointed(p: ParallelConfig, recompute: str) -> bool:
    """Whether the core attention is a recomputed region of its own (pretrain/stages.py): with
    selective recomputation, and under context parallelism unless the whole layer is recomputed."""
    return recompute == "selective" or (recompute == "none" and p.context > 1)


def context_parallel_working_set(m: ModelConfig, p: ParallelConfig, shape: Shape) -> float:
    """Under context parallelism, what one layer's attention allocates beside what is held, in its
    forward pass and again when its backward gathers once more (model/context_parallel.py): the
    whole sequence's keys and values as gathered, in sequence order, and their gradient before the
    reduce-scatter (or, in a layer rebuilt by full recomputation, the copy its attention keeps)."""
    if p.context == 1:
        return 0.0
    kv = m.num_query_groups * m.head_dim
    return 3 * 2 * kv * shape.seq_len * shape.micro_batch * shape.act_bytes / p.tensor


def rotary_per_micro_batch(m: ModelConfig, shape: Shape, p: ParallelConfig) -> float:
    """The cos/sin tables each attention keeps (per position, not per token of the batch)."""
    return 4 * shape.seq_len / p.context * m.rotary_dim * shape.act_bytes


def mlp_per_token(m: ModelConfig, p: ParallelConfig, a: int, moe: bool) -> float:
    t, h = p.tensor, m.hidden_size
    sp = _norm(h, a) + h * a
    if not moe:
        return (sp + 5 * m.ffn_hidden_size * a) / t
    k, e = m.moe_router_topk, m.num_experts
    router = 2 * e * F32 + 2 * k * ID + 2 * F32 + k * F32 + e + e * F32 + k * ID
    shared = 5 * m.moe_ffn_hidden_size * m.num_shared_experts * a
    # routed copies: each GPU receives on average topk x its tokens' worth of rows; under expert
    # tensor parallelism the rows of etp GPUs are gathered and the FFN width split etp ways
    routed = k * p.expert_tensor * ((h + 5 * m.moe_ffn_hidden_size / p.expert_tensor) * a + F32)
    return (sp + router + shared + routed) / t


def layer_bytes(m: ModelConfig, p: ParallelConfig, shape: Shape, moe: bool, recompute: str) -> float:
    """Bytes one decoder layer keeps for one micro-batch on one GPU."""
    n, a = shape.tokens(p), shape.act_bytes
    if recompute == "full":
        return n * m.hidden_size * a / p.tensor
    return (n * (attention_per_token(m, p, a, recompute) + mlp_per_token(m, p, a, moe))
            + rotary_per_micro_batch(m, shape, p))


def mtp_bytes(m: ModelConfig, p: ParallelConfig, shape: Shape, recompute: str) -> float:
    """One MTP layer: its two norms, the eh_proj input, a MoE layer and its final norm."""
    n, a, h = shape.tokens(p), shape.act_bytes, m.hidden_size
    if recompute == "full":
        return n * 2 * h * a / p.tensor  # its inputs: the hidden states and the next tokens' embedding
    return n * (3 * _norm(h, a) + 2 * h * a) / p.tensor + layer_bytes(m, p, shape, True, recompute)


def head_bytes(m: ModelConfig, p: ParallelConfig, shape: Shape) -> float:
    """One output head: the output layer's input, the loss's fp32 softmax over its vocabulary
    slice, labels and mask; plus the token ids of its embedding lookup."""
    n, a, h = shape.tokens(p), shape.act_bytes, m.hidden_size
    return n * (h * a / p.tensor + m.vocab_size / p.tensor * F32 + 1 + 2 * ID + F32 + ID)


def output_backward_bytes(m: ModelConfig, p: ParallelConfig, shape: Shape) -> float:
    """Made during one output head's backward pass beside what is held: the logits' gradient (in
    bf16, Megatron's fused loss computes it in fp32 and casts it: 4 + 2 bytes per logit) and the
    output layer's weight gradient, before it is added to DDP's fp32 buffer. On an H200
    (single_gpu, 4096 tokens x 151,552 ids, bf16) this gives 3.9 GiB; the peak of the backward
    pass stood 4.65 GiB above the memory held after the forward pass."""
    n, a, h = shape.tokens(p), shape.act_bytes, m.hidden_size
    per_logit = F32 + a if a != F32 else F32
    return m.vocab_size / p.tensor * (n * per_logit + h * a)


def stage_bytes(m: ModelConfig, p: ParallelConfig, shape: Shape, recompute: str, layers: list[int],
                embedding: bool, output: bool) -> dict[str, float]:
    """What a pipeline stage (or one model chunk of it) keeps per micro-batch, by part."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r}: expected one of {', '.join(RECOMPUTE)}")
    n, a, h = shape.tokens(p), shape.act_bytes, m.hidden_size
    dense = sum(i < m.first_k_dense for i in layers)
    parts = {"dense layers": dense * layer_bytes(m, p, shape, False, recompute),
             "MoE layers": (len(layers) - dense) * layer_bytes(m, p, shape, True, recompute)}
    if not embedding:
        parts["stage input"] = n * h * a / p.tensor  # the received activation, held for the backward
    if output:
        parts["MTP"] = m.mtp_num_layers * mtp_bytes(m, p, shape, recompute)
        parts["output and loss"] = (n * _norm(h, a) / p.tensor  # final norm
                                    + (1 + m.mtp_num_layers) * head_bytes(m, p, shape))
    return parts


def recompute_working_set(m: ModelConfig, p: ParallelConfig, shape: Shape, layers: list[int], output: bool) -> float:
    """Full recomputation: the largest layer's activations, rebuilt during its backward pass."""
    candidates = [layer_bytes(m, p, shape, i >= m.first_k_dense, "none") for i in layers]
    if output and m.mtp_num_layers:
        candidates.append(mtp_bytes(m, p, shape, "none"))
    return max(candidates, default=0.0)


def held(p: ParallelConfig, pp_rank: int, microbatches: int, chunk_bytes: list[float]) -> float:
    """Peak bytes of activations a pipeline rank holds during a step of Megatron-Core's schedule,
    given what each of its model chunks keeps per micro-batch.

    Without pipelining one micro-batch at a time. 1F1B runs p - rank - 1 warm-up forward passes,
    then one forward and one backward at a time. The interleaved schedule runs
    2 (p - rank - 1) + (chunks - 1) p warm-up forwards, visiting the chunks in groups of p
    micro-batches (chunk (k mod p chunks) // p for the k-th forward, in reverse order for the
    backward passes), so a rank whose last chunk holds the output heads holds fewer of those."""
    stages, chunks = p.pipeline, p.virtual_stages
    if stages == 1:
        return chunk_bytes[0]
    total = microbatches * chunks
    if chunks == 1:
        warmup = min(stages - pp_rank - 1, total)
    else:
        warmup = min(2 * (stages - pp_rank - 1) + (chunks - 1) * stages, total)
    forward = [(k % (stages * chunks)) // stages for k in range(total)]
    live = peak = 0.0
    done = 0  # forward passes run
    for _ in range(warmup):
        live += chunk_bytes[forward[done]]
        done += 1
        peak = max(peak, live)
    for k in range(total):  # steady state, then cool-down: backward k after forward warmup + k
        if done < total:
            live += chunk_bytes[forward[done]]
            done += 1
            peak = max(peak, live)
        live -= chunk_bytes[chunks - 1 - forward[k]]
    return peak


def bubble(p: ParallelConfig, microbatches: int) -> float:
    """Idle fraction of a step added by the pipeline: (p - 1) / (chunks x micro-batches)."""
    return (p.pipeline - 1) / (p.virtual_stages * microbatches)
