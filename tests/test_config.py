"""Config composition and start-up validation."""

import pytest

from model.config import ConfigError
from pretrain.config import compose

# ../shared/GLM45_FACTS.md, architecture table.
FACTS = {
    "glm45": dict(hidden_size=5120, num_layers=92, num_attention_heads=96, num_query_groups=8, head_dim=128,
                  ffn_hidden_size=12288, moe_ffn_hidden_size=1536, num_experts=160, num_shared_experts=1,
                  moe_router_topk=8, first_k_dense=3, routed_scaling_factor=2.5, qk_norm=True,
                  partial_rotary_factor=0.5, rope_theta=1e6, max_position_embeddings=131072, vocab_size=151552,
                  qkv_bias=True, mtp_num_layers=1, rms_norm_eps=1e-5, norm_topk_prob=True),
    "glm45_air": dict(hidden_size=4096, num_layers=46, num_attention_heads=96, num_query_groups=8, head_dim=128,
                      ffn_hidden_size=10944, moe_ffn_hidden_size=1408, num_experts=128, num_shared_experts=1,
                      moe_router_topk=8, first_k_dense=1, routed_scaling_factor=1.0, qk_norm=False,
                      partial_rotary_factor=0.5, rope_theta=1e6, max_position_embeddings=131072,
                      vocab_size=151552, qkv_bias=True, mtp_num_layers=1, rms_norm_eps=1e-5, norm_topk_prob=True),
}


@pytest.mark.parametrize("name", sorted(FACTS))
def test_published_models_have_the_published_values(name):
    cfg = compose([f"model={name}"]).model
    for field, value in FACTS[name].items():
        assert getattr(cfg, field) == value, field


@pytest.mark.parametrize("name", ["smoke", "tiny"])
def test_small_models_switch_every_feature_on(name):
    m = compose([f"model={name}"]).model
    assert m.qk_norm and m.qkv_bias and m.mtp_num_layers >= 1 and m.num_shared_experts >= 1
    assert 0 < m.first_k_dense < m.num_layers and m.partial_rotary_factor == 0.5
    assert m.routed_scaling_factor != 1.0 and m.num_query_groups < m.num_attention_heads


@pytest.mark.parametrize("overrides,message", [
    (["+model.bogus=1"], r"model/smoke\.yaml: model\.bogus: Key 'bogus' not in 'ModelConfig'"),
    (["model.num_layers=many"], r"model/smoke\.yaml: model\.num_layers: Value 'many'"),
    (["model=glm45", "parallel.tensor=5"], r"parallel\.tensor=5 does not divide model\.num_attention_heads=96"),
    (["model=glm45_air", "parallel.tensor=16"], r"parallel\.tensor=16 does not divide model\.num_query_groups=8"),
    (["model=glm45", "parallel.expert=3"], r"parallel\.expert=3 does not divide model\.num_experts=160"),
    (["model=glm45", "parallel.pipeline=4", "parallel.virtual_stages=3"],
     r"no placement of model\.num_layers=92 on parallel\.pipeline=4 stages x parallel\.virtual_stages=3"),
    (["model=glm45_air", "parallel.pipeline=4", "parallel.first_stage_layers=44"],
     r"parallel\.first_stage_layers=44: no placement of model\.num_layers=46"),
    (["parallel.virtual_stages=2"], r"parallel\.virtual_stages=2 needs parallel\.pipeline > 1"),
    (["model=glm45", "parallel.tensor=2", "parallel.sequence_parallel=false"], r"sequence_parallel=False must be true"),
    (["model.num_query_groups=3"], r"model\.num_query_groups=3 must divide num_attention_heads=8"),
    (["model.moe_router_topk=99"], r"model\.moe_router_topk=99 exceeds num_experts=16"),
    (["model.norm_topk_prob=false"], r"model\.norm_topk_prob=False must be true"),
    (["model=nonexistent"], r"Could not find 'model/nonexistent'"),
    (["data.packing=greedy"], r"data/smoke.yaml: data.packing='greedy' is not one of"),
    (["data.on_error=ignore"], r"data/smoke.yaml: data.on_error='ignore' is not one of"),
    (["data.sources.1.weight=0"], r"data/smoke.yaml: data.sources\[1\] \('code'\).weight=0.0 must be positive"),
    (["data.seq_length=0"], r"data/smoke.yaml: data.seq_length=0 must be positive"),
    (["data.sources.1.name=general"], r"data/smoke.yaml: data.sources names repeat"),
    (["train.async_save=sometimes"], r"train.async_save='sometimes' must be auto, true or false"),
])
def test_bad_config_fails_naming_file_field_and_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose(overrides)


