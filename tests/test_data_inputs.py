"""Damaged and unusual raw inputs for `glm-data prepare` (each numbered case of the bad-data issue):
every one stops with the file and the place named, or, where the user chose to repair, is repaired
and counted; prepare never leaves a half-written output or a stray file."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import zstandard

from data import cli, format as fmt, tokenizer as toks
from data.prepare import Options, prepare, summary
from data.stream import decoded_shard, open_dataset

pytestmark = pytest.mark.xdist_group("data")
LINES = [json.dumps({"text": f"document {i}: " + "lorem ipsum " * 5}) + "\n" for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    toks.train_default(1024).save(str(path))
    return str(path)


def run(tokenizer, inputs, out, **kw):
    return prepare(Options([str(i) for i in inputs], str(out), tokenizer=tokenizer, workers=1, **kw), progress=False)


def documents_of(out) -> dict:
    ds, docs = open_dataset("x", str(out)), {}
    for i in range(len(ds.urls)):
        for _, tokens, meta in decoded_shard(ds, i):
            docs.update(zip(meta["docs"], (t.tolist() for t in fmt.split_documents(tokens, meta))))
    return docs


def no_stray_files(parent: Path, out: Path) -> bool:
    return not out.exists() and [p.name for p in parent.iterdir() if p.name.startswith(".")] == []


# ---- 4: invalid UTF-8, surrogates, truncated .gz, -o problems -----------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_invalid_utf8_names_file_line_and_byte_or_is_replaced_and_counted(tokenizer, tmp_path, suffix):
    raw = "".join(LINES[:3]).encode() + b'{"text": "caf\xe9 au lait"}\n' + "".join(LINES[3:6]).encode()
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else
                     zstandard.ZstdCompressor().compress(raw) if suffix.endswith(".zst") else raw)
    with pytest.raises(fmt.DataError, match=rf"latin1{suffix}:4: invalid UTF-8 at byte offset 13 \(b'\\xe9 au'...\); "
                                            r"pass --invalid-utf8=replace"):
        run(tokenizer, [path], tmp_path / "o")
    assert no_stray_files(tmp_path, tmp_path / "o")
    manifest = run(tokenizer, [path], tmp_path / "o", invalid_utf8="replace")
    assert manifest["inputs"][0]["replaced_characters"] == 1 and manifest["inputs"][0]["documents"] == 7
    assert "replaced 1 invalid UTF-8 sequence(s) with U+FFFD in 1 input(s)" in summary(manifest, "o")
    tok = toks.load(tmp_path / "o")
    assert tok.decode(documents_of(tmp_path / "o")[f"{path}:4"][:-1]) == "caf\ufffd au lait"


def test_a_lone_surrogate_in_a_json_string_is_named_or_replaced(tokenizer, tmp_path):
    (tmp_path / "s.jsonl").write_text(LINES[0] + '{"text": "half a pair \\ud800 here"}\n')
    with pytest.raises(fmt.DataError, match=r"s.jsonl:2: lone surrogate '\\ud800' at character 12"):
        run(tokenizer, [tmp_path / "s.jsonl"], tmp_path / "o")
    manifest = run(tokenizer, [tmp_path / "s.jsonl"], tmp_path / "o", invalid_utf8="replace")
    assert manifest["inputs"][0]["replaced_characters"] == 1


def test_a_truncated_gz_is_named_and_leaves_no_files(tokenizer, tmp_path):
    data = gzip.compress("".join(LINES).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(fmt.DataError, match=r"cut.jsonl.gz: damaged or truncated compressed data after line \d+ "
                                            r"\(EOFError"):
        run(tokenizer, [tmp_path / "cut.jsonl.gz"], tmp_path / "o")
    assert no_stray_files(tmp_path, tmp_path / "o")
    flipped = bytearray(data)
    flipped[-6] ^= 0xFF  # the CRC
    (tmp_path / "crc.jsonl.gz").write_bytes(bytes(flipped))
    with pytest.raises(fmt.DataError, match=r"crc.jsonl.gz: damaged or truncated compressed data after line 40 "
                                            r"\(BadGzipFile: CRC check failed"):
        run(tokenizer, [tmp_path / "crc.jsonl.gz"], tmp_path / "o")


def test_output_that_is_a_file_or_overlaps_an_input_is_refused_before_any_work(tokenizer, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(LINES))
    (tmp_path / "file").write_text("x")
    with pytest.raises(fmt.DataError, match=r"-o .*file: is a file"):
        run(tokenizer, [tmp_path / "in"], tmp_path / "file")
    with pytest.raises(fmt.DataError, match=r"-o .*in/out lies inside the input .*in: prepare would read its own"):
        run(tokenizer, [tmp_path / "in"], tmp_path / "in" / "out", overwrite=True)
    with pytest.raises(fmt.DataError, match=r"input .*in lies inside -o .*, which prepare replaces"):
        run(tokenizer, [tmp_path / "in"], tmp_path, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["a.jsonl"]


# ---- 5: zstd truncated at a line boundary, several frames ---------------------------------------

def test_zstd_cut_at_a_line_boundary_is_detected_and_every_frame_is_read(tokenizer, tmp_path):
    c = zstandard.ZstdCompressor()
    frames = [c.compress("".join(LINES[i:i + 10]).encode()) for i in range(0, 40, 10)]
    (tmp_path / "multi.jsonl.zst").write_bytes(b"".join(frames))  # as parallel compressors write them
    manifest = run(tokenizer, [tmp_path / "multi.jsonl.zst"], tmp_path / "o")
    assert manifest["inputs"][0]["documents"] == 40
    # cut inside the third frame: the first 20 lines decode whole, then the data stops mid-frame
    whole = b"".join(frames[:2])
    (tmp_path / "cut.jsonl.zst").write_bytes(whole + frames[2][: len(frames[2]) // 2])
    with pytest.raises(fmt.DataError, match=r"cut.jsonl.zst: damaged or truncated compressed data after line \d+ "
                                            r"\(_Truncated: the file ends inside a zstd frame\)"):
        run(tokenizer, [tmp_path / "cut.jsonl.zst"], tmp_path / "o2")
    # one frame written with content size and checksum, cut exactly after a line's bytes were emitted
    single = zstandard.ZstdCompressor(write_checksum=True).compress("".join(LINES).encode())
    for cut in (len(single) - 4, len(single) - 1):  # the checksum missing, or part of it
        (tmp_path / "c.jsonl.zst").write_bytes(single[:cut])
        with pytest.raises(fmt.DataError, match=r"c.jsonl.zst: damaged or truncated"):
            run(tokenizer, [tmp_path / "c.jsonl.zst"], tmp_path / "o3")


def test_a_cut_zstd_input_ends_the_cli_cleanly_with_the_shard_being_written_closed(tokenizer, tmp_path):
    """The error arrives while a shard is being written: the CLI says what is wrong and exits 2, and
    nothing more (before: the open shard's tar stream wrote into its closed file at exit, 'Exception
    ignored in: <function _Stream.__del__> ... ValueError: write to closed file')."""
    import subprocess
    import sys

    c = zstandard.ZstdCompressor()
    text = "".join(json.dumps({"text": f"document {i} " + "lorem ipsum dolor sit amet " * 50}) + "\n"
                   for i in range(2000))
    lines = text.splitlines(keepends=True)
    frames = [c.compress("".join(lines[i:i + 200]).encode()) for i in range(0, 2000, 200)]
    data = b"".join(frames)
    (tmp_path / "cut.jsonl.zst").write_bytes(data[: len(data) * 2 // 3])
    p = subprocess.run([sys.executable, "-m", "data.cli", "prepare", str(tmp_path / "cut.jsonl.zst"), "-o",
                        str(tmp_path / "out"), "--tokenizer", tokenizer, "--shard-tokens", "100000000"],
                       capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 2, p.stderr[-2000:]
    assert "cut.jsonl.zst: damaged or truncated compressed data after line" in p.stderr
    assert "Exception ignored" not in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert no_stray_files(tmp_path, tmp_path / "out")


# ---- 6: the smaller ones ------------------------------------------------------------------------

def test_json_errors_keep_line_and_column(tokenizer, tmp_path):
    (tmp_path / "bad.jsonl").write_text(LINES[0] + '{"text": "x",, "y": 1}\n')
    with pytest.raises(fmt.DataError, match=r"bad.jsonl:2: not valid JSON \(Expecting property name enclosed in "
                                            r"double quotes at column 14\)"):
        run(tokenizer, [tmp_path / "bad.jsonl"], tmp_path / "o")


def test_json_files_are_parsed_as_one_document_or_a_list(tokenizer, tmp_path):
    (tmp_path / "one.json").write_text(json.dumps({"text": "a single document"}))
    (tmp_path / "many.json").write_text(json.dumps([{"text": "first"}, {"text": "second"}]))
    manifest = run(tokenizer, [tmp_path / "one.json", tmp_path / "many.json"], tmp_path / "o")
    assert [p["documents"] for p in manifest["inputs"]] == [1, 2]
    tok, docs = toks.load(tmp_path / "o"), documents_of(tmp_path / "o")
    assert tok.decode(docs[f"{tmp_path}/one.json"][:-1]) == "a single document"
    assert tok.decode(docs[f"{tmp_path}/many.json:1"][:-1]) == "second"
    (tmp_path / "bad.json").write_text('{"text": "x"}\n{"text": "y"}\n')
    with pytest.raises(fmt.DataError, match=r"bad.json:2: not valid JSON \(Extra data at column 1\)"):
        run(tokenizer, [tmp_path / "bad.json"], tmp_path / "o2")


def test_an_empty_directory_is_reported_as_empty(tokenizer, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["prepare", str(tmp_path / "empty"), "-o", str(tmp_path / "o"), "-q"]) == 2
    assert "empty: the directory holds no files" in capsys.readouterr().err


def test_fim_draws_do_not_depend_on_where_the_output_goes(tokenizer, tmp_path):
    (tmp_path / "code.jsonl").write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n"
                                                 for i in range(30)))
    a = run(tokenizer, [tmp_path / "code.jsonl"], tmp_path / "a" / "py", code=True)
    run(tokenizer, [tmp_path / "code.jsonl"], tmp_path / "b" / "python", code=True)
    assert documents_of(tmp_path / "a" / "py") == documents_of(tmp_path / "b" / "python")  # the same FIM draws
    run(tokenizer, [tmp_path / "code.jsonl"], tmp_path / "c" / "other", code=True, name="py")
    for shard in a["shards"]:  # and with the same name, byte-identical shards
        assert (tmp_path / "a" / "py" / shard["name"]).read_bytes() == \
            (tmp_path / "c" / "other" / shard["name"]).read_bytes()


def test_compression_ratio_is_said_plainly(tokenizer, tmp_path):
    (tmp_path / "tiny.jsonl").write_text(LINES[0])
    manifest = run(tokenizer, [tmp_path / "tiny.jsonl"], tmp_path / "o")
    line = summary(manifest, "o").splitlines()[0]
    assert "x larger than raw uint16: on so few tokens the tar headers outweigh the compression" in line
    assert "0.0" not in line.split("MB, ")[1]


# ---- crash safety ---------------------------------------------------------------------------------

def test_a_failed_overwrite_leaves_the_previous_output_intact(tokenizer, tmp_path):
    (tmp_path / "good.jsonl").write_text("".join(LINES))
    run(tokenizer, [tmp_path / "good.jsonl"], tmp_path / "o")
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}
    (tmp_path / "bad.jsonl").write_text("".join(LINES) + "not json\n")
    with pytest.raises(fmt.DataError, match=r"bad.jsonl:41: not valid JSON"):
        run(tokenizer, [tmp_path / "good.jsonl", tmp_path / "bad.jsonl"], tmp_path / "o", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # a run killed outright leaves its hidden work directory; the next run clears it
    (tmp_path / f".o.tmp-{os.getpid() + 1}").mkdir()
    run(tokenizer, [tmp_path / "good.jsonl", tmp_path / "good.jsonl"], tmp_path / "o", overwrite=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
