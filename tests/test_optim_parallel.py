"""Muon + AdamW under tensor, expert and data parallelism on CPU (gloo): the same parameters after
several steps as one process, and a checkpointed run that continues exactly, across layouts.

The exact comparisons run Newton-Schulz in fp32: they test the algorithm and its distribution, so
their verdict must not depend on whether this CPU multiplies bf16 natively. The bf16 path has its
own layout comparison at a tolerance derived from bf16 (`test_bf16_same_update_as_one_process`),
and the same comparison is shown to fail under each fault a real bug would introduce."""

import warnings

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("distributed")]

SEQ, BATCH, STEPS = 16, 4, 3


def _batch(step: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))


def _train(rank, layout, state_path, first, last, load_dir=None, save_dir=None, ns_dtype="fp32"):
    """Steps [first, last) of the tiny model through Megatron DDP and our optimizer.

    Returns the whole-model parameters and the optimizer's reports."""
    warnings.filterwarnings("ignore")
    from megatron.core import dist_checkpointing

    from model.sharding import gather_whole, load_whole_state
    from optim import checkpoint
    from optim.optimizer import Optimizer
    from pretrain.parallel import ParallelConfig, init_distributed, shutdown_distributed
    from tests.megatron_helpers import tiny_in_ddp

    parallel = ParallelConfig(**layout)
    init_distributed(parallel)
    try:
        cfg, model, ddp = tiny_in_ddp(parallel, state_path)
        opt = Optimizer(model, _optim_config(ns_dtype))
        if load_dir:
            loaded = dist_checkpointing.load(checkpoint.sharded_state_dict(opt), load_dir)
            checkpoint.load_sharded_state_dict(opt, loaded)
            model_state = torch.load(f"{load_dir}/model.pt")
            load_whole_state(model, model_state)
        reports = _steps(cfg, ddp, opt, first, last)
        whole = gather_whole(model)
        if save_dir:
            dist_checkpointing.save(checkpoint.sharded_state_dict(opt), save_dir)
            if torch.distributed.get_rank() == 0:
                torch.save(whole, f"{save_dir}/model.pt")  # the model's own checkpoint is not under test
        return whole, reports
    finally:
        shutdown_distributed()


def _optim_config(ns_dtype: str):
    from optim.config import OptimConfig

    cfg = OptimConfig(lr=0.02, weight_decay=0.1, clip_grad=0.5)
    cfg.muon.ns_dtype = ns_dtype
    return cfg


def _steps(cfg, ddp, opt, first, last):
    from megatron.core.distributed import finalize_model_grads

    from tests.megatron_helpers import data_parallel_share, positions

    reports = []
    for step in range(first, last):
        ids = data_parallel_share(_batch(step, cfg.vocab_size))
        ddp.zero_grad_buffer()
        ddp(ids, positions(ids), None, labels=ids).mean().backward()
        finalize_model_grads([ddp])
        reports.append(opt.step())
    return reports


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


# ---- bf16 Newton-Schulz: layout independence at bf16's tolerance, and the faults it catches ----

# One step, compared by the relative Frobenius error of each parameter's update. bf16 keeps 8
# significant bits (relative rounding up to 2^-8 ~ 0.4%); the runs start from gradients that differ
# in their last fp32 bits (reduction order), which bf16 rounding in the Newton-Schulz iterations
# turns into errors of a few bf16 units; a nearly rank-deficient block (an expert that saw few
# tokens) amplifies them most. Measured on the tiny model: at most 1.1% for DP2, 3.1% for TP2+SP
# (one such expert). A second step is no use here: its routing and gradients already follow the
# first step's bf16 differences (30-40% apart), so only the first step isolates the layout. Each
# fault below gives 75% or more.
BF16_UPDATE_RTOL = 0.10


def _drop_tp_shard(monkeypatch):
    """The gathered matrix lacks the last tensor-parallel rank's piece (zeros instead)."""
    from model import sharding
    from optim.optimizer import Optimizer

    gather = Optimizer._gather_tp

    def gather_missing_last(self, roles, pieces):
        out = gather(self, roles, pieces)
        for i, r in enumerate(roles):
            if r.tp_dim is not None:
                _, size, _ = sharding.tp_split(r.name)
                parts = [pieces[i]] * (size - 1) + [torch.zeros_like(pieces[i])]
                out[i] = sharding.join_pieces(parts, r.name, r.tp_dim)
        return out

    monkeypatch.setattr(Optimizer, "_gather_tp", gather_missing_last)


