"""prepare -> inspect -> load on the embedded corpus and on user files; FIM; reproducibility."""

from __future__ import annotations

import filecmp
import json

import pytest

from data import cli, format as fmt, tokenizer as toks
from data.corpus import documents
from data.loader import TokenLoader
from data.prepare import Options, prepare
from data.stream import decoded_shard, open_dataset
from tests.data_helpers import config

pytestmark = pytest.mark.xdist_group("data")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    assert cli.main(["prepare", "embedded:general", "-o", str(root / "general"), "-q", "--workers", "2"]) == 0
    # code with general's tokenizer, as `make data` does (it holds the FIM tokens already)
    assert cli.main(["prepare", "embedded:code", "--code", "-o", str(root / "code"), "-q", "--workers", "2",
                     "--tokenizer", str(root / "general")]) == 0
    return root


def stored_docs(path):
    """{document id: token ids (EOD included)} of a prepared dataset."""
    ds, out = open_dataset("x", str(path)), {}
    for i in range(len(ds.urls)):
        for _, tokens, meta in decoded_shard(ds, i):
            out.update(zip(meta["docs"], fmt.split_documents(tokens, meta)))
    return out


def test_embedded_round_trips_to_text(embedded):
    tok = toks.load(embedded / "general")
    eod = tok.token_to_id("<|endoftext|>")
    stored = stored_docs(embedded / "general")
    originals = {d.id: d.text for d in documents("general")}
    assert stored.keys() == originals.keys()
    for doc_id, ids in stored.items():
        assert ids[-1] == eod and eod not in ids[:-1]
        assert tok.decode(ids[:-1].tolist(), skip_special_tokens=False) == originals[doc_id]
    manifest = json.loads((embedded / "general" / fmt.MANIFEST).read_text())
    assert manifest["totals"]["tokens"] == sum(len(v) for v in stored.values())
    assert manifest["tokenizer"]["sha256"] == toks.identity(tok)


def test_fim_rearranges_code_and_keeps_it_whole(embedded):
    tok = toks.load(embedded / "code")
    pre, suf, mid = (tok.token_to_id(t) for t in toks.FIM_CANDIDATES[0])
    originals = {d.id: d.text for d in documents("code")}
    modes = {"psm": 0, "spm": 0, "none": 0}
    dec = lambda ids: tok.decode(list(ids), skip_special_tokens=False)  # noqa: E731
    for doc_id, ids in stored_docs(embedded / "code").items():
        ids = ids[:-1].tolist()
        if ids[:2] == [pre, suf]:  # SPM: <pre> <suf> suffix <mid> prefix middle
            modes["spm"] += 1
            suffix, rest = ids[2:ids.index(mid)], ids[ids.index(mid) + 1:]
            assert originals[doc_id].endswith(dec(suffix))
            assert dec(rest) + dec(suffix) == originals[doc_id]
        elif ids[:1] == [pre]:  # PSM: <pre> prefix <suf> suffix <mid> middle
            modes["psm"] += 1
            p, s, m = ids[1:ids.index(suf)], ids[ids.index(suf) + 1:ids.index(mid)], ids[ids.index(mid) + 1:]
            assert dec(p) + dec(m) + dec(s) == originals[doc_id]
        else:
            modes["none"] += 1
            assert dec(ids) == originals[doc_id]
    n = sum(modes.values())
    fim = modes["psm"] + modes["spm"]
    # rate 0.5 and SPM share 0.5, within 4 binomial standard deviations
    assert abs(fim / n - 0.5) < 4 * (0.25 / n) ** 0.5
    assert abs(modes["spm"] / fim - 0.5) < 4 * (0.25 / fim) ** 0.5


