"""The training loop's cost per step against a bare Megatron-Core step on the same model and batch
size, in the same run: `forward_backward_func` over micro-batches already in memory, then the
optimizer step, nothing else. Ours adds the loader, schedules, metrics (norms, MoE load, aux
losses, TensorBoard) and the stop-flag check. Also printed: our tokens/s and MFU.

Target: overhead ratio (bare time / our time per step) >= 0.97.

--profile N: afterwards, N more steps of our loop under torch.profiler, and where their time goes by
part: waiting for the loader, the model's forward and backward (Megatron's schedule, the loss and
the gradient all-reduce included), the optimizer step, the metrics of logged steps (norms, MoE load,
TensorBoard), and the rest of the loop; wall time, and on a GPU the kernels' time, per part; then
the top operators. The parts are marked from outside the loop (wrapped methods), so the loop itself
carries no profiling code.

  .venv/bin/python benchmarks/train_step.py [--experiment smoke] [--steps 6] [--profile 3] [override ...]
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


PARTS = ("data", "forward-backward", "optimizer", "metrics")


def _marked(name: str, fn):
    from torch.profiler import record_function

    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    return wrapper


def profile_by_part(trainer, cfg, steps: int) -> None:
    """`steps` more steps of the loop under torch.profiler; a table of wall (and kernel) time by part."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from pretrain import train as loop

    cuda = trainer.device.type == "cuda"
    # the parts, marked by wrapping what the loop calls
    it = trainer.iterator
    trainer.iterator = [_MarkedIterator(i) for i in it] if isinstance(it, list) else _MarkedIterator(it)
    from megatron.core import pipeline_parallel

    real_fb = pipeline_parallel.get_forward_backward_func
    pipeline_parallel.get_forward_backward_func = lambda: _marked("forward-backward", real_fb())
    trainer.optimizer.step = _marked("optimizer", trainer.optimizer.step)
    trainer.metrics.write = _marked("metrics", trainer.metrics.write)
    for name in ("aux_scalars", "params_norm", "over_stages"):  # as the loop module imports them
        setattr(loop, name, _marked("metrics", getattr(loop, name)))
    trainer.load.scalars = _marked("metrics", trainer.load.scalars)
    cfg.train.max_steps = trainer.step + steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with profile(activities=activities) as prof:
            with record_function("loop"):
                start = time.perf_counter()
                trainer.run()
                if cuda:
                    torch.cuda.synchronize()
                wall = time.perf_counter() - start
    finally:
        pipeline_parallel.get_forward_backward_func = real_fb
    events = {e.key: e for e in prof.key_averages()}
    device_key = "device_time_total" if hasattr(next(iter(events.values())), "device_time_total") else "cuda_time_total"
    total_dev = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events.values()) if cuda else 0
    print(f"\nprofile of {steps} steps of our loop ({wall * 1e3 / steps:.0f} ms per step, wall), by part:")
    print(f"{'part':<20}{'wall ms/step':>14}{'share':>8}" + (f"{'kernels ms/step':>17}{'share':>8}" if cuda else ""))
    def per_step(part: str, key: str) -> float:
        e = events.get(part)
        return (getattr(e, key, 0) or 0) / 1e3 / steps if e else 0.0

    accounted = 0.0
    for part in PARTS:
        cpu, dev = per_step(part, "cpu_time_total"), per_step(part, device_key) if cuda else 0.0
        if part == "forward-backward":  # the loader is read inside the schedule (the forward step)
            cpu -= per_step("data", "cpu_time_total")
            dev -= per_step("data", device_key) if cuda else 0.0
        accounted += cpu
        line = f"{part:<20}{cpu:>14.1f}{cpu / (wall * 1e3 / steps):>8.1%}"
        if cuda:
            line += f"{dev:>17.1f}{dev * 1e3 * steps / max(total_dev, 1):>8.1%}"
        print(line)
    rest = wall * 1e3 / steps - accounted
    print(f"{'rest of the loop':<20}{rest:>14.1f}{rest / (wall * 1e3 / steps):>8.1%}")
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"\ntop operators by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


class _MarkedIterator:
    """The loop's micro-batch iterator (or its per-chunk list), each fetch marked as `data`."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        return self

    def __next__(self):
        from torch.profiler import record_function

        with record_function("data"):
            return next(self.inner)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="smoke")
    ap.add_argument("--steps", type=int, default=6, help="timed steps of each (after one warm-up step)")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="then profile N steps of our loop by part")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.micro_batch_size=2")
    args = ap.parse_args(argv)
    quiet_megatron_warnings()
    # a fixed batch size (no ramp), so both sides run the same number of micro-batches
    cfg = compose([f"experiment={args.experiment}", f"train.max_steps={args.steps + 1}", "train.save_every=0",
                   *args.overrides])
    cfg.train.batch_start_tokens = cfg.train.global_batch_tokens
    with single_process(), tempfile.TemporaryDirectory() as run_dir:
        trainer = train_mod.Trainer(cfg, Path(run_dir))
        trainer.checkpoints.save = lambda **_: None  # checkpoints are not part of a step
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
        if args.profile:
            profile_by_part(trainer, cfg, args.profile)

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
