"""glm-convert against independent references: transformers' own loading and model for export, the
Hugging Face files themselves for import, an uninterrupted read of the training loop's checkpoints."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.hf_mapping import model_config_from_hf
from pretrain import checkpoint
from pretrain.checkpoint_io import Chunk, Pending, TensorReader, write_tensors
from convert.cli import main
from convert.export import export
from convert.importer import import_
from tests.hf_reference import hf_config, mtp_from_hf, mtp_reference_logits, write_hf_dir
from tests.megatron_helpers import logits
from tests.test_train import _env, _run

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _train(data_root: Path, run_dir: Path, *overrides: str) -> None:
    """The tiny experiment under torchrun with two processes, to its end or train.max_steps."""
    _run(data_root, run_dir, *overrides, nproc=2)


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for file in sorted(set(index.values())):
        out.update(load_file(str(hf_dir / file)))
    assert out.keys() == index.keys()
    return out


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models

    from tests.data_helpers import tiny_corpus

    root = tiny_corpus(tmp_path_factory.mktemp("data"))
    tokenizer = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "<unk>": 1, "a": 2}, unk_token="<unk>"))
    tokenizer.add_special_tokens(["<|endoftext|>"])
    for source in ("general", "code"):  # the tokenizer glm-data prepare saves beside the shards
        tokenizer.save(str(root / "tiny" / source / "tokenizer.json"))
    return root


# ---- export from the training loop's checkpoints ------------------------------------------------

LAYOUTS = {"TP2": ["parallel.tensor=2"], "EP2": ["parallel.expert=2"],
           "TP2+EP2": ["parallel.tensor=2", "parallel.expert=2"], "PP2": ["parallel.pipeline=2"],
           "TP2+ETP2": ["parallel.tensor=2", "parallel.expert_tensor=2"]}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_of_a_training_checkpoint_loads_in_transformers_with_the_same_logits(
        world1, data_root, tmp_path, layout):
    from transformers import AutoModelForCausalLM

    from model.build import build_model

    # three steps into the second stage: the RoPE base has changed (10,000 -> 1,000,000), and
    # training has moved every weight, the expert biases included, off their initial values
    _train(data_root, tmp_path / "run", *LAYOUTS[layout], "train.max_steps=14", "train.eval_every=0")
    out = export(tmp_path / "run", tmp_path / "hf", dtype="fp32", shard_size="300KB", quiet=True)

    ckpt = checkpoint.find(tmp_path / "run")
    cfg = checkpoint.model_config(ckpt)
    assert cfg.rope_theta == 1e6 and json.loads((out / "config.json").read_text())["rope_theta"] == 1e6
    ours = build_model(cfg, impl="local").eval()  # the trained model, read back in one process
    checkpoint.CheckpointManager._load_weights(ckpt, [ours])
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        main_logits, mtp_logits = logits(ours, ids)
    assert ref.std() > 0.1
    assert (main_logits - ref).abs().max().item() <= TOL

    # the MTP layer under the released names, enough for the reference formula to give its logits
    state = _tensors(out)
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == len(state)
    assert len({f for f in out.glob("model-*.safetensors")}) > 1
    config = hf_config(vocab_size=cfg.vocab_size, rope_theta=cfg.rope_theta)
    mtp = mtp_from_hf(state, config)
    assert (mtp_logits - mtp_reference_logits(hf, mtp, ids)).abs().max().item() <= TOL
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(out)  # the training data's tokenizer, carried by the checkpoint
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer("a").input_ids == [2]
    assert GenerationConfig.from_pretrained(out).eos_token_id == 0
    # the MTP layer's copies of the embedding and head, which vLLM's and SGLang's MTP drafters read
    assert torch.equal(state["model.layers.3.embed_tokens.weight"], state["model.embed_tokens.weight"])
    assert torch.equal(state["model.layers.3.shared_head.head.weight"], state["lm_head.weight"])
    bias = state["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and bias.abs().max() > 0  # the trained expert bias, in fp32


# ---- import, and the way back ---------------------------------------------------------------------

SHAPES = {  # glm4_moe shapes beside GLM-4.5's: the configurations the fast-path issue fixed, on disk
    "default": {},
    "mqa_rotary_quarter": dict(num_key_value_heads=1, partial_rotary_factor=0.25),
    "mha_full_rotary_all_moe_two_shared": dict(num_key_value_heads=4, partial_rotary_factor=1.0,
                                               first_k_dense_replace=0, n_shared_experts=2),
    "no_shared_expert": dict(n_shared_experts=0),
    "top1_unnormalised": dict(num_experts_per_tok=1, norm_topk_prob=False),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES)
def test_export_of_an_import_gives_back_the_same_bytes(tmp_path, shape, dtype):
    src = tmp_path / "src"
    _, _, config_json = write_hf_dir(src, hf_config(**SHAPES[shape]), dtype=dtype)
    import_(src, tmp_path / "run", quiet=True)
    out = export(tmp_path / "run", tmp_path / "out", dtype="bf16" if dtype == torch.bfloat16 else "fp32",
                 shard_size="150KB", quiet=True)
    want, got = _tensors(src), _tensors(out)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape and torch.equal(got[name], want[name]), name
    written = json.loads((out / "config.json").read_text())
    theirs, ours = model_config_from_hf(config_json), model_config_from_hf(written)
    assert not ours.architecture_differences(theirs)
    assert (ours.rope_theta, ours.max_position_embeddings) == (theirs.rope_theta, theirs.max_position_embeddings)
    assert written["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert (out / "generation_config.json").is_file()


def test_import_carries_the_tokenizer_through_to_the_export(tmp_path):
    from tokenizers import Tokenizer, models

    src = tmp_path / "src"
    write_hf_dir(src, hf_config())
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (src / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    import_(src, tmp_path / "run", quiet=True)
    out = export(tmp_path / "run", tmp_path / "out", quiet=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert not (out / "modeling_evil.py").exists()


@pytest.mark.distributed
def test_training_starts_from_imported_weights_under_another_layout_at_the_chosen_stage(data_root, tmp_path):
    src = tmp_path / "src"
    write_hf_dir(src, hf_config(vocab_size=512))  # the tiny experiment's model
    import_(src, tmp_path / "run", stage="mixed", parallel={"tensor": 2, "expert": 2}, quiet=True)
    # one step at learning rate 0 in a stage without expert-bias updates changes no weight: what the
    # run saves is the imported model itself, read and written by the loop under TP2+EP2
    _train(data_root, tmp_path / "run", "parallel.tensor=2", "parallel.expert=2", "train.max_steps=1",
           "optim.lr=0", "train.lr_min=0", "train.eval_every=0")
    meta = checkpoint.read_meta(checkpoint.find(tmp_path / "run"))
    assert meta["step"] == 1 and meta["stage"] == "mixed" and meta["tokens"] == 4096 + 512  # from the stage's start
    assert "weights_only" not in meta
    out = export(tmp_path / "run", tmp_path / "out", dtype="fp32", quiet=True)
    want, got = _tensors(src), _tensors(out)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 1e6  # the stage's, not the import's


def test_training_refuses_imported_weights_of_another_architecture(data_root, tmp_path):
    src = tmp_path / "src"
    write_hf_dir(src, hf_config(vocab_size=512, n_routed_experts=4, partial_rotary_factor=0.25))
    import_(src, tmp_path / "run", quiet=True)
    p = subprocess.run([sys.executable, "-m", "pretrain", "experiment=tiny", f"run.dir={tmp_path / 'run'}"],
                       env=_env(data_root), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "num_experts: 8 vs 4" in p.stdout and "partial_rotary_factor: 0.5 vs 0.25" in p.stdout


def test_import_refuses_a_layout_the_model_cannot_take_and_unknown_arguments(tmp_path):
    src = tmp_path / "src"
    write_hf_dir(src, hf_config())
    assert main(["import", str(src), str(tmp_path / "run"), "parallel.expert=3", "--quiet"]) == 2
    assert not (tmp_path / "run").exists()
    assert main(["import", str(src), str(tmp_path / "run"), "parallel.bogus=3"]) == 2


# ---- refusals, before any tensor is converted ----------------------------------------------------

@pytest.fixture
def imported(tmp_path) -> Path:
    src = tmp_path / "src"
    write_hf_dir(src, hf_config())
    return import_(src, tmp_path / "run", quiet=True)


def _export_fails(run: Path, out: Path, *match: str, capsys) -> None:
    assert main(["export", str(run), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    for m in match:
        assert m in err, err
    assert not out.exists()


def test_export_refuses_a_checkpoint_with_a_missing_or_truncated_data_file(imported, tmp_path, capsys):
    ckpt = checkpoint.find(imported)
    data = next(ckpt.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:1000])
    _export_fails(imported, tmp_path / "out", str(data), "truncated", capsys=capsys)
    data.unlink()
    _export_fails(imported, tmp_path / "out", str(data), "missing", capsys=capsys)


def test_export_refuses_tensors_that_disagree_with_the_model_config(imported, tmp_path, capsys):
    ckpt = checkpoint.find(imported)
    meta = checkpoint.read_meta(ckpt)
    meta["model"]["ffn_hidden_size"] = 128
    (ckpt / "meta.json").write_text(json.dumps(meta))
    _export_fails(imported, tmp_path / "out", "decoder.layers.0.mlp.linear_fc1.weight", "[192, 64]", "[256, 64]",
                  capsys=capsys)


def test_export_lists_tensors_the_mapping_table_does_not_account_for(imported, tmp_path, capsys):
    ckpt = checkpoint.find(imported)
    reader = TensorReader(ckpt)
    pending = [Pending(k, reader.shape(k), reader.dtype(k), [Chunk((0,) * len(reader.shape(k)), reader.shape(k),
                                                                   lambda k=k: reader.read(k))])
               for k in reader.tensors]
    pending.append(Pending("decoder.layers.0.mlp.mystery.weight", (4,), torch.float32,
                           [Chunk((0,), (4,), lambda: torch.ones(4))]))
    forged = tmp_path / "forged"
    write_tensors(forged, pending, {})
    shutil.copy(ckpt / "meta.json", forged / "meta.json")
    _export_fails(forged, tmp_path / "out", "decoder.layers.0.mlp.mystery.weight", "does not account for",
                  capsys=capsys)
    _export_fails(tmp_path / "nowhere", tmp_path / "out", "neither a run directory", capsys=capsys)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_metadata_that_would_run_code_is_refused_unrun(imported, tmp_path, capsys, monkeypatch):
    ckpt = checkpoint.find(imported)
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload()))
    monkeypatch.chdir(tmp_path)
    _export_fails(imported, tmp_path / "out", "refusing to load", "system", capsys=capsys)
    assert not (tmp_path / "pwned").exists()


def test_export_does_not_replace_an_existing_directory_unless_asked(imported, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    assert main(["export", str(imported), str(tmp_path / "out"), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "out" / "keep").exists()
    assert main(["export", str(imported), str(tmp_path / "out"), "--quiet", "--overwrite"]) == 0
    assert not (tmp_path / "out" / "keep").exists() and (tmp_path / "out" / "config.json").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def _hf_fails(src: Path, tmp_path: Path, *match: str, capsys) -> None:
    assert main(["import", str(src), str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    for m in match:
        assert m in err, err
    assert not (tmp_path / "run").exists()


def test_import_refuses_other_architectures_pickles_and_missing_files(tmp_path, capsys):
    src = tmp_path / "src"
    write_hf_dir(src, hf_config())
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    _hf_fails(src, tmp_path, "config.json", "llama", capsys=capsys)
    (src / "config.json").write_text(json.dumps(config))

    shard = sorted(src.glob("model-0*.safetensors"))[1]
    shard.rename(tmp_path / "aside")
    _hf_fails(src, tmp_path, str(shard), "missing", capsys=capsys)
    shard.write_bytes((tmp_path / "aside").read_bytes()[:-100])
    _hf_fails(src, tmp_path, str(shard), "truncated", capsys=capsys)
    (tmp_path / "aside").rename(shard)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(src / "config.json", pickled)
    torch.save({}, pickled / "pytorch_model.bin")
    _hf_fails(pickled, tmp_path, "pytorch_model.bin", "not read", capsys=capsys)


def test_import_names_a_tensor_missing_or_of_the_wrong_shape(tmp_path, capsys):
    src = tmp_path / "src"
    write_hf_dir(src, hf_config())
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    file = src / index[name]
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, name: torch.zeros(7, 64)}, str(file), metadata={"format": "pt"})
    _hf_fails(src, tmp_path, str(file), name, "[7, 64]", "[32, 64]", capsys=capsys)
    save_file({k: v for k, v in tensors.items() if k != name}, str(file), metadata={"format": "pt"})
    _hf_fails(src, tmp_path, str(file), name, capsys=capsys)


# ---- memory: one tensor at a time ----------------------------------------------------------------

_CONVERT_RSS = """
import sys
from pathlib import Path
from convert.export import export
from convert.importer import import_
import model.hf_mapping, pretrain.checkpoint, pretrain.checkpoint_io, convert.hf_dir, tqdm  # what they import

