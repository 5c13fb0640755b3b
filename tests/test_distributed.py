"""Tensor and expert parallelism on CPU (gloo): the same loss and gradients as one process."""

import warnings

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("distributed")]

SEQ, BATCH = 32, 2


def _step(rank, parallel_kw, state_path, impl="local"):
    """One forward/backward of the tiny model through Megatron's DDP on packed rows; returns (loss,
    whole grads)."""
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    from model.sharding import gather_whole
    from pretrain.parallel import ParallelConfig, init_distributed, shutdown_distributed
    from tests.megatron_helpers import data_parallel_share, positions, segments_of, tiny_in_ddp

    parallel = ParallelConfig(**parallel_kw)
    init_distributed(parallel)
    try:
        cfg, model, ddp = tiny_in_ddp(parallel, state_path, impl)
        ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
        # each data-parallel replica takes its share of the batch
        # packed rows: three documents and padding, and one document
        segments = torch.stack([segments_of([SEQ // 4, SEQ // 4, SEQ // 2 - 3], SEQ), segments_of([SEQ], SEQ)])
        ids, segments = data_parallel_share(ids), data_parallel_share(segments)
        dp = ps.get_data_parallel_world_size()
        loss = ddp(ids, positions(ids), segments, labels=ids).mean()
        loss.backward()
        finalize_model_grads([ddp])
        total = loss.detach().clone()
        torch.distributed.all_reduce(total, group=ps.get_data_parallel_group())
        grads = gather_whole(model, lambda t: getattr(t, "main_grad", None))
        return total.item() / dp, grads
    finally:
        shutdown_distributed()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random whole-model state and the single-process loss and gradients for it."""
    from tests import spawn

    d = tmp_path_factory.mktemp("ref")
    state_path = str(d / "state.pt")
    torch.save(_random_state(), state_path)
    (result,) = spawn.run(_step, 1, {}, state_path, out_dir=str(d / "out"))
    return state_path, result


def _random_state():
    from model.build import build_model
    from model.sharding import gather_whole
    from pretrain.config import compose
    from pretrain.parallel import single_process

    with single_process():
        torch.manual_seed(3)
        model = build_model(compose(["model=tiny"]).model, impl="local")
        state = gather_whole(model)
    g = torch.Generator().manual_seed(4)
    for k, v in state.items():  # norms and biases away from their trivial initial values
        if "norm" in k or k.endswith("bias"):
            v.add_(0.1 * torch.randn(v.shape, generator=g))
    return state


@pytest.mark.parametrize("impl", ["local", "torch"])
@pytest.mark.parametrize("layout", [{"expert": 2}, {"tensor": 2}, {"tensor": 2, "expert": 2},
                                    {"tensor": 2, "expert_tensor": 2}],
                         ids=["EP2", "TP2+SP", "TP2+SP+EP2", "TP2+SP+ETP2"])
def test_same_loss_and_gradients_as_one_process(reference, tmp_path, layout, impl):
    """Megatron's local modules or the fast PyTorch path (SDPA, grouped experts) under tensor and
    expert parallelism, against one process on Megatron's local modules."""
    from tests import spawn

    state_path, (ref_loss, ref_grads) = reference
    world = 2
    results = spawn.run(_step, world, layout, state_path, impl, out_dir=str(tmp_path))
    for rank, (loss, grads) in enumerate(results):
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6), f"rank {rank}"
        assert grads.keys() == ref_grads.keys()
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert any(g.abs().max() > 0 for k, g in ref_grads.items() if "experts.local_experts" in k)
