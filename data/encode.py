"""The worker side of `glm-data prepare`: a chunk of documents -> token ids (Fill-in-the-Middle for
code, end-of-document appended) -> samples of whole documents, compressed.

A worker process imports this module (numpy, zstandard, tokenizers, the data format) and the
command's entry module, nothing more: no WebDataset, so no torch (2-3 s and ~250 MB a process), and
a worker starts in well under a second and holds little besides its tokenizer.

A worker's memory follows its chunk, not the longest document: texts go to the tokenizer at most
about `BATCH_CHARS` characters at a time, a longer text in pieces cut where the tokenizer gives the
ids of the whole text (data/tokenizer.py, `pieces` and `cut_check`), and each piece's ids become a
compact array at once. A worker holds its chunk's text (at most CHUNK_CHARS of data/prepare.py, or
one longer document), its ids (twice, while a document's pieces are joined), and what one batch
costs the tokenizer (its normalised text, splits and Encodings: ~100-170 MB for 1 MiB of text).
"""

from __future__ import annotations

import os
import resource
import sys

import numpy as np
import zstandard

from data import fim, format as fmt, tokenizer as toks
from data.corpus import Document

# text per call of the tokenizer (measured faster than 256 KiB or 4 MiB); a longer text is cut into
# pieces of about this
BATCH_CHARS = 1 << 20

_W: dict = {}  # the worker's tokenizer and settings, set once by `init`


def init(tokenizer_json: str, settings: dict) -> None:
    """Set up a worker (or the main process, with --workers 1). The workers are the parallelism:
    the tokenizer's own thread pool stays off, whatever TOKENIZERS_PARALLELISM says outside (a
    pool per worker would put cores x workers threads on the cores)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = toks.Tokenizer.from_str(tokenizer_json)
    tok.encode_special_tokens = True  # text that spells "<|endoftext|>" is text, not a document break
    _W.clear()
    _W.update(settings, tok=tok, ids=toks.SpecialIds(**settings["ids"]), np_dtype=np.dtype(settings["dtype"]),
              compressor=zstandard.ZstdCompressor(level=settings["level"], write_checksum=True))


def token_ids(texts: list[str]) -> list[list[np.ndarray]]:
    """Each text's ids, as the tokenizer gives them for the whole text, as a list of arrays (one per
    piece of a long text) to concatenate; at most about BATCH_CHARS characters are in the tokenizer
    at a time."""
    out: list[list[np.ndarray]] = [[] for _ in texts]
    tok, dtype = _W["tok"], _W["np_dtype"]
    batch, owners, size = [], [], 0

    def run():
        for owner, e in zip(owners, tok.encode_batch_fast(batch, add_special_tokens=False)):
            out[owner].append(np.array(e.ids, dtype=dtype))
        batch.clear()
        owners.clear()

    for i, text in enumerate(texts):
        for piece in toks.pieces(text, BATCH_CHARS) if _W["cut"] else (text,):
            if batch and size + len(piece) > BATCH_CHARS:
                run()
                size = 0
            batch.append(piece)
            owners.append(i)
            size += len(piece)
    if batch:
        run()
    return out


def _tokenise(docs: list[Document]) -> list[np.ndarray | list[np.ndarray]]:
    """Token ids per document, FIM applied to a drawn fraction of code documents, EOD appended. A
    repository (Document.files) gives one array per file instead, no EOD: each file is its relative
    path on a line, then its text (FIM drawn per file), and `encode_chunk` cuts the repository into
    documents."""
    plans, texts = [], []

    def plan(key: str, text: str, header: str | None = None):
        # drawn from the seed and the document's (or file's) id only: the same inputs give the same
        # draws whatever the dataset is called or wherever it is written
        rng = fim.rng_for(_W["seed"], "fim", key) if _W["code"] else None
        if rng is not None and rng.random() < _W["fim_rate"]:
            mode, parts = fim.permute(rng, text, _W["fim_spm_rate"])
        else:
            mode, parts = None, [text]
        plans.append((mode, len(texts), header is not None))
        if header is not None:
            texts.append(header)
        texts.extend(parts)

    for doc in docs:
        if doc.files:
            for path, text in doc.files:
                plan(f"{doc.id}/{path}", text if text.endswith("\n") else text + "\n", f"{path}\n")
        else:
            plan(doc.id, doc.text)
    encoded = token_ids(texts)
    texts.clear()
    eod = [np.array([_W["ids"].eod], dtype=_W["np_dtype"])]
    out, k = [], 0

    def ids(end: list) -> np.ndarray:  # the next plan's arrays, concatenated once
        nonlocal k
        mode, start, header = plans[k]
        k += 1
        parts = encoded[start] if header else []
        start += header
        body = fim.arrange(mode, *encoded[start:start + 3], _W["ids"]) if mode else encoded[start]
        arrays = [*parts, *body, *end]
        for j in range(start - header, start + (3 if mode else 1)):
            encoded[j] = None  # each piece is held once: in `arrays` until concatenated
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    for doc in docs:
        out.append([ids([]) for _ in doc.files] if doc.files else ids(eod))
    return out


def _repository_documents(doc_id: str, files: list[np.ndarray], limit: int) -> list[tuple[str, np.ndarray]]:
    """A repository's files as documents (EOD appended to each) of at most `limit` tokens where the
    files allow: cut at file boundaries only (a single file longer than that stays whole). One piece
    keeps the repository's id; several are named `<id>#k/n`."""
    groups, current, size = [], [], 0
    for ids in files:
        if current and size + len(ids) + 1 > limit:
            groups.append(current)
            current, size = [], 0
        current.append(ids)
        size += len(ids)
    if current:
        groups.append(current)
    eod = np.array([_W["ids"].eod], dtype=_W["np_dtype"])
    return [(doc_id if len(groups) == 1 else f"{doc_id}#{k}/{len(groups)}", np.concatenate([*group, eod]))
            for k, group in enumerate(groups, 1)]


def peak_mb() -> float:
    """This process's peak resident memory so far, in MB: Linux's VmHWM (ru_maxrss would carry the
    peak of the process a worker was forked from across its exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e6
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes on macOS, KiB elsewhere


def encode_chunk(job: tuple[int, list[Document]]) -> tuple[int, list[tuple[int, int, dict]], int, int, float]:
    """-> (input index, [(tokens, documents, encoded sample without key)], documents, empty, the
    worker's peak memory in MB)."""
    index, docs = job
    kept = [d for d in docs if d.text]
    samples, group = [], []

    def flush():
        if group:
            tokens = group[0][1] if len(group) == 1 else np.concatenate([t for _, t in group])
            meta = {"source": _W["name"], "docs": [d for d, _ in group], "lengths": [len(t) for _, t in group],
                    "dtype": _W["dtype"]}
            samples.append((len(tokens), len(group), fmt.encode_sample("", tokens, _W["dtype"], meta, _W["compressor"])))
            group.clear()

    pending = 0
    documents = 0
    for doc, tokens in zip(kept, _tokenise(kept)):
        for doc_id, ids in (_repository_documents(doc.id, tokens, _W["sample_tokens"]) if doc.files
                            else [(doc.id, tokens)]):
            if group and pending + len(ids) > _W["sample_tokens"]:
                flush()
                pending = 0
            group.append((doc_id, ids))
            pending += len(ids)
            documents += 1
    flush()
    return index, samples, documents, len(docs) - len(kept), peak_mb()
