"""glm-data: prepare token shards, inspect them, and check what a training stage would read."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from data.config import DataConfigError
from data.format import DataError
from data.objstore import ObjectStoreError

EPILOG = """\
examples:
  glm-data prepare embedded:general -o outputs/data/embedded/general
  glm-data prepare embedded:code --code -o outputs/data/embedded/code
  glm-data prepare 'crawl/*.jsonl.zst' --tokenizer /models/GLM-4.5 -o /data/web
  glm-data prepare repo/ --code --fim-rate 0.9 --tokenizer tokenizer.json -o /data/code
  glm-data prepare repos/ --repo-level --sample-tokens 32768 --tokenizer /models/GLM-4.5 -o /data/repo_32k
  glm-data prepare 'crawl/*.jsonl.zst' --tokenizer /models/GLM-4.5 -o /data/web --part 3/64   (x 64, then:)
  glm-data prepare 'crawl/*.jsonl.zst' --tokenizer /models/GLM-4.5 -o /data/web --merge 64
  glm-data prepare 's3://raw/crawl/*.jsonl.zst' --tokenizer /models/GLM-4.5 -o s3://corpus/web
      (object storage: AWS_ENDPOINT_URL for another S3-compatible store; credentials as the AWS tools take them)
  glm-data inspect outputs/data/embedded/code
  glm-data inspect outputs/data/embedded/code/shard-000003.tar -n 2
  glm-data inspect --verify /data/web
  glm-data inspect --verify s3://corpus/web
  glm-data inspect --stage data=smoke
"""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="glm-data", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenise raw text into zstd WebDataset shards and a manifest",
                       description="Tokenise documents, append the end-of-document token, apply Fill-in-the-Middle "
                       "to code, and write samples of whole documents into WebDataset tar shards with a manifest. "
                       "The same inputs and options give byte-identical output.")
    p.add_argument("inputs", nargs="+", help="JSONL (.jsonl, .jsonl.gz, .jsonl.zst), JSON (one document or a list), "
                   "Parquet or text files, "
                   "directories, globs, or embedded:general / embedded:code")
    p.add_argument("-o", "--out", required=True, help="output directory (one dataset), or an s3://bucket/prefix: "
                   "each shard is staged in a temporary directory, uploaded when complete, the manifest last")
    p.add_argument("--name", default="", help="dataset name recorded in the samples (default: the directory name)")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer.json or a directory holding one; default: a "
                   "byte-level BPE trained here on the embedded corpus, saved beside the shards")
    p.add_argument("--vocab-size", type=int, default=16384, help="vocabulary of the default tokenizer (16384)")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text (text)")
    p.add_argument("--code", action="store_true", help="the inputs are source code: apply Fill-in-the-Middle")
    p.add_argument("--repo-level", action="store_true",
                   help="each first-level subdirectory of an input directory is a repository and becomes one "
                   "document: its text files in sorted order, each preceded by its relative path on a line, FIM "
                   "drawn per file (implies --code; --fim-rate 0 turns FIM off); binary and non-UTF-8 files are "
                   "left out and counted; a repository longer than --sample-tokens is cut at file boundaries; "
                   "--part never splits a repository")
    p.add_argument("--fim-rate", type=float, default=0.5, help="share of code documents given FIM (0.5)")
    p.add_argument("--fim-spm-rate", type=float, default=0.5, help="share of FIM documents in SPM order (0.5)")
    p.add_argument("--eod-token", help="end-of-document token (default: <|endoftext|> or a common spelling)")
    p.add_argument("--seed", type=int, default=0, help="seed of the FIM draws (0)")
    p.add_argument("--shard-tokens", type=int, help="tokens per shard (default 2^27; 2^15 for the embedded corpus). "
                   "Every dataloader worker of every data-parallel rank needs at least one shard")
    p.add_argument("--sample-tokens", type=int, default=32768, help="tokens per stored sample of whole documents "
                   "(32768; larger samples read faster, smaller ones shuffle finer)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="tokeniser processes (all cores)")
    p.add_argument("--zstd-level", type=int, default=3, help="zstd compression level (3)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    p.add_argument("--invalid-utf8", choices=("error", "replace"), default="error",
                   help="text that is not valid UTF-8: stop, naming file, line and byte (error, the default), or "
                   "replace each bad sequence with U+FFFD and count them in the summary (replace, for messy crawls)")
    p.add_argument("--part", metavar="I/N", help="tokenise only the I-th (from 0) of N ranges of the inputs "
                   "(balanced by bytes) into OUT.parts/, e.g. one Slurm array task each (slurm/prepare.sbatch)")
    p.add_argument("--merge", type=int, metavar="N", help="write OUT's shards and manifest from the N parts in "
                   "OUT.parts/ (byte for byte what one run over all inputs writes), then remove the parts")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    i = sub.add_parser("inspect", help="show a shard, a dataset, or the mixture a stage would produce",
                       description="With a .tar shard: its samples decoded back to text. With a dataset directory or "
                       "manifest: totals, tokenizer, tokens per input and a first sample; --verify reads and checks "
                       "every shard. With --stage: run that stage's loader and report the mixture it delivers.")
    i.add_argument("path", nargs="?", help="a shard (.tar), a dataset directory, or a manifest.json")
    i.add_argument("-n", "--samples", type=int, default=1, help="samples to decode and show (1)")
    i.add_argument("--width", type=int, default=160, help="characters of text shown per document (160)")
    i.add_argument("--tokenizer", help="tokenizer for a shard whose directory has none")
    i.add_argument("--verify", action="store_true", help="read every shard: checksums, counts, every sample")
    i.add_argument("--stage", nargs="+", metavar="ARG", help="a stage's data config file and field overrides, "
                   "e.g. configs/data/smoke.yaml seq_length=4096")
    i.add_argument("--sequences", type=int, default=256, help="with --stage: sequences to draw (256)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "prepare":
            from data.prepare import main_args

            return main_args(args)
        from data import inspect

        if args.stage:
            from data.config import load_data_config

            cfg = load_data_config(args.stage[0], args.stage[1:])
            inspect.mixture(cfg, args.sequences, 8, args.width, sys.stdout)
        elif not args.path:
            print("glm-data inspect: give a path or --stage", file=sys.stderr)
            return 2
        elif args.verify:
            return 1 if inspect.verify(args.path, sys.stdout) else 0
        elif args.path.endswith(".tar"):
            inspect.shard(args.path, args.samples, args.width, args.tokenizer, sys.stdout)
        else:
            inspect.dataset(args.path, args.samples, args.width, sys.stdout)
        return 0
    except DataError as e:
        print(f"glm-data: {e}", file=sys.stderr)
        return 2
    except ObjectStoreError as e:  # a listing, an upload or a manifest read from the store, for good
        print(f"glm-data: {e.message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stdout = open(os.devnull, "w")
        return 0
    except DataConfigError as e:
        print(f"glm-data: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
