"""The token loader: exact resume, determinism, disjoint readers, mixture proportions, packing,
layout and stage changes - on synthetic datasets whose tokens name their documents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.format import DataError
from data.loader import TokenLoader
from data.packing import best_fit
from data.stream import ErrorPolicy, SlotStream, open_dataset, slot_shards
from tests.data_helpers import config, docs_in, synthetic

pytestmark = pytest.mark.xdist_group("data")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    lengths = synthetic(root / "a", "a", 400, base=1000, seed=1)
    lengths.update(synthetic(root / "b", "b", 300, base=20000, seed=2))
    return root, lengths


def equal(xs, ys):
    return len(xs) == len(ys) and all(torch.equal(x[k], y[k]) for x, y in zip(xs, ys) for k in x)


@pytest.mark.parametrize("packing,workers", [("concat", 2), ("best_fit", 2), ("concat", 0)])
def test_resume_continues_exactly(root, packing, workers):
    cfg = config(root[0], {"a": 0.6, "b": 0.4}, seq_length=256, packing=packing, num_workers=workers,
                 shuffle_window=8, pack_window=4)
    whole = TokenLoader(cfg, micro_batch=3).take(35)
    first = TokenLoader(cfg, micro_batch=3)
    head = first.take(11)
    resumed = TokenLoader(cfg, micro_batch=3, states=[first.state_dict()])
    assert equal(whole[:30], head + resumed.take(19))
    # resuming a resumed loader continues as well
    again = TokenLoader(cfg, micro_batch=3, states=[resumed.state_dict()])
    assert equal(whole[30:], again.take(5))


def test_deterministic_per_seed(root):
    cfg = config(root[0], {"a": 1.0}, seq_length=128, num_workers=0)
    assert equal(TokenLoader(cfg, 2).take(5), TokenLoader(cfg, 2).take(5))
    other = config(root[0], {"a": 1.0}, seq_length=128, num_workers=0, seed=7)
    assert not equal(TokenLoader(cfg, 2).take(5), TokenLoader(other, 2).take(5))


def test_concat_keeps_every_token_once(root):
    """Sequences overlap by exactly one token: inputs + the last label reproduce the slot's token stream."""
    cfg = config(root[0], {"a": 1.0}, seq_length=100, num_workers=0, shuffle_window=1)
    batches = TokenLoader(cfg, 1).take(20)
    for prev, nxt in zip(batches, batches[1:]):
        assert prev["labels"][0, -1] == nxt["tokens"][0, 0]
        assert torch.equal(prev["tokens"][0, 1:], prev["labels"][0, :-1])
    ds = open_dataset("a", str(root[0] / "a"))
    stream = SlotStream(ds, 0, 1, cfg.seed, 1, ds.vocab_size, ErrorPolicy())
    expected = np.concatenate([next(stream)[0] for _ in range(20)])[:2001]
    got = np.concatenate([b["tokens"][0].numpy() for b in batches] + [batches[-1]["labels"][0, -1:].numpy()])
    assert np.array_equal(got, expected)


def test_readers_are_disjoint_and_cover_each_epoch(root):
    ds = open_dataset("a", str(root[0] / "a"))
    n_slots = 6
    seen = []
    for slot in range(n_slots):
        stream = SlotStream(ds, slot, n_slots, 5, 4, ds.vocab_size, ErrorPolicy())
        n = sum(ds.samples[s] for s in slot_shards(ds, 5, 0, slot, n_slots))
        seen.append([tuple(next(stream)[1]["docs"]) for _ in range(n)])
        assert stream.position()["epoch"] == 0
    flat = [d for slot in seen for sample in slot for d in sample]
    assert len(flat) == len(set(flat)) == 400  # every document once, no two readers share one
    # the next epoch reshuffles the shards among the readers
    assert slot_shards(ds, 5, 0, 0, n_slots) != slot_shards(ds, 5, 1, 0, n_slots)


def test_ranks_and_workers_read_different_documents(root):
    cfg = config(root[0], {"a": 1.0}, seq_length=64, num_workers=2, shuffle_window=4)
    per_rank = [set(docs_in(TokenLoader(cfg, 2, rank=r, n_ranks=2).take(8))) for r in range(2)]
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]


