"""The architecture against the Hugging Face glm4_moe reference: same weights, same logits."""

import pytest
import torch

from model.build import build_model
from model import hf_mapping
from model.hf_mapping import hf_to_megatron, megatron_to_hf, model_config_from_hf
from model.sharding import gather_whole, load_whole_state
from tests.hf_reference import hf_config, mtp_reference_logits, random_checkpoint
from tests.megatron_helpers import logits

TOL = 1e-4


def converted(tmp_path, impl="local", **hf_kw):
    config = hf_config(**hf_kw)
    hf, mtp, state, config_json = random_checkpoint(tmp_path, config)
    cfg = model_config_from_hf(config_json)
    model = build_model(cfg, impl=impl).eval()
    load_whole_state(model, hf_to_megatron(state, cfg))
    return hf, mtp, model, cfg, state


def assert_logits_match(hf, mtp, model, cfg, seed=1):
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        ours, ours_mtp = logits(model, ids)
    assert ref.std() > 0.3, "reference logits too small for the comparison to mean anything"
    assert (ours - ref).abs().max().item() <= TOL
    assert (ours_mtp - mtp_reference_logits(hf, mtp, ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("impl", ["local", "torch"])
@pytest.mark.parametrize("qk_norm,scale", [(True, 2.5), (False, 1.0)])
def test_logits_match_transformers(world1, tmp_path, qk_norm, scale, impl):
    hf, mtp, model, cfg, _ = converted(tmp_path, impl, qk_norm=qk_norm, routed_scaling_factor=scale)
    assert cfg.qk_norm == qk_norm and cfg.routed_scaling_factor == scale and cfg.partial_rotary_factor == 0.5
    assert_logits_match(hf, mtp, model, cfg)


SHAPES = {  # glm4_moe shapes beside GLM-4.5's, each through import, logits and the way back
    "mqa_rotary_quarter": dict(num_key_value_heads=1, partial_rotary_factor=0.25),
    "mha_full_rotary_all_moe_two_shared": dict(num_key_value_heads=4, partial_rotary_factor=1.0,
                                               first_k_dense_replace=0, n_shared_experts=2),
    "no_shared_expert": dict(n_shared_experts=0),
    "top1_unnormalised": dict(num_experts_per_tok=1, norm_topk_prob=False),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_other_shapes_match_transformers_and_round_trip(world1, tmp_path, shape):
    hf, mtp, model, cfg, state = converted(tmp_path, "torch", **SHAPES[shape])
    assert_logits_match(hf, mtp, model, cfg)
    back = megatron_to_hf(gather_whole(model), cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("kw,message", [
    (dict(num_experts_per_tok=1, norm_topk_prob=True), r"norm_topk_prob=True must be false with moe_router_topk=1"),
    (dict(num_experts_per_tok=2, norm_topk_prob=False), r"norm_topk_prob=False must be true with moe_router_topk=2"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), r"RoPE scaling 'linear'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
     r"RoPE scaling 'yarn'"),
])
def test_configs_that_would_convert_wrongly_are_refused(tmp_path, kw, message):
    config = hf_config(**kw).to_dict()
    config.update(kw)  # as written on disk, whatever this transformers version normalises it to
    with pytest.raises(ValueError, match=message):
        model_config_from_hf(config)


def test_written_config_names_the_dtype_written(tmp_path):
    cfg = model_config_from_hf(hf_config().to_dict())
    assert hf_mapping.hf_config(cfg, torch.float32)["torch_dtype"] == "float32"
    assert hf_mapping.hf_config(cfg, torch.bfloat16)["torch_dtype"] == "bfloat16"


def test_expert_bias_changes_routing_and_is_honoured(world1, tmp_path):
    """The e_score_correction_bias of the reference changes which experts are chosen; the
    converted model follows it (a model that ignored the bias would give other logits)."""
    hf, mtp, model, cfg, _ = converted(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    gate = hf.model.layers[1].mlp.gate
    with torch.no_grad():
        x = hf.model.embed_tokens(ids).view(-1, cfg.hidden_size)
        _, _, with_bias = gate(x)
        saved = gate.e_score_correction_bias.clone()
        gate.e_score_correction_bias.zero_()
        _, _, without_bias = gate(x)
        changed = (with_bias.sort(-1).values != without_bias.sort(-1).values).any(-1).float().mean()
        unbiased_ref = hf(input_ids=ids).logits
        gate.e_score_correction_bias.copy_(saved)
        ours, _ = logits(model, ids)
    assert changed > 0.2
    assert (ours - unbiased_ref).abs().max() > 100 * TOL


def test_round_trip_is_exact(world1, tmp_path):
    _, _, model, cfg, state = converted(tmp_path)
    mg = gather_whole(model)
    back = megatron_to_hf(mg, cfg)
    assert back.keys() == state.keys()
    for k in state:
        assert torch.equal(back[k], state[k]), k
    again = hf_to_megatron(back, cfg)
    assert again.keys() == mg.keys()
    for k in mg:
        assert torch.equal(again[k], mg[k]), k


def test_mismatched_checkpoint_names_the_weights(world1, tmp_path):
    _, _, _, cfg, state = converted(tmp_path)
    del state["model.layers.1.mlp.experts.3.up_proj.weight"]
    state["model.layers.1.mlp.experts.99.up_proj.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"1 missing.*experts\.3\.up_proj.*1 unexpected.*experts\.99"):
        hf_to_megatron(state, cfg)
