"""The training loop's cost per step against a bare Megatron-Core step on the same model and batch
size, in the same run: `forward_backward_func` over micro-batches already in memory, then the
optimizer step, nothing else. Ours adds the loader, schedules, metrics (norms, MoE load, aux
losses, TensorBoard) and the stop-flag check. Also printed: our tokens/s and MFU.

Target: overhead ratio (bare time / our time per step) >= 0.97.

  .venv/bin/python benchmarks/train_step.py [--experiment smoke] [--steps 6] [override ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from model import quiet_megatron_warnings  # noqa: E402
from model.accounting import train_flops_per_token  # noqa: E402
from pretrain import train as train_mod  # noqa: E402
from pretrain.config import compose  # noqa: E402
from pretrain.parallel import single_process  # noqa: E402
from pretrain.step import forward_step  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="smoke")
    ap.add_argument("--steps", type=int, default=6, help="timed steps of each (after one warm-up step)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.micro_batch_size=2")
    args = ap.parse_args(argv)
    quiet_megatron_warnings()
    # a fixed batch size (no ramp), so both sides run the same number of micro-batches
    cfg = compose([f"experiment={args.experiment}", f"train.max_steps={args.steps + 1}", "train.save_every=0",
                   *args.overrides])
    cfg.train.batch_start_tokens = cfg.train.global_batch_tokens
    with single_process(), tempfile.TemporaryDirectory() as run_dir:
        trainer = train_mod.Trainer(cfg, Path(run_dir))
        trainer.save = lambda: None  # checkpoints are not part of a step
        starts = []
        step = trainer.train_step

        def timed_step(n_micro, lr):
            starts.append(time.perf_counter())
            return step(n_micro, lr)

        trainer.train_step = timed_step
        trainer.run()
        starts.append(time.perf_counter())  # run() returns right after the last step's bookkeeping
        ours = (starts[-1] - starts[1]) / args.steps

        micro = cfg.train.micro_batch_size
        seq = trainer.seq_length
        n_micro = cfg.train.global_batch_tokens // seq // micro
        batches = [next(trainer.iterator) for _ in range(n_micro)]
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def bare_step():
            for d in trainer.ddp:
                d.zero_grad_buffer()
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches),
                                        model=trainer.ddp, num_microbatches=n_micro, seq_length=seq,
                                        micro_batch_size=micro, forward_only=False)
            trainer.optimizer.step(1e-4)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()

        bare_step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            bare_step()
        bare = (time.perf_counter() - t0) / args.steps

    tokens = n_micro * micro * seq
    flops = train_flops_per_token(cfg.model, seq) * tokens
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{args.experiment} on {device}, {torch.get_num_threads()} threads, dtype {trainer.dtype}: "
          f"{n_micro} micro-batches of {micro} x {seq} tokens per step")
    print(f"bare Megatron step {bare * 1e3:.0f} ms, our loop {ours * 1e3:.0f} ms per step: "
          f"overhead ratio {bare / ours:.3f} (target >= 0.97)")
    print(f"ours: {tokens / ours:,.0f} tokens/s, {flops / ours / 1e12:.3f} TFLOP/s, "
          f"MFU {flops / ours / trainer.peak:.1%} of {trainer.peak / 1e12:.2f} TFLOP/s ({trainer.peak_source})")


if __name__ == "__main__":
    main()
