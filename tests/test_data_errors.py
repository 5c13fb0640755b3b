"""Bad data is named (shard and sample) and either stops the run (`fail`) or is skipped, counted and
reported (`skip`) - never silently replaced by a repeat."""

from __future__ import annotations

import io
import json
import re
import tarfile

import pytest

from data import format as fmt
from data.loader import TokenLoader
from data.stream import decoded_shard, open_dataset
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


def read_epoch(directory, on_error, tokens_budget, max_skip_fraction=0.01):
    cfg = config(directory.parent, {directory.name: 1.0}, seq_length=50, num_workers=0, on_error=on_error,
                 shuffle_window=2, max_skip_fraction=max_skip_fraction)
    loader = TokenLoader(cfg, 1)
    batches = loader.take(tokens_budget // 50)
    return loader, batches


def shard_docs(directory, shard: int) -> set[int]:
    """Document markers of one shard (read before it is damaged)."""
    ds = open_dataset("d", str(directory))
    return {int(tokens[0]) for _, tokens, meta in decoded_shard(ds, shard)
            for tokens in fmt.split_documents(tokens, meta)}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_fails_with_a_named_place(tmp_path, case):
    lengths = synthetic(tmp_path / "d", "d", N_DOCS, base=100, shard_tokens=1500, sample_tokens=400)
    damage, match = CASES[case]
    damage(tmp_path / "d")
    with pytest.raises(fmt.DataError, match=match):
        read_epoch(tmp_path / "d", "fail", sum(lengths.values()) + N_DOCS)


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_shard_is_skipped_whole_and_counted_exactly(tmp_path, case, caplog):
    lengths = synthetic(tmp_path / "d", "d", N_DOCS, base=100, shard_tokens=1500, sample_tokens=400)
    lost = shard_docs(tmp_path / "d", 1)
    CASES[case][0](tmp_path / "d")
    manifest = json.loads((tmp_path / "d" / fmt.MANIFEST).read_text())["shards"][1]  # the contract, as it is now
    total = sum(lengths.values()) + N_DOCS
    loader, batches = read_epoch(tmp_path / "d", "skip", total * 3 // 4, max_skip_fraction=0.5)
    stats = loader.stats()
    # the manifest's numbers for the whole shard, once, in total and for its source
    assert (stats["skipped_shards"], stats["skipped_samples"], stats["skipped_tokens"]) == \
        (1, manifest["samples"], manifest["tokens"]) == \
        (stats["skipped_shards/d"], stats["skipped_samples/d"], stats["skipped_tokens/d"])
    assert "skipping bad shard" in caplog.text and "shard-000001.tar" in caplog.text
    seen = docs_in(batches)
    assert not lost & set(seen)  # none of the bad shard's samples is delivered, good ones included
    # the stream moves on: in the first three quarters of an epoch no document comes twice
    runs = [t for b in batches for t in b["tokens"].flatten().tolist() if t]
    starts = [d for i, d in enumerate(runs) if i == 0 or runs[i - 1] != d]
    assert len(starts) - len(set(starts)) <= len(batches)  # a document may only continue across a sequence edge
    assert len(set(seen)) == len(seen)


def add_sample(directory, shard: int, fix_manifest: bool):
    """Append a copy of a shard's first sample under a new key (the manifest's count left as it was)."""
    path = directory / fmt.shard_name(shard)
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        extra = [(m, d) for m, d in members if m.name.startswith(f"{shard:06d}_000000.")]
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
        for m, data in extra:
            m = tarfile.TarInfo(m.name.replace("_000000.", "_999999."))
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    if fix_manifest:  # checksum and size made to agree: only the count tells
        edit_manifest(directory, lambda m: m["shards"][shard].update(sha256=fmt.sha256_file(path),
                                                                      bytes=path.stat().st_size))


@pytest.mark.parametrize("fix_manifest", [True, False], ids=["count-only", "count-and-checksum"])
def test_a_shard_with_more_samples_than_listed_is_refused(tmp_path, fix_manifest):
    lengths = synthetic(tmp_path / "d", "d", N_DOCS, base=100, shard_tokens=1500, sample_tokens=400)
    add_sample(tmp_path / "d", 1, fix_manifest)
    total = sum(lengths.values()) + N_DOCS
    match = r"shard-000001.tar: \d+ samples, but .*manifest.json lists \d+ \(holds more: changed\?\)" if fix_manifest \
        else r"shard-000001.tar: (\d+ samples, but|contents do not match)"
    with pytest.raises(fmt.DataError, match=match):
        read_epoch(tmp_path / "d", "fail", total * 2)
    loader, _ = read_epoch(tmp_path / "d", "skip", total // 2, max_skip_fraction=0.5)
    assert loader.stats()["skipped_shards"] == 1


def test_skip_mode_ends_when_a_source_has_nothing_good(tmp_path):
    """Every shard bad: a whole pass delivers nothing, and the run stops naming the source, instead
    of skipping forever."""
    synthetic(tmp_path / "d", "d", N_DOCS, base=100, shard_tokens=1500, sample_tokens=400)
    edit_manifest(tmp_path / "d", lambda m: [s.update(sha256="0" * 64) for s in m["shards"]])
    with pytest.raises(fmt.DataError, match=r"source 'd'.*skipped \d+ bad shard\(s\)|source 'd': a whole pass over"):
        read_epoch(tmp_path / "d", "skip", 10**6, max_skip_fraction=1.0)


def test_skip_mode_stops_past_the_skipped_share_ceiling(tmp_path, caplog):
    synthetic(tmp_path / "d", "d", 200, base=100, shard_tokens=1500, sample_tokens=400)
    n = len(json.loads((tmp_path / "d" / fmt.MANIFEST).read_text())["shards"])
    edit_manifest(tmp_path / "d", lambda m: [s.update(sha256="0" * 64) for s in m["shards"][:8]])
    epoch = 200 * 300  # tokens: more than an epoch's
    with pytest.raises(fmt.DataError, match=r"source 'd' \(.*manifest.json\): skipped 8 bad shard\(s\), .* of the "
                                            r"\d+ samples this reader has read, more than data.max_skip_fraction=0.1; "
                                            r"bad shards: shard-0000\d\d.tar"):
        read_epoch(tmp_path / "d", "skip", 2 * epoch, max_skip_fraction=0.1)
    # the first skips are logged in full, then summaries, never one line per skip
    assert 5 <= caplog.text.count("skipping bad") <= 6
    loader, _ = read_epoch(tmp_path / "d", "skip", 2 * epoch, max_skip_fraction=0.5)
    stats, bad = loader.stats(), loader.worker_states[0]["skips"]["bad"]
    shards = json.loads((tmp_path / "d" / fmt.MANIFEST).read_text())["shards"]
    # several epochs: each bad shard counted once per epoch it was met in, with the manifest's numbers
    assert n > 8 and stats["skipped_shards"] == len(bad) > 8
    assert {int(k.rsplit(":", 1)[1]) for k in bad} == set(range(8))
    assert stats["skipped_tokens"] == sum(shards[int(k.rsplit(":", 1)[1])]["tokens"] for k in bad)


def test_inspect_verify_and_the_loader_agree_on_the_bad_shards(tmp_path):
    from data import inspect

    synthetic(tmp_path / "d", "d", N_DOCS, base=100, shard_tokens=1500, sample_tokens=400)
    rewrite_sample(tmp_path / "d", 0, 1, flip_zstd)
    truncate(tmp_path / "d")
    edit_manifest(tmp_path / "d", lambda m: m["shards"][3].update(samples=m["shards"][3]["samples"] + 1))
    out = io.StringIO()
    assert inspect.verify(str(tmp_path / "d"), out) == 3
    said = {line.split(":")[0].removeprefix("bad shard ") for line in out.getvalue().splitlines()
            if line.startswith("bad shard")}
    assert said == {fmt.shard_name(i) for i in (0, 1, 3)}
    loader, _ = read_epoch(tmp_path / "d", "skip", 10**5, max_skip_fraction=1.0)
    bad = loader.worker_states[0]["skips"]["bad"]
    assert {k.rsplit(":", 1)[1] for k in bad} == {"0", "1", "3"}
    for line in out.getvalue().splitlines():  # and for the same reasons
        if line.startswith("bad shard"):
            name, reason = line.removeprefix("bad shard ").split(": ", 1)
            assert reason in bad.values(), reason


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


def test_errors_in_loader_workers_arrive_as_the_projects_own_message(tmp_path):
    synthetic(tmp_path / "d", "d", N_DOCS, base=100, shard_tokens=1500, sample_tokens=400)
    truncate(tmp_path / "d")
    cfg = config(tmp_path, {"d": 1.0}, seq_length=50, num_workers=1, shuffle_window=2)
    with pytest.raises(fmt.DataError) as e:
        TokenLoader(cfg, 1).take(10**4)
    assert str(e.value).startswith(str(tmp_path / "d" / "shard-000001.tar"))
    assert "DataLoader worker" not in str(e.value) and "Traceback" not in str(e.value)


def test_a_manifest_whose_token_count_disagrees_is_refused(tmp_path):
    from data import inspect

    synthetic(tmp_path / "d", "d", N_DOCS, base=100, shard_tokens=1500, sample_tokens=400)
    edit_manifest(tmp_path / "d", lambda m: m["shards"][2].update(tokens=m["shards"][2]["tokens"] + 1))
    out = io.StringIO()
    assert inspect.verify(str(tmp_path / "d"), out) == 1
    assert re.search(r"bad shard shard-000002.tar: .*shard-000002.tar: [\d,]+ tokens, but .*manifest.json lists",
                     out.getvalue())
    loader, _ = read_epoch(tmp_path / "d", "skip", 10**4, max_skip_fraction=1.0)
    assert loader.stats()["skipped_shards"] >= 1
