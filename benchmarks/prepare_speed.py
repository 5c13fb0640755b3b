"""`glm-data prepare` against the tokenizer's own speed, on the same documents, with a 151k-id
byte-level BPE like GLM-4.5's (151,552 ids).

The bound is the tokenizer alone: `encode_batch_fast` over the documents, one process, one thread
(MB/s and tokens/s of text). prepare is measured end to end, as a user runs it (`glm-data prepare
... --workers W`: start-up, reading, tokenising, FIM, compression, shards, manifest). Target: with
every core busy, at least 0.8 of the bound per core; a 10 MB one-line document (a minified file)
at no less than half the bound's MB/s; a worker's peak memory under 1 GB.

Also measured, to say where the time goes: the bound run on every core at once (what the machine
itself gives each core when all are busy), and prepare under the tokenizer's own threading
switched on from outside (TOKENIZERS_PARALLELISM=true) or pinned (RAYON_NUM_THREADS=1).

The tokenizer: Qwen's 151,643 public BPE ranks (the family of GLM-4.5's vocabulary), converted to a
tokenizer.json with transformers' TikTokenConverter. The ranks ship inside the `dashscope` wheel:
`pip install --no-deps dashscope` (2.4 MB; nothing of it is imported), or give `--tiktoken FILE`
or a ready `--tokenizer tokenizer.json`. The text: this machine's own real text and code (the
Python standard library's sources, /usr/share/doc and the man pages), as JSONL, capped at --mb.

  .venv/bin/python benchmarks/prepare_speed.py [--mb 200] [--work DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import base64
import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.prepare import CHUNK_DOCS  # noqa: E402

# Qwen's split pattern (dashscope's qwen_tokenizer.PAT_STR): single digits, as GLM-4.5's tokenizer
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIALS = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
GLM_DATA = [str(Path(sys.executable).with_name("glm-data"))]  # the installed command, as a user runs it


# --- inputs ----------------------------------------------------------------------------------------
def tiktoken_file(given: str | None) -> Path:
    if given:
        return Path(given)
    spec = importlib.util.find_spec("dashscope")  # located, never imported
    if spec and spec.origin:
        path = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
        if path.exists():
            return path
    sys.exit("no 151k-id BPE: `pip install --no-deps dashscope` (its wheel ships Qwen's ranks, "
             "resources/qwen.tiktoken), or pass --tiktoken FILE or --tokenizer tokenizer.json")


def build_tokenizer(ranks: Path, out: Path) -> Path:
    """tokenizer.json from a tiktoken ranks file (base64 token, rank per line)."""
    if out.exists():
        return out
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path):  # the file format is two fields a line: no need for tiktoken itself
            lines = Path(path).read_bytes().splitlines()
            return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}

    tok = Converter(str(ranks), pattern=QWEN_PATTERN, extra_special_tokens=SPECIALS).converted()
    tok.save(str(out))
    return out


def machine_texts() -> list[tuple[str, Path]]:
    """(kind, file) of this machine's real text and code, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    text = sorted(p for root in ("/usr/share/doc", "/usr/share/man") for p in Path(root).rglob("*") if p.is_file())
    out = []
    for i in range(max(len(code), len(text))):  # interleaved, so that every part of the corpus mixes both
        out += [("code", code[i])] if i < len(code) else []
        out += [("text", text[i])] if i < len(text) else []
    return out


