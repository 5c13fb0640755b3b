"""The benchmarks' smoke modes: each runs end to end on a CPU at a tiny size (never a timed
assertion: the figures belong in benchmarks/RESULTS.md, measured on the hardware they name)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_peer_step_runs_our_side_and_says_why_the_peer_did_not_run():
    """torchtitan is not a dependency: --help works without it, and --smoke runs our side, then says
    why the peer's row is empty and exits 0 (with torchtitan importable, its forward runs too)."""
    p = _bench("benchmarks/peer_step.py", "--help")
    assert p.returncode == 0 and "--peer-path" in p.stdout and "torchtitan" in p.stdout
    p = _bench("benchmarks/peer_step.py", "--smoke", "--steps", "1", "--balanced")
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"tiny widths, 3 layers \(1 dense\), 8 experts top-2 \+ 1 shared, MTP 0; 1 x 128 tokens; "
                     r"float32; balanced routing", p.stdout), p.stdout
    assert re.search(r"glm-pretrain \(torch\)\s+[\d.]+M\s+\d+ms\s+[\d,]+", p.stdout), p.stdout
    assert re.search(r"torchtitan\s+(not run: ModuleNotFoundError: No module named 'torchtitan'|\(forward only\))",
                     p.stdout), p.stdout