def status(field):  # kB
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) here, after the imports
before = status("VmRSS")
if sys.argv[1] == "export":
    export(sys.argv[2], sys.argv[3], dtype="bf16", shard_size="64MB", quiet=True)
else:
    import_(sys.argv[2], sys.argv[3], quiet=True)
print(status("VmHWM") - before)
"""


def _synthetic_checkpoint(ckpt: Path, **shape) -> tuple[int, int]:
    """A weights-only checkpoint of random fp32 tensors for a model of `shape`; (bytes, largest tensor's bytes)."""
    import dataclasses

    from model.hf_mapping import dist_shapes, entries
    from pretrain.config import compose

    cfg = dataclasses.replace(compose(["model=tiny"]).model, **shape)
    shapes = dist_shapes(cfg)

    def chunks(key, shape):  # as the training loop writes them: routed experts one by one
        if ".experts.experts." not in key:
            return [Chunk((0,) * len(shape), shape, lambda: torch.randn(shape))]
        return [Chunk((e, 0, 0), (1, *shape[1:]), lambda: torch.randn(1, *shape[1:])) for e in range(shape[0])]

    write_tensors(ckpt, [Pending(k, s, torch.float32, chunks(k, s)) for k, s in shapes.items()], {})
    (ckpt / "meta.json").write_text(json.dumps({"step": 0, "weights_only": True, "model": dataclasses.asdict(cfg)}))
    return sum(4 * torch.Size(s).numel() for s in shapes.values()), max(4 * torch.Size(e.shape).numel()
                                                                         for e in entries(cfg))


def _peak_growth(*args: str) -> int:
    p = subprocess.run([sys.executable, "-c", _CONVERT_RSS, *args], cwd=ROOT, env=_env(ROOT), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return int(p.stdout.split()[-1])


def test_conversion_peak_memory_is_bounded_by_the_largest_tensor_not_the_model(tmp_path):
    # 12 layers of wide attention (the tensors that are not experts add up to 200 MB) and small experts
    model_bytes, largest = _synthetic_checkpoint(tmp_path / "ckpt", hidden_size=1024, num_layers=12,
                                                 num_attention_heads=16, num_query_groups=16, head_dim=64,
                                                 moe_ffn_hidden_size=64, vocab_size=2048)
    assert model_bytes > 4 * (3 * largest + 32 * 2**20)
    # per direction: the tensor being converted, its other-dtype or joined copy, the chunks it came
    # from; allocator slack. Holding one 64 MB output shard, let alone the model, would not fit.
    bound = 3 * largest + 32 * 2**20
    grew = _peak_growth("export", str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    assert grew <= bound, f"export: peak RSS grew {grew / 2**20:.0f} MiB; largest tensor {largest / 2**20:.0f} MiB, " \
                          f"model {model_bytes / 2**20:.0f} MiB"
    grew = _peak_growth("import", str(tmp_path / "hf"), str(tmp_path / "run"))
    assert grew <= bound, f"import: peak RSS grew {grew / 2**20:.0f} MiB; largest tensor {largest / 2**20:.0f} MiB, " \
                          f"model {model_bytes / 2**20:.0f} MiB"
