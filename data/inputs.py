"""Raw inputs for `prepare`: JSONL and JSON (optionally .gz/.zst), Parquet and plain-text files, given as
files, directories (walked recursively) or globs, plus `embedded:general` / `embedded:code`; with
--repo-level, directories of repositories (each first-level subdirectory one document). Files may be
on object storage: `s3://bucket/key`, a prefix ending in / (every object under it), or a glob
(`s3://raw/crawl/*.jsonl.zst`), read through data/objstore.py's retries.

Every document gets a stable id (`path:line`, `path:row`, or `path`) that goes into the shard
metadata, so any token can be traced back to where it came from.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import io
import json
import re
import tempfile
import zlib
from pathlib import Path
from typing import Iterator

import zstandard

from data import objstore
from data.corpus import PARTS, Document, documents
from data.format import DataError

EMBEDDED = "embedded:"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson")
JSON_SUFFIXES = (".json", ".json.gz", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)


def expand_repositories(specs: list[str]) -> list[str]:
    """Repository-level inputs: each spec is a directory (or a glob of directories) whose first-level
    subdirectories are repositories -> the sorted repository directories. Hidden ones are left out."""
    out: list[str] = []
    for spec in specs:
        dirs = [Path(spec)] if Path(spec).is_dir() else sorted(Path(p) for p in glob.glob(spec) if Path(p).is_dir())
        if not dirs:
            raise DataError(f"{spec}: --repo-level takes directories whose subdirectories are repositories; "
                            "this is no directory")
        for d in dirs:
            repos = sorted(str(p) for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not repos:
                raise DataError(f"{d}: no repositories in it (--repo-level reads each first-level subdirectory "
                                "as one repository)")
            out.extend(repos)
    return list(dict.fromkeys(out))


def repository_files(repo: Path) -> list[Path]:
    """A repository's files in a stable order (relative paths, sorted), hidden files and folders
    (.git, .github, ...) left out."""
    return sorted((p for p in repo.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(repo).parts)),
                  key=lambda p: p.relative_to(repo).as_posix())


_remote_sizes: dict[str, int] = {}  # object sizes seen when expanding s3:// inputs


def input_bytes(spec: str) -> int:
    """Bytes of one expanded input (a repository: all its files), for balancing --part ranges."""
    path = Path(spec)
    if spec.startswith(EMBEDDED):
        return 1
    if objstore.is_url(spec):
        if spec not in _remote_sizes:
            _remote_sizes[spec] = objstore.size(spec)
        return max(_remote_sizes[spec], 1)
    if path.is_dir():
        return max(sum(f.stat().st_size for f in repository_files(path)), 1)
    return max(path.stat().st_size, 1)


def expand(specs: list[str]) -> list[str]:
    """Input specs -> a sorted, de-duplicated list of files (embedded parts pass through)."""
    out: list[str] = []
    for spec in specs:
        if spec.startswith(EMBEDDED):
            if spec[len(EMBEDDED):] not in PARTS:
                raise DataError(f"{spec}: the embedded corpus has parts {', '.join(EMBEDDED + p for p in PARTS)}")
            out.append(spec)
            continue
        if objstore.is_url(spec):
            out.extend(_expand_remote(spec))
            continue
        path = Path(spec)
        if path.is_dir():
            files = sorted(str(p) for p in path.rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                raise DataError(f"{spec}: the directory holds no files (hidden ones are not read)")
        elif path.is_file():
            files = [spec]
        else:
            files = sorted(f for f in glob.glob(spec, recursive=True) if Path(f).is_file())
            if not files:
                raise DataError(f"{spec}: no such file, directory or matching glob")
        out.extend(files)
    return list(dict.fromkeys(out))


def _expand_remote(spec: str) -> list[str]:
    """An s3:// input: one object, every object under a prefix ending in /, or a glob (*, ?, [...]; `*`
    crosses `/` as in `aws s3 ls --recursive`), hidden names (a path part starting with .) left out."""
    glob_at = min((spec.index(c) for c in "*?[" if c in spec), default=None)
    listed = objstore.list_objects(spec[:glob_at] if glob_at is not None else spec)
    if glob_at is not None:
        found = [(u, n) for u, n in listed if fnmatch.fnmatchcase(u, spec)]
    elif spec.endswith("/"):
        found = listed
    else:
        found = [(u, n) for u, n in listed if u == spec]
    found = [(u, n) for u, n in found if not any(part.startswith(".") for part in u[len(objstore.SCHEME):].split("/")[1:])]
    if not found:
        raise DataError(f"{spec}: no such object, or none under the prefix or matching the glob")
    _remote_sizes.update(found)
    return [u for u, _ in found]


class Reader:
    """Reads inputs into documents, holding what it repaired: with `invalid_utf8="replace"` bytes
    that are not UTF-8 (and lone surrogates that JSON escapes can spell) become U+FFFD, counted per
    input in `replaced`; with "error" (the default) the first one stops prepare, naming file,
    line and byte offset."""

    def __init__(self, field: str = "text", invalid_utf8: str = "error"):
        if invalid_utf8 not in ("error", "replace"):
            raise DataError(f"--invalid-utf8={invalid_utf8!r}: expected error or replace")
        self.field, self.invalid_utf8 = field, invalid_utf8
        self.replaced: dict[str, int] = {}
        self.skipped_files: dict[str, int] = {}  # per repository: binary or undecodable files left out

    def read(self, spec: str) -> Iterator[Document]:
        """The documents of one expanded input."""
        if spec.startswith(EMBEDDED):
            yield from documents(spec[len(EMBEDDED):])
        elif objstore.is_url(spec) and spec.endswith(PARQUET_SUFFIXES):
            yield from self._remote_parquet(spec)
        elif not objstore.is_url(spec) and Path(spec).is_dir():
            yield from self._repository(spec)
        elif spec.endswith(JSONL_SUFFIXES):
            yield from self._jsonl(spec)
        elif spec.endswith(JSON_SUFFIXES):
            yield from self._json(spec)
        elif spec.endswith(PARQUET_SUFFIXES):
            yield from self._parquet(spec)
        else:
            data = objstore.read_bytes(spec) if objstore.is_url(spec) else Path(spec).read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                return  # not text (an image, a binary): left out, and listed in the summary
            yield Document(spec, text)

    def _repository(self, spec: str) -> Iterator[Document]:
        """One document for a whole repository: its text files in order, each to be preceded by its
        relative path (data/prepare.py). Binary files (a NUL byte) and files that are not UTF-8 are
        left out and counted, whatever --invalid-utf8 says: a repository holds images and archives."""
        repo = Path(spec)
        files = []
        for path in repository_files(repo):
            raw = path.read_bytes()
            try:
                if b"\0" in raw:
                    raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1, "NUL byte")
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                self.skipped_files[spec] = self.skipped_files.get(spec, 0) + 1
                continue
            if text:
                files.append((path.relative_to(repo).as_posix(), text))
        yield Document(spec, "".join(t for _, t in files), tuple(files))

    # --- text -------------------------------------------------------------------------------------
    def _decode(self, raw: bytes, where: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.invalid_utf8 == "error":
                raise DataError(f"{where}: invalid UTF-8 at byte offset {e.start} ({raw[e.start:e.start + 4]!r}...); "
                                "pass --invalid-utf8=replace to replace such bytes (counted)") from None
            text = raw.decode("utf-8", "replace")
            self._count(where, text.count("\ufffd") - raw.decode("utf-8", "ignore").count("\ufffd"))
            return text

    def _text(self, text: str, where: str) -> str:
        """`text` as valid Unicode: a lone surrogate (JSON's "\\ud800") is an error or replaced."""
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError as e:
            if self.invalid_utf8 == "error":
                raise DataError(f"{where}: lone surrogate {text[e.start]!r} at character {e.start} of the text "
                                "(not valid Unicode); pass --invalid-utf8=replace to replace it (counted)") from None
            fixed = _SURROGATE.sub("\ufffd", text)
            self._count(where, len(_SURROGATE.findall(text)))
            return fixed

    def _count(self, where: str, n: int) -> None:
        path = where.rsplit(":", 1)[0]
        self.replaced[path] = self.replaced.get(path, 0) + n

    def _lines(self, path: str) -> Iterator[tuple[int, bytes]]:
        """(line number, bytes) of a plain, .gz or .zst file; a damaged or truncated compressed file
        is a DataError naming the file and the last whole line read."""
        line_no = 0
        try:
            with _open_bytes(path) as f:
                for line_no, raw in enumerate(f, 1):
                    yield line_no, raw
        except objstore.ObjectStoreError as e:  # the store, for good: not the file's fault
            raise DataError(f"{e.message} (after line {line_no})") from None
        except (EOFError, OSError, zlib.error, zstandard.ZstdError, _Truncated) as e:
            raise DataError(f"{path}: damaged or truncated compressed data after line {line_no} "
                            f"({type(e).__name__}: {e})") from None

    def _jsonl(self, path: str) -> Iterator[Document]:
        for line_no, raw in self._lines(path):
            where = f"{path}:{line_no}"
            line = self._decode(raw, where)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield self._document(record, where)

    def _json(self, path: str) -> Iterator[Document]:
        """A .json file: one document (an object with the text field) or a list of them."""
        raw = b"".join(raw for _, raw in self._lines(path))
        text = self._decode(raw, path)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        records = value if isinstance(value, list) else [value]
        for i, record in enumerate(records):
            yield self._document(record, f"{path}:{i}" if isinstance(value, list) else path)

    def _document(self, record, where: str) -> Document:
        if not isinstance(record, dict) or self.field not in record:
            raise DataError(f"{where}: no '{self.field}' field (set it with --text-field)")
        text = record[self.field]
        if not isinstance(text, str):
            raise DataError(f"{where}: '{self.field}' is {type(text).__name__}, not a string")
        return Document(where, self._text(text, where))

    def _remote_parquet(self, url: str) -> Iterator[Document]:
        """Parquet is read by offsets from its end: staged whole in a temporary file first."""
        with tempfile.NamedTemporaryFile(suffix=".parquet") as f:
            with objstore.open_read(url) as src:
                while chunk := src.read(1 << 22):
                    f.write(chunk)
            f.flush()
            for doc in self._parquet(f.name):
                yield Document(url + doc.id[len(f.name):], doc.text, doc.files)

    def _parquet(self, path: str) -> Iterator[Document]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        if self.field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no '{self.field}' column (columns: {', '.join(pf.schema_arrow.names)}); "
                            "set it with --text-field")
        row = 0
        try:
            for batch in pf.iter_batches(columns=[self.field]):
                for text in batch.column(0).to_pylist():
                    if text is not None and not isinstance(text, str):
                        raise DataError(f"{path}: row {row}: '{self.field}' is {type(text).__name__}, not a string")
                    yield Document(f"{path}:{row}", self._text(text or "", f"{path}:{row}"))
                    row += 1
        except DataError:
            raise
        except Exception as e:  # pyarrow's errors for damaged pages, invalid UTF-8 in string columns
            raise DataError(f"{path}: unreadable Parquet data after row {row} ({type(e).__name__}: {e})") from None


