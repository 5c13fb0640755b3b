"""`glm-data prepare`: raw documents -> tokens (+ end-of-document, + Fill-in-the-Middle for code) ->
zstd-compressed WebDataset shards and a manifest.

Documents are read in order and cut into fixed chunks; worker processes (data/encode.py) tokenise,
group whole documents into samples and compress them; the main process writes the samples in chunk
order.
Nothing depends on the number of workers or on the clock, so the same inputs and options give
byte-identical shards. Everything is written into a hidden directory beside the output and moved
into place when complete: a failed or interrupted run leaves the previous output as it was.

At corpus scale the tokenising is split over jobs: `--part i/N` tokenises and compresses the i-th
of N contiguous ranges of the inputs (balanced by bytes) into `<out>.parts/`, and `--merge N`
then writes the shards and manifest from the N parts, byte for byte those of one run over all
inputs. That holds because samples never span chunks and chunks never span inputs: an input's
samples do not depend on any other input, only the cut into shards does, and the merge makes it.

The output may be on object storage (`-o s3://bucket/prefix`, data/objstore.py): each file is
staged in a local temporary directory, uploaded once complete (retried as reads are) and deleted;
the tokenizer goes first and the manifest last, so a dataset without its manifest is visibly
incomplete (and one being replaced loses its manifest first). With --overwrite, every object under
the prefix that the new manifest does not list is removed at the end. Parts go to
`s3://bucket/prefix.parts/`; the merge reads them from there.
"""

from __future__ import annotations

import io
import itertools
import json
import multiprocessing
import os
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from data import encode, format as fmt, inputs, objstore, tokenizer as toks
from data.corpus import Document

