"""glm-convert on a synthetic multi-GB model: GB/s against plain copying of the same bytes on the
same disk in the same run, and peak memory against the largest output shard.

A random glm4_moe directory (bf16, the router in fp32, as released) is written with the
`safetensors` package, imported into a dist checkpoint, and exported back. Each conversion runs in
a fresh process whose peak RSS (VmHWM) is read when it ends; the baseline is `shutil.copyfile` of
the files the conversion reads (the checkpoint's `*.distcp` for export, the safetensors for
import), in the same run. All reads are from a warm page cache, for the copy as for the
conversion; every timing starts after and ends with `os.sync()`, so each pays for its own writes
reaching the disk (without it the copy's speed swung from 0.5 to 2.4 GB/s with the dirty pages
the conversion before it left). Targets: export >= 0.5x copy speed; export peak RSS <= 1.5x the largest output shard.

  .venv/bin/python benchmarks/hf_export.py [--layers 8] [--shard-size 1GB] [--dir /tmp/hf-export-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import ModelConfig  # noqa: E402
from model.hf_mapping import HF_FP32, hf_config  # noqa: E402
from convert.hf_dir import INDEX, expected_shapes, parse_size  # noqa: E402

_CONVERT = """
import sys, time
from pathlib import Path

def status(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

from convert.export import export
from convert.importer import import_
import model.hf_mapping, pretrain.checkpoint, pretrain.checkpoint_io, convert.hf_dir, tqdm
import os
Path("/proc/self/clear_refs").write_text("5")
base = status("VmRSS")
os.sync()
t = time.perf_counter()
if sys.argv[1] == "export":
    export(sys.argv[2], sys.argv[3], dtype="bf16", shard_size=sys.argv[4], quiet=True)
else:
    import_(sys.argv[2], sys.argv[3], quiet=True)
os.sync()
print(time.perf_counter() - t, base, status("VmHWM"))
"""


def model(layers: int) -> ModelConfig:
    """GLM-4.5-Air's proportions at a quarter of its width, `layers` deep (1 dense + MoE) + MTP."""
    return ModelConfig(name="bench", vocab_size=32768, hidden_size=1024, num_layers=layers, num_attention_heads=24,
                       num_query_groups=2, head_dim=128, ffn_hidden_size=2816, moe_ffn_hidden_size=704,
                       num_experts=64, num_shared_experts=1, moe_router_topk=8, first_k_dense=1,
                       routed_scaling_factor=1.0, qk_norm=False, partial_rotary_factor=0.5, rope_theta=1e6,
                       max_position_embeddings=4096, mtp_num_layers=1).validate()


def write_hf_dir(path: Path, cfg: ModelConfig, shard_bytes: int) -> int:
    """A random glm4_moe directory in shards of about `shard_bytes`; returns its tensor bytes."""
    path.mkdir(parents=True)
    shapes = expected_shapes(cfg)
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, total, n = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shape in shapes.items():
        dtype = torch.float32 if name.endswith(HF_FP32) else torch.bfloat16
        t = (0.02 * torch.randn(shape, generator=g)).to(dtype)
        shard[name] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(hf_config(cfg, torch.bfloat16)))
    return total


def copy_speed(files: list[Path], dst: Path) -> tuple[float, int]:
    dst.mkdir(parents=True)
    nbytes = sum(f.stat().st_size for f in files)
    os.sync()
    t = time.perf_counter()
    for f in files:
        shutil.copyfile(f, dst / f.name)
    os.sync()
    return nbytes / (time.perf_counter() - t), nbytes


def convert(*args: str) -> tuple[float, int, int]:
    p = subprocess.run([sys.executable, "-c", _CONVERT, *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode:
        sys.exit(p.stderr)
    seconds, base, peak = p.stdout.split()[-3:]
    return float(seconds), int(base), int(peak)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (default 8: about 3.3 GB in bf16)")
    ap.add_argument("--shard-size", default="1GB", help="output shard size of the export (default 1GB)")
    ap.add_argument("--dir", help="where to write (default: a temporary directory, removed at the end)")
    args = ap.parse_args()
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="hf-export-bench-"))
    if work.exists() and args.dir:
        shutil.rmtree(work)
    cfg = model(args.layers)
    try:
        src = work / "src"
        total = write_hf_dir(src, cfg, parse_size(args.shard_size))
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
              f"model: {args.layers} layers, {cfg.num_experts} experts, {total / 1e9:.2f} GB of tensors in bf16")

        secs, base, peak = convert("import", str(src), str(work / "run"))
        ckpt = next((work / "run" / "checkpoints").glob("step-*"))
        copy, nbytes = copy_speed(sorted(src.glob("*.safetensors")), work / "copy-src")
        print(f"import : {nbytes / secs / 1e9:6.2f} GB/s vs copy {copy / 1e9:.2f} GB/s = {nbytes / secs / copy:.2f}x; "
              f"peak RSS {peak / 2**20:,.0f} MiB ({(peak - base) / 2**20:,.0f} MiB over the {base / 2**20:,.0f} MiB "
              f"after start-up)")

        secs, base, peak = convert("export", str(work / "run"), str(work / "out"), args.shard_size)
        copy, nbytes = copy_speed(sorted(ckpt.glob("*.distcp")), work / "copy-ckpt")
        largest = max(f.stat().st_size for f in (work / "out").glob("*.safetensors"))
        print(f"export : {nbytes / secs / 1e9:6.2f} GB/s vs copy {copy / 1e9:.2f} GB/s = {nbytes / secs / copy:.2f}x; "
              f"peak RSS {peak / 2**20:,.0f} MiB = {peak / largest:.2f}x the largest output shard "
              f"({largest / 2**20:,.0f} MiB); {(peak - base) / 2**20:,.0f} MiB over the {base / 2**20:,.0f} MiB "
              f"after start-up")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