def test_embedded_inspect_and_load(embedded, capsys):
    assert cli.main(["inspect", str(embedded / "code"), "-n", "1"]) == 0
    out = capsys.readouterr().out
    from data import corpus

    # the embedded code corpus is this Python's standard library: count it the same way (prepare
    # keeps the non-empty documents)
    kept = sum(1 for d in corpus.documents("code") if d.text)
    assert f"  {kept:,} documents, " in out
    assert "stdlib/" in out and "tokens per input" in out
    assert cli.main(["inspect", str(embedded / "general" / "shard-000000.tar"), "-n", "2"]) == 0
    assert "pydoc_data/" in capsys.readouterr().out
    assert cli.main(["inspect", "--verify", str(embedded / "code")]) == 0
    # piped into `head`, it stops quietly when the pipe closes
    import subprocess
    import sys

    shard = embedded / "general" / "shard-000000.tar"
    run = subprocess.run(f"{sys.executable} -m data.cli inspect {shard} -n 50 | head -1", shell=True,
                         capture_output=True, text=True)
    assert run.stdout.count("\n") == 1 and "Traceback" not in run.stderr
    cfg = config(embedded, {"general": 0.5, "code": 0.5}, seq_length=512, num_workers=2)
    batches = TokenLoader(cfg, 4, model_vocab=16384).take(4)
    assert batches[0]["tokens"].shape == (4, 512) and batches[0]["tokens"].dtype.is_signed
    with pytest.raises(fmt.DataError, match="exceeds the model's vocab_size 1000"):
        TokenLoader(cfg, 4, model_vocab=1000)


