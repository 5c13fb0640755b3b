"""Tokens per second one dataloader worker delivers at 4K sequence length - zstd decompression,
checks, window shuffle and packing included - side by side with Megatron-Core's indexed dataset
(mmap) delivering the same tokens the way its GPTDataset does (a precomputed shuffled sample index,
then `IndexedDataset.get` per document piece), in the same run.

The documents are the embedded code corpus (real token statistics, so real compression), repeated
to the requested size. Targets: >= 2M tokens/s per worker, and >= half the mmap reader's speed.

`--store`: the same shards also uploaded to an object store on this machine (data/local_store.py:
SeaweedFS, from the test extra) and read from `s3://` through one loader worker, alternating with
the local read in the same run (target: >= 0.8x local). The store runs on the same cores as the
reader here, so the ratio includes the store's own CPU.

  .venv/bin/python benchmarks/data_loader.py [--tokens 40e6] [--seq 4096] [--store]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import format as fmt  # noqa: E402
from data.config import DataConfig, SourceConfig  # noqa: E402
from data.loader import TokenLoader  # noqa: E402
from data.prepare import Options, ShardWriter, prepare  # noqa: E402
from data.stream import decoded_shard, open_dataset  # noqa: E402


def corpus_documents(work: Path) -> tuple[list[np.ndarray], dict]:
    m = prepare(Options(["embedded:code"], str(work / "code"), code=True, workers=os.cpu_count() or 1), progress=False)
    ds, docs = open_dataset("code", str(work / "code")), []
    for i in range(len(ds.urls)):
        for _, tokens, meta in decoded_shard(ds, i):
            docs.extend(fmt.split_documents(tokens, meta))
    return docs, m["tokenizer"]


SAMPLE_TOKENS = Options.sample_tokens  # prepare's default grouping of documents into samples


def write_shards(docs, copies, directory: Path, tokenizer: dict) -> int:
    directory.mkdir(parents=True)
    writer, comp = ShardWriter(directory, 1 << 22), zstandard.ZstdCompressor(write_checksum=True)
    group, n = [], 0
    for c in range(copies):
        for k, doc in enumerate(docs):
            group.append((f"{c}/{k}", doc))
            n += len(doc)
            if sum(len(d) for _, d in group) >= SAMPLE_TOKENS:
                tokens = np.concatenate([d for _, d in group])
                meta = {"source": "bench", "docs": [i for i, _ in group], "lengths": [len(d) for _, d in group],
                        "dtype": "uint16"}
                writer.write(len(tokens), len(group), fmt.encode_sample("", tokens, "uint16", meta, comp))
                group = []
    writer.close()
    fmt.write_manifest(directory, fmt.make_manifest("bench", "code", "uint16", tokenizer, writer.shards))
    return n


def write_indexed(docs, copies, prefix: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for _ in range(copies):
        for doc in docs:
            builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    builder.finalize(str(prefix) + ".idx")


class GPTDatasetPath(torch.utils.data.Dataset):
    """Megatron GPTDataset's reading path over an IndexedDataset: a shuffled document order cut into
    seq+1 token samples (an index Megatron precomputes and caches), each read with `get` per piece."""

    def __init__(self, prefix: Path, seq: int, seed: int = 0):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix, self.seq, self.ds = prefix, seq, None
        index = IndexedDataset(str(prefix), mmap=True)
        sizes = np.array(index.sequence_lengths)  # a copy: the lengths are a view into the closing mmap
        del index
        self.order = np.random.default_rng(seed).permutation(len(sizes))
        self.lengths = sizes[self.order].astype(np.int64)
        self.ends = np.cumsum(self.lengths)

    def __len__(self) -> int:
        return int(self.ends[-1] - 1) // self.seq

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.ds is None:  # opened lazily, in the worker that reads
            from megatron.core.datasets.indexed_dataset import IndexedDataset

            self.ds = IndexedDataset(str(self.prefix), mmap=True)
        seq, out = self.seq, np.empty(self.seq + 1, dtype=np.int64)
        d = int(np.searchsorted(self.ends, i * seq, side="right"))
        filled, offset = 0, i * seq - (int(self.ends[d - 1]) if d else 0)
        while filled < seq + 1:
            take = min(int(self.lengths[d]) - offset, seq + 1 - filled)
            out[filled:filled + take] = self.ds.get(int(self.order[d]), offset=offset, length=take)
            filled, d, offset = filled + take, d + 1, 0
        return torch.from_numpy(out)


def rate(batches, n: int, tokens_per_batch: int) -> float:
    it = iter(batches)
    for _ in range(8):  # warm-up: start workers, fill the first windows
        next(it)
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * tokens_per_batch / (time.perf_counter() - start)


def ours(directory: Path | str, seq: int, micro_batch: int, workers: int) -> TokenLoader:
    cfg = DataConfig(sources=[SourceConfig("bench", str(directory))], seq_length=seq, num_workers=workers,
                     shuffle_window=256)
    return TokenLoader(cfg, micro_batch=micro_batch)


def store_vs_local(work: Path, seq: int, n_seq: int, repeats: int = 3) -> None:
    """Tokens/s through one loader worker, reading the shards from local files and from s3://, in turns."""
    from data import objstore
    from data.local_store import LocalStore

    store = LocalStore(work / "weed").start()
    try:
        os.environ["AWS_ENDPOINT_URL"] = store.endpoint
        objstore.client().create_bucket(Bucket="bench")
        for f in sorted((work / "shards").iterdir()):
            objstore.upload(f, f"s3://bench/shards/{f.name}")
        print(f"  store: SeaweedFS at {store.endpoint}, {len(list((work / 'shards').iterdir()))} objects uploaded")
        print(f"  {'micro-batch':>11} {'reader (through 1 worker process)':<50}{'M tokens/s':>11}")
        rates: dict[str, list[float]] = {"local": [], "s3": []}
        for k in range(repeats):
            for where, root in (("local", str(work / "shards")), ("s3", "s3://bench/shards")):
                r = rate(ours(root, seq, 1, 1), n_seq, seq)
                rates[where].append(r)
                print(f"  {1:>11} {f'zstd shards, {where} (#{k + 1})':<50}{r / 1e6:>11.2f}")
        ratios = [s / loc for s, loc in zip(rates["s3"], rates["local"])]
        print(f"  ratio s3/local per turn: {', '.join(f'{x:.2f}' for x in ratios)} (median "
              f"{sorted(ratios)[len(ratios) // 2]:.2f}; target >= 0.8)")
    finally:
        store.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=float, default=40e6, help="dataset size in tokens (40M)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--sequences", type=int, default=4000, help="sequences timed per reader (4000)")
    ap.add_argument("--store", action="store_true", help="also read the shards from a local object store (s3://)")
    ap.add_argument("--store-only", action="store_true", help="only the store-vs-local comparison")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        docs, tokenizer = corpus_documents(work)
        copies = max(1, int(args.tokens // sum(map(len, docs))))
        n = write_shards(docs, copies, work / "shards", tokenizer)
        if not args.store_only:
            write_indexed(docs, copies, work / "indexed")
        size = sum(f.stat().st_size for f in (work / "shards").glob("*.tar"))
        indexed = "" if args.store_only else f", indexed .bin {(work / 'indexed.bin').stat().st_size / 1e6:.0f} MB"
        print(f"data: {n / 1e6:.1f}M tokens, {len(docs) * copies:,} documents; shards {size / 1e6:.0f} MB "
              f"(zstd){indexed}; built in {time.perf_counter() - t:.0f} s")
        n_seq = min(args.sequences, n // args.seq - 64)
        print(f"seq {args.seq}, {n_seq} sequences timed per reader, torch {torch.__version__}, {os.cpu_count()} CPUs")
        if args.store or args.store_only:
            store_vs_local(work, args.seq, n_seq)
        if args.store_only:
            return
        print(f"  {'micro-batch':>11} {'reader':<50}{'M tokens/s':>11}")
        for mb in (1, 4):
            n_b = n_seq // mb
            mmap = GPTDatasetPath(work / "indexed", args.seq)
            results = {
                "zstd shards, one worker's work (in process)": rate(ours(work / "shards", args.seq, mb, 1).producer(),
                                                                    n_b, mb * args.seq),
                "mmap GPTDataset path, one worker's work": rate(torch.utils.data.DataLoader(mmap, batch_size=mb),
                                                                n_b, mb * args.seq),
                "zstd shards, through 1 worker process": rate(ours(work / "shards", args.seq, mb, 1), n_b, mb * args.seq),
                "mmap GPTDataset path, through 1 worker process": rate(
                    torch.utils.data.DataLoader(mmap, batch_size=mb, num_workers=1, prefetch_factor=4), n_b,
                    mb * args.seq),
            }
            for name, r in results.items():
                print(f"  {mb:>11} {name:<50}{r / 1e6:>11.2f}")
            v = list(results.values())
            print(f"  {mb:>11} ratio zstd/mmap: {v[0] / v[1]:.2f} in process, {v[2] / v[3]:.2f} through a worker "
                  f"(target >= 0.5); in-process vs the 2M tokens/s target: {v[0] / 2e6:.1f}x")


if __name__ == "__main__":
    main()
