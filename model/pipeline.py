"""How many decoder layers the first and last pipeline stages hold.

The first stage also holds the embedding, the last the final norm, the output layer, the loss and
the MTP layer(s). At GLM-4.5's widths the output layer alone costs about two decoder layers'
FLOPs (151,552 x 5,120) and the MTP layer about three, so an even split makes the last stage the
slowest and every other stage waits for it. And 92 (GLM-4.5) or 46 (Air) layers divide evenly by
no usual pipeline size at all.

`split` returns Megatron-Core's `num_layers_in_first_pipeline_stage` / `..._last_...`: what the
config gives (checked; one given, the other is chosen), else the split with the smallest slowest-stage cost under
Megatron's rules (the middle stages hold equal numbers of layers; with virtual stages every
stage's layers divide evenly into its model chunks). Costs are the training FLOPs of
model/accounting.py at the stage's sequence length; the embedding lookup costs nothing there.
An even split is returned as (None, None), Megatron's default.
"""

from __future__ import annotations

from model.accounting import layer_flops_per_token
from model.config import ConfigError, ModelConfig, ParallelConfig

# Weigh stages at pre-training's sequence length (attention grows with it, slightly shifting
# the balance towards fewer layers on the last stage at 32K and beyond).
SEQ_LEN = 4096


def _allowed(first: int, last: int, layers: int, stages: int, chunks: int) -> bool:
    middle = layers - first - last
    if first < chunks or last < chunks or first % chunks or last % chunks or middle < 0:
        return False
    if stages == 2:
        # Megatron-Core 0.16 divides by the number of middle stages when it places virtual
        # stages of an uneven split (get_transformer_layer_offset): with two stages, none.
        return middle == 0 and (chunks == 1 or first == last)
    return middle > 0 and middle % (stages - 2) == 0 and (middle // (stages - 2)) % chunks == 0


def stage_costs(m: ModelConfig, stages: int, first: int, last: int, seq_len: int = SEQ_LEN) -> list[float]:
    """Training FLOPs per token of each pipeline stage with `first` and `last` layers at the ends."""
    f = layer_flops_per_token(m, seq_len)
    layer = [f["dense"] if i < m.first_k_dense else f["moe"] for i in range(m.num_layers)]
    per_middle = (m.num_layers - first - last) // max(stages - 2, 1)
    bounds = [0, first] + [first + per_middle * k for k in range(1, stages - 1)] + [m.num_layers]
    costs = [sum(layer[a:b]) for a, b in zip(bounds, bounds[1:])]
    costs[-1] += m.mtp_num_layers * f["mtp"] + f["output"]
    return costs


def layout_costs(m: ModelConfig, p: ParallelConfig, seq_len: int = SEQ_LEN) -> list[float]:
    """Training FLOPs per token of each pipeline stage under the layout's split."""
    if p.pipeline == 1:
        return [1.0]
    first, last = split(m, p)
    even = m.num_layers // p.pipeline
    return stage_costs(m, p.pipeline, first or even, last or even, seq_len)


def check_layout(m: ModelConfig, p: ParallelConfig, world_size: int | None = None,
                 source: str = "parallel") -> ParallelConfig:
    """The whole check of a layout: `p.validate` (what divides what, the world size), then whether
    the model's layers can be placed on its pipeline stages. Returns `p`; raises ConfigError."""
    p.validate(m, world_size, source)
    split(m, p, source)
    return p


def split(m: ModelConfig, p: ParallelConfig, source: str = "parallel") -> tuple[int | None, int | None]:
    """(first, last) decoder layers for Megatron-Core, or (None, None) for its even split."""
    stages, chunks, layers = p.pipeline, p.virtual_stages, m.num_layers
    given = (p.first_stage_layers, p.last_stage_layers)
    if stages == 1:
        if any(g is not None for g in given) or chunks > 1:
            field = "virtual_stages" if chunks > 1 else \
                ("first_stage_layers" if given[0] is not None else "last_stage_layers")
            raise ConfigError(f"{source}: parallel.{field}={getattr(p, field)!r} needs parallel.pipeline > 1")
        return None, None
    if layers < stages * chunks:
        raise ConfigError(f"{source}: parallel.pipeline={stages} x parallel.virtual_stages={chunks} model chunks "
                          f"need at least as many layers; model.num_layers={layers}")
    candidates = [(f, la) for f in range(1, layers) for la in range(1, layers - f + 1)
                  if _allowed(f, la, layers, stages, chunks) and given[0] in (None, f) and given[1] in (None, la)]
    if not candidates:
        fixed = ", ".join(f"parallel.{n}={v}" for n, v in zip(("first_stage_layers", "last_stage_layers"), given)
                          if v is not None)
        raise ConfigError(
            f"{source}: {fixed + ': ' if fixed else ''}no placement of model.num_layers={layers} on "
            f"parallel.pipeline={stages} stages x parallel.virtual_stages={chunks} model chunks: each end stage "
            f"needs a multiple of {chunks} layers and the {max(stages - 2, 0)} middle stage(s) equal shares of "
            f"the rest, each a multiple of {chunks}; " + ("leave the stage layers unset to have them chosen"
                                                           if fixed else "change parallel.virtual_stages or "
                                                           "parallel.pipeline"))
    even = layers // stages if layers % stages == 0 else None

    def key(c):
        # slowest stage first; then prefer Megatron's even split, then the most even ends
        return max(stage_costs(m, stages, *c)), c != (even, even), abs(c[0] - c[1])

    first, last = min(candidates, key=key)
    return (None, None) if first == last == even else (first, last)  # given or chosen: Megatron's own