def write_inputs(tmp_path):
    (tmp_path / "in").mkdir()
    docs = [f"document {i}: " + "lorem ipsum " * i for i in range(1, 40)]
    with open(tmp_path / "in" / "part1.jsonl", "w") as f:
        for d in docs[:20]:
            f.write(json.dumps({"text": d, "meta": 1}) + "\n")
        f.write("\n")
    with open(tmp_path / "in" / "part2.jsonl", "w") as f:
        for d in docs[20:]:
            f.write(json.dumps({"text": d}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["from parquet one", "from parquet two", None]}), tmp_path / "in" / "t.parquet")
    (tmp_path / "in" / "notes.txt").write_text("a plain text file <|endoftext|> spelled out")
    (tmp_path / "in" / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    return docs


def test_user_files_are_reproducible_and_traceable(embedded, tmp_path):
    write_inputs(tmp_path)
    tokenizer = str(embedded / "general" / fmt.TOKENIZER)
    runs = []
    for workers in (1, 2):
        out = tmp_path / f"run{workers}" / "user"
        manifest = prepare(Options([str(tmp_path / "in")], str(out), tokenizer=tokenizer, workers=workers,
                                   sample_tokens=64, shard_tokens=256), progress=False)
        runs.append(out)
    cmp = filecmp.dircmp(runs[0], runs[1])
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    assert len(cmp.same_files) == len(manifest["shards"]) + 2
    per_input = {p["path"].rsplit("/", 1)[1]: p for p in manifest["inputs"]}
    assert per_input["part1.jsonl"]["documents"] == 20 and per_input["part2.jsonl"]["documents"] == 19
    assert per_input["t.parquet"]["documents"] == 2 and per_input["t.parquet"]["empty"] == 1
    assert per_input["blob.bin"]["documents"] == 0
    stored = stored_docs(runs[0])
    tok = toks.load(runs[0])
    assert tok.decode(stored[f"{tmp_path}/in/part1.jsonl:3"][:-1].tolist()) == "document 3: " + "lorem ipsum " * 3
    assert tok.decode(stored[f"{tmp_path}/in/t.parquet:1"][:-1].tolist()) == "from parquet two"
    # text that spells a special token stays text: the only EOD is the one appended
    notes = stored[f"{tmp_path}/in/notes.txt"]
    assert list(notes).count(tok.token_to_id("<|endoftext|>")) == 1


def test_hf_tokenizer_directory_gets_fim_tokens_added(embedded, tmp_path):
    """A tokenizer without FIM tokens: `--code` adds them and the saved tokenizer carries them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<unk>", "</s>", *"abcdefghijklmnopqrstuvwxyz ():=\n"])}
    plain = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    plain.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    (tmp_path / "hf").mkdir()
    plain.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "code.py").write_text("def f(x):\n    return x\n")
    manifest = prepare(Options([str(tmp_path / "code.py")], str(tmp_path / "out"), tokenizer=str(tmp_path / "hf"),
                               code=True, fim_rate=1.0, workers=1), progress=False)
    saved = toks.load(tmp_path / "out")
    assert saved.token_to_id("<|fim_prefix|>") == manifest["tokenizer"]["special_ids"]["fim_prefix"] >= len(vocab)
    assert manifest["tokenizer"]["special_ids"]["eod"] == vocab["</s>"]
    assert manifest["tokenizer"]["vocab_size"] == len(vocab) + 3


@pytest.mark.parametrize("content,field,match", [
    ('{"text": "ok"}\n{"text": broken\n', "text", r"bad.jsonl:2: not valid JSON"),
    ('{"body": "x"}\n', "text", r"bad.jsonl:1: no 'text' field"),
    ('{"text": 3}\n', "text", r"bad.jsonl:1: 'text' is int"),
])
def test_bad_inputs_name_file_and_line(embedded, tmp_path, content, field, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(fmt.DataError, match=match):
        prepare(Options([str(tmp_path / "bad.jsonl")], str(tmp_path / "o"), text_field=field, workers=1,
                        tokenizer=str(embedded / "general" / fmt.TOKENIZER)), progress=False)


def test_cli_errors_are_clear(embedded, tmp_path, capsys):
    assert cli.main(["prepare", str(tmp_path / "nothing*.jsonl"), "-o", str(tmp_path / "o"), "-q"]) == 2
    assert "no such file, directory or matching glob" in capsys.readouterr().err
    assert cli.main(["prepare", "embedded:general", "-o", str(embedded / "general"), "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["prepare", "embedded:poems", "-o", str(tmp_path / "o"), "-q"]) == 2
    assert "embedded:general" in capsys.readouterr().err
    assert cli.main(["prepare", "embedded:code", "--tokenizer", str(tmp_path), "-o", str(tmp_path / "o"), "-q"]) == 2
    assert "no such tokenizer file" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path / "none")]) == 2
    assert "run `glm-data prepare` first" in capsys.readouterr().err


def _more_inputs(tmp_path):
    """Inputs of uneven sizes, so that shards span inputs and the parts' byte ranges differ."""
    docs = write_inputs(tmp_path)
    for k in range(5):
        with open(tmp_path / "in" / f"extra{k}.jsonl", "w") as f:
            for d in docs[: 4 + 7 * k]:
                f.write(json.dumps({"text": f"extra {k} " + d}) + "\n")


@pytest.mark.parametrize("parts", [3, 12], ids=["3-parts", "more-parts-than-inputs"])
def test_parts_then_merge_write_the_single_run_byte_for_byte(embedded, tmp_path, parts):
    _more_inputs(tmp_path)
    tokenizer = str(embedded / "general" / fmt.TOKENIZER)
    common = ["prepare", str(tmp_path / "in"), "--tokenizer", tokenizer, "--name", "user", "--sample-tokens", "64",
              "--shard-tokens", "256", "--workers", "1", "-q"]
    assert cli.main([*common, "-o", str(tmp_path / "single")]) == 0
    for i in reversed(range(parts)):  # in any order, as array tasks finish
        assert cli.main([*common, "-o", str(tmp_path / "merged"), "--part", f"{i}/{parts}"]) == 0
    assert cli.main([*common, "-o", str(tmp_path / "merged"), "--part", f"1/{parts}"]) == 0  # a task run again
    assert cli.main([*common, "-o", str(tmp_path / "merged"), "--merge", str(parts)]) == 0
    cmp = filecmp.dircmp(tmp_path / "single", tmp_path / "merged")
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    manifest = json.loads((tmp_path / "merged" / fmt.MANIFEST).read_text())
    assert len(manifest["shards"]) > parts and len(cmp.same_files) == len(manifest["shards"]) + 2
    assert not (tmp_path / "merged.parts").exists()  # the dataset holds all of it now


def test_merge_refuses_missing_or_mismatched_parts(embedded, tmp_path, capsys):
    _more_inputs(tmp_path)
    tokenizer = str(embedded / "general" / fmt.TOKENIZER)
    common = ["prepare", str(tmp_path / "in"), "--tokenizer", tokenizer, "--sample-tokens", "64", "-q",
              "--workers", "1", "-o", str(tmp_path / "out")]
    assert cli.main([*common, "--part", "0/3"]) == 0
    assert cli.main([*common, "--part", "2/3"]) == 0
    assert cli.main([*common, "--merge", "3"]) == 2
    assert "1 of 3 parts missing (part-00001-of-00003)" in capsys.readouterr().err
    assert cli.main([*common, "--part", "1/3", "--fim-rate", "0.9"]) == 0
    assert cli.main([*common, "--merge", "3"]) == 2
    assert "part-00001-of-00003/part.json: made with other options than this merge: fim_rate" in capsys.readouterr().err
    (tmp_path / "in" / "late.jsonl").write_text(json.dumps({"text": "added after the parts ran"}) + "\n")
    assert cli.main([*common, "--merge", "3"]) == 2
    assert "made from another list of inputs (10 files) than this merge's 11" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    for bad in ("3/3", "1", "a/b"):
        assert cli.main([*common, "--part", bad]) == 2
        assert "--part" in capsys.readouterr().err


# ---- repository-level documents -------------------------------------------------------------------

def _repositories(root):
    """Three repositories (and what a checkout also holds: hidden folders, binaries, a loose file)."""
    files = {
        "alpha/README.md": "# Alpha\nA tiny package.\n",
        "alpha/src/core.py": "def add(a, b):\n    return a + b\n",
        "alpha/src/util.py": "from core import add\n\nprint(add(1, 2))",
        "alpha/.git/config": "[core]\n",
        "beta/main.py": "import os\nprint(os.getcwd())\n",
        "gamma/a.py": "w = 1\n" * 8,
        "gamma/b.py": "x = 2\n" * 8,
        "gamma/c.py": "y = 3\n" * 8,
        "gamma/d.py": "z = 4\n" * 8,
        "notes.txt": "a file in no repository",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "alpha" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "alpha" / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    return files


def test_repo_level_documents_are_whole_repositories(embedded, tmp_path):
    """One document per first-level subdirectory: its text files in path order, each after its
    relative path; hidden, binary and non-UTF-8 files left out (counted); a repository longer than a
    sample cut at file boundaries; ids name the repository; the same inputs, in one run or in parts,
    give the same bytes, and no part splits a repository."""
    _repositories(tmp_path / "repos")
    tok = toks.load(embedded / "code")
    common = ["prepare", str(tmp_path / "repos"), "--repo-level", "--tokenizer", str(embedded / "code"), "--name", "repo",
              "--sample-tokens", "96", "--shard-tokens", "128", "--workers", "1", "-q"]
    assert cli.main([*common, "--fim-rate", "0", "-o", str(tmp_path / "plain")]) == 0
    docs = stored_docs(tmp_path / "plain")
    text = {k: tok.decode(v[:-1].tolist(), skip_special_tokens=False) for k, v in docs.items()}
    repo = str(tmp_path / "repos")
    assert text[f"{repo}/alpha"] == ("README.md\n# Alpha\nA tiny package.\n"
                                     "src/core.py\ndef add(a, b):\n    return a + b\n"
                                     "src/util.py\nfrom core import add\n\nprint(add(1, 2))\n")
    assert text[f"{repo}/beta"] == "main.py\nimport os\nprint(os.getcwd())\n"
    pieces = sorted(k for k in docs if k.startswith(f"{repo}/gamma#"))
    assert len(pieces) > 1 and all(len(docs[k]) <= 96 for k in pieces)
    assert "".join(text[k] for k in pieces) == "".join(f"{n}.py\n" + f"{v} = {i}\n" * 8
                                                       for i, (n, v) in enumerate(zip("abcd", "wxyz"), 1))
    assert all(text[k].startswith(("a.py\n", "b.py\n", "c.py\n", "d.py\n")) for k in pieces)  # at file edges
    manifest = json.loads((tmp_path / "plain" / fmt.MANIFEST).read_text())
    by_input = {p["path"]: p for p in manifest["inputs"]}
    assert list(by_input) == [f"{repo}/alpha", f"{repo}/beta", f"{repo}/gamma"]
    assert by_input[f"{repo}/alpha"]["skipped_files"] == 2 and "skipped_files" not in by_input[f"{repo}/beta"]
    assert manifest["options"]["repo_level"] and manifest["kind"] == "code"

    assert cli.main([*common, "--fim-rate", "0", "-o", str(tmp_path / "again")]) == 0
    for i in (1, 0):
        assert cli.main([*common, "--fim-rate", "0", "-o", str(tmp_path / "merged"), "--part", f"{i}/2"]) == 0
        part = json.loads((tmp_path / "merged.parts" / f"part-0000{i}-of-00002" / "part.json").read_text())
        assert {p["path"] for p in part["per_input"]} <= set(by_input)  # whole repositories
    assert cli.main([*common, "--fim-rate", "0", "-o", str(tmp_path / "merged"), "--merge", "2"]) == 0
    for other in ("again", "merged"):
        cmp = filecmp.dircmp(tmp_path / "plain", tmp_path / other)
        assert not cmp.diff_files and not cmp.left_only and not cmp.right_only, other

    # Fill-in-the-Middle per file: each file's path stays in front of its own FIM sentinels
    assert cli.main([*common, "--fim-rate", "1", "-o", str(tmp_path / "fim")]) == 0
    fim_text = tok.decode(stored_docs(tmp_path / "fim")[f"{repo}/beta"].tolist(), skip_special_tokens=False)
    assert fim_text.startswith("main.py\n<|fim_prefix|>") and fim_text.count("<|fim_middle|>") == 1


def test_repo_level_refuses_what_holds_no_repositories(embedded, tmp_path, capsys):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.py").write_text("x = 1\n")
    for spec, message in ((tmp_path / "flat", "no repositories in it"), (tmp_path / "nothing", "this is no directory")):
        assert cli.main(["prepare", str(spec), "--repo-level", "-o", str(tmp_path / "out"), "-q"]) == 2
        assert message in capsys.readouterr().err


# --- long documents: tokenised in pieces, memory bounded ------------------------------------------
def _long_texts() -> list[str]:
    """Real text and code, long: one line of prose (newlines made spaces, as a minified file), the
    code with its lines, and a run of letters and digits with no space at all."""
    prose = " ".join(d.text for d in documents("general")[:300]).replace("\n", " ")
    code = "\n".join(d.text for d in documents("code")[:60])
    return [prose, code, "ab12cd34" * 20000, "x" * 50000]


@pytest.mark.parametrize("kind", ["text", "code"])
def test_long_documents_in_pieces_give_the_ids_of_the_whole(embedded, tmp_path, monkeypatch, kind):
    """prepare with a 4 KB tokenizer batch (every long text cut into hundreds of pieces) writes what
    it writes when nothing is cut, byte for byte, FIM included; and the stored ids are the tokenizer's
    ids of each whole text."""
    from data import encode

    texts = _long_texts()
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = str(embedded / "general" / fmt.TOKENIZER)
    outs = {}
    for batch in (1 << 12, 1 << 30):
        monkeypatch.setattr(encode, "BATCH_CHARS", batch)
        outs[batch] = tmp_path / f"batch{batch}" / "long"
        prepare(Options([str(tmp_path / "long.jsonl")], str(outs[batch]), tokenizer=tokenizer, workers=1,
                        code=kind == "code", fim_rate=0.9), progress=False)
    cmp = filecmp.dircmp(*outs.values())
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only and cmp.same_files
    if kind == "text":
        tok, stored = toks.load(tokenizer), stored_docs(outs[1 << 12])
        for i, text in enumerate(texts):
            assert stored[f"{tmp_path}/long.jsonl:{i + 1}"][:-1].tolist() == tok.encode(text, add_special_tokens=False).ids


def test_a_tokenizer_that_cannot_be_cut_is_tokenised_whole(embedded, tmp_path, monkeypatch, capsys):
    """A pre-tokenizer that adds a space before every text (or none that splits at all) would change
    the ids at a cut: prepare says so and tokenises such documents whole."""
    from tokenizers import pre_tokenizers

    from data import encode

    tok = toks.load(embedded / "general" / fmt.TOKENIZER)
    assert toks.cut_check(tok) is None
    for pre, why in [(pre_tokenizers.ByteLevel(add_prefix_space=True), "differ from the ids of the whole"),
                     (pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), "span a space"),
                     (pre_tokenizers.Metaspace(), "span a space")]:
        tok.pre_tokenizer = pre
        assert why in toks.cut_check(tok)
    tok.save(str(tmp_path / "prefix.json"))
    text = _long_texts()[0][:200_000]
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": text}) + "\n")
    monkeypatch.setattr(encode, "BATCH_CHARS", 1 << 12)
    out = tmp_path / "out"
    prepare(Options([str(tmp_path / "long.jsonl")], str(out), tokenizer=str(tmp_path / "prefix.json"), workers=1),
            progress=True)
    assert "tokenised whole" in capsys.readouterr().err
    whole = toks.load(tmp_path / "prefix.json").encode(text, add_special_tokens=False).ids
    assert stored_docs(out)[f"{tmp_path}/long.jsonl:1"][:-1].tolist() == whole


def test_a_worker_memory_does_not_follow_the_longest_document(embedded, tmp_path):
    """An 8 MB one-line document costs a worker a few bytes per character (its text and its ids),
    not the ~140 bytes per token that a whole-text Encoding and its Python list would (~900 MB more):
    the peak that prepare reports stays within 200 MB (a 1 MiB batch in the tokenizer) + 8 bytes per
    character of a run of small documents' peak (measured: +174 MB; ~+880 MB if nothing is cut)."""
    prose = _long_texts()[0]
    big = (prose * (8_000_000 // len(prose) + 1))[:8_000_000]
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": big}) + "\n")
    (tmp_path / "small.jsonl").write_text("".join(json.dumps({"text": big[i:i + 4000]}) + "\n"
                                                  for i in range(0, 400_000, 4000)))
    peaks = {}
    for name in ("small", "big"):
        out = tmp_path / name
        m = prepare(Options([str(tmp_path / f"{name}.jsonl")], str(out), workers=2,
                            tokenizer=str(embedded / "general" / fmt.TOKENIZER)), progress=False)
        peaks[name] = m["worker_peak_mb"]
    assert 0 < peaks["small"] < peaks["big"] < 1000, peaks
    assert peaks["big"] - peaks["small"] < 200 + 8 * 8, peaks


def test_a_document_past_the_limit_becomes_several_counted_documents(embedded, tmp_path, monkeypatch, capsys):
    """MAX_DOCUMENT_CHARS (64 Mi characters; 20,000 here) bounds what a worker holds: a longer document
    is cut into documents of about that many characters, at a space between words, each with its EOD,
    named <id>#k/n, counted per input and in the summary; together they hold every character once."""
    from data import prepare as prep

    monkeypatch.setattr(prep, "MAX_DOCUMENT_CHARS", 20_000)
    text = _long_texts()[0][:70_000]
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": text}) + "\n")
    assert cli.main(["prepare", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out"), "--workers", "2",
                     "--tokenizer", str(embedded / "general" / fmt.TOKENIZER)]) == 0
    assert "cut 1 document(s) longer than 20,000 characters" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / fmt.MANIFEST).read_text())
    assert manifest["inputs"][0]["split_documents"] == 1 and manifest["inputs"][0]["documents"] == 5
    stored, tok = stored_docs(tmp_path / "out"), toks.load(embedded / "general" / fmt.TOKENIZER)
    names = [f"{tmp_path}/in.jsonl:2#{k}/4" for k in range(1, 5)]
    assert sorted(stored) == sorted([f"{tmp_path}/in.jsonl:1", *names])
    pieces = [tok.decode(stored[n][:-1].tolist()) for n in names]
    assert "".join(pieces) == text and all(19_000 < len(p) <= 20_100 for p in pieces[:3])
    assert all(p[0] == " " for p in pieces[1:])  # cut before a space between words
