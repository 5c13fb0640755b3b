"""GPU tier: the same model on CUDA in bf16, every layer implementation (Transformer Engine when
installed), FlexAttention's compiled document masks, both token dispatchers, a 32K-token step.

Skipped where CUDA is absent (conftest.py). Run with `pytest -m gpu tests/test_gpu.py`.
"""

import pytest
import torch

from model import build as build_mod
from model.build import build_model
from model.hf_mapping import hf_to_megatron, model_config_from_hf
from model.sharding import gather_whole, load_whole_state
from model.spec import have_transformer_engine
from pretrain.config import compose
from tests.hf_reference import hf_config, random_checkpoint
from tests.megatron_helpers import logits, positions, segments_of

pytestmark = pytest.mark.gpu

IMPLS = ["local", "torch", pytest.param("te", marks=pytest.mark.skipif(
    not have_transformer_engine(), reason="transformer_engine not installed"))]


@pytest.fixture
def checkpoint(world1, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hf, _, state, config_json = random_checkpoint(tmp_path, hf_config())
    return hf, state, model_config_from_hf(config_json)


def _model(cfg, state, impl, dtype=torch.float32):
    model = build_model(cfg, impl=impl, dtype=dtype).eval()
    load_whole_state(model, {k: v.to(dtype) for k, v in hf_to_megatron(state, cfg).items()})
    return model


@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_logits_match_transformers(checkpoint, impl):
    hf, state, cfg = checkpoint
    ids = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        ref = hf.cuda()(input_ids=ids).logits
        ours, _ = logits(_model(cfg, state, impl), ids)
    assert (ours - ref).abs().max().item() <= 2e-4


def test_bf16_stays_close_to_fp32(checkpoint):
    _, state, cfg = checkpoint
    ids = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        full, _ = logits(_model(cfg, state, "auto"), ids)
        half, _ = logits(_model(cfg, state, "auto", torch.bfloat16), ids)
    assert ((half.float() - full).abs().mean() / full.abs().mean()).item() < 0.05


def _loss_and_grads(model, ids, segments):
    model.zero_grad(set_to_none=True)
    loss = model(ids, positions(ids), segments, labels=ids)
    (loss.float() * torch.linspace(0.5, 1.5, loss.shape[-1], device=loss.device)).sum().backward()
    return loss.detach().float(), {k: p.grad.float() for k, p in model.named_parameters() if p.grad is not None}


def _relative(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


@pytest.fixture(scope="module")
def tiny_state(world1):
    torch.manual_seed(0)
    cfg = compose(["model=tiny"]).model
    return cfg, {k: v.cpu() for k, v in gather_whole(build_model(cfg, impl="local")).items()}


def _packed_rows(seq: int) -> torch.Tensor:
    """Documents across FlexAttention's 128-token tiles, padding at the end of the first row."""
    return torch.stack([segments_of([30, 140, 20], seq), segments_of([seq], seq)]).cuda()


def _run(cfg, state, impl, dtype, ids, segments):
    model = build_model(cfg, impl=impl, dtype=dtype)
    load_whole_state(model, {k: v.to(dtype).cuda() for k, v in state.items()})
    return _loss_and_grads(model, ids, segments)


def _flat(grads: dict, keys) -> torch.Tensor:
    return torch.cat([grads[k].flatten() for k in keys])


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed-flex"])
def test_fast_path_matches_megatron_local_modules_in_fp32(tiny_state, packed):
    """SDPA (or compiled FlexAttention with the document block mask) and grouped GEMMs against the
    unfused core and the per-expert loop: loss and every gradient."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg, state = tiny_state
    ids = torch.randint(0, cfg.vocab_size, (2, 200), generator=torch.Generator().manual_seed(1)).cuda()
    segments = _packed_rows(200) if packed else None
    ref_loss, ref = _run(cfg, state, "local", torch.float32, ids, segments)
    loss, got = _run(cfg, state, "torch", torch.float32, ids, segments)
    assert _relative(loss, ref_loss) < 1e-5
    assert got.keys() == ref.keys()
    worst = max(_relative(got[k], ref[k]) for k in ref if ref[k].norm() > 0)
    assert worst < 1e-4, worst


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed-flex"])
def test_fast_path_in_bf16_is_as_close_to_fp32_as_megatron_local_modules(tiny_state, packed):
    """In bf16 the two paths round differently, and a token whose top-k choice flips between them
    moves whole expert gradients, so neither is the other's reference: both are compared with the
    fp32 result, and the fast path must be no further from it than Megatron's own modules (plus a
    margin), for the loss and for all gradients together."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg, state = tiny_state
    ids = torch.randint(0, cfg.vocab_size, (2, 200), generator=torch.Generator().manual_seed(1)).cuda()
    segments = _packed_rows(200) if packed else None
    ref_loss, ref = _run(cfg, state, "local", torch.float32, ids, segments)
    keys = sorted(ref)
    errors = {}
    for impl in ("local", "torch"):
        loss, grads = _run(cfg, state, impl, torch.bfloat16, ids, segments)
        assert grads.keys() == ref.keys()
        errors[impl] = (_relative(loss, ref_loss), _relative(_flat(grads, keys), _flat(ref, keys)))
    print(f"bf16 against fp32 (loss, gradients): {errors}")
    for i in range(2):
        assert errors["torch"][i] <= 1.5 * errors["local"][i] + 5e-3, errors
    assert errors["torch"][0] < 2e-2 and errors["torch"][1] < 0.1, errors


def test_alltoall_and_allgather_dispatchers_agree(tiny_state, monkeypatch):
    cfg, state = tiny_state
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2)).cuda()
    make = build_mod.transformer_config
    results = {}
    for dispatcher in ("alltoall", "allgather"):
        def with_dispatcher(*a, _d=dispatcher, **kw):
            config = make(*a, **kw)
            config.moe_token_dispatcher_type = _d
            return config

        monkeypatch.setattr(build_mod, "transformer_config", with_dispatcher)
        model = build_model(cfg, impl="torch")
        assert model.decoder.layers[1].mlp.config.moe_token_dispatcher_type == dispatcher
        load_whole_state(model, {k: v.cuda() for k, v in state.items()})
        results[dispatcher] = _loss_and_grads(model, ids, None)
    (loss_a, grads_a), (loss_b, grads_b) = results["alltoall"], results["allgather"]
    assert _relative(loss_a, loss_b) < 1e-5
    assert max(_relative(grads_a[k], grads_b[k]) for k in grads_b if grads_b[k].norm() > 0) < 1e-4


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed-flex"])
def test_32k_tokens_through_an_air_width_two_layer_stack_fit_one_h100(world1, packed):
    """GLM-4.5-Air widths (96 query / 8 KV heads x 128, 128 experts), one dense and one MoE layer,
    32,768 tokens forward and backward in bf16 within an H100's 80 GB (the vocabulary is cut so
    that the logits do not dominate)."""
    cfg = compose(["model=glm45_air", "model.num_layers=2", "model.mtp_num_layers=0",
                   "model.vocab_size=4096"]).model
    seq = 32768
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg, impl="torch", dtype=torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), device="cuda")
    segments = None
    if packed:
        segments = torch.repeat_interleave(torch.arange(1, 9, device="cuda"), seq // 8)[None]
    loss, grads = _loss_and_grads(model, ids, segments)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"32K tokens, Air widths, 2 layers, packed={packed}: peak {peak:.1f} GiB")
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert peak < 78, f"peak {peak:.1f} GiB does not fit an H100 80GB"


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_context_parallel_attention_compiled_equals_the_whole_sequences(packed):
    """Context parallelism's attention as each of 4 ranks computes it (simulated in one process: its
    queries, the whole sequence's keys and values), through FlexAttention compiled with the block
    mask of S/N queries against S keys: each rank's rows of the whole attention, and key / value
    gradients that sum over the ranks to the whole's (what the reduce-scatter does)."""
    from model import context_parallel
    from model.attention import attend_as_context_rank

    seq, cp, g = 2048, 4, torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, seq, 64, generator=g).cuda()
    k, v = (torch.randn(1, 2, seq, 64, generator=g).cuda() for _ in range(2))
    grad = torch.randn(1, 8, seq, 64, generator=g).cuda()
    seg = (segments_of([300, 700, 129, 900, 19], seq)[None].cuda().int() if packed else None)
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    allowed = context_parallel.visible(torch.arange(seq).cuda(), seq, seg)  # dense, the reference
    out = torch.nn.functional.scaled_dot_product_attention(*whole, attn_mask=allowed, scale=0.125, enable_gqa=True)
    out.backward(grad)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for rank in range(cp):
        where = context_parallel.positions(seq, cp, rank).cuda()
        mine = [q[:, :, where].clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_()]
        part = attend_as_context_rank(*mine, seg, cp, rank, 0.125)
        part.backward(grad[:, :, where])
        torch.testing.assert_close(part, out[:, :, where], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine[0].grad, whole[0].grad[:, :, where], rtol=1e-4, atol=1e-5)
        dk += mine[1].grad
        dv += mine[2].grad
    torch.testing.assert_close(dk, whole[1].grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dv, whole[2].grad, rtol=1e-4, atol=1e-4)