_SURROGATE = re.compile("[\ud800-\udfff]")


class _Truncated(Exception):
    pass


class _ZstdLines(io.RawIOBase):
    """The bytes of every zstd frame in a file, one after the other (as `zstd -d` reads them); a file
    that ends inside a frame raises _Truncated instead of ending quietly."""

    def __init__(self, path: str):
        self.f = _raw(path)
        self.dctx = zstandard.ZstdDecompressor()
        self.obj = self.dctx.decompressobj()
        self.pending, self.at = b"", 0  # decompressed bytes not yet handed out start at `at`
        self.in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.at == len(self.pending):
            self.pending, self.at = b"", 0
            chunk = self.f.read(1 << 16)
            if not chunk:
                if self.in_frame:
                    raise _Truncated("the file ends inside a zstd frame")
                return 0
            while chunk:
                self.in_frame = True
                self.pending += self.obj.decompress(chunk)
                if self.obj.eof:  # a frame ended: what follows is the next frame
                    chunk = self.obj.unused_data
                    self.obj = self.dctx.decompressobj()
                    self.in_frame = False
                else:
                    chunk = b""
        n = min(len(buffer), len(self.pending) - self.at)
        buffer[:n] = self.pending[self.at:self.at + n]
        self.at += n
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def _raw(path: str):
    return objstore.open_read(path) if objstore.is_url(path) else open(path, "rb")


class _GzipOver(gzip.GzipFile):
    """gzip over a file object it closes when closed (an object on the store)."""

    def close(self) -> None:
        raw = self.fileobj
        super().close()
        if raw is not None:
            raw.close()


def _open_bytes(path: str):
    if path.endswith(".gz"):  # reads every member; CRC and length checked, truncation raises
        return _GzipOver(fileobj=_raw(path), mode="rb") if objstore.is_url(path) else gzip.open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdLines(path), 1 << 16)
    return _raw(path)
