"""Fuzzing bad data: random truncations, byte flips, insertions and deletions in raw inputs (JSONL,
.gz, .zst, Parquet) and in prepared shards (tar headers, zstd frames, JSON metadata), through
`prepare` and the loader in both modes. Every case must end in a DataError that names the file, or
in exact counts: nothing hangs (an alarm stops a case after 60 s), nothing crashes with another
exception, and nothing is lost silently (delivered tokens = the manifest's minus what was counted
as skipped; a compressed input whose damage its own integrity data cannot see gives back the
original documents).

CI runs a fixed, small set of cases. By hand, for longer: GLM_FUZZ_EXAMPLES=2000 pytest
tests/test_data_fuzz.py (random cases, a new set each run).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import signal

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

from data import format as fmt, tokenizer as toks
from data.prepare import Options, prepare
from data.stream import ErrorPolicy, SlotStream, decoded_shard, open_dataset
from tests.data_helpers import synthetic

pytestmark = pytest.mark.xdist_group("data")

EXAMPLES = int(os.environ.get("GLM_FUZZ_EXAMPLES", "0"))
SETTINGS = settings(max_examples=EXAMPLES or 40, deadline=None, derandomize=not EXAMPLES, database=None,
                    suppress_health_check=list(HealthCheck))
TEXTS = [f"document {i}: " + "lorem ipsum dolor " * (1 + i % 5) for i in range(24)]


@contextlib.contextmanager
def alarm(seconds: int = 60):
    def hung(*_):
        raise AssertionError(f"a fuzz case ran past {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


MUTATION = st.tuples(st.sampled_from(["truncate", "flip", "insert", "delete"]), st.floats(0, 1),
                     st.binary(min_size=1, max_size=8), st.integers(1, 64))


def mutate(data: bytes, mutation) -> bytes:
    kind, where, extra, span = mutation
    at = min(int(where * len(data)), len(data) - 1)
    if kind == "truncate":
        return data[:at]
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ (extra[0] or 1)]) + data[at + 1:]
    if kind == "insert":
        return data[:at] + extra + data[at:]
    return data[:at] + data[at + span:]


# ---- raw inputs through prepare ---------------------------------------------------------------

def _parquet_bytes(texts) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=8)
    return buf.getvalue()


JSONL = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode()
ENCODINGS = {
    "jsonl": (".jsonl", lambda: JSONL),
    "gz": (".jsonl.gz", lambda: gzip.compress(JSONL, mtime=0)),
    "zst": (".jsonl.zst", lambda: b"".join(zstandard.ZstdCompressor(write_checksum=True).compress(JSONL[i:i + 400])
                                           for i in range(0, len(JSONL), 400))),  # several frames
    "parquet": (".parquet", lambda: _parquet_bytes(TEXTS)),
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    toks.train_default(512).save(str(path))
    return str(path)


def _texts(out, tok) -> list[str]:
    ds = open_dataset("x", str(out))
    return [tok.decode(d[:-1].tolist()) for i in range(len(ds.urls)) for _, tokens, meta in decoded_shard(ds, i)
            for d in fmt.split_documents(tokens, meta)]


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@SETTINGS
@given(mutation=MUTATION)
def test_damaged_inputs_are_named_or_read_whole(tokenizer, tmp_path_factory, encoding, mutation):
    suffix, make = ENCODINGS[encoding]
    d = tmp_path_factory.mktemp("in")
    path = d / f"input{suffix}"
    path.write_bytes(mutate(make(), mutation))
    out = d / "out"
    with alarm():
        try:
            prepare(Options([str(path)], str(out), tokenizer=tokenizer, workers=1), progress=False)
        except fmt.DataError as e:
            assert str(path) in str(e) or "no documents with text found" in str(e), str(e)
            assert not out.exists() and not [p for p in d.iterdir() if p.name.startswith(".")]
            return
    if encoding in ("gz", "zst"):
        # gzip's CRC and length, zstd's frame ends and checksums: damage that passes them did not
        # touch the text (a gzip header field, say): every document comes back as it was
        assert _texts(out, toks.load(out)) == TEXTS


# ---- prepared shards through the loader ---------------------------------------------------------

def _one_epoch(directory, mode: str) -> tuple[int, dict]:
    """Tokens one reader delivers in one pass over every shard, and its skip counters."""
    ds = open_dataset("d", str(directory))
    policy = ErrorPolicy(mode, max_fraction=1.0)
    stream = SlotStream(ds, 0, 1, seed=3, window=4, vocab_size=ds.vocab_size, policy=policy)
    delivered = 0
    for tokens, _ in stream:
        if stream.pos["epoch"] > 0:  # the first sample of the next pass (its window may have met a bad shard)
            break
        delivered += len(tokens)
    first_pass = [int(k.rsplit(":", 1)[1]) for k in policy.bad if k.split(":")[1] == "0"]
    return delivered, {"shards": len(first_pass), "tokens": sum(ds.manifest["shards"][i]["tokens"] for i in first_pass)}


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards") / "d"
    synthetic(d, "d", 40, base=100, shard_tokens=1500, sample_tokens=400)
    return d


@pytest.mark.parametrize("mode", ["fail", "skip"])
@SETTINGS
@given(mutation=MUTATION, shard=st.integers(0, 3))
def test_damaged_shards_stop_the_run_or_are_counted_exactly(clean_shards, tmp_path_factory, mode, mutation, shard):
    d = tmp_path_factory.mktemp("damaged") / "d"
    shutil.copytree(clean_shards, d)
    path = d / fmt.shard_name(shard)
    original = path.read_bytes()
    path.write_bytes(mutate(original, mutation))
    manifest = json.loads((d / fmt.MANIFEST).read_text())
    total = manifest["totals"]["tokens"]
    changed = path.read_bytes() != original
    with alarm():
        try:
            delivered, skipped = _one_epoch(d, mode)
        except fmt.DataError as e:
            assert fmt.shard_name(shard) in str(e) or "source 'd'" in str(e), str(e)
            assert mode == "fail" or skipped_everything(manifest), str(e)
            return
    # the shards' SHA-256 covers every byte: any change is seen, and then counted whole
    if changed:
        assert mode == "skip" and skipped["shards"] == 1
        assert skipped["tokens"] == manifest["shards"][shard]["tokens"]
    assert delivered == total - skipped["tokens"]


def skipped_everything(manifest) -> bool:
    return len(manifest["shards"]) <= 1


def test_mutations_change_what_they_say():
    data = bytes(range(100))
    assert mutate(data, ("truncate", 0.5, b"x", 1)) == data[:50]
    assert mutate(data, ("flip", 0.0, b"\x01", 1))[0] == 1
    assert len(mutate(data, ("insert", 0.9, b"abc", 1))) == 103
    assert mutate(data, ("delete", 0.1, b"x", 5)) == data[:10] + data[15:]
    assert np.array_equal(np.frombuffer(mutate(data, ("flip", 0.99, b"\xff", 1))[:99], np.uint8), np.arange(99))
