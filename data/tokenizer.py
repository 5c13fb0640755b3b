"""Tokenizers for `prepare`: a Hugging Face tokenizer.json (or a directory holding one), or a
byte-level BPE trained here, offline and deterministically, on the embedded corpus.

Whatever tokenizer is used is saved beside the shards, so a dataset names its own vocabulary; its
identity is the SHA-256 of that saved JSON.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.format import DataError

DEFAULT_VOCAB = 16384  # the `smoke` model's vocabulary
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|end▁of▁sentence|>")
# (prefix, suffix, middle) spellings in common tokenizers; the first complete set found is used.
FIM_CANDIDATES = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<|code_prefix|>", "<|code_suffix|>", "<|code_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<|fim▁begin|>", "<|fim▁hole|>", "<|fim▁end|>"),
)
DEFAULT_SPECIALS = ["<|endoftext|>", *FIM_CANDIDATES[0], "<|pad|>"]


@dataclass(frozen=True)
class SpecialIds:
    eod: int
    fim_prefix: int | None = None
    fim_suffix: int | None = None
    fim_middle: int | None = None


def load(path: str | Path) -> Tokenizer:
    """A Hugging Face fast tokenizer: a tokenizer.json file or a directory that holds one."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        hint = (" (a directory with only a slow/sentencepiece tokenizer: save it once with transformers' "
                "AutoTokenizer(...).save_pretrained to get tokenizer.json)") if path.is_dir() else ""
        raise DataError(f"{file}: no such tokenizer file{hint}")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"{file}: not a Hugging Face tokenizer.json ({e})") from None


def train_default(vocab_size: int = DEFAULT_VOCAB) -> Tokenizer:
    """Byte-level BPE trained on the embedded corpus; the same Python gives the same tokenizer."""
    from data import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=DEFAULT_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [d.text for part in corpus.PARTS for d in corpus.documents(part)]
    tok.train_from_iterator(texts, trainer)
    return tok


def identity(tok: Tokenizer, text: str | None = None) -> str:
    """SHA-256 of the tokenizer's JSON (`text`, where the caller already holds tok.to_str())."""
    return hashlib.sha256((tok.to_str() if text is None else text).encode()).hexdigest()


def vocab_size(tok: Tokenizer) -> int:
    """One past the largest id the tokenizer can emit (added tokens may sit above the base vocab)."""
    n = tok.get_vocab_size(with_added_tokens=True)
    if tok.id_to_token(n - 1) is not None and all(tok.id_to_token(i) is None for i in range(n, n + 1024)):
        return n  # ids 0..n-1, as in every tokenizer we know: no dictionary of the whole vocabulary needed
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


# --- long texts ------------------------------------------------------------------------------------
# A long document is tokenised in pieces, so that a worker's memory does not grow with the longest
# document (an Encoding costs ~100 bytes per token, its Python list of ids ~36 more). The pieces give
# the ids of the whole text only where no pre-token spans a cut. Cuts are therefore taken only
# before a space between two ASCII letters ("word| word") or before an ASCII digit after an ASCII
# letter ("abc|123"): the split patterns of byte-level BPEs (GPT-2's, and the cl100k / Llama-3 /
# Qwen / GLM-4 family) end a letter run there, and a text piece that starts there is scanned as the
# whole text is from that point. NFC/NFKC/NFD/NFKD never join across an ASCII character. Whether a
# tokenizer really behaves so is checked once (`cut_check`) on a probe text; one that does not is
# tokenised whole.
CUT = re.compile(r"(?<=[A-Za-z])(?= [A-Za-z]|[0-9])")
_SAFE_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD"}
_PROBE_EXTRA = (
    "It's a dog's life; they'd've gone. ABC123 x2 h264 utf8 IPv6 0x1F 3.14e10 "
    "def f(a1, b2):\n    return a1+b2  # sum\n\tif x99 and y: pass\n"
    "naïve café Straße 東京 2024年 ÀÉÎ ok done; ünïcödé words mixed123letters end")


