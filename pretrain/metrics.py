"""What a run reports: TensorBoard scalars (rank 0) and one console line per logged step.

Scalar names are Megatron-LM's where it has them (`lm loss`, `mtp_1 loss`, `learning-rate`,
`batch-size`, `grad-norm`, `params-norm`, `iteration-time`, `throughput`, ...), so dashboards
carry over; each is written against the step and, as `<name> vs tokens`, against consumed tokens.
MFU divides the model's training FLOPs (model/accounting.py, Megatron's formula with MTP) by the
device's peak: a table of GPUs, or on a CPU a GEMM timed at start-up.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

# bf16 dense peak, TFLOP/s, by a substring of torch.cuda.get_device_name()
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
                   "L40S": 362.0, "B200": 2250.0, "GB200": 2500.0}


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name} bf16 dense peak"
        return 0.0, f"{name}: not in pretrain/metrics.py GPU_PEAK_TFLOPS (MFU not reported)"
    n = 1024
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < 0.25:
        a @ b
        reps += 1
    rate = 2 * n ** 3 * reps / (time.perf_counter() - start)
    return rate, f"CPU {str(dtype).replace('torch.', '')} GEMM {n}^3 measured at start-up"


def moe_layer_scalars(counts: torch.Tensor, biases: list[torch.Tensor], layer_ids: list) -> dict:
    """Per MoE layer: max/mean tokens per expert (`counts` [layers, experts], summed over the
    global batch) and the expert bias's min/max/std. One device-to-host copy for all of them."""
    counts = counts.float()
    b = torch.stack([x.float() for x in biases])
    table = torch.stack([counts.max(1).values / counts.mean(1).clamp(min=1e-9), b.min(1).values, b.max(1).values,
                         b.std(1) if b.shape[1] > 1 else torch.zeros(len(b), device=b.device)]).tolist()
    out = {}
    for k, i in enumerate(layer_ids):
        out[f"moe/max_over_mean_tokens_per_expert_layer_{i}"] = table[0][k]
        out[f"moe/expert_bias_min_layer_{i}"] = table[1][k]
        out[f"moe/expert_bias_max_layer_{i}"] = table[2][k]
        out[f"moe/expert_bias_std_layer_{i}"] = table[3][k]
    return out


def params_norm(chunks) -> float:
    """L2 norm of the whole model's parameters, each counted once across all ranks (the same
    rule as the optimizer's gradient norm). One reduction, one device-to-host copy."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)  # context-parallel peers hold copies
    edp_rank = ps.get_expert_data_parallel_rank()
    mine = []
    for chunk in chunks:
        for p in chunk.parameters():
            expert = not getattr(p, "allreduce", True)
            sharded = getattr(p, "tensor_model_parallel", False)
            if getattr(p, "shared", False):  # the last stage's copy of the word embedding (MTP)
                continue
            if (edp_rank if expert else dp_rank) == 0 and (expert or sharded or tp_rank == 0):
                mine.append(p.detach())
    device = next(chunks[0].parameters()).device
    sq = (torch.stack(torch._foreach_norm(mine, dtype=torch.float32)).double().square().sum() if mine
          else torch.zeros((), dtype=torch.float64, device=device))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    return math.sqrt(float(sq))


class Metrics:
    def __init__(self, run_dir, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, scalars: dict, step: int, tokens: int) -> None:
        if self.writer is None:
            return
        for name, value in scalars.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            self.writer.add_scalar(name, value, step)
            self.writer.add_scalar(f"{name} vs tokens", value, tokens)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def console_line(step: int, stage: str, s: dict, stage_eta: float, run_eta: float) -> str:
    mtp = f" mtp {s['mtp_1 loss']:.3f}" if "mtp_1 loss" in s else ""
    mfu = f" mfu {s['mfu']:.1%}" if s.get("mfu") else ""
    skipped = f" skipped {s['skipped-iterations']}" if s.get("skipped-iterations") else ""
    mem = f" mem {s['mem-max-allocated-bytes'] / 2**30:.1f} GiB" if "mem-max-allocated-bytes" in s else ""
    return (f"step {step:>6} [{stage}] loss {s['lm loss']:.4f}{mtp} lr {s['learning-rate']:.3g} "
            f"batch {s['batch-size']} gnorm {s['grad-norm']:.3f} | {s['tokens-per-second']:,.0f} tok/s"
            f"{mfu} {s['iteration-time'] * 1e3:.0f} ms/step{mem}{skipped} | ETA stage {_hms(stage_eta)} run {_hms(run_eta)}")


def aux_scalars(model_cfg, n_micro: int, device: torch.device) -> dict:
    """Megatron's trackers: the sequence-level balance loss per MoE layer, and MTP losses."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker, track_moe_metrics
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    out: dict = {}
    if model_cfg.num_experts and ps.get_pipeline_model_parallel_world_size() > 1:
        # The tracker sums its values over the pipeline stages; a stage with only dense layers
        # has no entry and would leave the others waiting in that all-reduce.
        get_moe_layer_wise_logging_tracker().setdefault("seq_load_balancing_loss", {
            "values": torch.zeros(model_cfg.num_layers + model_cfg.mtp_num_layers, device=device),
            "reduce_group": None, "avg_group": None, "reduce_group_has_dp": False})
    if model_cfg.num_experts:
        track_moe_metrics(loss_scale=1.0 / n_micro, iteration=0, writer=None, total_loss_dict=out,
                          num_layers=model_cfg.num_layers,
                          moe_layer_freq=[0] * model_cfg.first_k_dense + [1] * model_cfg.num_moe_layers,
                          mtp_num_layers=model_cfg.mtp_num_layers)
    if model_cfg.mtp_num_layers:
        MTPLossLoggingHelper.track_mtp_metrics(loss_scale=1.0 / n_micro, iteration=0, writer=None,
                                               total_loss_dict=out)
    return {k: float(v) for k, v in out.items()}


def over_stages(scalars: dict) -> dict:
    """Scalars that each pipeline stage knows part of (its MoE layers; the MTP losses live on the
    last stage), merged in stage order so the last stage's values win."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return scalars
    group = ps.get_pipeline_model_parallel_group()
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, scalars, group=group)
    return {k: v for stage in out for k, v in stage.items()}
