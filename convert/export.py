"""glm-convert export: a dist checkpoint, written under any tensor / expert / pipeline layout, -> a
Hugging Face glm4_moe directory, one tensor in memory at a time.

Each whole tensor is read from the checkpoint (pretrain/checkpoint_io.py), split into its Hugging
Face tensors by the one mapping table (model/hf_mapping.py) and appended to the output shard being
written (convert/hf_dir.py). Every tensor is accounted for before any is converted.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from convert.hf_dir import INDEX, ShardWriter, copy_side_files, parse_size
from convert.staging import progress, publish, release_freed_memory, staging

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _check_accounted(reader, cfg, ckpt: Path) -> None:
    """Every model tensor of the checkpoint is one the table maps, at the shape the config gives,
    and every tensor the table needs is there."""
    from model.hf_mapping import dist_shapes
    from pretrain.checkpoint_io import CheckpointError

    want = dist_shapes(cfg)
    have = {k: reader.shape(k) for k in reader.tensors if not k.startswith("optimizer.")}
    missing, unmapped = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing:
        raise CheckpointError(f"{ckpt}: {len(missing)} model tensors missing (first: {missing[:3]})")
    if unmapped:
        raise CheckpointError(f"{ckpt}: {len(unmapped)} tensors the mapping table (model/hf_mapping.py) does not "
                              f"account for: {unmapped[:5]}")
    for key, shape in want.items():
        if have[key] != shape:
            raise CheckpointError(f"{ckpt}: tensor {key} has shape {list(have[key])}, the model config "
                                  f"(meta.json) gives {list(shape)}")


def _shards(table, nbytes, shard_size: int) -> list[list]:
    """Consecutive entries grouped into shards of at most `shard_size` bytes (an entry larger than
    that alone in its own)."""
    shards, size = [[]], 0
    for e in table:
        n = nbytes(e)
        if shards[-1] and size + n > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def export(ckpt: str | Path, out: str | Path, dtype: str = "bf16", shard_size: str = "5GB",
           overwrite: bool = False, quiet: bool = False) -> Path:
    """A dist checkpoint (run directory or checkpoint directory) -> a Hugging Face directory."""
    from model.hf_mapping import HF_FP32, empty_shared_experts, entries, hf_config, mtp_copies, split
    from pretrain import checkpoint
    from pretrain.checkpoint_io import TensorReader

    release_freed_memory()
    ckpt, out = checkpoint.find(ckpt), Path(out)
    cfg = checkpoint.model_config(ckpt)
    reader = TensorReader(ckpt)
    _check_accounted(reader, cfg, ckpt)
    out_dtype, limit = DTYPES[dtype], parse_size(shard_size)

    def dtype_of(name: str) -> torch.dtype:
        return torch.float32 if name.endswith(HF_FP32) else out_dtype

    def nbytes(e) -> int:  # of an entry's Hugging Face tensors as written
        return sum(dtype_of(h).itemsize * math.prod(s) for h, s in zip(e.hf, e.hf_shapes))

    table = entries(cfg) + mtp_copies(cfg)
    shards = _shards(table, nbytes, limit)
    empty = empty_shared_experts(cfg)
    total = sum(nbytes(e) for e in table)
    tmp = staging(out, overwrite)
    weight_map = {}
    started = time.monotonic()
    with progress(total, f"export {ckpt.name}", quiet) as bar:
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            specs = [(h, dtype_of(h), s) for e in shard for h, s in zip(e.hf, e.hf_shapes)]
            if i == len(shards) - 1:
                specs += [(h, out_dtype, s) for h, s in empty.items()]
            writer = ShardWriter(tmp / file, specs)
            for e in shard:
                whole = reader.read(e.dist, e.expert)
                for name, t in zip(e.hf, split(cfg, e, whole)):
                    writer.write(name, t.to(dtype_of(name)))
                    bar.update(t.numel() * dtype_of(name).itemsize)
                del whole
            for name, shape in (empty.items() if i == len(shards) - 1 else ()):
                writer.write(name, torch.empty(shape, dtype=out_dtype))
            writer.close()
            weight_map.update({name: file for name, _, _ in specs})
    (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(hf_config(cfg, out_dtype), indent=2) + "\n")
    carried = copy_side_files(ckpt / checkpoint.HF_FILES, tmp) if (ckpt / checkpoint.HF_FILES).is_dir() else []
    specials = _special_tokens(tmp)
    if "tokenizer.json" in carried and "tokenizer_config.json" not in carried:  # a tokenizer from glm-data prepare
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_position_embeddings,
             **{f"{k}_token": v for k, (v, _) in specials.items()}}, indent=2) + "\n")
    if "generation_config.json" not in carried:
        (tmp / "generation_config.json").write_text(json.dumps(
            {"_from_model_config": True, **{f"{k}_token_id": i for k, (_, i) in specials.items()}}, indent=2) + "\n")
    publish(tmp, out)
    if not quiet:
        elapsed = time.monotonic() - started
        print(f"exported {ckpt} -> {out}: {len(weight_map)} tensors, {total / 1e9:.2f} GB in {len(shards)} shard(s), "
              f"{total / 1e9 / max(elapsed, 1e-9):.2f} GB/s" + (f"; carried {', '.join(carried)}" if carried else ""),
              file=sys.stderr)
    return out


def _special_tokens(out: Path) -> dict[str, tuple[str, int]]:
    """{'eos': (token, id), 'pad': ...} from the tokenizer.json beside the weights, where it has them."""
    tok = out / "tokenizer.json"
    if not tok.is_file():
        return {}
    from data.tokenizer import EOD_CANDIDATES

    added = {t["content"]: t["id"] for t in json.loads(tok.read_text()).get("added_tokens", [])}
    eos = next((c for c in EOD_CANDIDATES if c in added), None)
    if eos is None:
        return {}
    pad = "<|pad|>" if "<|pad|>" in added else eos
    return {"eos": (eos, added[eos]), "pad": (pad, added[pad])}
