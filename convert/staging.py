"""Where a conversion writes: a temporary directory beside its output, moved into place when
complete (a conversion that dies leaves no half-written output under the name asked for); its
progress bar; and the allocator setting that keeps its memory at one tensor."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def release_freed_memory() -> None:
    """Have glibc hand blocks of 1 MiB and more back to the system when freed. By default it raises
    that threshold (up to 32 MiB) each time such a block is freed, after which tensors below it come
    from the heap and stay resident once freed: an import of a 315 MB model peaked 20 or 100 MB above
    its start depending on the order of its tensors, 19 MB with the threshold fixed."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=quiet,
                mininterval=1.0, file=sys.stderr, dynamic_ncols=True)


def staging(out: Path, overwrite: bool) -> Path:
    """The temporary directory beside `out` that becomes `out` when complete."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (--overwrite replaces it)")
    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a conversion that died
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
