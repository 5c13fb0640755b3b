"""Context parallelism on the PyTorch path (model/context_parallel.py, model/attention.py): the split of
a sequence over CP ranks against Megatron-Core's own, the attention over gathered keys and values
against the whole sequence's (causal, and packed documents across chunk boundaries), Megatron's
MTP shift across chunk edges and the token count MTP divides by, then whole training runs under
CP2, CP4, CP2+TP2, CP2+EP2 and CP2+PP2 against one process from the same initial weights, and a
stage that switches to CP (save, exit 75, restart under the new layout)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from model import context_parallel
from model.attention import dense_document_mask, document_block_mask
from tests import spawn
from tests.megatron_helpers import segments_of
from tests.test_fast_path import _random_rows, assert_tiles_listed
from tests.test_train import DP_STEPS, _by_rank, _loop, _run, scalars

pytestmark = pytest.mark.xdist_group("context_parallel")


# ---- the split ------------------------------------------------------------------------------------

class _Group:
    """What Megatron asks of a process group to split a batch: its size and this rank."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize("cp", [2, 4])
def test_each_rank_keeps_megatrons_two_chunks(world1, cp):
    """Tokens, labels, loss mask and positions as Megatron's `get_batch_on_this_cp_rank` splits them
    (rank r: chunks r and 2N-1-r), segment ids whole; together the ranks hold every position once."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    seq = 48
    g = torch.Generator().manual_seed(cp)
    batch = {"tokens": torch.randint(0, 99, (2, seq), generator=g),
             "labels": torch.randint(0, 99, (2, seq), generator=g),
             "loss_mask": torch.rand(2, seq, generator=g), "position_ids": torch.arange(seq).expand(2, seq),
             "segment_ids": torch.stack([segments_of([30, 18], seq)] * 2)}
    held = []
    for rank in range(cp):
        ours = context_parallel.split_batch(dict(batch), cp, rank)
        theirs = get_batch_on_this_cp_rank({k: v.clone() for k, v in batch.items() if k != "segment_ids"},
                                           _Group(cp, rank))
        for k, v in theirs.items():
            assert torch.equal(ours[k], v), k
        assert torch.equal(ours["segment_ids"], batch["segment_ids"])
        c = seq // (2 * cp)
        assert ours["position_ids"][0].tolist() == [*range(rank * c, (rank + 1) * c),
                                                    *range((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)]
        held += context_parallel.positions(seq, cp, rank).tolist()
    assert sorted(held) == list(range(seq))
    with pytest.raises(ValueError, match="sequence length 50 is not divisible by 2 x context=4"):
        context_parallel.positions(50, 2, 0)


def test_rotary_table_on_a_cpu_keeps_the_ranks_chunks():
    """model/cpu_support.py's stand-in for Megatron's `get_pos_emb_on_this_cp_rank` (which builds its
    index in pinned memory) keeps rows r and 2N-1-r of a chunked table."""
    from model import cpu_support

    table = torch.arange(32.0).view(32, 1, 1, 1)
    got = cpu_support._pos_emb_on_this_cp_rank(table, 0, _Group(4, 1))
    assert got.flatten().tolist() == [4.0, 5.0, 6.0, 7.0, 24.0, 25.0, 26.0, 27.0]


# ---- the masks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cp, rank", [(2, 0), (2, 1), (4, 3)])
def test_context_parallel_block_mask_lists_exactly_the_tiles_that_matter(cp, rank):
    """The FlexAttention block mask of a rank's queries (S/N of them) against the whole sequence's
    keys, tile by tile against the dense truth; then FlexAttention (forward, uncompiled, on the CPU)
    with it against SDPA with the dense mask."""
    from torch.nn.attention.flex_attention import flex_attention

    seq, block = 128, 16
    g = torch.Generator().manual_seed(10 * cp + rank)
    seg = _random_rows(g, 2, seq)
    where = context_parallel.positions(seq, cp, rank)
    visible = context_parallel.visible(where, seq, seg)[:, 0]  # [b, S/N, S]
    assert torch.equal(visible, ~dense_document_mask(seg)[:, 0][:, where])  # the same truth, rows picked
    mask = document_block_mask(seg, block=block, q_positions=where)
    assert_tiles_listed(mask, visible, block)
    q = torch.randn(2, 4, len(where), 8, generator=g)
    k, v = (torch.randn(2, 2, seq, 8, generator=g) for _ in range(2))
    out = flex_attention(q, k, v, block_mask=mask, scale=0.3, enable_gqa=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None], scale=0.3,
                                                           enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# ---- on two gloo ranks: attention, MTP's shift and count, RoPE ----------------------------------

def _pieces(rank: int) -> dict:
    """On each rank of a CP2 world: the CP attention's output and q/k/v gradients for this rank's
    positions, and the whole sequence's, causal and packed; Megatron's `roll_tensor` and the MTP
    token count as GPTModel sees them; the model's rotary table."""
    from megatron.core.models.gpt import gpt_model
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.multi_token_prediction import roll_tensor

    from model.attention import SDPAttention
    from model.build import build_model, transformer_config
    from model.config import ParallelConfig
    from pretrain.config import compose
    from pretrain.parallel import init_distributed, shutdown_distributed

    m = compose(["model=tiny"]).model
    init_distributed(ParallelConfig(context=2))
    try:
        from megatron.core import parallel_state as ps

        group = ps.get_context_parallel_group()
        model = build_model(m, ParallelConfig(context=2), impl="torch")  # installs MTP's count (the module)
        out = {"rope": model.rotary_pos_emb(64)}  # this rank's positions of the table, [32, 1, 1, d]
        whole = SDPAttention(transformer_config(m, ParallelConfig()), 1, AttnMaskType.causal, "self")
        part = SDPAttention(transformer_config(m, ParallelConfig(context=2)), 1, AttnMaskType.causal, "self")
        s, b = 64, 2
        g = torch.Generator().manual_seed(0)
        q = torch.randn(s, b, m.num_attention_heads, m.head_dim, generator=g)
        k, v = (torch.randn(s, b, m.num_query_groups, m.head_dim, generator=g) for _ in range(2))
        grad = torch.randn(s, b, m.num_attention_heads * m.head_dim, generator=g)
        # documents that cross the chunk boundaries (16, 32, 48), one alone in its chunk, padding
        packed = torch.stack([segments_of([10, 30, 5, 13], s), segments_of([20, 44], s)])
        where = context_parallel.positions(s, 2, rank)
        for name, seg in (("causal", None), ("packed", packed)):
            full = [t.clone().requires_grad_() for t in (q, k, v)]
            whole(*full, seg).backward(grad)
            mine = [t[where].clone().requires_grad_() for t in (q, k, v)]
            got = part(*mine, seg)
            got.backward(grad[where])
            with torch.no_grad():
                want = whole(q, k, v, seg)[where]
            out[name] = {"out": (got.detach(), want), **{f"d{x}": (t.grad, f.grad[where])
                                                        for x, t, f in zip("qkv", mine, full)}}
        # MTP's shift: Megatron rolls each rank's chunks and exchanges the edges
        labels = torch.arange(100, 100 + s).expand(b, s)
        mask = torch.ones(b, s)
        mask[:, -5:] = 0  # the end of the sequence carries no loss (rank 0 holds it)
        rolled, _ = roll_tensor(labels[:, where], shifts=-1, dims=-1, cp_group=group)
        want = torch.roll(labels, -1, dims=-1)
        want[:, -1] = 0
        out["roll"] = (rolled, want[:, where])
        shifted_mask = torch.roll(mask, -1, dims=-1)
        shifted_mask[:, -1] = 0
        _, count = gpt_model.roll_tensor(mask[:, where], shifts=-1, dims=-1, cp_group=group)
        out["count"] = (count, shifted_mask.sum() / 2)  # the whole sequence's, over N (see the module)
        return out
    finally:
        shutdown_distributed()


