"""Tokenizers for `prepare`: a Hugging Face tokenizer.json (or a directory holding one), or a
byte-level BPE trained here, offline and deterministically, on the embedded corpus.

Whatever tokenizer is used is saved beside the shards, so a dataset names its own vocabulary; its
identity is the SHA-256 of that saved JSON.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

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


def identity(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def vocab_size(tok: Tokenizer) -> int:
    """One past the largest id the tokenizer can emit (added tokens may sit above the base vocab)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


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


def describe(tok: Tokenizer, ids: SpecialIds, source: str) -> dict:
    """The manifest's record of the tokenizer."""
    return {"file": "tokenizer.json", "sha256": identity(tok), "vocab_size": vocab_size(tok),
            "source": source, "special_ids": {k: v for k, v in vars(ids).items() if v is not None},
            "model": type(tok.model).__name__}
