"""GPU tier: the same model on CUDA, Transformer Engine modules when installed, bf16.

Skipped where CUDA is absent (conftest.py). Run with `pytest -m gpu tests/test_gpu.py`.
"""

import pytest
import torch

from model.build import build_model
from model.hf_mapping import hf_to_megatron, model_config_from_hf
from model.sharding import load_whole_state
from model.spec import have_transformer_engine
from tests.hf_reference import hf_config, random_checkpoint
from tests.megatron_helpers import logits

pytestmark = pytest.mark.gpu


@pytest.fixture
def checkpoint(world1, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hf, _, state, config_json = random_checkpoint(tmp_path, hf_config())
    return hf, state, model_config_from_hf(config_json)


def _model(cfg, state, impl, dtype=torch.float32):
    model = build_model(cfg, impl=impl, dtype=dtype).eval()
    load_whole_state(model, {k: v.to(dtype) for k, v in hf_to_megatron(state, cfg).items()})
    return model


@pytest.mark.parametrize("impl", ["local", pytest.param("te", marks=pytest.mark.skipif(
    not have_transformer_engine(), reason="transformer_engine not installed"))])
def test_cuda_logits_match_transformers(checkpoint, impl):
    hf, state, cfg = checkpoint
    ids = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        ref = hf.cuda()(input_ids=ids).logits
        ours, _ = logits(_model(cfg, state, impl), ids)
    assert (ours - ref).abs().max().item() <= 2e-4


def test_bf16_stays_close_to_fp32(checkpoint):
    _, state, cfg = checkpoint
    ids = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        full, _ = logits(_model(cfg, state, "auto"), ids)
        half, _ = logits(_model(cfg, state, "auto", torch.bfloat16), ids)
    assert ((half.float() - full).abs().mean() / full.abs().mean()).item() < 0.05
