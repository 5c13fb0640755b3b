"""Turning a stream of stored samples into training sequences of the stage's length.

- `ConcatPacker` (pre-training): documents back to back, cut every `seq_len` tokens. A sequence
  holds seq_len+1 tokens (inputs and shifted labels) and its last token is the first of the next,
  so every token is a target exactly once and none is dropped.
- `BestFitPacker` (mid-training): whole documents (those longer than a sequence cut into
  sequence-sized pieces) from a window of about `window` sequences' worth of tokens, placed
  best-fit-decreasing into sequences; the rest of each sequence is padding without loss. Position
  ids restart and `segment_ids` number the documents, so attention can be kept within a document.

Both keep their place as {"at": stream position of the sample (or window) in hand, ...}; given a
stream restored to "at", they replay the same deterministic steps and continue exactly.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np

from data.fim import rng_for
from data.format import split_documents


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each item, longest first, goes to the bin it fills most tightly."""
    free: list[tuple[int, int]] = []  # (room left, bin), kept sorted
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = bisect_left(free, (lengths[i], -1))
        if j < len(free):
            room, b = free.pop(j)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - lengths[i] > 0:
            insort(free, (room - lengths[i], b))
    return [sorted(b) for b in bins]


class ConcatPacker:
    def __init__(self, stream, seq_len: int, state: dict | None = None):
        self.stream, self.seq_len = stream, seq_len
        self.cur, self.off = None, 0
        self.at = stream.position()
        if state and state.get("offset") is not None:  # the stream stands at state["at"]
            self.cur, self.off = next(self.stream)[0], state["offset"]

    def state(self) -> dict:
        return {"at": self.at, "offset": self.off if self.cur is not None else None}

    def fill(self, out: np.ndarray) -> None:
        """Write the next sequence's seq_len+1 tokens into `out` (inputs are out[:-1], labels out[1:])."""
        need, filled = self.seq_len + 1, 0
        while filled < need:
            if self.cur is None or self.off >= len(self.cur):
                self.at = self.stream.position()
                self.cur, self.off = next(self.stream)[0], 0
            n = min(need - filled, len(self.cur) - self.off)
            out[filled:filled + n] = self.cur[self.off:self.off + n]
            filled += n
            self.off += n
        self.off -= 1  # the last token is also the first input of the next sequence


class BestFitPacker:
    def __init__(self, stream, seq_len: int, window: int, seed: int, state: dict | None = None):
        self.stream, self.seq_len, self.window, self.seed = stream, seq_len, window, seed
        self.bins: list | None = None
        self.emitted = 0
        self.at = stream.position()
        if state and state.get("emitted"):  # the stream stands at state["at"]
            self._fill()
            self.emitted = state["emitted"]

    def state(self) -> dict:
        return {"at": self.at, "emitted": self.emitted if self.bins is not None else 0}

    def _fill(self) -> None:
        self.at = self.stream.position()
        pieces: list[np.ndarray] = []
        total = 0
        while total < self.window * self.seq_len:
            tokens, meta = next(self.stream)
            for doc in split_documents(tokens, meta):
                for start in range(0, len(doc), self.seq_len):
                    pieces.append(doc[start:start + self.seq_len])
            total += len(tokens)
        bins = best_fit([len(p) for p in pieces], self.seq_len)
        order = rng_for(self.seed, self.stream.ds.name, str(self.stream.slot), *map(str, self.at.values()))
        self.bins = [[pieces[i] for i in bins[k]] for k in order.permutation(len(bins))]
        self.emitted = 0

    def fill(self, out: np.ndarray) -> None:
        """Write the next sequence into out[0:5] = tokens, labels, loss mask, position ids, segment ids."""
        if self.bins is None or self.emitted >= len(self.bins):
            self._fill()
        docs = self.bins[self.emitted]
        self.emitted += 1
        out[:] = 0
        tokens, labels, mask, positions, segments = out
        o = 0
        for k, doc in enumerate(docs, 1):
            n = len(doc)
            tokens[o:o + n] = doc
            labels[o:o + n - 1] = doc[1:]
            mask[o:o + n - 1] = 1  # a document's last token has no target inside the document
            positions[o:o + n] = np.arange(n)
            segments[o:o + n] = k
            o += n