@pytest.fixture(scope="module")
def pieces(tmp_path_factory):
    return spawn.run(_pieces, 2, out_dir=str(tmp_path_factory.mktemp("pieces")))


@pytest.mark.distributed
@pytest.mark.parametrize("mask", ["causal", "packed"])
def test_attention_over_gathered_keys_equals_the_whole_sequences(pieces, mask):
    """Each rank's output and its queries' gradients are the whole sequence's at its positions; the
    keys' and values' gradients reach the ranks that hold them (the all-gather's reduce-scatter)."""
    for rank, got in enumerate(pieces):
        for name, (value, want) in got[mask].items():
            torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} {name}: {m}")


@pytest.mark.distributed
def test_mtp_shift_crosses_chunk_edges_and_counts_the_whole_sequence(pieces):
    """Megatron's CP-aware `roll_tensor` (MTP's labels, loss mask and inputs): each rank's chunks
    shifted by one as the whole sequence is, the first token of the next chunk pulled across the
    boundary from the rank that holds it; the count GPTModel divides MTP's loss by is the whole
    sequence's tokens over N (model/context_parallel.py), not this rank's."""
    for rank, got in enumerate(pieces):
        rolled, want = got["roll"]
        assert torch.equal(rolled, want), rank
        count, whole = got["count"]
        assert float(count) == float(whole), rank