CHUNK_DOCS = 256  # documents per unit of work (or fewer, of CHUNK_CHARS in all); samples never span chunks
CHUNK_CHARS = 1 << 22
# A longer document is cut into documents of about this many characters (at a space between words
# where there is one near), each with its end-of-document token, named `<id>#k/n` and counted: so a
# worker's memory (~5 bytes per character of its longest document) stays under 1 GB whatever the
# inputs hold. 64 Mi characters are ~16M tokens; a training sequence is 4K-128K of them.
MAX_DOCUMENT_CHARS = 1 << 26
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
    part: str | None = None  # "i/N": tokenise only the i-th (from 0) of N ranges of the inputs
    merge: int | None = None  # N: write shards and manifest from the N parts in <out>.parts
    # each first-level subdirectory of an input directory is one repository, one document (code)
    repo_level: bool = False

    def __post_init__(self):
        if self.repo_level:
            self.code = True  # repositories are code: FIM per file (--fim-rate 0 turns it off)

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
        if self.part is not None and self.merge is not None:
            raise fmt.DataError("--part and --merge: one run does one of them")
        if self.part is not None:
            self.part_of()
        if self.merge is not None and self.merge < 1:
            raise fmt.DataError(f"--merge={self.merge} must be positive (the number of parts)")

    def part_of(self) -> tuple[int, int]:
        i, sep, n = (self.part or "").partition("/")
        if not (sep and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
            raise fmt.DataError(f"--part={self.part!r}: expected i/N with 0 <= i < N (e.g. 0/16 ... 15/16)")
        return int(i), int(n)

    def recipe(self) -> dict:
        """What makes the output: a part or a merge must agree with every other part on all of it."""
        return {k: v for k, v in asdict(self).items() if k not in ("out", "workers", "overwrite", "part", "merge")}


# --- main side -------------------------------------------------------------------------------------
def _split(doc: Document, limit: int) -> list[Document]:
    """`doc` as documents of about `limit` characters (see MAX_DOCUMENT_CHARS)."""
    if len(doc.text) <= limit or doc.files:
        return [doc]
    texts = list(toks.pieces(doc.text, limit, reach=65536))
    return [Document(f"{doc.id}#{k}/{len(texts)}", text) for k, text in enumerate(texts, 1)]


def _jobs(files: list[str], reader: inputs.Reader, split: dict[str, int]) -> Iterator[tuple[int, list[Document]]]:
    for index, spec in enumerate(files):
        chunk: list[Document] = []
        chars = 0
        for whole in reader.read(spec):
            docs = _split(whole, MAX_DOCUMENT_CHARS)
            if len(docs) > 1:
                split[spec] = split.get(spec, 0) + 1
            for doc in docs:
                chunk.append(doc)
                chars += len(doc.text)
                if len(chunk) == CHUNK_DOCS or chars >= CHUNK_CHARS:
                    yield index, chunk
                    chunk, chars = [], 0
        if chunk:
            yield index, chunk


class ShardWriter:
    """Writes samples into shard-NNNNNN.tar files of about `shard_tokens` tokens each: WebDataset's
    layout (one tar member per field, `<key>.<field>`, in sorted order), written with the standard
    library's tarfile, as WebDataset's own TarWriter does, because importing `webdataset` imports
    torch (2-3 s and ~250 MB in a process that never uses it)."""

    def __init__(self, out: Path, shard_tokens: int, publish=None):
        self.out, self.shard_tokens = out, shard_tokens
        self.publish = publish  # called with each complete shard's path (an upload to object storage)
        self.shards: list[dict] = []
        self.tar = None

    def write(self, tokens: int, docs: int, sample: dict) -> None:
        if self.tar is None:
            name = fmt.shard_name(len(self.shards))
            self.tmp = self.out / (name + ".tmp")
            self.file = open(self.tmp, "wb")
            self.tar = tarfile.open(fileobj=self.file, mode="w|")
            self.current = {"name": name, "samples": 0, "documents": 0, "tokens": 0}
        c = self.current
        key = f"{len(self.shards):06d}_{c['samples']:06d}"
        for part in sorted(k for k in sample if not k.startswith("_")):
            info = tarfile.TarInfo(f"{key}.{part}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(sample[part]), 0, 0o644, "", ""
            self.tar.addfile(info, io.BytesIO(sample[part]))
        c["samples"] += 1
        c["documents"] += docs
        c["tokens"] += tokens
        if c["tokens"] >= self.shard_tokens:
            self.close()

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.file.close()
        final = self.out / self.current["name"]
        self.tmp.replace(final)
        self.shards.append({**self.current, "bytes": final.stat().st_size, "sha256": fmt.sha256_file(final)})
        self.tar = None
        if self.publish is not None:
            self.publish(final)

    def abort(self) -> None:
        """On an error: close the shard being written and remove it (the finished ones stay for
        --overwrite to replace; a closed stream would otherwise be written to once more at exit)."""
        if self.tar is None:
            return
        try:
            self.tar.close()
        finally:
            self.file.close()
            self.tar = None
            self.tmp.unlink(missing_ok=True)


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


def parts_dir(out: str | Path) -> Path | str:
    """Where `--part` runs leave their parts for `--merge`: beside the output (an s3:// prefix beside
    an s3:// output)."""
    if objstore.is_url(str(out)):
        return f"{str(out).rstrip('/')}.parts"
    out = Path(out)
    return out.parent / f"{out.name}.parts"


def _at(where: Path | str, *names: str) -> Path | str:
    """A file of a local directory or of an s3:// prefix."""
    return f"{where}/{'/'.join(names)}" if isinstance(where, str) else where.joinpath(*names)


def _read(location: Path | str) -> bytes:
    return objstore.read_bytes(location) if isinstance(location, str) else location.read_bytes()


def _exists(location: Path | str) -> bool:
    return objstore.exists(location) if isinstance(location, str) else location.is_file()


def _part_name(i: int, n: int) -> str:
    return f"part-{i:05d}-of-{n:05d}"


def ranges(files: list[str], n: int) -> list[range]:
    """N contiguous ranges of the inputs with about equal bytes each: input j goes to the part its
    byte midpoint falls in (parts may be empty when N exceeds the inputs). The same files give the
    same ranges."""
    sizes = [inputs.input_bytes(f) for f in files]
    total, cum, counts = sum(sizes), 0, [0] * n
    for size in sizes:
        counts[min(n - 1, int((cum + size / 2) * n / total))] += 1
        cum += size
    starts = list(itertools.accumulate(counts, initial=0))
    return [range(starts[i], starts[i + 1]) for i in range(n)]


def prepare(opts: Options, progress: bool = True) -> dict:
    """Run `prepare` (or one part of it, or the merge of its parts); returns the manifest (also
    written to <out>/manifest.json; for a part, the part's record).

    Everything is written into a hidden sibling directory and moved into place at the end; a
    failed or interrupted run leaves the previous output (if any) as it was and no stray files."""
    import shutil

    opts.validate()
    files = inputs.expand_repositories(opts.inputs) if opts.repo_level else inputs.expand(opts.inputs)
    if objstore.is_url(opts.out):
        return _prepare_to_store(opts, files, progress)
    out = Path(opts.out)
    name = opts.name or out.resolve().name
    target = out
    if opts.part is not None:  # a part is replaced whenever its job runs again
        target = parts_dir(out) / _part_name(*opts.part_of())
        check_output(out, opts.inputs, files, overwrite=True)
    check_output(target, opts.inputs, files, opts.overwrite or opts.part is not None)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    work = target.parent / f".{target.name}.tmp-{os.getpid()}"
    work.mkdir()
    try:
        manifest = _prepare_into(work, name, files, opts, progress)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
            work.rename(target)
            shutil.rmtree(old)
        else:
            work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if opts.merge is not None:
        shutil.rmtree(parts_dir(out), ignore_errors=True)  # the dataset holds all of it now
    return manifest


def _prepare_to_store(opts: Options, files: list[str], progress: bool) -> dict:
    """`prepare` with its output on object storage (see the module's docstring)."""
    import tempfile

    out = opts.out.rstrip("/")
    bucket, key = objstore.split(out)
    if not key:
        raise fmt.DataError(f"-o {opts.out}: name a prefix inside the bucket (s3://{bucket}/NAME): a dataset is "
                            "one prefix, and --overwrite removes what else lies under it")
    name = opts.name or key.rsplit("/", 1)[-1]
    target = _at(parts_dir(out), _part_name(*opts.part_of())) if opts.part is not None else out
    last = _PART if opts.part is not None else fmt.MANIFEST
    existing = objstore.list_keys(f"{target}/")
    if existing and not (opts.overwrite or opts.part is not None):
        what = "a prepared dataset" if f"{target}/{fmt.MANIFEST}" in existing else "objects that are not a prepared dataset"
        raise fmt.DataError(f"-o {out}: already holds {what} ({len(existing)} objects); pass --overwrite to replace it")
    if opts.merge is None and opts.part is None:
        for spec in opts.inputs:
            if objstore.is_url(spec) and (spec.startswith(f"{out}/") or spec.rstrip("/") == out):
                raise fmt.DataError(f"input {spec} lies inside -o {out}, which prepare replaces")
    if f"{target}/{last}" in existing:  # replaced: visibly incomplete from now until the new one is written
        objstore.delete([f"{target}/{last}"])
    written: list[str] = []

    def publish(path: Path) -> None:
        objstore.upload(path, f"{target}/{path.name}")
        written.append(f"{target}/{path.name}")
        path.unlink()  # staged no longer than it takes to upload

    with tempfile.TemporaryDirectory(prefix="glm-prepare-") as staging:
        manifest = _prepare_into(Path(staging), name, files, opts, progress, publish)
    stale = [k for k in existing if k not in written]
    if stale:
        objstore.delete(stale)
    if opts.merge is not None:
        objstore.delete(objstore.list_keys(f"{parts_dir(out)}/"))  # the dataset holds all of it now
    return manifest


def _tokenizer(opts: Options):
    """(tokenizer, where it came from, special ids): loaded, or the default trained here."""
    if opts.tokenizer:
        tok, source = toks.load(opts.tokenizer), str(opts.tokenizer)
    else:
        tok, source = toks.train_default(opts.vocab_size), f"byte-level BPE on the embedded corpus ({opts.vocab_size})"
    return tok, source, toks.special_ids(tok, opts.eod_token, fim=opts.code, where=source)


class _Workers:
    """The processes that tokenise (`data/encode.py`): a spawned pool, or this process with one
    worker. Started as soon as the tokenizer is known, so that they load it while this process
    saves it and begins to read; `peak_mb` is the largest peak memory a worker reported."""

    def __init__(self, n: int, tok_json: str, settings: dict):
        self.pool, self.peak_mb = None, None
        if n > 1:
            self.pool = multiprocessing.get_context("spawn").Pool(n, encode.init, (tok_json, settings))
        else:
            encode.init(tok_json, settings)

    def map(self, jobs: Iterator) -> Iterator[tuple[int, list, int, int]]:
        for *result, worker_mb in (self.pool.imap if self.pool else map)(encode.encode_chunk, jobs):
            self.peak_mb = max(self.peak_mb or 0.0, worker_mb)
            yield tuple(result)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


def _encoded(files: list[str], todo: range, workers: _Workers, reader, progress: bool, split: dict[str, int]
             ) -> Iterator[tuple[int, list, int, int]]:
    """(input index, samples, documents, empty documents) per chunk of the inputs `todo`, in order;
    `split` counts the documents cut (MAX_DOCUMENT_CHARS) per input."""
    bar = _progress(progress)
    tokens = 0
    jobs = ((todo.start + i, chunk) for i, chunk in _jobs([files[j] for j in todo], reader, split))
    try:
        for result in workers.map(jobs):
            yield result
            tokens += sum(t for t, _, _ in result[1])
            bar.update(result[2] + result[3])
            bar.set_postfix_str(f"{tokens / 1e6:.1f}M tokens", refresh=False)
    finally:
        bar.close()


def _prepare_into(out: Path, name: str, files: list[str], opts: Options, progress: bool, publish=None) -> dict:
    """Everything written into the directory `out`; `publish(path)`, where given, takes each file once it
    is complete (the tokenizer first, the manifest, or a part's record, last)."""
    started = time.perf_counter()
    publish = publish or (lambda path: None)
    tok, tok_source, ids = _tokenizer(opts)
    tok_json = tok.to_str()  # once: a 151k-id vocabulary takes a good part of a second to serialise
    dtype = fmt.dtype_for(toks.vocab_size(tok))
    whole = toks.cut_check(tok)
    if whole and progress:
        print(f"note: long documents are tokenised whole, with memory in proportion to the longest: "
              f"the tokenizer cannot be cut exactly ({whole})", file=sys.stderr)
    settings = {"name": name, "code": opts.code, "fim_rate": opts.fim_rate, "fim_spm_rate": opts.fim_spm_rate,
                "seed": opts.seed, "sample_tokens": opts.sample_tokens, "dtype": dtype, "level": opts.zstd_level,
                "ids": asdict(ids), "cut": whole is None}
    # started now: they load the tokenizer while this process saves it and begins to read
    workers = _Workers(opts.workers, tok_json, settings) if opts.merge is None else None
    try:
        tok.save(str(out / fmt.TOKENIZER))
        if opts.part is None:
            publish(out / fmt.TOKENIZER)
        shard_tokens = opts.shard_tokens or (EMBEDDED_SHARD_TOKENS if all(f.startswith(inputs.EMBEDDED) for f in files)
                                             else DEFAULT_SHARD_TOKENS)
        reader = inputs.Reader(opts.text_field, opts.invalid_utf8)
        per_input = [{"path": f, "documents": 0, "empty": 0, "tokens": 0} for f in files]
        split: dict[str, int] = {}
        if opts.part is not None:
            record = _write_part(out, files, opts, tok_json, workers, reader, per_input, progress, publish)
            record.update(elapsed_s=time.perf_counter() - started, worker_peak_mb=workers.peak_mb)
            return record
        writer = ShardWriter(out, shard_tokens, publish)
        try:
            if opts.merge is not None:
                per_input = _merge_parts(writer, files, opts, tok_json, progress)
            else:
                for index, samples, n_docs, n_empty in _encoded(files, range(len(files)), workers, reader, progress,
                                                            split):
                    for tokens, docs, sample in samples:
                        writer.write(tokens, docs, sample)
                        per_input[index]["tokens"] += tokens
                    per_input[index]["documents"] += n_docs
                    per_input[index]["empty"] += n_empty
                _note_replaced(per_input, reader, split)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        if not writer.shards:
            raise fmt.DataError(f"{', '.join(opts.inputs)}: no documents with text found")
        manifest = fmt.make_manifest(
            name, "code" if opts.code else "text", dtype, toks.describe(tok, ids, tok_source, tok_json), writer.shards,
            per_input,
            {"text_field": opts.text_field, "fim_rate": opts.fim_rate if opts.code else 0.0,
             "fim_spm_rate": opts.fim_spm_rate, "seed": opts.seed, "sample_tokens": opts.sample_tokens,
             "shard_tokens": shard_tokens, "zstd_level": opts.zstd_level, "invalid_utf8": opts.invalid_utf8,
             **({"repo_level": True} if opts.repo_level else {})})
        fmt.write_manifest(out, manifest)
        publish(out / fmt.MANIFEST)
        # reported, not stored: shards stay reproducible
        manifest.update(elapsed_s=time.perf_counter() - started, worker_peak_mb=workers and workers.peak_mb)
        return manifest
    finally:
        if workers is not None:
            workers.close()


def _note_replaced(per_input: list[dict], reader, split: dict[str, int]) -> None:
    for item in per_input:
        if split.get(item["path"]):
            item["split_documents"] = split[item["path"]]
        if reader.replaced.get(item["path"]):
            item["replaced_characters"] = reader.replaced[item["path"]]
        if reader.skipped_files.get(item["path"]):
            item["skipped_files"] = reader.skipped_files[item["path"]]


# --- parts -----------------------------------------------------------------------------------------
# A part directory: samples.bin (each sample's compressed tokens, then its metadata, back to back),
# index.npy (per sample: input index, tokens, documents, bytes of tokens, bytes of metadata) and
# part.json (its inputs' counts, the recipe and the tokenizer, which the merge checks).
_SAMPLES, _INDEX, _PART = "samples.bin", "index.npy", "part.json"


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _write_part(out: Path, files: list[str], opts: Options, tok_json: str, workers: _Workers, reader,
                per_input: list[dict], progress: bool, publish) -> dict:
    i, n = opts.part_of()
    todo = ranges(files, n)[i]
    rows, split = [], {}
    with open(out / _SAMPLES, "wb") as f:
        for index, samples, n_docs, n_empty in _encoded(files, todo, workers, reader, progress, split):
            for tokens, docs, sample in samples:
                f.write(sample[fmt.TOKENS])
                f.write(sample[fmt.META])
                rows.append((index, tokens, docs, len(sample[fmt.TOKENS]), len(sample[fmt.META])))
                per_input[index]["tokens"] += tokens
            per_input[index]["documents"] += n_docs
            per_input[index]["empty"] += n_empty
    np.save(out / _INDEX, np.array(rows, dtype=np.int64).reshape(-1, 5))
    _note_replaced(per_input, reader, split)
    record = {"part": i, "parts": n, "inputs": [todo.start, todo.stop], "files": len(files),
              "files_sha256": _digest("\n".join(files)), "recipe": opts.recipe(),
              "tokenizer_sha256": _digest(tok_json), "per_input": [per_input[j] for j in todo],
              "samples": len(rows), "tokens": sum(r[1] for r in rows)}
    (out / _PART).write_text(json.dumps(record, indent=1) + "\n")
    for file in (_SAMPLES, _INDEX, _PART):  # the record last: a part without it is not done
        publish(out / file)
    return record


def _merge_parts(writer: ShardWriter, files: list[str], opts: Options, tok_json: str, progress: bool) -> list[dict]:
    """Every part's samples through `writer`, in input order (all parts checked first); returns
    the inputs' counts."""
    from tqdm import tqdm

    n = opts.merge
    where = parts_dir(opts.out)
    names = [_part_name(i, n) for i in range(n)]
    missing = [x for x in names if not _exists(_at(where, x, _PART))]
    if missing:
        raise fmt.DataError(f"{where}: {len(missing)} of {n} parts missing ({', '.join(missing[:4])}"
                            f"{' ...' if len(missing) > 4 else ''}): run `glm-data prepare ... --part i/{n}` for each")
    expected, parts = ranges(files, n), []
    for i, name in enumerate(names):
        at = _at(where, name)
        part = json.loads(_read(_at(at, _PART)))
        if part["files_sha256"] != _digest("\n".join(files)):
            raise fmt.DataError(f"{_at(at, _PART)}: made from another list of inputs ({part['files']} files) than "
                                f"this merge's {len(files)}: give every part and the merge the same inputs")
        if part["recipe"] != opts.recipe():
            differ = sorted(k for k in {*part["recipe"], *opts.recipe()} if part["recipe"].get(k) != opts.recipe().get(k))
            raise fmt.DataError(f"{_at(at, _PART)}: made with other options than this merge: {', '.join(differ)}")
        if part["tokenizer_sha256"] != _digest(tok_json):
            raise fmt.DataError(f"{_at(at, _PART)}: tokenised with another tokenizer than this merge's")
        if part["inputs"] != [expected[i].start, expected[i].stop]:
            raise fmt.DataError(f"{_at(at, _PART)}: holds inputs {part['inputs']}, expected "
                                f"{[expected[i].start, expected[i].stop]}")
        rows = np.load(io.BytesIO(_read(_at(at, _INDEX)))).reshape(-1, 5)
        samples = _at(at, _SAMPLES)
        size = objstore.size(samples) if isinstance(samples, str) else samples.stat().st_size
        accounted = int(rows[:, 3:].sum())
        if len(rows) != part["samples"] or size != accounted:
            raise fmt.DataError(f"{at}: {len(rows)} samples in {_INDEX} ({part['samples']} in {_PART}), {size} bytes "
                                f"in {_SAMPLES} ({accounted} in its index): the part is damaged, run it again")
        parts.append((at, rows, part["per_input"]))
    with tqdm(total=sum(int(r[:, 1].sum()) for _, r, _ in parts), unit=" tok", unit_scale=True,
              disable=not progress, file=sys.stderr, desc="merge") as bar:
        for at, rows, _ in parts:
            samples = _at(at, _SAMPLES)
            with (objstore.open_read(samples) if isinstance(samples, str) else open(samples, "rb")) as f:
                for _, tokens, docs, n_tokens, n_meta in rows.tolist():
                    writer.write(tokens, docs, {"__key__": "", fmt.TOKENS: f.read(n_tokens), fmt.META: f.read(n_meta)})
                    bar.update(tokens)
    return [item for _, _, per_input in parts for item in per_input]


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
             f"  {manifest['elapsed_s']:.1f} s, {t['tokens'] / max(manifest['elapsed_s'], 1e-9) / 1e6:.2f}M tokens/s"
             + (f", peak memory of a worker {manifest['worker_peak_mb']:.0f} MB" if manifest.get("worker_peak_mb") else "")]
    if skipped:
        lines.append(f"  skipped {skipped:,} empty documents")
    split = sum(p.get("split_documents", 0) for p in manifest["inputs"])
    if split:
        lines.append(f"  cut {split:,} document(s) longer than {MAX_DOCUMENT_CHARS:,} characters into documents of "
                     "about that many, each with its end-of-document token, named <id>#k/n")
    replaced = [(p["path"], p["replaced_characters"]) for p in manifest["inputs"] if p.get("replaced_characters")]
    if replaced:
        lines.append(f"  replaced {sum(n for _, n in replaced):,} invalid UTF-8 sequence(s) with U+FFFD in "
                     f"{len(replaced)} input(s): " + ", ".join(f"{p} ({n})" for p, n in replaced[:5])
                     + (" ..." if len(replaced) > 5 else ""))
    binary = [(p["path"], p["skipped_files"]) for p in manifest["inputs"] if p.get("skipped_files")]
    if binary:
        lines.append(f"  left out {sum(n for _, n in binary):,} binary or non-UTF-8 file(s) in {len(binary)} "
                     "repositor" + ("y" if len(binary) == 1 else "ies") + ": "
                     + ", ".join(f"{p} ({n})" for p, n in binary[:5]) + (" ..." if len(binary) > 5 else ""))
    if silent:
        lines.append(f"  {len(silent)} input(s) gave no documents (empty, or not UTF-8 text): "
                     f"{', '.join(silent[:5])}{' ...' if len(silent) > 5 else ''}")
    return "\n".join(lines)


def main_args(args) -> int:  # called by data.cli
    opts = Options(**{k: v for k, v in vars(args).items() if k in Options.__dataclass_fields__})
    manifest = prepare(opts, progress=not args.quiet)
    if opts.part is not None:
        i, n = manifest["part"], manifest["parts"]
        docs = sum(p["documents"] for p in manifest["per_input"])
        print(f"part {i}/{n}: inputs {manifest['inputs'][0]}..{manifest['inputs'][1] - 1} of {manifest['files']}, "
              f"{docs:,} documents, {manifest['tokens']:,} tokens in {manifest['samples']:,} samples -> "
              f"{parts_dir(opts.out)}; when all {n} parts are done: glm-data prepare ... --merge {n}")
    else:
        print(summary(manifest, opts.out))
    return 0
