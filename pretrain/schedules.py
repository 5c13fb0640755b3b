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
                    seq_length: int, granule: int, increment_tokens: int | None = None) -> int:
    """Sequences in the global batch after `tokens` consumed tokens: a ramp in tokens from
    `start_tokens` to `final_tokens` over the first `ramp_tokens`.

    With `increment_tokens` (train.batch_ramp_increment_tokens) the ramp climbs in steps of that
    many tokens, evenly spaced over `ramp_tokens` (Megatron's --rampup-batch-size), and the batch is
    the same at every data-parallel size: `pretrain/elastic.py` refuses a size whose micro-batch x
    data-parallel `granule` does not divide it, so nothing is rounded. Without it the ramp is
    linear, rounded down to a whole number of granules at the run's own size (never below one)."""
    if increment_tokens:
        steps = (final_tokens - start_tokens) // increment_tokens
        done = steps if not ramp_tokens or tokens >= ramp_tokens else math.floor(tokens * steps / ramp_tokens)
        return (start_tokens + done * increment_tokens) // seq_length
    frac = 1.0 if not ramp_tokens or tokens >= ramp_tokens else tokens / ramp_tokens
    batch_tokens = start_tokens + (final_tokens - start_tokens) * frac
    return max(granule, int(batch_tokens // seq_length) // granule * granule)
