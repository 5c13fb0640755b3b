"""glm-convert: checkpoints to and from Hugging Face `glm4_moe` directories, streamed.

  glm-convert export outputs/runs/air OUT/GLM-4.5-Air-cpt          (a run's latest checkpoint)
  glm-convert import GLM-4.5-Air/ outputs/runs/air-cpt --stage mid_repo_code
  glm-pretrain experiment=glm45_air run.dir=outputs/runs/air-cpt   (continues from the weights)

Both directions go one tensor at a time through the one mapping table (model/hf_mapping.py):
export reads each whole tensor from the dist checkpoint (whatever tensor / expert / pipeline
layout wrote it; pretrain/checkpoint_io.py), splits it into its Hugging Face tensors and appends
them to the output shard being written (convert/hf_dir.py); import reads the Hugging Face
tensors of one Megatron tensor, joins them, and writes it. Peak memory is about the largest tensor,
not a shard, not the model. Output goes to a temporary name beside OUT and is moved into place
when complete; everything is checked before any tensor is converted.
"""

from __future__ import annotations

import argparse
import sys

from convert.export import DTYPES, export
from convert.importer import import_

HELP = "\n\n".join(__doc__.split("\n\n")[:2]) + """

commands:
  export CKPT OUT   CKPT: a run directory (its checkpoints/latest) or one checkpoint directory,
                    written by glm-pretrain under any layout, or by `import`. OUT: a Hugging Face
                    directory: config.json, generation_config.json, sharded *.safetensors with
                    model.safetensors.index.json, experts one by one and the MTP layer as
                    model.layers.<num_layers> as in the released GLM-4.5 checkpoints, and the
                    tokenizer files the checkpoint carries. Loads with
                    AutoModelForCausalLM.from_pretrained (which skips the MTP layer).
  import HF_DIR OUT a glm4_moe directory (config.json + safetensors; tokenizer files carried along
                    when present) -> OUT, a run directory whose checkpoints/latest holds the
                    weights only: glm-pretrain run.dir=OUT starts from them with a fresh optimizer
                    and schedules, at the beginning of the first stage or of --stage. The
                    checkpoint loads under any parallel layout.

Run `glm-convert export --help` or `glm-convert import --help` for the options.
"""


def _parallel_overrides(items: list[str]) -> dict:
    import dataclasses

    from model.config import ConfigError, ParallelConfig

    fields = {f.name: f.type for f in dataclasses.fields(ParallelConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        name = key.removeprefix("parallel.")
        if not sep or not key.startswith("parallel.") or name not in fields:
            raise ConfigError(f"{item!r}: expected parallel.FIELD=VALUE with FIELD one of {', '.join(fields)}")
        if name == "sequence_parallel":
            out[name] = value.lower() in ("1", "true", "yes")
        else:
            try:
                out[name] = None if value.lower() in ("null", "none") else int(value)
            except ValueError:
                raise ConfigError(f"{item!r}: parallel.{name} takes an integer") from None
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        return 0 if argv else 2
    parser = argparse.ArgumentParser(prog="glm-convert")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="dist checkpoint -> Hugging Face directory",
                        description="A run's latest checkpoint (or one checkpoint directory) -> a Hugging Face "
                                    "glm4_moe directory, one tensor in memory at a time.")
    ex.add_argument("ckpt", help="run directory (its checkpoints/latest) or checkpoint directory")
    ex.add_argument("out", help="the Hugging Face directory to write")
    ex.add_argument("--dtype", choices=DTYPES, default="bf16",
                    help="dtype of the weights written (default bf16, as released; the router's weight and "
                         "expert bias are written in fp32, as transformers keeps them)")
    ex.add_argument("--shard-size", default="5GB", help="largest safetensors file (default 5GB; e.g. 500MB, 2GiB)")
    ex.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")
    ex.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    im = sub.add_parser("import", help="Hugging Face directory -> weights-only dist checkpoint",
                        description="A Hugging Face glm4_moe directory -> a run directory whose checkpoints/latest "
                                    "holds its weights; glm-pretrain run.dir=OUT continues from them with a fresh "
                                    "optimizer under any parallel layout.")
    im.add_argument("hf_dir", help="glm4_moe directory: config.json and *.safetensors (+ index)")
    im.add_argument("out", help="the run directory to create")
    im.add_argument("--stage", help="start training at the beginning of this stage of the experiment "
                                    "(default: the first)")
    im.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")
    im.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    im.epilog = ("parallel.FIELD=VALUE ... (any number, anywhere): the layout you will train with, checked against "
                 "the model now and recorded in meta.json; the checkpoint itself loads under any layout.")
    args, overrides = parser.parse_known_args(argv)
    if overrides and (args.command != "import" or not all(o.startswith("parallel.") for o in overrides)):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")

    from model.config import ConfigError
    from pretrain.checkpoint_io import CheckpointError
    from convert.hf_dir import HFDirError

    try:
        if args.command == "export":
            from convert.hf_dir import parse_size

            parse_size(args.shard_size)  # a bad size fails before anything is read
            export(args.ckpt, args.out, args.dtype, args.shard_size, args.overwrite, args.quiet)
        else:
            import_(args.hf_dir, args.out, args.stage, _parallel_overrides(overrides), args.overwrite, args.quiet)
    except (CheckpointError, HFDirError, ConfigError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"glm-convert {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