def _qkv_contiguous_thirds(monkeypatch):
    """Q, K and V taken as contiguous row ranges instead of per query group."""
    from optim.roles import Split

    views = Split.views

    def wrong_views(self, w):
        if self.kind != "qkv":
            return views(self, w)
        return list(w.split([self.groups * s for s in self.sizes], 0))

    monkeypatch.setattr(Split, "views", wrong_views)


def _no_all_gather(monkeypatch):
    """Owners update their parameters, but the other data-parallel ranks never receive them."""
    from optim import owners

    monkeypatch.setattr(owners, "share", lambda params, group: None)


FAULTS = {"tp_shard_dropped": _drop_tp_shard, "qkv_wrong_rows": _qkv_contiguous_thirds,
          "owner_not_all_gathered": _no_all_gather}


def _train_variants(rank, layout, state_path, faults):
    """One step in bf16 Newton-Schulz from the start state: once as written, then once under each
    fault in `faults`. Returns {variant: whole-model parameters}."""
    warnings.filterwarnings("ignore")
    from model.sharding import gather_whole
    from optim.optimizer import Optimizer
    from pretrain.parallel import ParallelConfig, init_distributed, shutdown_distributed
    from tests.megatron_helpers import tiny_in_ddp

    parallel = ParallelConfig(**layout)
    init_distributed(parallel)
    results = {}
    try:
        for variant in ("clean", *faults):
            with pytest.MonkeyPatch.context() as mp:
                if variant != "clean":
                    FAULTS[variant](mp)
                cfg, model, ddp = tiny_in_ddp(parallel, state_path)
                _steps(cfg, ddp, Optimizer(model, _optim_config("bf16")), 0, 1)
                results[variant] = gather_whole(model)
        return results
    finally:
        shutdown_distributed()


def _update_errors(got: dict, want: dict, start: dict) -> dict:
    """Per parameter: ||got - want|| / ||want - start||, the error relative to the update's size."""
    errors = {}
    for k, w in want.items():
        moved = (w - start[k]).norm()
        if moved > 0:
            errors[k] = ((got[k] - w).norm() / moved).item()
    return errors


@pytest.fixture(scope="module")
def bf16_reference(start):
    from tests import spawn

    d, state_path = start
    (result,) = spawn.run(_train_variants, 1, {}, state_path, [], out_dir=str(d / "bf16_ref"))
    return result["clean"]


@pytest.mark.parametrize("layout,faults", [
    ({}, ["owner_not_all_gathered", "qkv_wrong_rows"]),
    ({"tensor": 2}, ["tp_shard_dropped"]),
], ids=["DP2", "TP2+SP"])
def test_bf16_same_update_as_one_process(start, bf16_reference, tmp_path, layout, faults):
    from tests import spawn

    _, state_path = start
    initial = torch.load(state_path)
    for rank, got in enumerate(spawn.run(_train_variants, 2, layout, state_path, faults, out_dir=str(tmp_path))):
        errors = _update_errors(got["clean"], bf16_reference, initial)
        worst = max(errors, key=errors.get)
        assert errors[worst] < BF16_UPDATE_RTOL, f"rank {rank}: {worst} off by {errors[worst]:.3%} of its update"
        for fault in faults:
            errors = _update_errors(got[fault], bf16_reference, initial)
            assert max(errors.values()) > 5 * BF16_UPDATE_RTOL, f"rank {rank}: {fault} went unnoticed"


def _shared(rank, round_elements):
    """Three ranks own parameters of uneven sizes (rank 2 none); each rank starts with its own
    values in every parameter, and after `share` holds the owners'."""
    import torch.distributed as dist

    from optim import owners

    owners.ROUND_ELEMENTS = round_elements
    dist.init_process_group("gloo")
    try:
        shapes = [[(3, 5), (1,), (4, 4)], [(2, 7), (9,), (3, 4)], []]
        params = [[torch.full(s, float(100 * rank + 10 * owner + i)) for i, s in enumerate(ps)]
                  for owner, ps in enumerate(shapes)]
        owners.share(params, None)
        return [[p.clone() for p in ps] for ps in params]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("round_elements", [1 << 26, 8], ids=["one-round", "rounds-across-parameters"])
def test_share_gives_every_rank_the_owners_parameters(tmp_path, round_elements):
    """The all-gather of updated parameters, in one round or in rounds of 8 elements that cut
    through parameters (35 elements for the largest owner: 5 rounds, the last of 3)."""
    from tests import spawn

    got = spawn.run(_shared, 3, round_elements, out_dir=str(tmp_path))
    for params in got:
        for owner, ps in enumerate(params):
            for i, p in enumerate(ps):
                assert torch.equal(p, torch.full_like(p, float(100 * owner + 10 * owner + i))), (owner, i)
