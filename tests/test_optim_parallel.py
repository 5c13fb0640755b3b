"""Muon + AdamW under tensor, expert and data parallelism on CPU (gloo): the same parameters after
several steps as one process, and a checkpointed run that continues exactly, across layouts."""

import warnings

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("distributed")]

SEQ, BATCH, STEPS = 16, 4, 3


def _batch(step: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))


def _train(rank, layout, state_path, first, last, load_dir=None, save_dir=None):
    """Steps [first, last) of the tiny model through Megatron DDP and our optimizer.

    Returns the whole-model parameters and the optimizer's reports."""
    warnings.filterwarnings("ignore")
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import finalize_model_grads

    from model.sharding import gather_whole, load_whole_state
    from optim import checkpoint
    from optim.config import OptimConfig
    from optim.optimizer import Optimizer
    from pretrain.parallel import ParallelConfig, init_distributed, shutdown_distributed
    from tests.megatron_helpers import data_parallel_share, positions, tiny_in_ddp

    parallel = ParallelConfig(**layout)
    init_distributed(parallel)
    try:
        cfg, model, ddp = tiny_in_ddp(parallel, state_path)
        opt = Optimizer(model, OptimConfig(lr=0.02, weight_decay=0.1, clip_grad=0.5))
        if load_dir:
            loaded = dist_checkpointing.load(checkpoint.sharded_state_dict(opt), load_dir)
            checkpoint.load_sharded_state_dict(opt, loaded)
            model_state = torch.load(f"{load_dir}/model.pt")
            load_whole_state(model, model_state)
        reports = []
        for step in range(first, last):
            ids = data_parallel_share(_batch(step, cfg.vocab_size))
            ddp.zero_grad_buffer()
            ddp(ids, positions(ids), None, labels=ids).mean().backward()
            finalize_model_grads([ddp])
            reports.append(opt.step())
        whole = gather_whole(model)
        if save_dir:
            dist_checkpointing.save(checkpoint.sharded_state_dict(opt), save_dir)
            if torch.distributed.get_rank() == 0:
                torch.save(whole, f"{save_dir}/model.pt")  # the model's own checkpoint is not under test
        return whole, reports
    finally:
        shutdown_distributed()


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    from tests.test_distributed import _random_state

    d = tmp_path_factory.mktemp("optim")
    state_path = str(d / "state.pt")
    torch.save(_random_state(), state_path)
    return d, state_path


@pytest.fixture(scope="module")
def reference(start):
    """One process, STEPS steps from the start state."""
    from tests import spawn

    d, state_path = start
    (result,) = spawn.run(_train, 1, {}, state_path, 0, STEPS, out_dir=str(d / "ref"))
    return result


def _assert_same(got: dict, want: dict, what: str):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=2e-4, atol=2e-5, msg=lambda m: f"{what}: {k}: {m}")


def test_reference_run_moves_every_parameter(start, reference):
    _, state_path = start
    initial = torch.load(state_path)
    params, reports = reference
    assert not any(r.skipped for r in reports) and all(r.clip_factor < 1 for r in reports)
    unchanged = [k for k in initial if not k.endswith(("local_tokens_per_expert", "expert_bias"))
                 and torch.equal(initial[k], params[k])]
    assert not unchanged


@pytest.mark.parametrize("layout", [{}, {"expert": 2}, {"tensor": 2}, {"tensor": 2, "expert": 2}],
                         ids=["DP2", "EP2+DP2", "TP2+SP", "TP2+SP+EP2"])
def test_same_parameters_as_one_process(start, reference, tmp_path, layout):
    from tests import spawn

    _, state_path = start
    want, want_reports = reference
    for rank, (got, reports) in enumerate(spawn.run(_train, 2, layout, state_path, 0, STEPS, out_dir=str(tmp_path))):
        _assert_same(got, want, f"rank {rank}")
        for r, w in zip(reports, want_reports):
            assert r.grad_norm == pytest.approx(w.grad_norm, rel=1e-5)


@pytest.mark.parametrize("save_layout,load_layout,load_world", [
    ({"expert": 2}, {"expert": 2}, 2), ({"expert": 2}, {"tensor": 2}, 2), ({"tensor": 2}, {}, 1)],
    ids=["EP2->EP2", "EP2->TP2", "TP2->one"])
def test_checkpoint_resume_continues_exactly(start, reference, tmp_path, save_layout, load_layout, load_world):
    from tests import spawn

    _, state_path = start
    want, _ = reference
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    ckpt = str(ckpt)
    spawn.run(_train, 2, save_layout, state_path, 0, STEPS - 1, None, ckpt, out_dir=str(tmp_path / "a"))
    results = spawn.run(_train, load_world, load_layout, state_path, STEPS - 1, STEPS, ckpt, out_dir=str(tmp_path / "b"))
    for rank, (got, _) in enumerate(results):
        _assert_same(got, want, f"resumed rank {rank}")