def pieces(text: str, max_chars: int, reach: int | None = None) -> Iterator[str]:
    """`text` cut into pieces of about `max_chars`, one at a time: each cut is the first cut point at
    or after the limit; a text with none there is left whole from the last cut. With `reach`, one with
    none within `reach` characters after the limit is cut at the limit itself (the pieces then need
    not tokenise as the whole does: for cutting a document into documents)."""
    at = 0
    while len(text) - at > max_chars:
        limit = at + max_chars
        m = CUT.search(text, limit) if reach is None else CUT.search(text, limit, limit + reach)
        if m is None and reach is None:
            break
        cut = m.start() if m else limit
        yield text[at:cut]
        at = cut
    yield text[at:] if at else text


def cut_check(tok: Tokenizer) -> str | None:
    """None if cutting texts at `CUT` points keeps `tok`'s ids those of the whole text; else why not."""
    normalizer = tok.normalizer
    parts = [] if normalizer is None else list(normalizer) if type(normalizer).__name__ == "Sequence" else [normalizer]
    unsafe = [type(n).__name__ for n in parts if type(n).__name__ not in _SAFE_NORMALIZERS]
    if unsafe:
        return f"its normalizer {'+'.join(unsafe)} may act across a cut"
    spanning = [t.content for t in tok.get_added_tokens_decoder().values() if CUT.search(t.content)]
    if spanning:
        return f"its added token {spanning[0]!r} could span a cut"
    from pydoc_data import topics

    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    pairs = " ".join(f"x{a} {b}x{a}{d}" for a in letters for b in letters for d in "0123456789"[letters.index(b) % 10])
    prose = "\n".join(topics.topics[k] for k in sorted(topics.topics)[:12])[:30000]  # Python's docs: prose and code
    probe = "\n".join([_PROBE_EXTRA, pairs, prose])
    if tok.pre_tokenizer is None:
        return "it has no pre-tokenizer: a whole text is one word"
    bounds = {b for _, span in tok.pre_tokenizer.pre_tokenize_str(probe) for b in span}
    if any(m.start() not in bounds for m in CUT.finditer(probe)):
        return "its pre-tokenizer lets a pre-token span a space between letters or a letter-digit pair"
    whole = tok.encode(probe, add_special_tokens=False).ids
    cuts = [0, *(m.start() for m in CUT.finditer(probe)), len(probe)]  # cut at every cut point
    split = [probe[a:b] for a, b in zip(cuts, cuts[1:])]
    cut = [i for e in tok.encode_batch_fast(split, add_special_tokens=False) for i in e.ids]
    if whole != cut:
        return "the ids of texts cut at those points differ from the ids of the whole text"
    return None


def special_ids(tok: Tokenizer, eod_token: str | None = None, fim: bool = False,
                where: str = "tokenizer") -> SpecialIds:
    """The end-of-document id and, with fim=True, the FIM ids; missing FIM tokens are added to `tok`."""
    names = [eod_token] if eod_token else list(EOD_CANDIDATES)
    eod = next((tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None), None)
    if eod is None:
        raise DataError(f"{where}: no end-of-document token among {names}; name it with --eod-token")
    if not fim:
        return SpecialIds(eod)
    spelling = next((c for c in FIM_CANDIDATES if all(tok.token_to_id(t) is not None for t in c)), None)
    if spelling is None:
        spelling = FIM_CANDIDATES[0]
        tok.add_special_tokens(list(spelling))
    prefix, suffix, middle = (tok.token_to_id(t) for t in spelling)
    return SpecialIds(eod, prefix, suffix, middle)


def describe(tok: Tokenizer, ids: SpecialIds, source: str, text: str | None = None) -> dict:
    """The manifest's record of the tokenizer (`text`: its JSON, where the caller holds it)."""
    return {"file": "tokenizer.json", "sha256": identity(tok, text), "vocab_size": vocab_size(tok),
            "source": source, "special_ids": {k: v for k, v in vars(ids).items() if v is not None},
            "model": type(tok.model).__name__}
