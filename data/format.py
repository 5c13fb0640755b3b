"""The on-disk format of prepared token data: one home for how a sample and a manifest look.

A dataset is a directory (or a set of URLs) holding `manifest.json`, `tokenizer.json` and
WebDataset tar shards `shard-000000.tar`, ... Each sample in a shard is a group of whole documents:

  <key>.tokens.zst  the documents' token ids, concatenated (each ends with the end-of-document
                    token), as a little-endian array of the manifest's dtype, one zstd frame
  <key>.json        {"source": dataset name, "docs": [document ids], "lengths": [tokens per doc]}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import zstandard

FORMAT = "glm-pretrain-tokens"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
TOKENS = "tokens.zst"
META = "json"


class DataError(Exception):
    """Bad data: the message names the shard and the sample (or the file and line) at fault."""


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def encode_sample(key: str, tokens: np.ndarray, dtype: str, meta: dict,
                  compressor: zstandard.ZstdCompressor) -> dict:
    data = np.ascontiguousarray(tokens, dtype=np.dtype(dtype).newbyteorder("<"))  # no copy where it is so
    return {"__key__": key, TOKENS: compressor.compress(memoryview(data).cast("B")),
            META: json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode()}


def decode_sample(raw: dict, dtype: str, vocab_size: int, where: str,
                  decompressor: zstandard.ZstdDecompressor) -> tuple[np.ndarray, dict]:
    """Decode and check one stored sample; every failure is a DataError naming `where` (shard + key)."""
    missing = [k for k in (TOKENS, META) if k not in raw]
    if missing:
        raise DataError(f"{where}: sample lacks {', '.join(missing)} (has {sorted(k for k in raw if not k.startswith('__'))})")
    try:
        meta = json.loads(raw[META])
        lengths = [int(n) for n in meta["lengths"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{where}: unreadable metadata ({e})") from None
    if meta.get("dtype", dtype) != dtype:
        raise DataError(f"{where}: tokens stored as {meta['dtype']}, the manifest says {dtype}")
    try:
        data = decompressor.decompress(raw[TOKENS])
    except zstandard.ZstdError as e:
        raise DataError(f"{where}: corrupt zstd frame ({e})") from None
    itemsize = np.dtype(dtype).itemsize
    if len(data) != sum(lengths) * itemsize:
        raise DataError(f"{where}: {len(data)} bytes of tokens, but the metadata's lengths sum to "
                        f"{sum(lengths)} {dtype} tokens ({sum(lengths) * itemsize} bytes): wrong dtype or length")
    tokens = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"))
    if tokens.size and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise DataError(f"{where}: token id {int(tokens[bad])} at position {bad} is outside the vocabulary "
                        f"(size {vocab_size})")
    return tokens, meta


def split_documents(tokens: np.ndarray, meta: dict) -> list[np.ndarray]:
    """The documents of a decoded sample, as views of its token array."""
    return np.split(tokens, np.cumsum(meta["lengths"])[:-1])


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_manifest(name: str, kind: str, dtype: str, tokenizer: dict, shards: list[dict],
                  inputs: list[dict] | None = None, options: dict | None = None) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "kind": kind, "dtype": dtype,
            "tokenizer": tokenizer, "inputs": inputs or [], "options": options or {}, "shards": shards,
            "totals": {k: sum(s[k] for s in shards) for k in ("samples", "documents", "tokens", "bytes")}}


def write_manifest(directory: Path, manifest: dict) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    tmp.replace(directory / MANIFEST)


def check_manifest(manifest: dict, where: str) -> dict:
    if manifest.get("format") != FORMAT:
        raise DataError(f"{where}: not a {FORMAT} manifest (format={manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{where}: format_version {manifest.get('format_version')} is not the supported "
                        f"{FORMAT_VERSION}; prepare the data again")
    for field in ("name", "dtype", "tokenizer", "shards"):
        if field not in manifest:
            raise DataError(f"{where}: manifest lacks '{field}'")
    if not manifest["shards"]:
        raise DataError(f"{where}: manifest lists no shards")
    return manifest
