"""Learning rate and global batch size as functions of consumed tokens.

Both are expressed in tokens, not steps, so they stay right when a stage changes the sequence
length and while the batch ramps: GLM-4.5's recipe warms the batch up from 16M to 64M tokens over
the first 500B tokens and decays the learning rate from 2.5e-4 to 2.5e-5 by the end of
mid-training.
"""

from __future__ import annotations

import math


def learning_rate(tokens: float, peak: float, minimum: float, warmup_tokens: float, total_tokens: float) -> float:
    """Linear warm-up from 0 to `peak` over `warmup_tokens`, then cosine to `minimum` at `total_tokens`."""
    if warmup_tokens and tokens < warmup_tokens:
        return peak * tokens / warmup_tokens
    if not math.isfinite(total_tokens) or total_tokens <= warmup_tokens:
        return peak
    progress = min(1.0, (tokens - warmup_tokens) / (total_tokens - warmup_tokens))
    return minimum + 0.5 * (peak - minimum) * (1 + math.cos(math.pi * progress))


def batch_sequences(tokens: float, start_tokens: int, final_tokens: int, ramp_tokens: float,
                    seq_length: int, granule: int) -> int:
    """Sequences in the global batch after `tokens` consumed tokens: a linear ramp in tokens from
    `start_tokens` to `final_tokens` over `ramp_tokens`, rounded down to a whole number of
    `granule` sequences (micro-batch x data-parallel ranks), and never below one granule."""
    frac = 1.0 if not ramp_tokens or tokens >= ramp_tokens else tokens / ramp_tokens
    batch_tokens = start_tokens + (final_tokens - start_tokens) * frac
    return max(granule, int(batch_tokens // seq_length) // granule * granule)
