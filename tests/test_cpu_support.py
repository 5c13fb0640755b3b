"""Each CPU patch of model/cpu_support.py, tested for what it exists to make work."""

import pytest
import torch

from model import cpu_support

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")


def test_install_is_idempotent_and_active_without_cuda():
    assert cpu_support.install() is True
    assert cpu_support.install() is True


def test_router_buffers_live_on_cpu(world1):
    from model.build import build_model
    from pretrain.config import compose

    model = build_model(compose(["model=tiny"]).model, impl="local")
    router = model.decoder.layers[1].mlp.router
    assert torch.cuda.current_device() == torch.device("cpu")
    assert router.expert_bias.device.type == "cpu" and router.local_tokens_per_expert.device.type == "cpu"


def test_rng_tracker_keeps_separate_streams_and_restores_the_default(world1):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(5)
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    with get_cuda_rng_tracker().fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the tracked stream advanced
    model_parallel_cuda_manual_seed(5)
    with get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), a)  # and is reproducible from the seed


def test_router_gating_runs_without_transformer_engine():
    from megatron.core.transformer.moe import moe_utils

    cpu_support.install()
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    out = moe_utils.router_gating_linear(x, w, None, torch.float32)
    torch.testing.assert_close(out, x @ w.T)


def test_default_causal_mask_is_built_on_cpu():
    from megatron.core.fusions import fused_softmax

    cpu_support.install()
    mask = fused_softmax.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and torch.equal(mask, torch.ones(4, 4, dtype=torch.bool).triu(1))


def test_synchronize_is_a_no_op():
    cpu_support.install()
    assert torch.cuda.synchronize() is None


def test_model_trains_without_an_explicit_mask(world1):
    """The whole model, loss and backward on CPU, with Megatron's implicit causal mask."""
    from model.build import build_model
    from pretrain.config import compose
    from tests.megatron_helpers import positions

    model = build_model(compose(["model=tiny"]).model, impl="local")
    ids = torch.randint(0, 256, (2, 16))
    model(ids, positions(ids), None, labels=ids).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "experts" not in n)


def test_embedding_setup_moves_nothing_to_cuda():
    """Under pipeline parallelism the last stage's copy of the word embedding (for MTP) is moved
    with `.cuda()` at construction; on CPU that must leave it where it is, and only there."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    cpu_support.install()
    assert hasattr(LanguageModule.setup_embeddings_and_output_layer, "__wrapped__")
    original = torch.Tensor.cuda
    seen = []
    cpu_support._keep_on_cpu(lambda t: seen.append(t.cuda()))(t := torch.ones(2))
    assert seen[0] is t and torch.Tensor.cuda is original
    with pytest.raises((AssertionError, RuntimeError)):  # outside it, .cuda() still fails without CUDA
        torch.ones(2).cuda()