@pytest.mark.distributed
def test_rotary_embedding_under_context_parallelism_is_the_ranks_rows(pieces, world1):
    from model.build import build_model
    from pretrain.config import compose

    m = compose(["model=tiny"]).model
    table = build_model(m, impl="torch").rotary_pos_emb(64)
    for rank, got in enumerate(pieces):
        assert torch.equal(got["rope"], table[context_parallel.positions(64, 2, rank)]), rank


# ---- training runs against one process ------------------------------------------------------------

PACKED = ["stages.general.packing=best_fit"]


def _runs(rank, runs, data_root, out_dir):
    """Several `tests.test_train._loop` runs in one world, one after the other, each with its own
    layout (the process group stays; Megatron's groups are made anew). `runs`: (name, overrides,
    save_state) with the initial weights in out_dir/state.pt."""
    from megatron.core import parallel_state as ps

    from pretrain import parallel

    shutdown, results = parallel.shutdown_distributed, {}
    parallel.shutdown_distributed = ps.destroy_model_parallel
    try:
        for name, overrides, save_state in runs:
            results[name] = _loop(rank, overrides, data_root, os.path.join(out_dir, name),
                                  os.path.join(out_dir, "state.pt"), save_state, False)
    finally:
        parallel.shutdown_distributed = shutdown
        shutdown()
    return results


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One process, from the weights it saves: the tiny experiment's first stage with concatenated
    sequences, and with best-fit packed documents."""
    from tests.data_helpers import tiny_corpus

    d = tmp_path_factory.mktemp("cp")
    data = tiny_corpus(d / "data")
    (one,) = spawn.run(_runs, 1, [("causal", [], True), ("packed", PACKED, False)], str(data), str(d),
                       out_dir=str(d / "o1"))
    return one, data, d


def _assert_same_run(got_steps, got_params, want_steps, want_params, params_atol):
    """Every logged scalar the single process logs, at every step; the final parameters."""
    assert got_steps.keys() == want_steps.keys() and len(want_steps) == DP_STEPS
    for step, want in want_steps.items():
        names = ["lm loss", "mtp_1 loss", "grad-norm", "params-norm", "seq_load_balancing_loss"] + \
            [k for k in want if k.startswith("moe/")]
        assert len(names) > 10
        for name in names:
            assert got_steps[step][name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), (step, name)
    assert got_params.keys() == want_params.keys()
    for name, want in want_params.items():
        torch.testing.assert_close(got_params[name], want, rtol=1e-4, atol=params_atol, msg=name)


# Packed rows: the parameters after 6 steps differ from one process's by up to 3.5e-4 (measured),
# as much as impl=torch and impl=local differ in one process on the same packed data (5.3e-4;
# 1.8e-6 without packing): the optimizer (Muon's Newton-Schulz, AdamW's division by the second
# moment) amplifies rounding in gradient entries that are ~0 in exact arithmetic. Losses, MTP loss,
# norms and expert load agree to 1e-5 all the same.
PARAMS_ATOL = {"causal": 1e-5, "packed": 1e-3}


@pytest.mark.distributed
def test_two_rank_layouts_give_the_single_process_run(references, tmp_path):
    """CP2 (concatenated sequences and packed documents) and CP2+EP2 on two gloo processes, one
    data-parallel replica, MTP on, clipping active: every scalar and the final parameters."""
    want, data, d = references
    shutil.copy(d / "state.pt", tmp_path / "state.pt")
    runs = [("cp2", ["parallel.context=2"], False), ("cp2-packed", ["parallel.context=2", *PACKED], False),
            ("cp2-ep2", ["parallel.context=2", "parallel.expert=2"], False)]
    results = spawn.run(_runs, 2, runs, str(data), str(tmp_path), out_dir=str(tmp_path / "o"))
    for name, ref in (("cp2", "causal"), ("cp2-packed", "packed"), ("cp2-ep2", "causal")):
        want_steps, _, want_params = want[ref]
        _assert_same_run(*_by_rank([r[name] for r in results]), want_steps, want_params, PARAMS_ATOL[ref])


@pytest.mark.distributed
def test_four_rank_layouts_give_the_single_process_run(references, tmp_path):
    """CP4, CP2 with TP2 (sequence parallelism) and CP2 with two pipeline stages on four gloo
    processes, one data-parallel replica each."""
    want, data, d = references
    shutil.copy(d / "state.pt", tmp_path / "state.pt")
    runs = [("cp4", ["parallel.context=4"], False), ("cp2-tp2", ["parallel.context=2", "parallel.tensor=2"], False),
            ("cp2-pp2", ["parallel.context=2", "parallel.pipeline=2"], False)]
    results = spawn.run(_runs, 4, runs, str(data), str(tmp_path), out_dir=str(tmp_path / "o"))
    want_steps, _, want_params = want["causal"]
    for name, _, _ in runs:
        _assert_same_run(*_by_rank([r[name] for r in results]), want_steps, want_params, PARAMS_ATOL["causal"])


# ---- a stage with its own layout -------------------------------------------------------------------

@pytest.mark.distributed
def test_a_stage_that_switches_to_context_parallelism_saves_exits_and_restarts_under_it(references, tmp_path):
    """Two processes: the first stage (seq 64) as two data-parallel replicas, the second (seq 128)
    under CP2. At the boundary the run saves and exits 75; the same command again runs the second
    stage under CP2 and gives, step by step, what a run given CP2 from that checkpoint gives."""
    _, data, _ = references
    run = tmp_path / "run"
    switch = ["stages.mixed.parallel.context=2", "stages.mixed.seq_length=128"]
    _run(data, run, *switch, nproc=2, expect=1)  # torchrun reports a worker's 75 as its own failure
    log = (run / "log.txt").read_text()
    assert "stage 1 'mixed' runs under another layout (context 2, data 1) than this one (data 2): saving step 12" \
        in log, log[-2000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000012"
    given = tmp_path / "given"
    shutil.copytree(run, given)

    out = _run(data, run, *switch, "train.max_steps=15", nproc=2)
    assert "layout context 2, data 1 (stage 'mixed')" in out and "resumed from" in out
    assert "switched to stage 1 'mixed' from 4,096 tokens" in out and "(64 tokens of each sequence per" in out
    _run(data, given, "parallel.context=2", "stages.mixed.seq_length=128", "train.max_steps=15", nproc=2)
    want, got = scalars(given), scalars(run)
    for name in ("lm loss", "mtp_1 loss", "grad-norm", "params-norm", "moe/expert_bias_std_layer_1"):
        assert [got[name][s] for s in (13, 14, 15)] == [want[name][s] for s in (13, 14, 15)], name


# ---- refusals --------------------------------------------------------------------------------------

def test_layouts_and_lengths_that_cannot_work_are_refused_before_starting(monkeypatch, tmp_path):
    from model.config import ConfigError
    from pretrain import train as train_mod
    from pretrain.config import compose

    with pytest.raises(ConfigError, match=r"tiny.yaml: stages.mixed: seq_length=90 \(data=tiny\) is not divisible "
                                          r"by 2 x parallel.context=2"):
        compose(["experiment=tiny", "stages.mixed.parallel.context=2", "stages.mixed.seq_length=90"])
    cfg = compose(["experiment=tiny", "stages.mixed.parallel.context=4"])
    with pytest.raises(ConfigError, match=r"stages.mixed \(its layout\): world size 2 is not divisible by "
                                          r"tensor\*pipeline\*context=4"):
        cfg.validate(world_size=2)
    cfg.validate(world_size=4)
    with pytest.raises(ConfigError, match=r"stages.mixed.parallel.contxt: Key 'contxt' not in 'ParallelConfig'"):
        compose(["experiment=tiny", "stages.mixed.parallel.contxt=2"])
    with pytest.raises(ConfigError, match=r"stages.general: parallel.context=2 with train.impl=local"):
        train_mod.check_impl_for_stages(compose(["experiment=tiny", "parallel.context=2"]), "local")
    # Transformer Engine is absent here: the check itself, as a run with it would make
    with pytest.raises(ConfigError, match=r"stages.mixed.packing=best_fit with train.impl=te"):
        train_mod.check_impl_for_stages(compose(["experiment=tiny"]), "te")
    train_mod.check_impl_for_stages(compose(["experiment=tiny", "stages.mixed.packing=concat"]), "te")
