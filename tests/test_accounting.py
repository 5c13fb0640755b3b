"""Parameter counts read off the meta-built model, against counts computed here from the config."""

import re

import pytest

from model.accounting import count_parameters, flops_by_part, train_flops_per_token
from model.build import build_model, stage_plan
from plan.info import main as model_info
from pretrain.config import compose
from pretrain.parallel import ParallelConfig

PUBLISHED = {"glm45": (355e9, 32e9), "glm45_air": (106e9, 12e9)}


def expected_parts(m):
    """Per-part parameter counts of one model, straight from the architecture."""
    h, q, kv, d = m.hidden_size, m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim, m.head_dim
    attention = h * (q + 2 * kv) + (q + 2 * kv) * m.qkv_bias + q * h + 2 * d * m.qk_norm
    moe = dict(experts=m.num_experts * 3 * h * m.moe_ffn_hidden_size,
               shared_experts=m.num_shared_experts * 3 * h * m.moe_ffn_hidden_size, router=m.num_experts * h)
    main = dict(attention=m.num_layers * attention, dense_mlp=m.first_k_dense * 3 * h * m.ffn_hidden_size,
                norms=2 * h * m.num_layers + h, **{k: v * m.num_moe_layers for k, v in moe.items()})
    mtp = dict(attention=attention, norms=2 * h + 3 * h, mtp_proj=2 * h * h, **moe)
    return main, {k: v * m.mtp_num_layers for k, v in mtp.items()}, m.vocab_size * h


@pytest.fixture(scope="module")
def built(world1):
    out = {}
    for name in ("glm45", "glm45_air", "smoke"):
        m = compose([f"model={name}"]).model
        out[name] = (m, count_parameters(build_model(m, meta=True), m))
    return out


@pytest.mark.parametrize("name", ["glm45", "glm45_air", "smoke"])
def test_each_part_counts_exactly(built, name):
    m, counts = built[name]
    main, mtp, embedding = expected_parts(m)
    assert {k: v for k, v in counts.main.items() if v} == {k: v for k, v in main.items() if v}
    assert {k: v for k, v in counts.mtp.items() if v} == {k: v for k, v in mtp.items() if v}
    assert counts.embedding == counts.output == embedding


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_default_lines_are_within_two_percent_of_published(built, name):
    _, counts = built[name]
    total, active = PUBLISHED[name]
    assert counts.default_total == pytest.approx(total, rel=0.02)
    assert counts.default_active == pytest.approx(active, rel=0.02)


def test_hand_counted_conventions(built):
    """The figures of GLM45_FACTS.md, counted by hand there."""
    for name, main, mtp, emb, active in (("glm45", 351.25, 3.99, 1.55, 32.08),
                                         ("glm45_air", 105.61, 2.38, 1.24, 12.18)):
        c = built[name][1]
        assert c.total(mtp=False, embeddings=False) / 1e9 == pytest.approx(main, abs=0.01)
        assert (c.total(mtp=True, embeddings=False) - c.total(mtp=False, embeddings=False)) / 1e9 == pytest.approx(mtp, abs=0.01)
        assert (c.embedding + c.output) / 1e9 == pytest.approx(emb, abs=0.01)
        assert c.active(mtp=False, embeddings=False) / 1e9 == pytest.approx(active, abs=0.01)


def test_smoke_model_has_tens_of_millions_of_parameters(built):
    assert 10e6 < built["smoke"][1].total(mtp=True, embeddings=True) < 100e6


@pytest.mark.parametrize("name,gflop", [("glm45", 230.7), ("glm45_air", 95.4)])
def test_training_flops_per_token(name, gflop):
    assert train_flops_per_token(compose([f"model={name}"]).model, 4096) / 1e9 == pytest.approx(gflop, abs=0.05)


@pytest.mark.parametrize("name", ["tiny", "smoke", "single_gpu", "glm45_air", "glm45"])
def test_flops_by_part_add_up_to_the_total(name):
    m = compose([f"model={name}"]).model
    assert sum(flops_by_part(m, 4096).values()) == pytest.approx(train_flops_per_token(m, 4096), rel=1e-12)


def test_flops_by_part_of_single_gpu_by_hand():
    """Counted by hand from configs/model/single_gpu.yaml: two output heads (main and MTP) of
    1536 x 151,552, 24 layers of 24 query heads x 128 at sequence 4096, 23 MoE layers + MTP of top-8
    experts of 384."""
    parts = flops_by_part(compose(["model=single_gpu"]).model, 4096)
    assert parts["output layer"] == 6 * 2 * 1536 * 151552
    assert parts["attention scores"] == 6 * 24 * 3072 * 4096
    assert parts["attention projections"] == 6 * 24 * (1536 * (3072 + 2 * 512) + 3072 * 1536)
    assert parts["routed experts"] == 6 * 24 * 8 * 3 * 1536 * 384
    assert parts["shared experts"] == 6 * 24 * 3 * 1536 * 384
    assert parts["dense MLP"] == 6 * 3 * 1536 * 4608
    assert parts["MTP projection and norms"] == 6 * (3 * 1536 + 2 * 1536 * 1536)


def test_model_info_prints_labelled_conventions(world1, capsys):
    assert model_info(["model=glm45_air", "parallel.tensor=2", "parallel.expert=8", "parallel.pipeline=2"]) == 0
    out = capsys.readouterr().out
    assert "total parameters:  106.85B" in out and "active per token:  12.18B" in out
    assert "decoder + MTP + embedding/output [everything trained]" in out
    assert "training FLOPs per token at seq 4096: 95.4 GFLOP" in out
    assert re.search(r"routed experts +38\.20 GFLOP +40\.0%", out)  # the largest part first
    assert "pipeline=2: first stage 25 layers, last 21 (chosen)" in out
    assert "stage 0: layers 0-24 (25, 1 dense) + embedding, compute 0.98 of the slowest" in out
    assert "stage 1: layers 25-45 (21, 0 dense) + output, MTP x1, compute 1.00 of the slowest" in out


def test_model_info_rejects_bad_layout(capsys):
    assert model_info(["model=glm45", "parallel.expert=7"]) == 2
    assert "parallel.expert=7 does not divide model.num_experts=160" in capsys.readouterr().err


def test_pipeline_stages_put_dense_layers_first_and_mtp_last(world1):
    m = compose(["model=glm45"]).model
    plans = [stage_plan(m, ParallelConfig(pipeline=4, first_stage_layers=23, last_stage_layers=23), r)
             for r in range(4)]
    assert [len(s["layers"]) for s in plans] == [23] * 4
    assert sum((s["layers"] for s in plans), []) == list(range(92))
    assert all(i in plans[0]["layers"] for i in range(m.first_k_dense))
    assert [s["embedding"] for s in plans] == [True, False, False, False]
    assert [(s["output"], s["mtp"]) for s in plans] == [(False, False)] * 3 + [(True, True)]
