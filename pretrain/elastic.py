"""Which world sizes a run can go on at: the same model-parallel layout of each stage (tensor,
pipeline, expert, context), only the data-parallel size changes, and the global batch in tokens
stays what it is (more micro-batches per step on fewer replicas).

A world size works when every stage's layout fits it (`Config.check_layouts`) and the batch divides
into micro-batch x data-parallel sequences at the start of the batch ramp and at its end, in every
stage's sequence length: a size that cannot keep the batch is refused like one that cannot hold
the layout, never rounded. (Inside the ramp the batch is rounded down to micro-batch x
data-parallel sequences, pretrain/schedules.py, so a run that changes size mid-ramp moves by less
than one such granule there; the log says so when it happens.)

The Slurm launcher asks `glm-pretrain --fit-nodes N PER_NODE` how many of its N nodes to use;
glm-plan prints the same table with memory and step time; a resumed run whose world size changed
logs and records it (pretrain/train.py)."""

from __future__ import annotations


def batch_problem(cfg, world: int) -> str | None:
    """Why the global batch cannot stay the same at `world` processes, or None."""
    t = cfg.train
    where = cfg.sources.get("experiment", "experiment")
    for name in cfg.stages:
        layout, seq = cfg.layout_of(name), cfg.stage_data[name].seq_length
        granule = t.micro_batch_size * layout.data(world)
        for field, tokens in (("batch_start_tokens", t.batch_start_tokens), ("global_batch_tokens",
                                                                            t.global_batch_tokens)):
            seqs = tokens // seq
            if seqs % granule:
                return (f"{where}: train.{field}={tokens} is {seqs} sequence(s) of {seq} (stages.{name}), not a "
                        f"multiple of train.micro_batch_size={t.micro_batch_size} x {layout.data(world)} "
                        f"data-parallel replica(s) = {granule}")
    return None


def problem(cfg, world: int) -> str | None:
    """Why a run of `cfg` (validated when composed) cannot go on at `world` processes (its layouts, its
    batch), or None."""
    from model.config import ConfigError

    try:
        cfg.check_layouts(world)
    except ConfigError as e:
        return str(e)
    return batch_problem(cfg, world)


def node_counts(cfg, per_node: int, max_nodes: int) -> dict[int, str | None]:
    """For 1..max_nodes nodes of `per_node` processes: why each cannot run `cfg`, or None."""
    return {n: problem(cfg, n * per_node) for n in range(1, max_nodes + 1)}


def describe_fit(counts: dict[int, str | None]) -> str:
    good = [n for n, why in counts.items() if why is None]
    return ", ".join(map(str, good)) if good else "none"


def best_node_count(cfg, per_node: int, nodes: int) -> tuple[int, str]:
    """The most of `nodes` nodes the run can use (0: none), and a line saying which counts work."""
    counts = node_counts(cfg, per_node, nodes)
    good = [n for n, why in counts.items() if why is None]
    best = max(good, default=0)
    text = f"node counts up to {nodes} (x {per_node} process(es)) that run it: {describe_fit(counts)}"
    if best < nodes:
        text += f"; {nodes}: {counts[nodes]}"
    return best, text