def build_corpus(mb: float, out: Path, files: int = 16) -> tuple[list[Path], int]:
    """JSONL files of about `mb` MB of text in all; returns (files, bytes of text)."""
    stamp = out / "done.json"
    if stamp.exists():
        return sorted(out.glob("part-*.jsonl")), json.loads(stamp.read_text())["bytes"]
    out.mkdir(parents=True, exist_ok=True)
    docs, total = [], 0
    for _, path in machine_texts():
        try:
            raw = path.read_bytes()
            text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
            continue
        if not text.strip() or "\0" in text:
            continue
        docs.append(text)
        total += len(text.encode())
        if total >= mb * 1e6:
            break
    per = -(-len(docs) // files)
    paths = []
    for k in range(files):
        path = out / f"part-{k:02d}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[k * per:(k + 1) * per]))
        paths.append(path)
    stamp.write_text(json.dumps({"bytes": total, "documents": len(docs)}))
    return paths, total


def one_line(corpus: list[Path], mb: float, out: Path) -> tuple[Path, int]:
    """One document of `mb` MB and no newline: the corpus's text with its newlines made spaces."""
    if not out.exists():
        text, size = [], 0
        for path in corpus:
            for line in path.open():
                text.append(json.loads(line)["text"].replace("\n", " "))
                size += len(text[-1])
                if size >= mb * 1e6:
                    break
            if size >= mb * 1e6:
                break
        out.write_text(json.dumps({"text": "".join(text)[:int(mb * 1e6)]}) + "\n")
    return out, len(json.loads(out.read_text())["text"].encode())


# --- the runs --------------------------------------------------------------------------------------
BOUND = r"""
import json, os, sys, time
os.environ["TOKENIZERS_PARALLELISM"] = "false"
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
docs = [json.loads(line)["text"] for f in sys.argv[3:] for line in open(f)]
chunk = int(sys.argv[2])
start, tokens = time.perf_counter(), 0
for i in range(0, len(docs), chunk):
    tokens += sum(len(e.ids) for e in tok.encode_batch_fast(docs[i:i + chunk], add_special_tokens=False))
print(json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens}))
"""


def bound(tokenizer: Path, corpus: list[Path], copies: int = 1) -> list[dict]:
    """The tokenizer alone, one thread, in `copies` processes at once (each over all the documents)."""
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", BOUND, str(tokenizer), str(CHUNK_DOCS), *map(str, corpus)],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(copies)]
    return [json.loads(p.communicate()[0]) for p in procs]


def prepare(tokenizer: Path, inputs: list[Path], workers: int, work: Path, env: dict | None = None) -> dict:
    out = work / "out"
    cmd = [*GLM_DATA, "prepare", *map(str, inputs), "-o", str(out), "--tokenizer", str(tokenizer),
           "--workers", str(workers), "--overwrite", "-q"]
    start = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - start
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    peak = [float(x) for x in re.findall(r"peak memory of a worker (\d+) MB", p.stdout)]
    return {"seconds": seconds, "tokens": manifest["totals"]["tokens"], "worker_peak_mb": peak[0] if peak else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=200, help="MB of text to prepare (default 200)")
    ap.add_argument("--long-mb", type=float, default=10, help="size of the one-line document (default 10)")
    ap.add_argument("--work", help="working directory, kept for the next run (default: a temporary one)")
    ap.add_argument("--tiktoken", help="a tiktoken ranks file (default: the one in the dashscope package)")
    ap.add_argument("--tokenizer", help="a ready tokenizer.json instead of the 151k BPE")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="workers for the all-cores run")
    ap.add_argument("--repeats", type=int, default=3, help="pairs of (bound, prepare --workers N) runs (default 3)")
    ap.add_argument("--smoke", action="store_true", help="a tiny size, to check that the benchmark runs")
    args = ap.parse_args()
    if args.smoke:
        args.mb, args.long_mb, args.repeats = 1, 0.5, 1
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="glm-prepare-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = Path(args.tokenizer) if args.tokenizer else build_tokenizer(tiktoken_file(args.tiktoken),
                                                                             work / "bpe-151k.json")
    corpus, size = build_corpus(args.mb, work / f"corpus-{args.mb:g}MB")
    cores, w = os.cpu_count() or 1, args.workers
    vocab = json.loads(tokenizer.read_text())["model"]["vocab"]
    print(f"machine: {cores} cores, {_cpu_name()}; tokenizer {tokenizer.name} ({len(vocab):,} ids); "
          f"{size / 1e6:.1f} MB of text in {len(corpus)} JSONL files")

    # The bound and prepare --workers N alternate, `repeats` times: on a shared machine the speed drifts
    # by 10% over minutes, so each ratio is taken against the bound measured just before it.
    rows, pairs = [], []
    for k in range(args.repeats):
        b = bound(tokenizer, corpus)[0]
        r = prepare(tokenizer, corpus, w, work)
        pairs.append((b, r))
        rows.append((f"bound: encode_batch_fast, 1 process, 1 thread (#{k + 1})", size, b, 1, None, b))
        rows.append((f"prepare --workers {w} (#{k + 1})", size, r, w, r["worker_peak_mb"], b))
    ref = sorted(pairs, key=lambda p: p[0]["seconds"])[len(pairs) // 2][0]  # the median bound, for the rest
    busy = bound(tokenizer, corpus, copies=cores)
    rows.append((f"bound on all {cores} cores at once (the slowest process)", size,
                 {"seconds": max(b["seconds"] for b in busy), "tokens": ref["tokens"]}, 1, None, ref))
    for label, workers, env in [("prepare --workers 1", 1, None),
                                (f"prepare --workers {w}, TOKENIZERS_PARALLELISM=true", w,
                                 {"TOKENIZERS_PARALLELISM": "true"}),
                                (f"prepare --workers {w}, RAYON_NUM_THREADS=1", w, {"RAYON_NUM_THREADS": "1"})]:
        r = prepare(tokenizer, corpus, workers, work, env)
        rows.append((label, size, r, workers, r["worker_peak_mb"], ref))
    long_doc, long_size = one_line(corpus, args.long_mb, work / f"one-line-{args.long_mb:g}MB.jsonl")
    r = prepare(tokenizer, [long_doc], 1, work)
    rows.append((f"prepare --workers 1, one {long_size / 1e6:.3g} MB line", long_size, r, 1, r["worker_peak_mb"], ref))

    print(f"{'run':58s} {'MB/s':>7s} {'Mtok/s':>7s} {'x bound':>8s} {'per core':>9s} {'worker peak':>12s}")
    for label, nbytes, r, workers, peak, b in rows:
        rate = nbytes / 1e6 / r["seconds"]
        mbps = size / 1e6 / b["seconds"]
        print(f"{label:58s} {rate:7.2f} {r['tokens'] / r['seconds'] / 1e6:7.3f} {rate / mbps:8.2f} "
              f"{rate / mbps / workers:9.2f} {f'{peak:.0f} MB' if isinstance(peak, float) else '-':>12s}")
    per_core = sorted(b["seconds"] / r["seconds"] / w for b, r in pairs)
    print(f"prepare --workers {w} per core against the bound just before it: "
          f"{', '.join(f'{x:.2f}' for x in per_core)} (median {per_core[len(per_core) // 2]:.2f}). "
          f"Bound (median): {size / 1e6 / ref['seconds']:.2f} MB/s, {ref['tokens'] / ref['seconds'] / 1e6:.3f}M "
          "tokens/s. prepare's times are end to end (start-up included), the bound's the tokenising alone; a row "
          "after the pairs is taken against the median bound")
    return 0


def _cpu_name() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
        return f"{names[0]}{', AVX512-BF16' if 'avx512_bf16' in flags else ''}"
    except (OSError, IndexError, StopIteration):
        import platform

        return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
