"""Synthetic prepared datasets whose every token says which document it came from.

Document k of a dataset with base b is the token b + k repeated, then the end-of-document id 0, so
the documents present in any delivered batch can be read straight off its tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zstandard

from data import format as fmt
from data.config import DataConfig, SourceConfig
from data.prepare import ShardWriter


def synthetic(directory: Path, name: str, n_docs: int, base: int, doc_len=(20, 300), sample_tokens: int = 600,
              shard_tokens: int = 3000, vocab: int = 1 << 16, seed: int = 0) -> dict[int, int]:
    """Write a dataset; returns {doc marker token: document length without EOD}."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(*doc_len, size=n_docs)
    writer, compressor = ShardWriter(directory, shard_tokens), zstandard.ZstdCompressor(write_checksum=True)
    group: list[np.ndarray] = []

    def flush():
        if group:
            tokens = np.concatenate(group)
            meta = {"source": name, "docs": [f"{name}/{int(g[0])}" for g in group], "lengths": [len(g) for g in group],
                    "dtype": "uint16"}
            writer.write(len(tokens), len(group), fmt.encode_sample("", tokens, "uint16", meta, compressor))
            group.clear()

    for k, n in enumerate(lengths):
        doc = np.append(np.full(n, base + k, dtype=np.uint16), np.uint16(0))
        if group and sum(map(len, group)) + len(doc) > sample_tokens:
            flush()
        group.append(doc)
    flush()
    writer.close()
    tokenizer = {"file": fmt.TOKENIZER, "sha256": "synthetic", "vocab_size": vocab, "source": "synthetic",
                 "special_ids": {"eod": 0}}
    fmt.write_manifest(directory, fmt.make_manifest(name, "text", "uint16", tokenizer, writer.shards))
    return {base + k: int(n) for k, n in enumerate(lengths)}


def config(root: Path, weights: dict[str, float], **kw) -> DataConfig:
    return DataConfig(sources=[SourceConfig(n, str(root / n), weight=w) for n, w in weights.items()], **kw)


def docs_in(batches: list[dict], key: str = "tokens") -> list[int]:
    """Document markers in order of first appearance (EOD and padding, id 0, left out)."""
    seen: dict[int, None] = {}
    for b in batches:
        for t in b[key].flatten().tolist():
            if t:
                seen.setdefault(t, None)
    return list(seen)


def tiny_corpus(root: Path) -> Path:
    """The `tiny` experiment's two sources (general prose, code) under root/tiny, as its data
    configs expect them with GLM_DATA_ROOT=root."""
    synthetic(root / "tiny" / "general", "general", 200, 1, doc_len=(20, 120), vocab=512)
    synthetic(root / "tiny" / "code", "code", 200, 256, doc_len=(20, 120), vocab=512, seed=1)
    return root


def bpe_tokenizer(directory: Path, vocab_size: int = 512) -> Path:
    """The tokenizer `glm-data prepare --vocab-size N` trains on the embedded corpus, saved as
    directory/tokenizer.json: tests that prepare many times pass it as --tokenizer (each training
    takes seconds; the tokenizer is the same every time)."""
    from data import tokenizer as toks

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    toks.train_default(vocab_size).save(str(path))
    return path
