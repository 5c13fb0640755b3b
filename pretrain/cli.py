"""glm-pretrain: train (or resume) a GLM-family MoE model from the Hydra config tree.

  glm-pretrain experiment=smoke
  torchrun --nproc-per-node 8 -m pretrain experiment=smoke parallel.pipeline=2 parallel.expert=4
  srun glm-pretrain experiment=glm45 run.dir=/ckpt/glm45   (Slurm: one task per GPU)
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

HELP = """\
usage: glm-pretrain experiment=NAME [field=value ...] [--print-config | --fit-nodes NODES PER_NODE]

Train a deep-narrow GLM-4.5-family MoE model on Megatron-Core. The run directory (run.dir) holds
the resolved config, TensorBoard events (tensorboard/), checkpoints (checkpoints/, `latest` names
the newest complete one) and the log; starting again with the same run.dir resumes from `latest`.

experiments (configs/experiment/):
{experiments}

main fields (any field of any group can be overridden with Hydra syntax):
  model=glm45|glm45_air|single_gpu|smoke|tiny   model.num_layers=8 ...   (configs/model/)
  parallel.tensor / .expert / .expert_tensor / .pipeline / .context  (data parallel = the rest;
                context: each sequence split over that many ranks, on the torch path too)
  parallel.virtual_stages (interleaved schedule)  parallel.first_stage_layers / .last_stage_layers
                (uneven pipeline split; unset = chosen so the output/MTP stage is not the slowest)
  optim=muon|adamw  optim.lr=2.5e-4  optim.weight_decay=0.1  optim.clip_grad=1.0
  train.micro_batch_size  train.global_batch_tokens  train.batch_start_tokens  train.batch_ramp_tokens
  train.batch_ramp_increment_tokens (the ramp climbs in these steps: the same batch at every DP size)
  train.lr_warmup_tokens  train.lr_min  train.dtype=auto|bf16|fp32  train.impl=auto|torch|te|local  train.max_steps
  train.log_every  train.save_every  train.keep_last  train.eval_every  train.eval_batches
  train.async_save=auto|true|false (write checkpoints while training goes on; auto = on GPUs)
  stages.<name>.tokens / .data / .seq_length / .packing / .rope_theta / .expert_bias_update_rate
                / .mtp_loss_weight / .recompute
  stages.<name>.parallel.<field>  the stage's own layout (e.g. .context=8 for 128K): at the switch the
                run saves and exits 75; the same command again continues under it
  data.num_workers  data.on_error=fail|skip  data.max_skip_fraction  data.holdout_shards
  data.read_timeout_s / .read_tries / .read_retry_s   (reads from s3://: a stall, tries and seconds of
                failing per shard before it goes the on_error way)   (loader settings, every stage)
  GLM_DATA_ROOT=s3://bucket/prefix  the data configs' sources on object storage (AWS_ENDPOINT_URL for
                another S3-compatible store; credentials, region and profiles as the AWS tools take them)
  run.dir=outputs/runs/NAME  run.exit_after_minutes=0
  faults.watchdog.factor / .floor_s / .first_s / .step_s / .checkpoint_s / .validation_s / .poll_s
                / .grace_s / .alive_s / .silent_s / .enabled   (hang watchdog: timeouts from observed durations; README: Faults)
  faults.spike.policy=skip|rewind|off / .factor / .window / .max_spikes / .max_spikes_steps
  faults.straggler.factor / .steps   faults.on_save_error=stop|continue

