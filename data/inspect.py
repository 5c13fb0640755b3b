"""`glm-data inspect`: what is in a shard, a dataset, or the mixture a stage would produce."""

from __future__ import annotations

import io
import itertools
from collections import Counter
from pathlib import Path

import numpy as np

from data import format as fmt, objstore, tokenizer as toks
from data.stream import check_shard, decoded_shard, open_dataset


def _preview(text: str, width: int) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[:width] + f"... ({len(text):,} chars)"


def _tokenizer_beside(path: Path | str, given: str | None):
    """The tokenizer given, or the one beside the shards (a directory, or an s3:// prefix); None if there
    is none (token ids are shown instead)."""
    if not given and objstore.is_url(str(path)):
        url = f"{str(path).rstrip('/')}/{fmt.TOKENIZER}"
        return toks.Tokenizer.from_str(objstore.read_bytes(url).decode()) if objstore.exists(url) else None
    candidate = Path(given) if given else Path(path) / fmt.TOKENIZER
    return toks.load(candidate) if candidate.exists() else None


def _show_samples(ds, index: int, samples: int, width: int, tok, out: io.TextIOBase) -> None:
    for key, tokens, meta in itertools.islice(decoded_shard(ds, index), samples):
        print(f"{key}: {len(meta['docs'])} document(s), {len(tokens):,} tokens", file=out)
        for doc, piece in zip(meta["docs"], fmt.split_documents(tokens, meta)):
            text = tok.decode(piece.tolist(), skip_special_tokens=False) if tok else str(piece[:16].tolist())
            print(f"  {doc} [{len(piece):,} tokens]: {_preview(text, width)}", file=out)


def shard(path: str, samples: int, width: int, tokenizer: str | None, out: io.TextIOBase) -> None:
    """The first `samples` samples of one shard file, decoded to text when a tokenizer is at hand."""
    base, _, shard_name = path.rpartition("/")
    base = base or "."
    if not objstore.is_url(path) and not (Path(base) / fmt.MANIFEST).exists():
        raise fmt.DataError(f"{path}: no manifest beside it that lists this shard")
    ds = open_dataset(base.rsplit("/", 1)[-1], base)
    index = next((i for i, s in enumerate(ds.manifest["shards"]) if s["name"] == shard_name), None)
    if index is None:
        raise fmt.DataError(f"{path}: no manifest beside it that lists this shard")
    _show_samples(ds, index, samples, width, _tokenizer_beside(base, tokenizer), out)


def dataset(path: str, samples: int, width: int, out: io.TextIOBase) -> None:
    """A dataset's manifest in brief: totals, the tokenizer, tokens per input, shard sizes."""
    ds = open_dataset(Path(path).name, path)
    m = ds.manifest
    t = m["totals"]
    tok = m["tokenizer"]
    print(f"{ds.where}\n  name {m['name']} ({m['kind']}), format v{m['format_version']}, tokens as {m['dtype']}", file=out)
    print(f"  {t['documents']:,} documents, {t['tokens']:,} tokens, {t['samples']:,} samples, "
          f"{len(m['shards'])} shards, {t['bytes'] / 1e6:.1f} MB", file=out)
    print(f"  tokenizer: {tok['source']}, vocab {tok['vocab_size']}, sha256 {tok['sha256'][:12]}, "
          f"special ids {tok['special_ids']}", file=out)
    opts = m.get("options", {})
    if m["kind"] == "code":
        print(f"  FIM rate {opts.get('fim_rate')}, SPM share {opts.get('fim_spm_rate')}", file=out)
    sizes = [s["tokens"] for s in m["shards"]]
    print(f"  tokens per shard: min {min(sizes):,}, median {int(np.median(sizes)):,}, max {max(sizes):,}", file=out)
    print("  tokens per input:", file=out)
    for item in sorted(m["inputs"], key=lambda i: -i["tokens"])[:20]:
        print(f"    {item['tokens']:>14,}  {item['documents']:>9,} docs  {item['path']}", file=out)
    if len(m["inputs"]) > 20:
        print(f"    ... and {len(m['inputs']) - 20} more inputs", file=out)
    if samples and not path.startswith("pipe:"):
        print(f"first {samples} sample(s) of {m['shards'][0]['name']}:", file=out)
        _show_samples(ds, 0, samples, width, _tokenizer_beside(path, None), out)


def verify(path: str, out: io.TextIOBase) -> int:
    """Read every shard of a dataset whole and check it as the loader's skip mode does (the same
    function: tar structure, samples, bytes, sha256 against the manifest, every sample decoded);
    print each bad shard and why. Returns the number of bad shards."""
    from tqdm import tqdm

    ds = open_dataset(Path(path).name, path)
    bad = []
    for i in tqdm(range(len(ds.urls)), unit=" shard", desc="verify"):
        err = check_shard(ds, i)
        if err is not None:
            bad.append(i)
            print(f"bad shard {ds.manifest['shards'][i]['name']}: {err}", file=out)
    samples = sum(ds.manifest["shards"][i]["samples"] for i in bad)
    tokens = sum(ds.manifest["shards"][i]["tokens"] for i in bad)
    print(f"{ds.where}: {len(ds.urls)} shards read, {len(bad)} bad ({samples:,} samples, {tokens:,} tokens "
          "that a run with data.on_error=skip leaves out)", file=out)
    return len(bad)


def mixture(cfg, sequences: int, micro_batch: int, width: int, out: io.TextIOBase) -> None:
    """Run a stage's loader (DataConfig `cfg`, in this process) and report what it delivers, per source."""
    from data.loader import TokenLoader

    cfg.num_workers = 0
    loader = TokenLoader(cfg, micro_batch=micro_batch)
    tok = toks.load(Path(loader.datasets[0].urls[0]).parent / fmt.TOKENIZER) \
        if not loader.datasets[0].urls[0].startswith("pipe:") else None
    batches = loader.take(max(1, sequences // micro_batch))
    n_seq = len(batches) * micro_batch
    stats = loader.stats()
    mask = sum(float(b["loss_mask"].sum()) for b in batches)
    total = n_seq * cfg.seq_length
    print(f"stage: {cfg.seq_length} tokens per sequence, packing {cfg.packing}, {n_seq} sequences drawn", file=out)
    print(f"  {'source':<24}{'weight':>8}{'sequences':>11}{'share':>8}", file=out)
    for s, w in zip(cfg.sources, cfg.weights()):
        got = stats.get(f"sequences/{s.name}", 0)
        print(f"  {s.name:<24}{w:>8.3f}{got:>11}{got / n_seq:>8.3f}", file=out)
    print(f"  tokens with a loss: {mask / total:.1%} (the rest is padding or document ends)", file=out)
    first = batches[0]["tokens"][0].tolist()
    text = tok.decode(first, skip_special_tokens=False) if tok else str(first[:32])
    print(f"first sequence: {_preview(text, width)}", file=out)
    counts = Counter()
    for b in batches:
        counts.update(b["tokens"].flatten().tolist())
    top = ", ".join(f"{tok.id_to_token(i) if tok else i}:{c}" for i, c in counts.most_common(8))
    print(f"most frequent tokens: {top}", file=out)
