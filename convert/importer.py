"""glm-convert import: a Hugging Face glm4_moe directory -> a run directory whose checkpoints/latest
holds its weights only (glm-pretrain run.dir=OUT continues from them with a fresh optimizer, under
any parallel layout).

The Hugging Face tensors of one Megatron tensor are read (convert/hf_dir.py, checked whole against
its config first), joined by the one mapping table (model/hf_mapping.py) and written as they are
asked for by the checkpoint writer (pretrain/checkpoint_io.py): peak memory is about the largest
tensor.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from convert.hf_dir import HFDir, copy_side_files
from convert.staging import progress, publish, release_freed_memory, staging


def import_(hf_dir: str | Path, out: str | Path, stage: str | None = None, parallel: dict | None = None,
            overwrite: bool = False, quiet: bool = False) -> Path:
    """A Hugging Face glm4_moe directory -> a run directory holding a weights-only checkpoint."""
    import dataclasses

    from model import pipeline
    from model.config import ParallelConfig
    from model.hf_mapping import entries, merge
    from pretrain import checkpoint
    from pretrain.checkpoint_io import Chunk, Pending, write_tensors

    release_freed_memory()
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
    tmp = staging(out, overwrite)
    ckpt = tmp / "checkpoints" / checkpoint.step_name(0)
    started = time.monotonic()
    with progress(total, f"import {hf.dir.name}", quiet) as bar:
        write_tensors(ckpt, list(pending.values()), common={},
                      done=lambda t: bar.update(t.numel() * t.element_size()))
    carried = copy_side_files(hf.dir, ckpt / checkpoint.HF_FILES)
    meta = {"step": 0, "tokens": 0, "weights_only": True, "stage": stage, "source": str(hf.dir.resolve()),
            "model": dataclasses.asdict(cfg), "parallel": vars(layout)}
    checkpoint.finish_external(tmp, ckpt, meta)
    publish(tmp, out)
    if not quiet:
        elapsed = time.monotonic() - started
        print(f"imported {hf.dir} -> {out}: {total / 1e9:.2f} GB, {total / 1e9 / max(elapsed, 1e-9):.2f} GB/s"
              + (f"; carried {', '.join(carried)}" if carried else "")
              + f"\nstart from it: glm-pretrain experiment=... run.dir={out}", file=sys.stderr)
    return out
