"""`glm-data prepare`: raw documents -> tokens (+ end-of-document, + Fill-in-the-Middle for code) ->
zstd-compressed WebDataset shards and a manifest.

Documents are read in order and cut into fixed chunks; worker processes tokenise, group whole
documents into samples and compress them; the main process writes the samples in chunk order.
Nothing depends on the number of workers or on the clock, so the same inputs and options give
byte-identical shards. Everything is written into a hidden directory beside the output and moved
into place when complete: a failed or interrupted run leaves the previous output as it was.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds
import zstandard

from data import fim, format as fmt, inputs, tokenizer as toks
from data.corpus import Document

CHUNK_DOCS = 256  # documents per unit of work; samples never span chunks
DEFAULT_SHARD_TOKENS = 1 << 27
EMBEDDED_SHARD_TOKENS = 1 << 15  # the embedded corpus is small; many shards let many readers share it


@dataclass
class Options:
    inputs: list[str]
    out: str
    name: str = ""
    tokenizer: str | None = None
    vocab_size: int = toks.DEFAULT_VOCAB
    text_field: str = "text"
    code: bool = False
    fim_rate: float = 0.5
    fim_spm_rate: float = 0.5
    eod_token: str | None = None
    seed: int = 0
    shard_tokens: int | None = None
    sample_tokens: int = 32768
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    zstd_level: int = 3
    overwrite: bool = False
    invalid_utf8: str = "error"  # error | replace (bytes that are not UTF-8 become U+FFFD, counted)

    def validate(self) -> None:
        for name in ("fim_rate", "fim_spm_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise fmt.DataError(f"--{name.replace('_', '-')}={getattr(self, name)} must lie in [0, 1]")
        for name in ("sample_tokens", "workers", "vocab_size"):
            if getattr(self, name) < 1:
                raise fmt.DataError(f"--{name.replace('_', '-')}={getattr(self, name)} must be positive")
        if self.shard_tokens is not None and self.shard_tokens < 1:
            raise fmt.DataError(f"--shard-tokens={self.shard_tokens} must be positive")
        if self.invalid_utf8 not in ("error", "replace"):
            raise fmt.DataError(f"--invalid-utf8={self.invalid_utf8!r}: expected error or replace")


# --- worker side -----------------------------------------------------------------------------------
_W: dict = {}


def _init_worker(tokenizer_json: str, settings: dict) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = toks.Tokenizer.from_str(tokenizer_json)
    tok.encode_special_tokens = True  # text that spells "<|endoftext|>" is text, not a document break
    _W.update(settings, tok=tok, ids=toks.SpecialIds(**settings["ids"]),
              compressor=zstandard.ZstdCompressor(level=settings["level"], write_checksum=True))


def _tokenise(docs: list[Document]) -> list[np.ndarray]:
    """Token ids per document, FIM applied to a drawn fraction of code documents, EOD appended."""
    plans, pieces = [], []
    for doc in docs:
        # drawn from the seed and the document's id only: the same inputs give the same draws
        # whatever the dataset is called or wherever it is written
        rng = fim.rng_for(_W["seed"], "fim", doc.id) if _W["code"] else None
        if rng is not None and rng.random() < _W["fim_rate"]:
            mode, parts = fim.permute(rng, doc.text, _W["fim_spm_rate"])
        else:
            mode, parts = None, [doc.text]
        plans.append((mode, len(pieces), len(parts)))
        pieces.extend(parts)
    encoded = [e.ids for e in _W["tok"].encode_batch_fast(pieces, add_special_tokens=False)]
    out = []
    for mode, start, n in plans:
        ids = fim.arrange(mode, *encoded[start:start + 3], _W["ids"]) if mode else encoded[start]
        out.append(np.array([*ids, _W["ids"].eod], dtype=_W["dtype"]))
    return out


def _encode_chunk(job: tuple[int, list[Document]]) -> tuple[int, list[tuple[int, int, dict]], int, int]:
    """-> (input index, [(tokens, documents, encoded sample without key)], documents, empty)."""
    index, docs = job
    kept = [d for d in docs if d.text]
    samples, group = [], []

    def flush():
        if group:
            tokens = np.concatenate([t for _, t in group])
            meta = {"source": _W["name"], "docs": [d for d, _ in group], "lengths": [len(t) for _, t in group],
                    "dtype": _W["dtype"]}
            samples.append((len(tokens), len(group), fmt.encode_sample("", tokens, _W["dtype"], meta, _W["compressor"])))
            group.clear()

    pending = 0
    for doc, tokens in zip(kept, _tokenise(kept)):
        if group and pending + len(tokens) > _W["sample_tokens"]:
            flush()
            pending = 0
        group.append((doc.id, tokens))
        pending += len(tokens)
    flush()
    return index, samples, len(kept), len(docs) - len(kept)


# --- main side -------------------------------------------------------------------------------------
def _jobs(files: list[str], reader: inputs.Reader) -> Iterator[tuple[int, list[Document]]]:
    for index, spec in enumerate(files):
        chunk: list[Document] = []
        for doc in reader.read(spec):
            chunk.append(doc)
            if len(chunk) == CHUNK_DOCS:
                yield index, chunk
                chunk = []
        if chunk:
            yield index, chunk


class ShardWriter:
    """Writes samples into shard-NNNNNN.tar files of about `shard_tokens` tokens each."""

    def __init__(self, out: Path, shard_tokens: int):
        self.out, self.shard_tokens = out, shard_tokens
        self.shards: list[dict] = []
        self.tar = None

    def write(self, tokens: int, docs: int, sample: dict) -> None:
        if self.tar is None:
            name = fmt.shard_name(len(self.shards))
            self.tmp = self.out / (name + ".tmp")
            self.tar = wds.TarWriter(str(self.tmp), user="", group="", mode=0o644, mtime=0, encoder=False)
            self.current = {"name": name, "samples": 0, "documents": 0, "tokens": 0}
        c = self.current
        self.tar.write({**sample, "__key__": f"{len(self.shards):06d}_{c['samples']:06d}"})
        c["samples"] += 1
        c["documents"] += docs
        c["tokens"] += tokens
        if c["tokens"] >= self.shard_tokens:
            self.close()

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        final = self.out / self.current["name"]
        self.tmp.replace(final)
        self.shards.append({**self.current, "bytes": final.stat().st_size, "sha256": fmt.sha256_file(final)})
        self.tar = None


def _progress(enabled: bool):
    from tqdm import tqdm

    return tqdm(unit=" doc", disable=not enabled, file=sys.stderr, smoothing=0.1, dynamic_ncols=True)


def check_output(out: Path, specs: list[str], files: list[str], overwrite: bool) -> None:
    """Refuse, before any work, an output that is a file, that holds something and may not be
    replaced, or that overlaps an input (prepare would read its own shards, or replace its inputs)."""
    if out.exists() and not out.is_dir():
        raise fmt.DataError(f"-o {out}: is a file; the output is a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "a prepared dataset" if (out / fmt.MANIFEST).exists() else "files that are not a prepared dataset"
        raise fmt.DataError(f"-o {out}: already holds {what}; pass --overwrite to replace it")
    o = out.resolve()
    for spec in specs:
        if spec.startswith(inputs.EMBEDDED) or not Path(spec).exists():
            continue
        d = Path(spec).resolve()
        if d == o or d in o.parents:
            raise fmt.DataError(f"-o {out} lies inside the input {spec}: prepare would read its own output")
        if o in d.parents:
            raise fmt.DataError(f"input {spec} lies inside -o {out}, which prepare replaces")
    for f in files:
        if not f.startswith(inputs.EMBEDDED) and o in Path(f).resolve().parents:
            raise fmt.DataError(f"input {f} lies inside -o {out}, which prepare replaces")


def prepare(opts: Options, progress: bool = True) -> dict:
    """Run `prepare`; returns the manifest (also written to <out>/manifest.json).

    Everything is written into a hidden sibling directory and moved into place at the end; a
    failed or interrupted run leaves the previous output (if any) as it was and no stray files."""
    import shutil

    opts.validate()
    files = inputs.expand(opts.inputs)
    out = Path(opts.out)
    check_output(out, opts.inputs, files, opts.overwrite)
    name = opts.name or out.resolve().name
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    work.mkdir()
    try:
        manifest = _prepare_into(work, name, files, opts, progress)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            work.rename(out)
            shutil.rmtree(old)
        else:
            work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _prepare_into(out: Path, name: str, files: list[str], opts: Options, progress: bool) -> dict:
    started = time.perf_counter()
    if opts.tokenizer:
        tok, tok_source = toks.load(opts.tokenizer), str(opts.tokenizer)
    else:
        tok, tok_source = toks.train_default(opts.vocab_size), f"byte-level BPE on the embedded corpus ({opts.vocab_size})"
    ids = toks.special_ids(tok, opts.eod_token, fim=opts.code, where=tok_source)
    tok.save(str(out / fmt.TOKENIZER))
    tok_json = tok.to_str()
    dtype = fmt.dtype_for(toks.vocab_size(tok))
    shard_tokens = opts.shard_tokens or (EMBEDDED_SHARD_TOKENS if all(f.startswith(inputs.EMBEDDED) for f in files)
                                         else DEFAULT_SHARD_TOKENS)
    settings = {"name": name, "code": opts.code, "fim_rate": opts.fim_rate, "fim_spm_rate": opts.fim_spm_rate,
                "seed": opts.seed, "sample_tokens": opts.sample_tokens, "dtype": dtype, "level": opts.zstd_level,
                "ids": asdict(ids)}

    per_input = [{"path": f, "documents": 0, "empty": 0, "tokens": 0} for f in files]
    reader = inputs.Reader(opts.text_field, opts.invalid_utf8)
    writer = ShardWriter(out, shard_tokens)
    bar = _progress(progress)
    pool = None
    try:
        if opts.workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(opts.workers, _init_worker, (tok_json, settings))
            results = pool.imap(_encode_chunk, _jobs(files, reader))
        else:
            _init_worker(tok_json, settings)
            results = map(_encode_chunk, _jobs(files, reader))
        for index, samples, n_docs, n_empty in results:
            for tokens, docs, sample in samples:
                writer.write(tokens, docs, sample)
                per_input[index]["tokens"] += tokens
            per_input[index]["documents"] += n_docs
            per_input[index]["empty"] += n_empty
            bar.update(n_docs + n_empty)
            bar.set_postfix_str(f"{sum(p['tokens'] for p in per_input) / 1e6:.1f}M tokens", refresh=False)
        writer.close()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    if not writer.shards:
        raise fmt.DataError(f"{', '.join(opts.inputs)}: no documents with text found")
    for item in per_input:
        if reader.replaced.get(item["path"]):
            item["replaced_characters"] = reader.replaced[item["path"]]

    manifest = fmt.make_manifest(
        name, "code" if opts.code else "text", dtype, toks.describe(tok, ids, tok_source), writer.shards, per_input,
        {"text_field": opts.text_field, "fim_rate": opts.fim_rate if opts.code else 0.0,
         "fim_spm_rate": opts.fim_spm_rate, "seed": opts.seed, "sample_tokens": opts.sample_tokens,
         "shard_tokens": shard_tokens, "zstd_level": opts.zstd_level, "invalid_utf8": opts.invalid_utf8})
    fmt.write_manifest(out, manifest)
    manifest["elapsed_s"] = time.perf_counter() - started  # reported, not stored: shards stay reproducible
    return manifest


def summary(manifest: dict, out: str) -> str:
    t = manifest["totals"]
    raw = t["tokens"] * np.dtype(manifest["dtype"]).itemsize
    skipped = sum(p["empty"] for p in manifest["inputs"])
    silent = [p["path"] for p in manifest["inputs"] if p["documents"] == 0]
    ratio = raw / max(t["bytes"], 1)
    size = (f"{ratio:.1f}x smaller than raw {manifest['dtype']}" if ratio >= 1 else
            f"{1 / max(ratio, 1e-9):.1f}x larger than raw {manifest['dtype']}: on so few tokens the tar headers "
            "outweigh the compression")
    lines = [f"{out}: {t['documents']:,} documents, {t['tokens']:,} tokens in {len(manifest['shards'])} shards "
             f"({t['bytes'] / 1e6:.1f} MB, {size})",
             f"  tokenizer: {manifest['tokenizer']['source']}, vocab {manifest['tokenizer']['vocab_size']}, "
             f"sha256 {manifest['tokenizer']['sha256'][:12]}",
             f"  {manifest['elapsed_s']:.1f} s, {t['tokens'] / max(manifest['elapsed_s'], 1e-9) / 1e6:.2f}M tokens/s"]
    if skipped:
        lines.append(f"  skipped {skipped:,} empty documents")
    replaced = [(p["path"], p["replaced_characters"]) for p in manifest["inputs"] if p.get("replaced_characters")]
    if replaced:
        lines.append(f"  replaced {sum(n for _, n in replaced):,} invalid UTF-8 sequence(s) with U+FFFD in "
                     f"{len(replaced)} input(s): " + ", ".join(f"{p} ({n})" for p, n in replaced[:5])
                     + (" ..." if len(replaced) > 5 else ""))
    if silent:
        lines.append(f"  {len(silent)} input(s) gave no documents (empty, or not UTF-8 text): "
                     f"{', '.join(silent[:5])}{' ...' if len(silent) > 5 else ''}")
    return "\n".join(lines)


def main_args(args) -> int:  # called by data.cli
    opts = Options(**{k: v for k, v in vars(args).items() if k in Options.__dataclass_fields__})
    manifest = prepare(opts, progress=not args.quiet)
    print(summary(manifest, opts.out))
    return 0