--print-config: print the resolved config (checked against WORLD_SIZE when set) and exit; nothing
    is started or opened (the Slurm launchers' DRY_RUN=1 uses it).
--fit-nodes NODES PER_NODE: print the most of NODES nodes (PER_NODE processes each) the run can use:
    every stage's layout must fit and the global batch must divide into micro-batch x data-parallel
    sequences (pretrain/elastic.py), and a run resumed inside a batch ramp without
    train.batch_ramp_increment_tokens keeps its data-parallel size (its latest checkpoint says where
    it is); stderr names the node counts that work; exit 2 when none does.
    The Slurm launchers use it on every (re)start of a job given a node range.

Each rank runs under a supervisor process that ends the whole run when a rank stops making progress
or dies, naming it, with every rank's stacks in run.dir/watchdog/.

exit codes: 0 finished; 75 stopped early on SIGTERM / SIGUSR1 / run.exit_after_minutes, or at a
stage with another parallel layout, with a checkpoint saved (start it again to resume); 76 the
watchdog ended a hung run or one with a dead rank (start it again to resume from `latest`); 1 an
error; 2 a bad config, or no checkpoint in run.dir that loads (a `latest` that does not load makes
the run fall back to the newest older one that does, and say so); 3 unstable (too many loss spikes
or non-finite steps); 4 a checkpoint could not be written (`latest` names the last good one).
"""


def _experiments() -> str:
    from pretrain.config import CONFIG_DIR

    lines = []
    for path in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        first = next((ln[2:].strip() for ln in path.read_text().splitlines()
                      if ln.startswith("# ") and "@package" not in ln), "")
        lines.append(f"  {path.stem:<12} {first}")
    return "\n".join(lines)


def _setup_logging(run_dir: Path, rank: int) -> None:
    fmt = "%(asctime)s %(message)s" if rank == 0 else f"%(asctime)s [rank {rank}] %(message)s"
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=fmt,
                        datefmt="%H:%M:%S", handlers=handlers, force=True)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its DDP lists every bucket's parameters


def _config_yaml(cfg) -> str:
    import dataclasses

    from omegaconf import OmegaConf

    plain = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "sources"}
    return OmegaConf.to_yaml(OmegaConf.create(plain))


def _save_config(cfg, run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(_config_yaml(cfg))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(HELP.format(experiments=_experiments()))
        return 0
    from pretrain import watchdog

    watchdog.start_beating()  # the training process under a supervisor: heartbeat and stacks from here on
    from data.format import DataError
    from model.config import ConfigError
    from model import quiet_megatron_warnings
    from pretrain.config import compose
    from pretrain.parallel import slurm_environment

    quiet_megatron_warnings()
    rank = int(os.environ.get("RANK", slurm_environment().get("RANK", 0)))
    print_only = "--print-config" in argv
    argv = [a for a in argv if a != "--print-config"]
    fit = None
    if "--fit-nodes" in argv:
        i = argv.index("--fit-nodes")
        try:
            fit = int(argv[i + 1]), int(argv[i + 2])
        except (IndexError, ValueError):
            print("glm-pretrain: --fit-nodes takes two numbers: NODES PER_NODE", file=sys.stderr)
            return 2
        argv = argv[:i] + argv[i + 3:]
    overrides = list(argv)
    try:
        cfg = compose(argv)
        if not cfg.experiment:
            raise ConfigError("no experiment chosen: add experiment=NAME (glm-pretrain --help lists them)")
        if fit is not None:  # the launchers: how many of the job's nodes to use
            from pretrain import elastic
            from pretrain.checkpoint import meta_to_resume

            best, text = elastic.best_node_count(cfg, fit[1], fit[0], meta_to_resume(cfg.run.dir))
            print(f"glm-pretrain: {text}", file=sys.stderr)
            if not best:
                return 2
            print(best)
            return 0
        if print_only:  # the launchers' dry run: checked against the launch's size, nothing opened
            world = os.environ.get("WORLD_SIZE")
            cfg.validate(world_size=int(world) if world else None)
            print(_config_yaml(cfg), end="")
            return 0
        if cfg.faults.watchdog.enabled and not watchdog.under_supervisor():
            # this process becomes the rank's supervisor; the training runs in its child
            return watchdog.supervise(overrides, cfg.faults.watchdog, Path(cfg.run.dir))
        from pretrain.train import preflight

        preflight(cfg)
    except (ConfigError, DataError) as e:
        print(f"glm-pretrain: {e}", file=sys.stderr)
        return 2
    from pretrain.faults import catch_stop_signals

    catch_stop_signals()
    run_dir = Path(cfg.run.dir)
    _setup_logging(run_dir, rank)
    if rank == 0:
        _save_config(cfg, run_dir)
    from pretrain.checkpoint_io import CheckpointError, CheckpointSaveError
    from pretrain.faults import EXIT_CONFIG, EXIT_SAVE_FAILED, EXIT_UNSTABLE
    from pretrain.train import train

    try:
        return train(cfg)
    except (ConfigError, CheckpointError) as e:  # found once the run directory is read: a checkpoint of
        # another model, or no checkpoint that loads (each one tried is named)
        logging.getLogger("pretrain").error(f"glm-pretrain: {e}")
        return EXIT_CONFIG
    except CheckpointSaveError as e:  # every rank knows it (decided together); rank 0 says it
        if rank == 0:
            logging.getLogger("pretrain").error(f"glm-pretrain: {e}")
        return EXIT_SAVE_FAILED
    except FloatingPointError as e:  # non-finite gradients optim.max_skipped_steps times in a row, or
        # faults.spike.max_spikes loss spikes: training on would meet them again
        logging.getLogger("pretrain").error(f"rank {rank}: {e}")
        return EXIT_UNSTABLE
    except Exception as e:
        watchdog.failed(e)  # a collective that lost its peer: the supervisor's report says so
        logging.getLogger("pretrain").exception(f"rank {rank} failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