def test_a_layout_set_by_the_experiment_is_blamed_on_the_experiment_file():
    """glm45's layout lives in configs/experiment/glm45.yaml, over the parallel group's file: an error
    about it names both, the experiment first; a group the experiment leaves alone names its own."""
    cfg = compose(["experiment=glm45"])
    with pytest.raises(ConfigError, match=r"experiment/glm45.yaml \(over .*parallel/single.yaml\): world size 3 "):
        cfg.validate(world_size=3)
    assert cfg.sources["model"].endswith("model/glm45.yaml")


def test_world_size_must_fit_the_layout():
    cfg = compose(["model=glm45", "parallel.tensor=8", "parallel.pipeline=4", "parallel.expert=16"])
    cfg.validate(world_size=256)
    with pytest.raises(ConfigError, match="world size 96 is not divisible by expert\\*expert_tensor\\*pipeline=64"):
        cfg.validate(world_size=96)
    with pytest.raises(ConfigError, match="world size 48 is not divisible by tensor\\*pipeline\\*context=32"):
        cfg.validate(world_size=48)


@pytest.mark.parametrize("stage,seq,packing", [("smoke", 1024, "concat"), ("stage1", 4096, "concat"),
                                               ("stage2", 4096, "concat"), ("mid_32k", 32768, "best_fit"),
                                               ("long_128k", 131072, "best_fit")])
def test_data_stages_compose(stage, seq, packing):
    data = compose([f"data={stage}"]).data
    assert (data.seq_length, data.packing) == (seq, packing)
    assert abs(sum(data.weights()) - 1.0) < 1e-9



def test_an_installed_package_finds_its_configs(tmp_path):
    """Installed without -e (a wheel into site-packages), glm-pretrain still finds the config tree."""
    import subprocess
    import sys
    from pathlib import Path

    import shutil

    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # a copy: building writes build/ beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    for package in ("model", "data", "optim", "pretrain", "configs"):
        shutil.copytree(root / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True)
    code = ("from pretrain.config import compose, CONFIG_DIR; c = compose(['experiment=glm45_air']); "
            "print(CONFIG_DIR, c.model.num_experts, len(c.stages))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(target / "configs"), "128", "5"]


def test_pretrain_help_lists_experiments_and_the_main_fields(capsys):
    from pretrain import cli

    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("smoke", "tiny", "single_gpu", "glm45", "glm45_air"):
        assert f"\n  {name} " in out, name
    for field in ("parallel.virtual_stages", "first_stage_layers", "data.max_skip_fraction", "exit codes: 0 finished"):
        assert field in out, field


def test_the_read_settings_of_object_storage_apply_to_every_stage_and_keep_their_defaults():
    """configs/config.yaml lists them so that `data.read_timeout_s=...` overrides them on the command line;
    its values are data/config.py's defaults."""
    import dataclasses

    from data.config import DataConfig
    from pretrain.config import compose

    defaults = {f.name: f.default for f in dataclasses.fields(DataConfig) if f.name.startswith("read_")}
    cfg = compose(["experiment=tiny"])
    assert defaults and all(getattr(d, k) == v for d in cfg.stage_data.values() for k, v in defaults.items())
    cfg = compose(["experiment=tiny", "data.read_timeout_s=2", "data.read_tries=3", "data.read_retry_s=9"])
    assert all((d.read_timeout_s, d.read_tries, d.read_retry_s) == (2, 3, 9) for d in cfg.stage_data.values())
    with pytest.raises(ConfigError, match="data.read_tries=0 must be >= 1"):
        compose(["experiment=tiny", "data.read_tries=0"])
