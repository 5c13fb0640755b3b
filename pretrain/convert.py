"""glm-convert: checkpoints to and from Hugging Face `glm4_moe` directories, streamed.

  glm-convert export outputs/runs/air OUT/GLM-4.5-Air-cpt          (a run's latest checkpoint)
  glm-convert import GLM-4.5-Air/ outputs/runs/air-cpt --stage mid_repo_code
  glm-pretrain experiment=glm45_air run.dir=outputs/runs/air-cpt   (continues from the weights)

Both directions go one tensor at a time through the one mapping table (model/hf_mapping.py):
export reads each whole tensor from the dist checkpoint (whatever tensor / expert / pipeline
layout wrote it; pretrain/checkpoint_io.py), splits it into its Hugging Face tensors and appends
them to the output shard being written (pretrain/hf_dir.py); import reads the Hugging Face
tensors of one Megatron tensor, joins them, and writes it. Peak memory is about the largest tensor,
not a shard, not the model. Output goes to a temporary name beside OUT and is moved into place
when complete; everything is checked before any tensor is converted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

HELP = "\n\n".join(__doc__.split("\n\n")[:2]) + """

commands:
  export CKPT OUT   CKPT: a run directory (its checkpoints/latest) or one checkpoint directory,
                    written by glm-pretrain under any layout, or by `import`. OUT: a Hugging Face
                    directory: config.json, generation_config.json, sharded *.safetensors with
                    model.safetensors.index.json, experts one by one and the MTP layer as
                    model.layers.<num_layers> as in the released GLM-4.5 checkpoints, and the
                    tokenizer files the checkpoint carries. Loads with
                    AutoModelForCausalLM.from_pretrained (which skips the MTP layer).
  import HF_DIR OUT a glm4_moe directory (config.json + safetensors; tokenizer files carried along
                    when present) -> OUT, a run directory whose checkpoints/latest holds the
                    weights only: glm-pretrain run.dir=OUT starts from them with a fresh optimizer
                    and schedules, at the beginning of the first stage or of --stage. The
                    checkpoint loads under any parallel layout.

Run `glm-convert export --help` or `glm-convert import --help` for the options.
"""


def _release_freed_memory() -> None:
    """Have glibc hand blocks of 1 MiB and more back to the system when freed. By default it raises
    that threshold (up to 32 MiB) each time such a block is freed, after which tensors below it come
    from the heap and stay resident once freed: an import of a 315 MB model peaked 20 or 100 MB above
    its start depending on the order of its tensors, 19 MB with the threshold fixed."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def _progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=quiet,
                mininterval=1.0, file=sys.stderr, dynamic_ncols=True)


