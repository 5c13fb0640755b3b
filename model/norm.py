"""RMSNorm with Megatron-Core's norm constructor signature, usable under sequence parallelism.

Megatron's own torch-norm wrapper refuses sequence parallelism. Under SP each tensor-parallel rank
normalises a different slice of the sequence, so the weight's gradient is partial on each rank:
marking it `sequence_parallel` makes Megatron's finalize_model_grads all-reduce it across TP.
"""

import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_megatron_norm_kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale in the input dtype, as the Hugging Face reference does.
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * y
