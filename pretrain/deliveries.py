"""The delivery record (data.record=true): which stored samples each data-parallel reader delivered
at each step, to show across restarts and world-size changes that nothing was delivered twice and
what was dropped.

    run.dir/deliveries/<launch>/dp-<r>.tsv      one line per stored sample: step epoch source shard sample

One directory per launch, one file per data-parallel replica (written by its first rank: its tensor,
context and pipeline peers read the same batches). A launch resumes from a checkpoint's step: what an
earlier launch delivered for later steps was never saved and is delivered again, so `effective`
drops it, launch by launch in the order they started.
"""

from __future__ import annotations

import time
from pathlib import Path

DIR = "deliveries"


class Recorder:
    def __init__(self, run_dir: Path, launch: str, dp_rank: int, start_step: int):
        self.path = Path(run_dir) / DIR / launch / f"dp-{dp_rank}.tsv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(f"# started {time.time():.3f} at step {start_step}\n")

    def write(self, step: int, records: list) -> None:
        if records:
            with open(self.path, "a") as f:
                f.writelines(f"{step}\t{e}\t{src}\t{shard}\t{sample}\n" for e, src, shard, sample in records)


def _read(path: Path) -> tuple[float, int, list[tuple]]:
    started, start_step, rows = float("inf"), 0, []
    for line in path.read_text().splitlines():
        if line.startswith("# started "):
            words = line.split()
            started, start_step = min(started, float(words[2])), int(words[5])
        elif line:
            step, epoch, source, shard, sample = line.split("\t")
            rows.append((int(step), int(epoch), source, int(shard), int(sample)))
    return started, start_step, rows


def effective(run_dir: Path) -> list[tuple]:
    """Every (step, epoch, source, shard, sample) that counts: of each launch, the steps up to the
    step the launches after it resumed from."""
    launches = []
    for d in (Path(run_dir) / DIR).iterdir() if (Path(run_dir) / DIR).is_dir() else ():
        files = [_read(f) for f in sorted(d.glob("dp-*.tsv"))]
        if files:
            launches.append((min(f[0] for f in files), files[0][1], [r for f in files for r in f[2]]))
    launches.sort()
    out = []
    for i, (_, _, rows) in enumerate(launches):
        redone = min((start for _, start, _ in launches[i + 1:]), default=None)
        out += [r for r in rows if redone is None or r[0] <= redone]
    return out
