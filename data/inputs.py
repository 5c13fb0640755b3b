"""Raw inputs for `prepare`: JSONL (optionally .gz/.zst), Parquet and plain-text files, given as
files, directories (walked recursively) or globs, plus `embedded:general` / `embedded:code`.

Every document gets a stable id (`path:line`, `path:row`, or `path`) that goes into the shard
metadata, so any token can be traced back to where it came from.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from pathlib import Path
from typing import Iterator

from data.corpus import PARTS, Document, documents
from data.format import DataError

EMBEDDED = "embedded:"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


def expand(specs: list[str]) -> list[str]:
    """Input specs -> a sorted, de-duplicated list of files (embedded parts pass through)."""
    out: list[str] = []
    for spec in specs:
        if spec.startswith(EMBEDDED):
            if spec[len(EMBEDDED):] not in PARTS:
                raise DataError(f"{spec}: the embedded corpus has parts {', '.join(EMBEDDED + p for p in PARTS)}")
            out.append(spec)
            continue
        path = Path(spec)
        if path.is_dir():
            files = sorted(str(p) for p in path.rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            files = [spec]
        else:
            files = sorted(f for f in glob.glob(spec, recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"{spec}: no such file, directory or matching glob")
        out.extend(files)
    return list(dict.fromkeys(out))


def _text_lines(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    if path.endswith(".zst"):
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


def _jsonl(path: str, field: str) -> Iterator[Document]:
    with _text_lines(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{path}:{line_no}: no '{field}' field (set it with --text-field)")
            if not isinstance(record[field], str):
                raise DataError(f"{path}:{line_no}: '{field}' is {type(record[field]).__name__}, not a string")
            yield Document(f"{path}:{line_no}", record[field])


def _parquet(path: str, field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no '{field}' column (columns: {', '.join(pf.schema_arrow.names)}); "
                        "set it with --text-field")
    row = 0
    for batch in pf.iter_batches(columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise DataError(f"{path}: row {row}: '{field}' is {type(text).__name__}, not a string")
            yield Document(f"{path}:{row}", text or "")
            row += 1


def read(spec: str, field: str = "text") -> Iterator[Document]:
    """The documents of one expanded input. Plain files that are not UTF-8 text yield nothing."""
    if spec.startswith(EMBEDDED):
        yield from documents(spec[len(EMBEDDED):])
    elif spec.endswith(JSONL_SUFFIXES):
        yield from _jsonl(spec, field)
    elif spec.endswith(PARQUET_SUFFIXES):
        yield from _parquet(spec, field)
    else:
        try:
            text = Path(spec).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            return
        yield Document(spec, text)
