"""The fast PyTorch path (impl=torch) against Megatron-Core's local modules (impl=local): fused
attention against the unfused core, grouped experts against the per-expert loop, packed documents
against separate runs. fp32 throughout, so the comparisons are tight on any CPU."""

import pytest
import torch

from model import experts as experts_mod
from model.attention import SDPAttention, dense_document_mask, document_block_mask
from model.build import build_model, resolve_impl
from model.sharding import gather_whole, load_whole_state
from pretrain.config import compose
from tests.megatron_helpers import positions, segments_of


@pytest.fixture(scope="module")
def pair(world1):
    """The tiny model on Megatron's local modules and on the fast path, with the same weights."""
    cfg = compose(["model=tiny"]).model
    torch.manual_seed(0)
    local = build_model(cfg, impl="local")
    fast = build_model(cfg, impl="torch")
    load_whole_state(fast, gather_whole(local))
    return cfg, local, fast


def test_auto_is_the_fast_path_without_transformer_engine():
    assert resolve_impl("auto") == "torch"
    with pytest.raises(ValueError, match="impl='fast'"):
        resolve_impl("fast")


def _grads(model, ids, mask):
    model.zero_grad()
    loss = model(ids, positions(ids), mask, labels=ids)
    (loss * torch.linspace(0.5, 1.5, loss.shape[-1])).sum().backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_same_loss_and_gradients_as_megatron_local_modules(pair, packed):
    cfg, local, fast = pair
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    mask = torch.stack([segments_of([10, 30, 5], 48), segments_of([48], 48)]) if packed else None
    ref_loss, ref = _grads(local, ids, mask)
    loss, got = _grads(fast, ids, mask)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == ref.keys() and any(".local_experts." in k for k in ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("impl", ["local", "torch"])
def test_packed_documents_see_only_themselves(pair, impl):
    """Each document of a packed row gets the logits it gets alone (positions restart per document)."""
    cfg, local, fast = pair
    model = {"local": local, "torch": fast}[impl]
    lengths = [7, 20, 12]
    docs = [torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)) for n in lengths]
    row = torch.cat(docs + [torch.zeros(1, 9, dtype=torch.long)], 1)
    pos = torch.cat([torch.arange(n) for n in lengths] + [torch.arange(9)])[None]
    seg = segments_of(lengths, row.shape[1])[None]

    def main_logits(ids, position_ids, mask):
        seen = []
        hook = model.output_layer.register_forward_hook(lambda m, i, o: seen.append(o[0].detach().clone()))
        try:
            with torch.no_grad():
                model(ids, position_ids, mask, labels=ids)
        finally:
            hook.remove()
        return seen[-1][:, 0]  # [s, b, vocab] -> the row's [s, vocab]

    packed = main_logits(row, pos, seg)
    at = 0
    for doc in docs:
        n = doc.shape[1]
        torch.testing.assert_close(packed[at:at + n], main_logits(doc, positions(doc), None), rtol=1e-4, atol=1e-5)
        at += n