def test_mixture_matches_weights_in_tokens(root):
    _, lengths = root
    cfg = config(root[0], {"a": 0.7, "b": 0.3}, seq_length=128, num_workers=2)
    batches = TokenLoader(cfg, 4).take(50)
    tokens = torch.cat([b["tokens"].flatten() for b in batches])
    from_b = int(((tokens >= 20000)).sum())
    from_a = int(((tokens >= 1000) & (tokens < 20000)).sum())
    share = from_a / (from_a + from_b)
    # deterministic round-robin: within one sequence per worker of the 70/30 split (plus EOD noise)
    assert abs(share - 0.7) < 2 * 128 / (from_a + from_b) + 0.01


def test_best_fit_matches_reference_and_keeps_documents_whole(root):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=300).tolist()
    bins = best_fit(lengths, 128)
    # reference: scan every bin for the tightest fit, items longest first
    ref, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [(room[b] - lengths[i], b) for b in range(len(ref)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits)[1]
        else:
            b = len(ref)
            ref.append([])
            room.append(128)
        ref[b].append(i)
        room[b] -= lengths[i]
    assert [sorted(b) for b in ref] == bins
    assert sorted(i for b in bins for i in b) == list(range(300))

    cfg = config(root[0], {"a": 1.0}, seq_length=256, packing="best_fit", num_workers=0, pack_window=4)
    batch = TokenLoader(cfg, 8).take(1)[0]
    for row in range(8):
        tok, lab, mask, pos, seg = (batch[k][row] for k in ("tokens", "labels", "loss_mask", "position_ids",
                                                                "segment_ids"))
        for s in set(seg.tolist()) - {0}:
            idx = (seg == s).nonzero().flatten()
            doc = tok[idx]
            assert torch.equal(pos[idx], torch.arange(len(idx)))
            assert mask[idx[-1]] == 0 and bool(mask[idx[:-1]].all())
            assert torch.equal(lab[idx[:-1]], doc[1:])
            assert len(set(doc[doc != 0].tolist())) <= 1  # one document per segment
        assert mask[seg == 0].sum() == 0
    assert 0.5 < float(batch["loss_mask"].mean()) <= 1.0


def test_layout_change_repeats_nothing(root):
    """dp=2 x 1 worker, then resumed as dp=1 x 1 worker: run 2 sees no document run 1 saw in the epoch."""
    a_root = root[0]
    cfg = config(a_root, {"a": 1.0}, seq_length=64, num_workers=0, shuffle_window=4)
    old = [TokenLoader(cfg, 2, rank=r, n_ranks=2) for r in range(2)]
    seen_before = set()
    for loader in old:
        seen_before |= set(docs_in(loader.take(5)))
    states = [loader.state_dict() for loader in old]
    new = TokenLoader(cfg, 2, rank=0, n_ranks=1, states=states)
    excluded = {int(s) for s in new.worker_states[0]["sources"]["a"]["exclude"]["0"]}
    ds = new.datasets[0]
    left = [s for s in slot_shards(ds, cfg.seed, 0, 0, 1) if s not in excluded]
    tokens_left = sum(ds.manifest["shards"][s]["tokens"] for s in left)
    seen_after = docs_in(new.take(tokens_left // (2 * 64)))
    assert seen_before and seen_after
    assert not seen_before & set(seen_after)
    # at most the rest of the started shards is skipped: all other documents are still to come
    assert len(excluded) <= 2 * 2  # each old reader started at most the shards of one window


def test_a_size_change_delivers_nothing_twice_and_counts_what_it_drops(root):
    """data.record: 3 readers, then resumed as 2 (a lost node). Over the first epoch, what the old and
    the new readers delivered (the record) holds no stored sample twice, and with what the re-deal
    counted as dropped (the rest of each old reader's started shards) it is every sample of the epoch."""
    cfg = config(root[0], {"a": 1.0}, seq_length=64, num_workers=0, shuffle_window=4, record=True)
    old = [TokenLoader(cfg, 2, rank=r, n_ranks=3) for r in range(3)]
    for loader in old:
        loader.take(4)
    assert old[0].redealt is None
    delivered = [r for loader in old for r in loader.delivered]
    new = [TokenLoader(cfg, 2, rank=r, n_ranks=2, states=[lo.state_dict() for lo in old]) for r in range(2)]
    assert new[0].redealt == new[1].redealt and new[0].redealt["from_readers"] == 3
    for loader in new:
        batches = iter(loader)
        for _ in range(2000):  # until this reader is into the next epoch
            if any(r[0] > 0 for r in loader.delivered):
                break
            next(batches)
        else:
            raise AssertionError("a new reader never finished the first epoch")
        delivered += loader.delivered
    first_epoch = [r[1:] for r in delivered if r[0] == 0]
    assert len(first_epoch) == len(set(first_epoch)), "a stored sample was delivered twice"
    dropped = new[0].redealt["dropped_samples"]
    assert 0 < dropped and len(first_epoch) + dropped == sum(new[0].datasets[0].samples)


def test_stage_change_continues_each_source(root):
    """A new stage (other length and packing, one new source) picks each kept source up where it was."""
    stage1 = config(root[0], {"a": 1.0}, seq_length=128, num_workers=0, shuffle_window=4)
    first = TokenLoader(stage1, 2)
    seen1 = set(docs_in(first.take(6)))
    stage2 = config(root[0], {"a": 0.5, "b": 0.5}, seq_length=256, packing="best_fit", num_workers=0,
                    shuffle_window=4, pack_window=2)
    second = TokenLoader(stage2, 2, states=[first.state_dict()])
    seen2 = docs_in(second.take(6))
    a2 = {d for d in seen2 if d < 20000}
    assert a2 and {d for d in seen2 if d >= 20000}
    # the document cut at the stage boundary may show in both; nothing else does
    assert len(seen1 & a2) <= 1


def test_bad_state_is_refused(root):
    cfg = config(root[0], {"a": 1.0}, seq_length=64, num_workers=0)
    loaders = [TokenLoader(cfg, 1, rank=r, n_ranks=2) for r in range(2)]
    with pytest.raises(DataError, match="3 rank states given, the saved run had 2; pass every rank"):
        TokenLoader(cfg, 1, states=[loaders[0].state_dict()] * 3)


def test_pipe_urls_with_brace_expansion_read_the_same_tokens(root):
    """Shards read through a `pipe:` command (as from an object store) give what local paths give."""
    a = root[0] / "a"
    n = len(list(a.glob("shard-*.tar")))
    local = config(root[0], {"a": 1.0}, seq_length=128, num_workers=0)
    piped = config(root[0], {"a": 1.0}, seq_length=128, num_workers=0)
    piped.sources[0].path = f"pipe:cat {a}/manifest.json"
    piped.sources[0].urls = f"pipe:cat {a}/shard-{{000000..{n - 1:06d}}}.tar"
    assert equal(TokenLoader(local, 2).take(10), TokenLoader(piped, 2).take(10))
    piped.sources[0].urls = f"pipe:cat {a}/shard-{{000000..{n - 2:06d}}}.tar"
    with pytest.raises(DataError, match=f"expand to {n - 1} shards, but .* lists {n}"):
        TokenLoader(piped, 2)


def test_held_out_shards_are_never_trained_on(root):
    """holdout_shards=1: validation reads exactly the last shard of each source; training never does."""
    from data.stream import open_dataset

    cfg = config(root[0], {"a": 1.0}, seq_length=64, num_workers=0, holdout_shards=1)
    ds = open_dataset("a", str(root[0] / "a"))
    train, val = TokenLoader(cfg, 2), TokenLoader(cfg, 2, part="validation")
    assert val.datasets[0].urls == ds.urls[-1:] and train.datasets[0].urls == ds.urls[:-1]
    seen_train = set(docs_in(train.take(200)))
    seen_val = set(docs_in(val.take(10)))
    assert seen_val and seen_train and not seen_train & seen_val
    with pytest.raises(DataError, match=r"source .a.: no validation part \(holdout_shards is 0\)"):
        TokenLoader(config(root[0], {"a": 1.0}, seq_length=64, num_workers=0), 2, part="validation")
