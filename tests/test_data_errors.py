"""Bad data is named (shard and sample) and either stops the run (`fail`) or is skipped, counted and
reported (`skip`) - never silently replaced by a repeat."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from data import format as fmt
from data.loader import TokenLoader
from tests.data_helpers import config, docs_in, synthetic

pytestmark = pytest.mark.xdist_group("data")
N_DOCS = 60


def rewrite_sample(directory, shard: int, sample: int, change, fix_manifest=True):
    """Apply change(files: {ext: bytes}) to one sample of a shard; by default keep the manifest's checksum true."""
    path = directory / fmt.shard_name(shard)
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    key = f"{shard:06d}_{sample:06d}"
    files = {m.name.split(".", 1)[1]: data for m, data in members if m.name.startswith(key + ".")}
    change(files)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for m, data in members:
            if m.name.startswith(key + "."):
                data = files[m.name.split(".", 1)[1]]
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    if fix_manifest:
        edit_manifest(directory, lambda m: m["shards"][shard].update(sha256=fmt.sha256_file(path),
                                                                      bytes=path.stat().st_size))
    return key


def edit_manifest(directory, change):
    m = json.loads((directory / fmt.MANIFEST).read_text())
    change(m)
    (directory / fmt.MANIFEST).write_text(json.dumps(m))


def flip_zstd(files):
    data = bytearray(files["tokens.zst"])
    data[len(data) // 2] ^= 0xFF
    files["tokens.zst"] = bytes(data)


def set_meta(**kw):
    def change(files):
        meta = json.loads(files["json"])
        meta.update({k: v(meta[k]) if callable(v) else v for k, v in kw.items()})
        files["json"] = json.dumps(meta).encode()
    return change


def truncate(directory):
    path = directory / fmt.shard_name(1)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CASES = {
    "corrupt zstd": (lambda d: rewrite_sample(d, 1, 1, flip_zstd), r"shard-000001.tar sample 000001_000001: corrupt zstd frame"),
    "wrong dtype": (lambda d: rewrite_sample(d, 1, 1, set_meta(dtype="uint32")), r"000001_000001: tokens stored as uint32"),
    "wrong length": (lambda d: rewrite_sample(d, 1, 1, set_meta(lengths=lambda ns: [n + 1 for n in ns])), r"000001_000001: .* wrong dtype or length"),
    "truncated tar": (truncate, r"shard-000001.tar: (truncated or unreadable tar after sample 000001_|\d+ samples, .* \(ended early: truncated\?\))"),
    "missing shard": (lambda d: (d / fmt.shard_name(1)).unlink(), r"shard-000001.tar: missing or unreadable shard"),
    "checksum": (lambda d: edit_manifest(d, lambda m: m["shards"][1].update(sha256="0" * 64)),
                 r"shard-000001.tar: contents do not match .*manifest.json"),
    "sample count": (lambda d: edit_manifest(d, lambda m: m["shards"][1].update(samples=m["shards"][1]["samples"] + 1)),
                     r"shard-000001.tar: \d+ samples, but .*manifest.json lists \d+"),
}


def read_epoch(directory, on_error, tokens_budget):
    cfg = config(directory.parent, {directory.name: 1.0}, seq_length=50, num_workers=0, on_error=on_error,
                 shuffle_window=2)
    loader = TokenLoader(cfg, 1)
    batches = loader.take(tokens_budget // 50)
    return loader, batches


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_fails_with_a_named_place(tmp_path, case):
    lengths = synthetic(tmp_path / "d", "d", N_DOCS, base=100, shard_tokens=1500, sample_tokens=400)
    damage, match = CASES[case]
    damage(tmp_path / "d")
    with pytest.raises(fmt.DataError, match=match):
        read_epoch(tmp_path / "d", "fail", sum(lengths.values()) + N_DOCS)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_skipped_is_counted_and_not_replaced(tmp_path, case, caplog):
    lengths = synthetic(tmp_path / "d", "d", N_DOCS, base=100, shard_tokens=1500, sample_tokens=400)
    CASES[case][0](tmp_path / "d")
    total = sum(lengths.values()) + N_DOCS
    loader, batches = read_epoch(tmp_path / "d", "skip", total * 3 // 4)
    stats = loader.stats()
    assert stats["skipped_samples"] + stats["skipped_shards"] >= 1
    assert "skipping bad data" in caplog.text
    seen = docs_in(batches)
    # the stream moves on: in the first three quarters of an epoch no document comes twice
    runs = [t for b in batches for t in b["tokens"].flatten().tolist() if t]
    starts = [d for i, d in enumerate(runs) if i == 0 or runs[i - 1] != d]
    assert len(starts) - len(set(starts)) <= len(batches)  # a document may only continue across a sequence edge
    assert len(set(seen)) == len(seen)


def test_out_of_vocabulary_ids_are_named(tmp_path):
    synthetic(tmp_path / "d", "d", 10, base=600, vocab=500)
    with pytest.raises(fmt.DataError, match=r"shard-000000.tar sample 000000_\d+: token id 6\d\d at position \d+ is outside"):
        read_epoch(tmp_path / "d", "fail", 500)


@pytest.mark.parametrize("change,match", [
    (lambda m: m.update(format_version=99), "format_version 99 is not the supported"),
    (lambda m: m.update(format="other"), "not a glm-pretrain-tokens manifest"),
    (lambda m: m.update(shards=[]), "lists no shards"),
])
def test_bad_manifest_is_refused(tmp_path, change, match):
    synthetic(tmp_path / "d", "d", 10, base=100)
    edit_manifest(tmp_path / "d", change)
    with pytest.raises(fmt.DataError, match=match):
        read_epoch(tmp_path / "d", "fail", 100)


def test_too_few_shards_for_the_readers(tmp_path):
    synthetic(tmp_path / "d", "d", 10, base=100, shard_tokens=10**6)
    cfg = config(tmp_path, {"d": 1.0}, seq_length=50, num_workers=2)
    with pytest.raises(fmt.DataError, match=r"1 shards cannot feed 4 readers"):
        TokenLoader(cfg, 1, rank=0, n_ranks=2).take(1)


def test_mixed_tokenizers_are_refused(tmp_path):
    synthetic(tmp_path / "a", "a", 10, base=100)
    synthetic(tmp_path / "b", "b", 10, base=100)
    edit_manifest(tmp_path / "b", lambda m: m["tokenizer"].update(sha256="other"))
    with pytest.raises(fmt.DataError, match="sources 'a' and 'b' were tokenised with different tokenizers"):
        TokenLoader(config(tmp_path, {"a": 1, "b": 1}, num_workers=0), 1)
