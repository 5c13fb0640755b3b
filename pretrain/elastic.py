"""Which world sizes a run can go on at: the same model-parallel layout of each stage (tensor,
pipeline, expert, context), only the data-parallel size changes, and the global batch in tokens
stays what it is (more micro-batches per step on fewer replicas).

A world size works when every stage's layout fits it (`Config.check_layouts`) and the global batch
is a whole number of micro-batch x data-parallel sequences wherever that stage meets it: at the end
of the batch ramp, and in a stage that starts inside the ramp also at its start and every step of
its climb (train.batch_ramp_increment_tokens, pretrain/schedules.py). A size that cannot keep the
batch is refused like one that cannot hold the layout, never rounded. A ramp without an increment
is rounded at the run's own size; such a run cannot change size inside the ramp
(`ramp_problem`).

The Slurm launcher asks `glm-pretrain --fit-nodes N PER_NODE` how many of its N nodes to use;
glm-plan prints the same table with memory and step time; a resumed run whose world size changed
logs and records it (pretrain/train.py)."""

from __future__ import annotations


def batch_problem(cfg, world: int) -> str | None:
    """Why the global batch cannot stay the same at `world` processes, or None."""
    t = cfg.train
    where = cfg.sources.get("experiment", "experiment")
    ramping = bool(t.batch_ramp_tokens) and t.batch_start_tokens != t.global_batch_tokens
    begins = 0.0
    for name, stage in cfg.stages.items():
        layout, seq = cfg.layout_of(name), cfg.stage_data[name].seq_length
        granule = t.micro_batch_size * layout.data(world)
        sizes = [("global_batch_tokens", t.global_batch_tokens)]
        if ramping and begins < t.batch_ramp_tokens:
            sizes.append(("batch_start_tokens", t.batch_start_tokens))
            if t.batch_ramp_increment_tokens:
                sizes.append(("batch_ramp_increment_tokens", t.batch_ramp_increment_tokens))
        begins += stage.tokens
        for field, tokens in sizes:
            seqs, left = divmod(tokens, seq)
            if field == "batch_ramp_increment_tokens" and left:
                return (f"{where}: train.{field}={tokens} is not a whole number of sequences of {seq} "
                        f"(stages.{name}, which starts inside the batch ramp)")
            if seqs == 0 or seqs % granule:
                return (f"{where}: train.{field}={tokens} is {seqs} sequence(s) of {seq} (stages.{name}), not a "
                        f"multiple of train.micro_batch_size={t.micro_batch_size} x {layout.data(world)} "
                        f"data-parallel replica(s) = {granule}")
    return None


def ramp_problem(cfg, old_world: int, world: int, stage: str, tokens: float) -> str | None:
    """Why a run at `tokens` consumed tokens cannot go from `old_world` to `world` processes inside a
    batch ramp that has no increment (rounded at each size to its own granule), or None."""
    t = cfg.train
    if (t.batch_ramp_increment_tokens or not t.batch_ramp_tokens or tokens >= t.batch_ramp_tokens
            or t.batch_start_tokens == t.global_batch_tokens):
        return None
    layout = cfg.layout_of(stage)
    old, new = (t.micro_batch_size * layout.data(w) for w in (old_world, world))
    if old == new:
        return None
    return (f"{cfg.sources.get('experiment', 'experiment')}: the batch ramp (train.batch_ramp_tokens="
            f"{t.batch_ramp_tokens:g}, {tokens:,.0f} consumed) has no train.batch_ramp_increment_tokens, so it is "
            f"rounded to micro-batch x data-parallel sequences: {old} at {old_world} processes, {new} at {world}, "
            "a different batch; set train.batch_ramp_increment_tokens to a number of tokens that is a whole "
            "number of such granules at every size the run may use")


def problem(cfg, world: int, resumed: dict | None = None) -> str | None:
    """Why a run of `cfg` (validated when composed) cannot go on at `world` processes (its layouts, its
    batch; with `resumed`, the meta.json of the checkpoint it resumes from, also its ramp), or None."""
    from model.config import ConfigError

    try:
        cfg.check_layouts(world)
    except ConfigError as e:
        return str(e)
    from pretrain.checkpoint import stage_of

    stage = stage_of(resumed or {})
    if resumed and resumed.get("world_size") and stage in cfg.stages:
        return resume_problem(cfg, resumed["world_size"], world, stage, resumed.get("tokens", 0))
    return batch_problem(cfg, world)


def resume_problem(cfg, old_world: int, world: int, stage: str, tokens: float) -> str | None:
    """Why a run of `old_world` processes, at `tokens` consumed tokens in `stage`, cannot go on at
    `world` with the same global batch (its sizes, its ramp), or None."""
    return batch_problem(cfg, world) or ramp_problem(cfg, old_world, world, stage, tokens)


def node_counts(cfg, per_node: int, max_nodes: int, resumed: dict | None = None) -> dict[int, str | None]:
    """For 1..max_nodes nodes of `per_node` processes: why each cannot run `cfg`, or None."""
    return {n: problem(cfg, n * per_node, resumed) for n in range(1, max_nodes + 1)}


def describe_fit(counts: dict[int, str | None]) -> str:
    good = [n for n, why in counts.items() if why is None]
    return ", ".join(map(str, good)) if good else "none"


def best_node_count(cfg, per_node: int, nodes: int, resumed: dict | None = None) -> tuple[int, str]:
    """The most of `nodes` nodes the run can use (0: none), and a line saying which counts work."""
    counts = node_counts(cfg, per_node, nodes, resumed)
    good = [n for n, why in counts.items() if why is None]
    best = max(good, default=0)
    text = f"node counts up to {nodes} (x {per_node} process(es)) that run it: {describe_fit(counts)}"
    if best < nodes:
        text += f"; {nodes}: {counts[nodes]}"
    return best, text
