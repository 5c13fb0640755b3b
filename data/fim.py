"""Fill-in-the-Middle (Bavarian et al., 2022) at the character level, applied while tokenising code.

A document is cut at two uniformly drawn character positions into prefix, middle and suffix; each
part is tokenised on its own, then arranged as

  PSM: <prefix> prefix <suffix> suffix <middle> middle
  SPM: <prefix> <suffix> suffix <middle> prefix middle

The random draw for a document depends only on the seed, the dataset name and the document id, so
the result does not depend on how documents are spread over worker processes.
"""

from __future__ import annotations

import hashlib

import numpy as np

from data.tokenizer import SpecialIds


def rng_for(seed: int, *keys: str) -> np.random.Generator:
    digest = hashlib.sha256("\0".join([str(seed), *keys]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def permute(rng: np.random.Generator, text: str, spm_rate: float) -> tuple[str, list[str]]:
    """Draw the FIM layout for `text`: ("psm" | "spm", [prefix, middle, suffix])."""
    lo, hi = sorted(rng.integers(0, len(text) + 1, size=2).tolist())
    mode = "spm" if rng.random() < spm_rate else "psm"
    return mode, [text[:lo], text[lo:hi], text[hi:]]


def arrange(mode: str, prefix: list, middle: list, suffix: list, ids: SpecialIds) -> list:
    """The parts (each a list of id arrays) with the FIM tokens, in PSM or SPM order: a list of id
    arrays to concatenate."""
    def tok(i):
        return np.array([i], dtype=prefix[0].dtype if prefix else np.int64)

    if mode == "psm":
        return [tok(ids.fim_prefix), *prefix, tok(ids.fim_suffix), *suffix, tok(ids.fim_middle), *middle]
    return [tok(ids.fim_prefix), tok(ids.fim_suffix), *suffix, tok(ids.fim_middle), *prefix, *middle]
