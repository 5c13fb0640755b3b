"""Routed experts as two grouped GEMMs (`torch._grouped_mm`) for the local layer spec.

Megatron-Core 0.16's local experts (`SequentialMLP`) loop over the experts in Python, one small
GEMM each (and a host sync to split the tokens); its grouped module needs Transformer Engine or
the `grouped_gemm` package. `GroupedExperts` *is* a SequentialMLP — the same parameters
(`local_experts.<i>.linear_fc1.weight`, ...), initialisation, checkpoints, HF mapping, expert and
expert-tensor parallelism and optimizer roles — whose forward runs all local experts at once.

`_grouped_mm` wants one [experts, in, out] tensor. Stacking the expert weights on every forward
would copy them (4.4 GB per layer at Air's widths) and keep the copy until the backward, so the
experts' weights are instead views of one contiguous allocation per projection, and
`_StackedWeights` hands that allocation to the GEMM as a tensor whose gradient flows back to each
expert's parameter (a view of the stacked gradient). If anything re-points a parameter (`.to()`,
`.cuda()` of a CPU-built model), the next forward notices and stacks again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

_PROJECTIONS = ("linear_fc1", "linear_fc2")


class _StackedWeights(torch.autograd.Function):
    """`stacked` (which the expert weights are views of) as a differentiable function of them."""

    @staticmethod
    def forward(ctx, stacked, *weights):
        return stacked.view_as(stacked)

    @staticmethod
    def backward(ctx, grad):
        return (None, *grad.unbind(0))


def _is_stacked(stacked: torch.Tensor | None, weights: list[torch.Tensor]) -> bool:
    if stacked is None or stacked.device.type == "meta":
        return stacked is not None and all(w.device.type == "meta" for w in weights)
    step = stacked.stride(0) * stacked.element_size()
    base = stacked.data_ptr()
    return all(w.dtype == stacked.dtype and w.device == stacked.device and w.shape == stacked.shape[1:]
               and w.stride() == stacked.stride()[1:] and w.data_ptr() == base + i * step
               for i, w in enumerate(weights))


@torch.no_grad()
def _stack(weights: list[torch.nn.Parameter]) -> torch.Tensor:
    stacked = torch.stack([w.detach() for w in weights])
    for i, w in enumerate(weights):
        w.data = stacked[i]
    return stacked


_HAS_GROUPED_MM: dict = {}  # (device, dtype) -> whether torch._grouped_mm runs there


def _has_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` exists and runs for this device and dtype: tried once on a
    small problem (builds differ: CUDA kernels need compute capability 9.0, some dtypes none)."""
    key = (device, dtype)
    if key not in _HAS_GROUPED_MM:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                x = torch.ones(32, 16, device=device, dtype=dtype)
                w = torch.ones(2, 16, 16, device=device, dtype=dtype)
                torch._grouped_mm(x, w.transpose(1, 2), offs=torch.tensor([16, 32], device=device, dtype=torch.int32))
            except (RuntimeError, NotImplementedError):
                ok = False
        _HAS_GROUPED_MM[key] = ok
    return _HAS_GROUPED_MM[key]


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x [tokens, in] in groups ending at `offs` (sizes `counts`), group e times w[e].T
    (w [groups, out, in]): one `torch._grouped_mm` where it runs, a loop over the groups otherwise."""
    if _has_grouped_mm(x.device, x.dtype):
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
    parts = torch.split(x, counts.tolist())
    return torch.cat([p @ w[e].t() for e, p in enumerate(parts)])


class GroupedExperts(SequentialMLP):
    """SequentialMLP's parameters and state, grouped GEMMs for the forward (SwiGLU, no biases)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection)
        for field, ok, why in (("add_bias_linear", not config.add_bias_linear, "expert biases"),
                               ("gated_linear_unit", config.gated_linear_unit and config.activation_func is F.silu,
                                "anything but SwiGLU experts"),
                               ("fp8", not (config.fp8 or config.fp4), "fp8/fp4 experts"),
                               ("activation_func_clamp_value", config.activation_func_clamp_value is None,
                                "clamped activations")):
            if not ok:
                raise ValueError(f"GroupedExperts: {field}={getattr(config, field)!r}: {why} are not "
                                 f"supported by the grouped path (impl=torch); use impl=local")
        self._stacked = {name: _stack(self._weights(name)) for name in _PROJECTIONS}
        self.restacks = 0  # times the weights had to be stacked again after a move (tests read it)

    def _weights(self, name: str) -> list[torch.nn.Parameter]:
        return [getattr(expert, name).weight for expert in self.local_experts]

    def _weight(self, name: str) -> torch.Tensor:
        weights = self._weights(name)
        if not _is_stacked(self._stacked[name], weights):
            self._stacked[name] = _stack(weights)
            self.restacks += 1
        return _StackedWeights.apply(self._stacked[name], *weights)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:  # as SequentialMLP: top-1 only, probs on the input
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        counts = tokens_per_expert.to(device=x.device)
        offs = counts.cumsum(0).to(torch.int32)
        h = grouped_mm(x, self._weight("linear_fc1"), offs, counts)
        gate, up = h.chunk(2, dim=-1)
        # as Megatron's MLP: SwiGLU, then the routing weight in the probabilities' dtype, then back
        h = (F.silu(gate) * up * probs.unsqueeze(-1)).to(h.dtype)
        return grouped_mm(h, self._weight("linear_fc2"), offs, counts), None