def _cores(fast, local):
    return (fast.decoder.layers[0].self_attention.core_attention,
            local.decoder.layers[0].self_attention.core_attention)


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_sdpa_core_matches_the_unfused_core(pair, packed):
    cfg, local, fast = pair
    ours, theirs = _cores(fast, local)
    assert isinstance(ours, SDPAttention) and not isinstance(theirs, SDPAttention)
    s, b = 40, 2
    g = torch.Generator().manual_seed(5)
    q = torch.randn(s, b, cfg.num_attention_heads, cfg.head_dim, generator=g)
    k, v = (torch.randn(s, b, cfg.num_query_groups, cfg.head_dim, generator=g) for _ in range(2))
    seg = torch.stack([segments_of([5, 25], s), segments_of([40], s)]) if packed else None
    out_grad = torch.randn(s, b, cfg.num_attention_heads * cfg.head_dim, generator=g)
    results = []
    for core, mask in ((ours, seg), (theirs, None if seg is None else dense_document_mask(seg))):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = core(*x, mask)
        out.backward(out_grad)
        results.append((out.detach(), [t.grad for t in x]))
    (out, grads), (ref, ref_grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _random_rows(g: torch.Generator, rows: int, seq: int) -> torch.Tensor:
    out = []
    for _ in range(rows):
        lengths, left = [], seq - int(torch.randint(0, 12, (1,), generator=g))
        while left > 0:
            lengths.append(min(left, int(torch.randint(1, 60, (1,), generator=g))))
            left -= lengths[-1]
        out.append(segments_of(lengths, seq))
    return torch.stack(out)


def assert_tiles_listed(mask, visible: torch.Tensor, block: int) -> None:
    """A FlexAttention block mask against the dense truth `visible` [b, queries, keys], tile by tile:
    every tile holding a visible pair is listed, and a tile is listed as full (no mask evaluated,
    which the compiled kernels trust) exactly when it lies inside the sequence and is wholly
    visible."""
    b, sq, s = visible.shape
    nq, nk = -(-sq // block), -(-s // block)
    tiles = torch.nn.functional.pad(visible, (0, nk * block - s, 0, nq * block - sq)).view(b, nq, block, nk, block)
    any_visible, all_visible = tiles.any(-1).any(2), tiles.all(-1).all(2)
    for r in range(b):
        for qt in range(nq):
            partial = set(mask.kv_indices[r, 0, qt, :mask.kv_num_blocks[r, 0, qt]].tolist())
            full = set(mask.full_kv_indices[r, 0, qt, :mask.full_kv_num_blocks[r, 0, qt]].tolist())
            assert not partial & full
            for kt in range(nk):
                if any_visible[r, qt, kt]:  # listed by document-id ranges: a tile may be listed for nothing
                    assert kt in partial | full, (r, qt, kt)
                assert (kt in full) == bool(all_visible[r, qt, kt]), (r, qt, kt)


@pytest.mark.parametrize("seq", [64, 93])
def test_document_block_mask_lists_exactly_the_tiles_that_matter(seq):
    """Tiles listed as full are entirely visible; tiles left out hold no visible pair; every
    visible pair lies in a listed tile. The truth is the dense mask, tile by tile."""
    seg = _random_rows(torch.Generator().manual_seed(seq), 3, seq)
    assert_tiles_listed(document_block_mask(seg, block=16), ~dense_document_mask(seg)[:, 0], 16)


@pytest.mark.parametrize("seq", [64, 93])
def test_flex_attention_with_the_document_mask_equals_dense_attention(seq):
    """FlexAttention has no backward on CPU (torch 2.13): the forward here, the gradients in the
    GPU tier. Uncompiled it applies the mask function to every listed tile, full ones too, so this
    checks the mask function and that no visible tile is left out; the test above checks which
    tiles are listed as full, which the compiled kernels on a GPU trust."""
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(seq)
    seg = _random_rows(g, 2, seq)
    q = torch.randn(2, 4, seq, 16, generator=g)
    k, v = (torch.randn(2, 2, seq, 16, generator=g) for _ in range(2))
    out = flex_attention(q, k, v, block_mask=document_block_mask(seg, block=16), scale=0.3, enable_gqa=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~dense_document_mask(seg), scale=0.3,
                                                           enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("counts", [[3, 0, 9, 1, 0, 4, 2, 5], [0] * 7 + [24], [0] * 8],
                         ids=["some-empty", "one-expert", "no-tokens"])
@pytest.mark.parametrize("loop", [False, True], ids=["grouped_mm", "loop-fallback"])
def test_grouped_experts_match_the_per_expert_loop(pair, counts, loop, monkeypatch):
    cfg, local, fast = pair
    ours, theirs = fast.decoder.layers[1].mlp.experts, local.decoder.layers[1].mlp.experts
    assert isinstance(ours, experts_mod.GroupedExperts)
    if loop:
        monkeypatch.setitem(experts_mod._HAS_GROUPED_MM, (torch.device("cpu"), torch.float32), False)
    g = torch.Generator().manual_seed(sum(counts))
    tokens = torch.tensor(counts)
    x = torch.randn(sum(counts), cfg.hidden_size, generator=g)
    probs = torch.rand(sum(counts), generator=g)
    out_grad = torch.randn(sum(counts), cfg.hidden_size, generator=g)
    results = []
    for module in (ours, theirs):
        module.zero_grad()
        xi, pi = x.clone().requires_grad_(), probs.clone().requires_grad_()
        out, bias = module(xi, tokens, pi)
        assert bias is None
        out.backward(out_grad)
        grads = {k: p.grad for k, p in module.named_parameters()}
        results.append((out.detach(), xi.grad, pi.grad, grads))
    for got, want in zip(results[0][:3], results[1][:3]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for k, want in results[1][3].items():
        got = results[0][3][k]
        if want is None:  # the loop never touches an expert without tokens
            assert got is None or not got.any(), k
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_expert_weights_stay_views_of_one_tensor_through_training(world1):
    """Megatron's DDP and our optimizer update the expert weights in place, so the grouped GEMM
    reads them without a copy; a move (`.to()`) is noticed and the weights stacked again."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from optim.optimizer import Optimizer

    cfg = compose(["model=tiny", "optim=muon"])
    torch.manual_seed(0)
    model = build_model(cfg.model, impl="torch")
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = Optimizer(model, cfg.optim)
    module = model.decoder.layers[1].mlp.experts
    ids = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    before = module.local_experts[3].linear_fc2.weight.detach().clone()
    for _ in range(2):
        ddp.zero_grad_buffer()
        ddp(ids, positions(ids), None, labels=ids).mean().backward()
        optimizer.step(lr=1e-2)
    weight = module.local_experts[3].linear_fc2.weight
    assert not torch.equal(weight, before), "the expert was not trained"
    assert module.restacks == 0
    assert torch.equal(module._stacked["linear_fc2"][3], weight)

    model.to(torch.float64)
    x = torch.randn(6, cfg.model.hidden_size, dtype=torch.float64)
    counts = torch.tensor([0, 0, 0, 6, 0, 0, 0, 0])
    out, _ = module(x, counts, torch.ones(6, dtype=torch.float64))
    assert module.restacks == 2 and module._stacked["linear_fc2"].dtype == torch.float64  # fc1 and fc2
    expert = module.local_experts[3]
    ref = expert.linear_fc2.weight @ (torch.nn.functional.silu(x @ expert.linear_fc1.weight[:32].T)
                                      * (x @ expert.linear_fc1.weight[32:].T)).T
    torch.testing.assert_close(out, ref.T)


def test_fused_cross_entropy_only_where_the_logits_are_bf16(monkeypatch):
    """Megatron's native fused cross-entropy hands back the logits' gradient in bf16 whatever their
    dtype (measured: 0.18% relative error against the unfused loss on fp32 logits), so the fast
    path uses it on GPUs in bf16 only; Megatron's modules (`local`) never."""
    from model.build import transformer_config
    from model.config import ParallelConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    m = compose(["model=tiny"]).model
    fused = {(impl, dtype): transformer_config(m, ParallelConfig(), dtype=dtype, impl=impl,
                                               initialize=False).cross_entropy_loss_fusion
             for impl in ("torch", "local") for dtype in (torch.float32, torch.bfloat16)}
    assert fused == {("torch", torch.float32): False, ("torch", torch.bfloat16): True,
                     ("local", torch.float32): False, ("local", torch.bfloat16): False}
