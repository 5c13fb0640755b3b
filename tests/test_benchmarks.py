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


def test_prepare_speed_reports_prepare_against_the_tokenizer_bound(tmp_path):
    """The smoke size of benchmarks/prepare_speed.py with a small tokenizer (the 151k BPE is an
    optional download): it builds its corpus from this machine's text, measures the bound and every
    prepare row, and prints the per-core ratios."""
    from data import tokenizer as toks

    toks.train_default(512).save(str(tmp_path / "tok.json"))
    p = _bench("benchmarks/prepare_speed.py", "--smoke", "--tokenizer", str(tmp_path / "tok.json"),
               "--work", str(tmp_path / "work"))
    assert p.returncode == 0, p.stderr[-3000:]
    for row in (r"bound: encode_batch_fast, 1 process, 1 thread \(#1\)", r"prepare --workers \d+ \(#1\)",
                r"bound on all \d+ cores at once", r"prepare --workers 1 ", r"TOKENIZERS_PARALLELISM=true",
                r"RAYON_NUM_THREADS=1", r"prepare --workers 1, one [\d.]+ MB line"):
        assert re.search(row + r".*\s[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s", p.stdout), (row, p.stdout)
    assert re.search(r"per core against the bound just before it: [\d.]+ \(median [\d.]+\)", p.stdout), p.stdout
    assert re.search(r"worker peak\n(.*\n)*.*prepare --workers 1 .* \d+ MB", p.stdout), p.stdout


def test_data_loader_reads_the_same_shards_from_a_local_object_store(tmp_path):
    """benchmarks/data_loader.py --store-only: the shards uploaded to a SeaweedFS on this machine and
    read through s3:// in turns with the local files (never skipped: the store comes with the test
    extra)."""
    p = _bench("benchmarks/data_loader.py", "--store-only", "--tokens", "3e6", "--sequences", "60", "--seq", "1024")
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"store: SeaweedFS at http://127.0.0.1:\d+, \d+ objects uploaded", p.stdout), p.stdout
    assert len(re.findall(r"zstd shards, (local|s3) \(#\d\)\s+[\d.]+", p.stdout)) == 6, p.stdout
    assert re.search(r"ratio s3/local per turn: [\d.]+, [\d.]+, [\d.]+ \(median [\d.]+", p.stdout), p.stdout