def _staging(out: Path, overwrite: bool) -> Path:
    """The temporary directory beside `out` that becomes `out` when complete."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (--overwrite replaces it)")
    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a conversion that died
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


# ---- export -------------------------------------------------------------------------------------

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
    from pretrain.hf_dir import INDEX, ShardWriter, copy_side_files, parse_size

    _release_freed_memory()
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
    tmp = _staging(out, overwrite)
    weight_map = {}
    started = time.monotonic()
    with _progress(total, f"export {ckpt.name}", quiet) as bar:
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
    _publish(tmp, out)
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


# ---- import -------------------------------------------------------------------------------------

def import_(hf_dir: str | Path, out: str | Path, stage: str | None = None, parallel: dict | None = None,
            overwrite: bool = False, quiet: bool = False) -> Path:
    """A Hugging Face glm4_moe directory -> a run directory holding a weights-only checkpoint."""
    import dataclasses

    from model import pipeline
    from model.config import ParallelConfig
    from model.hf_mapping import entries, merge
    from pretrain import checkpoint
    from pretrain.checkpoint_io import Chunk, Pending, write_tensors
    from pretrain.hf_dir import HFDir, copy_side_files

    _release_freed_memory()
    hf, out = HFDir(hf_dir), Path(out)
    cfg = hf.cfg
    layout = pipeline.check_layout(cfg, ParallelConfig(**(parallel or {})), source="glm-convert import")
    pending: dict[str, Pending] = {}
    for e in entries(cfg):
        dtype = max((hf.dtype(h) for h in e.hf), key=lambda d: d.itemsize)

        def make(e=e):
            t = merge(cfg, e, [hf.get(h) for h in e.hf])
            return t if e.expert is None else t[None]

        if e.expert is None:
            pending[e.dist] = Pending(e.dist, e.shape, dtype, [Chunk((0,) * len(e.shape), e.shape, make)])
        else:
            p = pending.setdefault(e.dist, Pending(e.dist, (cfg.num_experts, *e.shape), dtype, []))
            p.chunks.append(Chunk((e.expert,) + (0,) * len(e.shape), (1, *e.shape), make))
    total = sum(math.prod(c.sizes) * p.dtype.itemsize for p in pending.values() for c in p.chunks)
    tmp = _staging(out, overwrite)
    ckpt = tmp / "checkpoints" / checkpoint.step_name(0)
    started = time.monotonic()
    with _progress(total, f"import {hf.dir.name}", quiet) as bar:
        write_tensors(ckpt, list(pending.values()), common={},
                      done=lambda t: bar.update(t.numel() * t.element_size()))
    carried = copy_side_files(hf.dir, ckpt / checkpoint.HF_FILES)
    meta = {"step": 0, "tokens": 0, "weights_only": True, "stage": stage, "source": str(hf.dir.resolve()),
            "model": dataclasses.asdict(cfg), "parallel": vars(layout)}
    checkpoint.finish_external(tmp, ckpt, meta)
    _publish(tmp, out)
    if not quiet:
        elapsed = time.monotonic() - started
        print(f"imported {hf.dir} -> {out}: {total / 1e9:.2f} GB, {total / 1e9 / max(elapsed, 1e-9):.2f} GB/s"
              + (f"; carried {', '.join(carried)}" if carried else "")
              + f"\nstart from it: glm-pretrain experiment=... run.dir={out}", file=sys.stderr)
    return out


# ---- command line -------------------------------------------------------------------------------

def _parallel_overrides(items: list[str]) -> dict:
    import dataclasses

    from model.config import ConfigError, ParallelConfig

    fields = {f.name: f.type for f in dataclasses.fields(ParallelConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        name = key.removeprefix("parallel.")
        if not sep or not key.startswith("parallel.") or name not in fields:
            raise ConfigError(f"{item!r}: expected parallel.FIELD=VALUE with FIELD one of {', '.join(fields)}")
        if name == "sequence_parallel":
            out[name] = value.lower() in ("1", "true", "yes")
        else:
            try:
                out[name] = None if value.lower() in ("null", "none") else int(value)
            except ValueError:
                raise ConfigError(f"{item!r}: parallel.{name} takes an integer") from None
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        return 0 if argv else 2
    parser = argparse.ArgumentParser(prog="glm-convert")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="dist checkpoint -> Hugging Face directory",
                        description="A run's latest checkpoint (or one checkpoint directory) -> a Hugging Face "
                                    "glm4_moe directory, one tensor in memory at a time.")
    ex.add_argument("ckpt", help="run directory (its checkpoints/latest) or checkpoint directory")
    ex.add_argument("out", help="the Hugging Face directory to write")
    ex.add_argument("--dtype", choices=DTYPES, default="bf16",
                    help="dtype of the weights written (default bf16, as released; the router's weight and "
                         "expert bias are written in fp32, as transformers keeps them)")
    ex.add_argument("--shard-size", default="5GB", help="largest safetensors file (default 5GB; e.g. 500MB, 2GiB)")
    ex.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")
    ex.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    im = sub.add_parser("import", help="Hugging Face directory -> weights-only dist checkpoint",
                        description="A Hugging Face glm4_moe directory -> a run directory whose checkpoints/latest "
                                    "holds its weights; glm-pretrain run.dir=OUT continues from them with a fresh "
                                    "optimizer under any parallel layout.")
    im.add_argument("hf_dir", help="glm4_moe directory: config.json and *.safetensors (+ index)")
    im.add_argument("out", help="the run directory to create")
    im.add_argument("--stage", help="start training at the beginning of this stage of the experiment "
                                    "(default: the first)")
    im.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")
    im.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    im.epilog = ("parallel.FIELD=VALUE ... (any number, anywhere): the layout you will train with, checked against "
                 "the model now and recorded in meta.json; the checkpoint itself loads under any layout.")
    args, overrides = parser.parse_known_args(argv)
    if overrides and (args.command != "import" or not all(o.startswith("parallel.") for o in overrides)):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")

    from model.config import ConfigError
    from pretrain.checkpoint_io import CheckpointError
    from pretrain.hf_dir import HFDirError

    try:
        if args.command == "export":
            from pretrain.hf_dir import parse_size

            parse_size(args.shard_size)  # a bad size fails before anything is read
            export(args.ckpt, args.out, args.dtype, args.shard_size, args.overwrite, args.quiet)
        else:
            import_(args.hf_dir, args.out, args.stage, _parallel_overrides(overrides), args.overwrite, args.quiet)
    except (CheckpointError, HFDirError, ConfigError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"glm-convert {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
