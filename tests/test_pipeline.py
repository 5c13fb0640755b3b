"""Pipeline placement (model/pipeline.py): which decoder layers each stage and model chunk holds,
checked against Megatron-Core's own rules and its layer offsets, and the production layouts."""

import pytest
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from model import pipeline
from model.build import stage_plan, transformer_config
from model.config import ConfigError, ParallelConfig
from pretrain.config import compose


def _megatron_accepts(m, p) -> bool:
    """Megatron-Core's TransformerConfig validation of an uneven split (the independent rule)."""
    try:
        transformer_config(m, p, initialize=False)
    except (ValueError, AssertionError):
        return False
    return True


@pytest.mark.parametrize("stages,chunks", [(2, 1), (3, 1), (4, 1), (2, 2), (4, 2), (3, 3)])
def test_allowed_splits_are_exactly_megatrons(stages, chunks):
    m = compose(["model=tiny", "model.num_layers=12"]).model
    for first in range(1, 12):
        for last in range(1, 13 - first):
            ours = pipeline._allowed(first, last, 12, stages, chunks)
            p = ParallelConfig(pipeline=stages, virtual_stages=chunks, first_stage_layers=first,
                               last_stage_layers=last)
            if ours:
                assert _megatron_accepts(m, p), (first, last)
                # and Megatron builds exactly those layers, each once, in order
                config = transformer_config(m, p, initialize=False)
                ids = []
                for r in range(stages):
                    for v in range(chunks):
                        vp = v if chunks > 1 else None
                        offset = get_transformer_layer_offset(config, vp_stage=vp, pp_rank=r)
                        ids += [(offset + i, v, r) for i in range(get_num_layers_to_build(config, vp, r))]
                assert sorted(i for i, _, _ in ids) == list(range(12))
                per_stage = [sum(1 for _, _, r in ids if r == s) for s in range(stages)]
                assert per_stage[0] == first and per_stage[-1] == last
            else:
                with pytest.raises(ConfigError):
                    pipeline.split(m, p)


@pytest.mark.parametrize("experiment,stages,first,last", [("glm45", 8, 12, 8), ("glm45_air", 4, 12, 8)])
def test_production_layouts_validate_and_are_what_the_placement_chooses(experiment, stages, first, last):
    cfg = compose([f"experiment={experiment}"])
    p = cfg.parallel
    assert (p.pipeline, p.first_stage_layers, p.last_stage_layers) == (stages, first, last)
    cfg.validate(world_size=128 if experiment == "glm45" else 32)
    chosen = compose([f"experiment={experiment}", "parallel.first_stage_layers=null",
                      "parallel.last_stage_layers=null"])
    assert pipeline.split(chosen.model, chosen.parallel) == (first, last)
    # the last stage, with the output layer and MTP, is no longer the slowest by much:
    costs = pipeline.stage_costs(cfg.model, stages, first, last)
    even = cfg.model.num_layers // stages
    assert max(costs) / min(costs) < 1.1
    # ... where a near-even split would leave it 20-30% slower than the others
    near_even = pipeline.stage_costs(cfg.model, stages, even + 1, even) if experiment == "glm45" else \
        pipeline.stage_costs(cfg.model, stages, 12, 10)
    assert near_even[-1] > 1.2 * min(near_even)


def test_chosen_split_minimises_the_slowest_stage():
    m = compose(["model=smoke"]).model
    for stages in (2, 3, 4):
        p = ParallelConfig(pipeline=stages)
        first, last = pipeline.split(m, p)
        first = first or m.num_layers // stages
        last = last or m.num_layers // stages
        best = max(pipeline.stage_costs(m, stages, first, last))
        for f in range(1, m.num_layers):
            for la in range(1, m.num_layers - f + 1):
                if pipeline._allowed(f, la, m.num_layers, stages, 1):
                    assert best <= max(pipeline.stage_costs(m, stages, f, la)) * (1 + 1e-12)


def test_stage_costs_add_up_to_the_training_flops():
    from model.accounting import train_flops_per_token

    m = compose(["model=glm45"]).model
    assert sum(pipeline.stage_costs(m, 8, 12, 8)) == pytest.approx(train_flops_per_token(m, pipeline.SEQ_LEN))


def test_one_given_end_is_kept_and_the_other_chosen():
    m = compose(["model=glm45_air"]).model
    first, last = pipeline.split(m, ParallelConfig(pipeline=4, first_stage_layers=10))
    assert first == 10 and (46 - 10 - last) % 2 == 0


def test_virtual_stages_place_embedding_first_and_output_and_mtp_last():
    m = compose(["model=tiny", "model.num_layers=8"]).model
    p = ParallelConfig(pipeline=2, virtual_stages=2)
    plans = {(r, v): stage_plan(m, p, r, v) for r in range(2) for v in range(2)}
    assert [plans[r, v]["layers"] for v in range(2) for r in range(2)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [k for k, s in plans.items() if s["embedding"]] == [(0, 0)]
    assert [k for k, s in plans.items() if s["output"]] == [(1, 1)] == [k for k, s in plans.items() if s["mtp"]]
