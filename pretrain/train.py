"""The training loop: build, resume, then step through the stages until the tokens run out.

Reads top to bottom: `Trainer.run()` is the loop, `train_step` one step. Its parts each have one
home: the forward step and loss (pretrain/step.py), stages (pretrain/stages.py), schedules
(pretrain/schedules.py), checkpoints (pretrain/checkpointer.py: which one to resume from, saving,
failed saves; pretrain/checkpoint.py: how they are written and read), metrics (pretrain/metrics.py),
loss spikes (pretrain/spikes.py), stragglers (pretrain/stragglers.py), signals and exit codes
(pretrain/faults.py), the hang watchdog (pretrain/watchdog.py). Megatron-Core does the rest:
parallel state, DDP, the micro-batch schedule, `finalize_model_grads` (gradient all-reduce and the
loss-free expert-bias update).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain import faults, schedules, stages as stages_mod, watchdog
from pretrain.checkpoint import rng_state, set_rng_state
from pretrain.checkpointer import Checkpointer
from pretrain.config import Config
from pretrain.faults import EXIT_DONE, EXIT_RESUME, StopFlag
from pretrain.metrics import (Metrics, aux_scalars, console_line, moe_layer_scalars, over_stages, params_norm,
                              peak_flops)
from pretrain.spikes import SpikeDetector
from pretrain.stragglers import Stragglers
from pretrain.step import forward_step, per_chunk

log = logging.getLogger("pretrain")


def model_dtype(name: str) -> torch.dtype:
    if name == "bf16" or (name == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


class ExpertLoad:
    """Tokens per expert of each MoE layer in the last step, read before `finalize_model_grads`
    (which consumes and zeroes Megatron's counters for the expert-bias update)."""

    def __init__(self, chunks):
        from model.sharding import whole_name

        # (whole-model name: global layer ids, router) of every MoE layer of this rank's chunks
        self.routers = [(whole_name(name, chunk), m)
                        for chunk in chunks for name, m in chunk.named_modules()
                        if hasattr(m, "expert_bias") and getattr(m, "local_tokens_per_expert", None) is not None]
        self.counts: list[torch.Tensor] = []
        self.step_started = 0.0  # set by the loop at the start of each step
        self.work_s = 0.0  # this rank's own work in the last step: until it joined the gradient all-reduce

    def finalize(self, *args, **kwargs):
        from megatron.core.distributed import finalize_model_grads

        faults.inject("work", faults.step_now)
        if self.device_sync:
            torch.cuda.synchronize()  # the GPU's work is done, not just queued (logged steps only)
        self.work_s = time.perf_counter() - self.step_started
        self.counts = [m.local_tokens_per_expert.detach().clone() for _, m in self.routers]
        return finalize_model_grads(*args, **kwargs)

    device_sync = False

    def scalars(self) -> dict:
        """This pipeline stage's MoE layers (every layer once the stages are merged)."""
        from megatron.core import parallel_state as ps

        if not self.counts:
            return {}
        counts = torch.stack(self.counts)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts, group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True))
        ids = [int(name.split("layers.")[1].split(".")[0]) if name.startswith("decoder.layers.") else
               f"mtp{name.split('layers.')[1].split('.')[0]}" for name, _ in self.routers]
        return moe_layer_scalars(counts, [m.expert_bias for _, m in self.routers], ids)


def _reduced_mean(values: list[torch.Tensor], device: torch.device) -> float:
    """Mean of the micro-batch losses over micro-batches and data-parallel ranks. Under pipeline
    parallelism only the last stage has them: every stage gets its value."""
    from megatron.core import parallel_state as ps

    total = torch.stack([v.float() for v in values]).mean() if values else torch.zeros((), device=device)
    if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        total = total.clone()
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())  # the other stages add 0
    if dist.is_initialized() and ps.get_data_parallel_world_size(with_context_parallel=True) > 1:
        total = total.clone()
        dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
        total /= ps.get_data_parallel_world_size(with_context_parallel=True)
    return float(total)


# Megatron DDP: gradients accumulate and are reduced in fp32 buffers (4 bytes per parameter, which
# glm-plan counts), after the backward pass.
DDP_SETTINGS = {"grad_reduce_in_fp32": True, "overlap_grad_reduce": False}


class Trainer:
    """Everything the loop needs, built once; `run()` is the loop."""

    def __init__(self, cfg: Config, run_dir: Path):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        from model.build import build_chunks
        from optim.optimizer import Optimizer

        self.cfg, self.run_dir = cfg, run_dir
        self.rank = dist.get_rank()
        # data-parallel replicas: each reads its own batches; the ranks of a context-parallel group
        # read the same ones and split every sequence (pretrain/step.py)
        self.dp = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.cp = ps.get_context_parallel_world_size()
        self.dtype = model_dtype(cfg.train.dtype)
        # this rank's model chunks: one, or one per virtual pipeline stage (interleaved schedule)
        self.chunks = build_chunks(cfg.model, cfg.parallel, dtype=self.dtype, impl=cfg.train.impl)
        ddp_config = DistributedDataParallelConfig(**DDP_SETTINGS)
        self.ddp = [DistributedDataParallel(c.config, ddp_config, c) for c in self.chunks]
        self.load = ExpertLoad(self.chunks)
        config = self.chunks[0].config  # shared by the chunks
        config.no_sync_func = [d.no_sync for d in self.ddp] if len(self.ddp) > 1 else self.ddp[0].no_sync
        config.finalize_model_grads_func = self.load.finalize
        self.optimizer = Optimizer(self.chunks, cfg.optim)
        # Megatron keeps the aux-loss gradient scale as class state, created on first use with the
        # shape of whatever set it; anything that ran a backward before in this process (another
        # model, a test) must not decide it for the schedule, which sets a [1]-shaped scale.
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        MoEAuxLossAutoScaler.main_loss_backward_scale = None
        self.stages = stages_mod.Stages(cfg)
        self.metrics = Metrics(run_dir, enabled=self.rank == 0)
        self.checkpoints = Checkpointer(run_dir, cfg, self)
        self.device = next(self.chunks[0].parameters()).device
        self.peak, self.peak_source = peak_flops(self.device, self.dtype)
        # trainer state: all of it is saved in a checkpoint
        self.step = 0
        self.tokens = 0
        self.samples = 0
        self.skipped = 0
        self.dropped_samples = 0  # stored samples left behind where the data-parallel size changed
        self.stage_name = ""
        self.resized: dict | None = None  # resumed under another world size: from what
        self.recorder = None  # data.record: the delivery record (pretrain/deliveries.py)
        self.loader = self.iterator = self.batches = None
        self.loader_states: list | None = None  # every rank's loader state, to continue from
        self._skips_seen = 0  # bad shards skipped, as last reported
        self._fetched: dict[str, Path | None] = {}  # tokenizer files fetched from object storage
        self.spikes = SpikeDetector(cfg.faults.spike, run_dir, writer=self.rank == 0)
        self.straggler = Stragglers(cfg.faults.straggler)
        self.first_step = True  # of this launch or of a stage: the watchdog allows it more time

    # ---- what a checkpoint holds (pretrain/checkpointer.py saves and loads it) --------------

    def state_dict(self) -> dict:
        """The counters every rank shares."""
        return {"step": self.step, "tokens": self.tokens, "samples": self.samples, "skipped": self.skipped,
                "stage": self.stage_name, "spike_detector": self.spikes.state_dict(),
                "dropped_samples": self.dropped_samples}

    def rank_state_dict(self) -> dict:
        """This rank's own: its data-parallel replica's loader position, its RNG."""
        return {"loader": self.loader.state_dict() if self.loader else self.loader_states[self.dp_rank],
                "dp_rank": self.dp_rank, "rng": rng_state()}

    def load_state_dict(self, common: dict, ranks: dict) -> None:
        """`common` as state_dict gave it; `ranks`: every rank's rank_state_dict (`all`) and this rank's
        own (`mine`, None when the world size changed)."""
        self.step, self.tokens, self.samples = common["step"], common["tokens"], common["samples"]
        self.skipped, self.stage_name = common["skipped"], common["stage"]
        self.dropped_samples = common.get("dropped_samples", 0)
        self.spikes.load_state_dict(common.get("spike_detector"))
        # one loader state per data-parallel rank (tensor/expert-parallel peers share theirs)
        by_dp = {r["dp_rank"]: r["loader"] for r in ranks["all"]}
        self.loader_states = [by_dp[i] for i in sorted(by_dp)]
        if len(ranks["all"]) != dist.get_world_size():
            self.resized = {"world": len(ranks["all"]), "dp": len(self.loader_states)}
        if ranks["mine"] is not None:
            set_rng_state(ranks["mine"]["rng"])

    def start_from_weights(self, path: Path, meta: dict) -> None:
        """A weights-only checkpoint (glm-convert import) was loaded: schedules and data from the start
        of the first stage or of the one it names."""
        from model.config import ConfigError

        stage = meta.get("stage")
        if stage:
            found = [s for s in self.stages.list if s.name == stage]
            if not found:
                raise ConfigError(f"{path / 'meta.json'}: stage={stage!r} is not a stage of experiment="
                                  f"{self.cfg.experiment} ({', '.join(s.name for s in self.stages.list)})")
            self.tokens = int(found[0].start_tokens)
        log.info(f"starting from the weights in {path} (from {meta.get('source', 'an import')}), fresh optimizer, "
                 f"at {self.tokens:,} tokens (stage {self.stages.at(self.tokens).name})")

    def checkpoint_meta(self) -> dict:
        """meta.json, for people and tools: where the run stands, its layout, and the model config as it
        stands at this step (the stage's RoPE base, MTP weight and bias rate: what an export describes)."""
        import dataclasses

        model = dataclasses.asdict(self.cfg.model)
        stage = next((s for s in self.stages.list if s.name == self.stage_name), None)
        if stage is not None:
            values = stages_mod.settings(self.stages, stage, self.cfg.model)
            model.update({k: v for k, v in values.items() if k in model})
        upcoming = self.stages.at(self.tokens)
        return {**self.state_dict(), "next_stage": upcoming.name if upcoming else None,
                "world_size": dist.get_world_size(), "parallel": vars(self.cfg.parallel),
                "experiment": self.cfg.experiment, "model": model}

    def hf_files(self) -> tuple[Path, ...]:
        """Files to hand on with the weights: the current stage's tokenizer.json (saved beside its first
        source's shards; from object storage, fetched once into run.dir/data/<stage>/)."""
        from data import objstore
        from data.format import TOKENIZER

        data = self.cfg.stage_data.get(self.stage_name)
        for source in (data.sources if data else ()):
            if objstore.is_url(source.path):
                base = source.path.rsplit("/", 1)[0] if source.path.endswith(".json") else source.path.rstrip("/")
                url = f"{base}/{TOKENIZER}"
                if url not in self._fetched:  # once per run: a copy in run.dir, or None
                    self._fetched[url] = self._fetch(url, self.run_dir / "data" / source.name / TOKENIZER, data)
                if self._fetched[url] is not None:
                    return (self._fetched[url],)
                continue
            path = Path(source.path)
            path = path.parent if path.suffix == ".json" else path
            if (path / TOKENIZER).is_file():
                return (path / TOKENIZER,)
        return ()

    def _fetch(self, url: str, local: Path, data) -> Path | None:
        """`url` copied to `local` (rank 0, which writes the checkpoint's hf/); None where the store has
        no such object (as a local source without one), or says why it cannot give it."""
        from data import objstore

        if self.rank != 0:
            return None
        try:
            if not objstore.exists(url, data.retries()):
                return None
            blob = objstore.read_bytes(url, data.retries())
        except objstore.ObjectStoreError as e:
            log.warning(f"checkpoints will not carry the tokenizer: {e}")
            return None
        local.parent.mkdir(parents=True, exist_ok=True)
        local.with_suffix(".tmp").write_bytes(blob)
        local.with_suffix(".tmp").replace(local)
        return local

    # ---- stages ----------------------------------------------------------------------------

    def enter(self, stage: stages_mod.Stage) -> None:
        """Start `stage`'s loader (continuing every source it shares with the last one) and put its
        values into the model."""
        from data.loader import TokenLoader

        if self.loader is not None:
            self.loader_states = _all_gather_dp(self.loader.state_dict())
        data = self.cfg.stage_data[stage.name]
        self.loader = TokenLoader(data, self.cfg.train.micro_batch_size, rank=self.dp_rank, n_ranks=self.dp,
                                  model_vocab=self.cfg.model.vocab_size, states=self.loader_states,
                                  pin_memory=self.device.type == "cuda")
        if self.loader.redealt:  # (every rank re-deals all the old readers' positions: the same total)
            self.dropped_samples += self.loader.redealt["dropped_samples"]
        if data.record and self.recorder is None and self._first_of_replica():
            from pretrain.deliveries import Recorder

            self.recorder = Recorder(self.run_dir, f"step-{self.step:08d}-{watchdog.launch_id()}", self.dp_rank,
                                     self.step)
        self.batches = watchdog.beating(iter(self.loader))
        self.iterator = per_chunk(self.batches, len(self.chunks))
        if stage.name != self.stage_name:
            self.spikes.reset()  # another loss level
            self.first_step = True
        values = stages_mod.settings(self.stages, stage, self.cfg.model)
        for chunk in self.chunks:
            stages_mod.apply(values, chunk)
        switched = self.stage_name and self.stage_name != stage.name
        self.stage_name = stage.name
        self.seq_length = data.seq_length
        per_rank = (f" ({data.seq_length // self.cp} tokens of each sequence per context-parallel rank)"
                    if self.cp > 1 else "")
        msg = (f"stage {stage.index} '{stage.name}' from {stage.start_tokens:,.0f} tokens: data={stage.cfg.data} "
               f"seq_length={data.seq_length}{per_rank} packing={data.packing} "
               + " ".join(f"{k}={v}" for k, v in values.items()))
        log.info(("switched to " if switched else "") + msg)
        self.metrics.text("stage", msg, self.step)

    def _first_of_replica(self) -> bool:
        """Whether this rank is its data-parallel replica's first (its tensor, context and pipeline
        peers read the same batches)."""
        from megatron.core import parallel_state as ps

        return (ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
                and ps.get_pipeline_model_parallel_rank() == 0)

    def report_resize(self) -> None:
        """The run resumed under another world size: check that its global batch stays, and say so in
        the log and TensorBoard, with why (the launch's nodes) and what the loader dropped."""
        from model.config import ConfigError
        from pretrain import elastic

        world, old = dist.get_world_size(), self.resized
        problem = elastic.resume_problem(self.cfg, old["world"], world, self.stage_name, self.tokens)
        if problem:
            raise ConfigError(f"{problem}: the checkpoint of step {self.step} (a run of {old['world']} processes) "
                              f"cannot go on at {world} with the same global batch")
        t = self.cfg.train
        env = os.environ
        why = (f"job {env['SLURM_JOB_ID']} (restart {env.get('SLURM_RESTART_COUNT', '0')}) runs on "
               f"{env.get('SLURM_JOB_NUM_NODES', '?')} node(s), {env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST', '?')}"
               if env.get("SLURM_JOB_ID") else f"this launch has {world} process(es)")
        msg = (f"world size changed from {old['world']} to {world} processes at step {self.step} "
               f"(data-parallel {old['dp']} -> {self.dp}, layout {self.cfg.parallel.describe(world)}): {why}; the "
               f"global batch stays {t.global_batch_tokens:,} tokens (micro-batches per replica follow); the loader "
               f"dropped {self.dropped_samples:,} stored sample(s) so far (the rest of each old reader's started "
               "shards)")
        log.warning(msg)
        self.metrics.text("world size", msg, self.step)
        self.resized = None

    def stop_for_layout(self, stage: stages_mod.Stage) -> int:
        """Stage `stage` runs under another parallel layout: save at its boundary and exit for a
        restart, which reads the stage from the checkpoint and starts its layout's process groups."""
        world = dist.get_world_size()
        new, old = self.cfg.layout_of(stage.name), self.cfg.parallel
        log.warning(f"stage {stage.index} '{stage.name}' runs under another layout ({new.describe(world)}) "
                    f"than this one ({old.describe(world)}): saving step {self.step}; start the same command "
                    f"again (the Slurm launcher requeues itself) to continue under the new layout")
        self.metrics.text("stage", f"stopped at step {self.step}: stage '{stage.name}' runs under "
                          f"{new.describe(world)}", self.step)
        self.checkpoints.final()
        return EXIT_RESUME

    def data_scalars(self) -> dict:
        """Bad data skipped so far (data.on_error=skip), and reads from object storage retried and the
        seconds spent reading from it, over every data-parallel rank; a warning whenever the skips grow."""
        from megatron.core import parallel_state as ps

        st = self.loader.stats()
        counts = torch.tensor([st["skipped_shards"], st["skipped_samples"], st["skipped_tokens"], st["read_retries"],
                               st["read_seconds"]], dtype=torch.float64, device=self.device)
        if self.dp > 1:
            dist.all_reduce(counts, group=ps.get_data_parallel_group())
        shards, samples, tokens, retries = (int(x) for x in counts.tolist()[:4])
        if shards > self._skips_seen:
            log.warning(f"data: {shards} bad shard(s) skipped so far, {samples:,} samples, {tokens:,} tokens "
                        "(data.on_error=skip; the loader's log names them)")
        self._skips_seen = shards
        return {"skipped-data-shards": shards, "skipped-data-samples": samples, "skipped-data-tokens": tokens,
                "data-read-retries": retries, "data-read-seconds": float(counts[4])}

    # ---- the loop --------------------------------------------------------------------------

    def train_step(self, n_micro: int, lr: float):
        """One step: forward and backward over n_micro micro-batches, then the optimizer, unless the
        loss is a spike (pretrain/spikes.py): then nothing changes. Returns (loss, step info, the
        median a spike was compared with, or None)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from optim.optimizer import StepInfo
        from pretrain.checkpoint import any_rank

        for d in self.ddp:
            d.zero_grad_buffer()
        # the expert biases move inside the schedule (finalize_model_grads), before the loss is known
        biases = [m.expert_bias.detach().clone() for _, m in self.load.routers] if self.spikes.enabled else []
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=self.iterator, model=self.ddp,
            num_microbatches=n_micro, seq_length=self.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size, forward_only=False)
        loss = _reduced_mean([x["lm loss"] for x in losses], self.device)
        spike, median = self.spikes.is_spike(loss)
        if self.spikes.enabled and any_rank(spike):  # the same loss everywhere; agreed all the same
            with torch.no_grad():
                for (_, m), b in zip(self.load.routers, biases):
                    m.expert_bias.copy_(b)
            return loss, StepInfo(float("nan"), 0.0, True), median
        return loss, self.optimizer.step(lr), None

    def on_spike(self, loss: float, median: float) -> bool:
        """After the spike step was logged: record it; under `rewind`, go back to the newest
        checkpoint and leave out the batches from there to here (True)."""
        policy, step = self.cfg.faults.spike.policy, self.step
        self.checkpoints.finish(wait=True)
        saved = self.checkpoints.saved_step  # (-1 if the save in flight failed)
        latest = self.checkpoints.storage.latest() if policy == "rewind" else None
        back = latest is not None and saved >= 0
        first = saved + 1 if back else step
        steps = list(range(first, step + 1))
        what = (f"rewinding to {latest.name} and leaving out the batches of steps {first}-{step}" if back else
                f"step {step} changed nothing and its batch is left out" +
                (" (no checkpoint to rewind to yet)" if policy == "rewind" else ""))
        msg = (f"loss spike at step {step}: {loss:.4f} > {self.cfg.faults.spike.factor} x the median {median:.4f} "
               f"of the last {self.cfg.faults.spike.window} steps: {what} (recorded in {self.spikes.path})")
        log.warning(msg)
        self.metrics.text("loss spike", msg, step)
        self.spikes.add(step, steps, loss, median, policy if back else "skip")
        if back:
            self.checkpoints.load(latest)
            self.close_loader()
        return back

    def close_loader(self) -> None:
        """Stop the loader (its workers end); the loop starts it again from `loader_states`."""
        if self.batches is not None:
            self.batches.close()
        self.loader = self.iterator = self.batches = None

    def leave_out(self, n_micro: int) -> None:
        """Draw one step's micro-batches from the loader and drop them (a recorded spike's batch)."""
        for _ in range(n_micro):
            next(self.batches)

    @torch.no_grad()
    def validate(self, stage: stages_mod.Stage) -> dict:
        """Loss on the stage's held-out shards: the same first `train.eval_batches` micro-batches
        per data-parallel rank at every validation, so the curve compares like with like. Under
        no_grad the routers count no tokens, so the expert-bias update sees training tokens only."""
        import dataclasses

        from data.loader import TokenLoader
        from megatron.core.pipeline_parallel import get_forward_backward_func

        t = self.cfg.train
        data = dataclasses.replace(self.cfg.stage_data[stage.name], num_workers=0, record=False)
        readers = min(self.dp, data.holdout_shards)  # replicas beyond the held-out shards repeat them
        loader = TokenLoader(data, t.micro_batch_size, rank=self.dp_rank % readers, n_ranks=readers,
                             model_vocab=self.cfg.model.vocab_size, part="validation")
        for d in self.ddp:
            d.eval()
        try:
            out = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=per_chunk(iter(loader), len(self.chunks)),
                model=self.ddp, num_microbatches=t.eval_batches, seq_length=data.seq_length,
                micro_batch_size=t.micro_batch_size, forward_only=True)
        finally:
            for d in self.ddp:
                d.train()
        loss = _reduced_mean([x["lm loss"] for x in out], self.device)
        return {"lm loss validation": loss, "validation ppl": math.exp(min(loss, 50.0))}

    def run(self) -> int:
        from model.accounting import train_flops_per_token

        cfg, t = self.cfg, self.cfg.train
        stop = StopFlag(cfg.run.exit_after_minutes)
        granule = t.micro_batch_size * self.dp
        total = self.stages.total_tokens
        started = time.monotonic()
        start_tokens = self.tokens
        try:
            while True:
                stage = self.stages.at(self.tokens)
                if stage is None or (t.max_steps and self.step >= t.max_steps):
                    self.checkpoints.final()
                    log.info(f"done: step {self.step}, {self.tokens:,} tokens")
                    return EXIT_DONE
                if self.loader is None or stage.name != self.stage_name:
                    # (with the loader not yet started: a resume that fell back to a checkpoint of a
                    # stage with another layout than the one `latest` named)
                    if cfg.layout_of(stage.name) != cfg.parallel:
                        return self.stop_for_layout(stage)
                    self.enter(stage)
                    if self.resized:
                        self.report_resize()
                seqs = schedules.batch_sequences(self.tokens, t.batch_start_tokens, t.global_batch_tokens,
                                                 t.batch_ramp_tokens, self.seq_length, granule,
                                                 t.batch_ramp_increment_tokens)
                lr = schedules.learning_rate(self.tokens, cfg.optim.lr, t.lr_min, t.lr_warmup_tokens, total)
                logged = (self.step + 1) % t.log_every == 0
                watchdog.enter("step", self.step + 1, first=self.first_step)
                faults.inject("step", self.step + 1)
                tick = self.load.step_started = time.perf_counter()
                left_out = self.step + 1 in self.spikes.skip_steps
                if left_out:  # recorded as a spike's batch (by this run, or by the one it resumes)
                    self.leave_out(seqs // granule)
                else:
                    self.load.device_sync = logged and self.device.type == "cuda"
                    loss, info, spike_median = self.train_step(seqs // granule, lr)
                elapsed = time.perf_counter() - tick
                self.first_step = False
                batch_tokens = seqs * self.seq_length
                self.step += 1
                self.tokens += batch_tokens
                self.samples += seqs
                if self.recorder is not None:
                    self.recorder.write(self.step, self.loader.delivered)
                    self.loader.delivered = []
                if left_out:
                    log.info(f"step {self.step:>6} [{stage.name}] left out: its batch is recorded in "
                             f"{self.spikes.path}")
                    continue
                self.skipped += int(info.skipped)
                if logged:
                    flops = train_flops_per_token(cfg.model, self.seq_length) * batch_tokens
                    world = dist.get_world_size()
                    s = {"lm loss": loss, **over_stages({**aux_scalars(cfg.model, seqs // granule, self.device),
                                                          **self.load.scalars()}),
                         "learning-rate": lr, "batch-size": seqs, "grad-norm": info.grad_norm,
                         "params-norm": params_norm(self.chunks), "iteration-time": elapsed,
                         "throughput": flops / elapsed / world / 1e12,
                         "tokens-per-second": batch_tokens / elapsed, "consumed-tokens": self.tokens,
                         "stage": stage.index, "skipped-iterations": self.skipped, **self.data_scalars(),
                         "world-size": world, "data-dropped-samples": self.dropped_samples,
                         "loss-spikes": len(self.spikes.spikes) + (spike_median is not None),
                         "checkpoint-save-failures": self.checkpoints.failures,
                         **self.straggler.scalars(self.load.work_s, self.step),
                         "mfu": flops / elapsed / world / self.peak if self.peak else None}
                    if self.device.type == "cuda":
                        s["mem-allocated-bytes"] = torch.cuda.memory_allocated()
                        s["mem-max-allocated-bytes"] = torch.cuda.max_memory_allocated()
                    self.metrics.write(s, self.step, self.tokens)
                    rate = (self.tokens - start_tokens) / max(time.monotonic() - started, 1e-9)
                    log.info(console_line(self.step, stage.name, s, max(0.0, stage.end_tokens - self.tokens) / rate,
                                          max(0.0, total - self.tokens) / rate))
                if spike_median is not None and self.on_spike(loss, spike_median):
                    continue  # rewound: the step and the loader are the checkpoint's
                if t.eval_every and self.step % t.eval_every == 0:
                    watchdog.enter("validation", self.step)
                    v = self.validate(stage)
                    self.metrics.write(v, self.step, self.tokens)
                    log.info(f"step {self.step:>6} [{stage.name}] validation: lm loss {v['lm loss validation']:.4f}, "
                             f"ppl {v['validation ppl']:.2f}")
                self.checkpoints.finish()
                if t.save_every and self.step % t.save_every == 0:
                    self.checkpoints.save(required=False)
                if stop.should_stop():
                    log.warning(f"stopping early ({stop.reason}): saving step {self.step}")
                    self.checkpoints.final()
                    return EXIT_RESUME
        finally:
            stop.restore()
            self.metrics.close()


def _all_gather_dp(obj) -> list:
    """`obj` of every data-parallel rank, in data-parallel rank order."""
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group()
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def check_impl_for_stages(cfg: Config, impl: str) -> None:
    """What a layer implementation cannot do in some stage, refused naming the stage and field:
    Megatron's unfused attention (`local`) has no context parallelism; Transformer Engine (`te`) would
    receive packed documents as a dense mask under its causal mask type, which it may ignore (the
    documents would see each other, silently): this project hands packed rows to TE as segment ids
    only, and cannot check TE's THD path on any machine here."""
    from model.config import ConfigError

    where = cfg.sources.get("experiment", "experiment")
    for name in cfg.stages:
        layout, data = cfg.layout_of(name), cfg.stage_data[name]
        if impl == "local" and layout.context > 1:
            raise ConfigError(f"{where}: stages.{name}: parallel.context={layout.context} with train.impl=local: "
                              "Megatron-Core's unfused attention has no context parallelism; use train.impl=torch "
                              "(or auto)")
        if impl == "te" and data.packing == "best_fit":
            raise ConfigError(f"{where}: stages.{name}.packing=best_fit with train.impl=te: Transformer Engine's "
                              "attention would not keep packed documents apart (it takes them as THD with "
                              "cu_seqlens, which this project does not build); use train.impl=torch (or auto) for "
                              "this stage's run")


def preflight(cfg: Config) -> None:
    """What can be checked before any process group starts: every stage's layout against the launch's
    world size; enough micro-batches for the interleaved schedule; what the layer implementation
    cannot do in a stage (check_impl_for_stages); every stage's sources open (manifests only):
    missing data, mixed tokenizers, or a tokenizer with more ids than the model's vocabulary fail
    here, named."""

    from data import format as fmt
    from data.loader import open_sources
    from model.config import ConfigError
    from model.build import resolve_impl
    from pretrain import elastic
    from pretrain.parallel import slurm_environment

    world = int(os.environ.get("WORLD_SIZE") or slurm_environment().get("WORLD_SIZE") or 1)
    cfg.validate(world_size=world)
    problem = elastic.batch_problem(cfg, world)
    if problem:
        raise ConfigError(f"{problem}: the global batch must split evenly over the {world} process(es) of this "
                          "launch (glm-plan --nodes shows the sizes that work)")
    t = cfg.train
    for name in cfg.stages:
        p, seq = cfg.layout_of(name), cfg.stage_data[name].seq_length
        if p.virtual_stages == 1:
            continue
        # the interleaved schedule runs micro-batches in groups of `pipeline`: it needs that many
        granule = t.micro_batch_size * p.data(world)
        fewest = schedules.batch_sequences(0, t.batch_start_tokens, t.global_batch_tokens, t.batch_ramp_tokens,
                                           seq, granule, t.batch_ramp_increment_tokens) // granule
        if fewest < p.pipeline:
            raise ConfigError(
                f"{cfg.sources.get('experiment', 'experiment')}: train.batch_start_tokens={t.batch_start_tokens} "
                f"gives {fewest} micro-batch(es) per data-parallel replica at sequence length {seq} "
                f"(stages.{name}); the interleaved schedule (parallel.virtual_stages={p.virtual_stages}) needs at "
                f"least parallel.pipeline={p.pipeline}")
    try:
        impl = resolve_impl(t.impl)
    except RuntimeError as e:  # impl=te without Transformer Engine
        raise ConfigError(f"{cfg.sources.get('experiment', 'train')}: train.{e}") from None
    check_impl_for_stages(cfg, impl)

    for name, data in cfg.stage_data.items():
        try:
            open_sources(data, cfg.model.vocab_size)
        except fmt.DataError as e:
            raise fmt.DataError(f"stages.{name} (data={cfg.stages[name].data}): {e}") from None


def train(cfg: Config) -> int:
    """Run (or resume) the training in cfg.run.dir; returns the exit code (pretrain/faults.py)."""
    from pretrain.parallel import init_distributed, shutdown_distributed

    from pretrain.checkpoint import stage_to_resume

    run_dir = Path(cfg.run.dir)
    stage = stage_to_resume(run_dir)  # the layout is the stage's: decided before any process group starts
    cfg.parallel = cfg.layout_of(stage)
    # the process groups' own timeout is a backstop behind the watchdog's (pretrain/watchdog.py)
    init_distributed(cfg.parallel, seed=cfg.train.seed,
                     timeout_s=int(watchdog.backstop_s(cfg.faults.watchdog, run_dir)))
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir)
        if trainer.rank == 0:
            log.info(f"{cfg.experiment or 'run'} in {run_dir}: {dist.get_world_size()} process(es), layout "
                     f"{cfg.parallel.describe(dist.get_world_size())}"
                     + (f" (stage '{stage or next(iter(cfg.stages))}')"
                        if len(set(map(str, cfg.stage_parallel.values()))) > 1 else "")
                     + f", {trainer.stages.total_tokens:,.0f} tokens in {len(trainer.stages.list)} "
                     f"stage(s), dtype {str(trainer.dtype).replace('torch.', '')}, peak {trainer.peak / 1e12:.2f} "
                     f"TFLOP/s ({trainer.peak_source})")
        if not trainer.checkpoints.resume() and trainer.rank == 0:
            log.info("starting from scratch (no checkpoint in this run directory)")
        code = trainer.run()
        watchdog.enter("shutdown", trainer.step)
        if code == EXIT_RESUME and trainer.rank == 0:
            log.warning(f"stopped at step {trainer.step}, checkpoint {trainer.checkpoints.storage.latest()} saved: start the "
                        f"same command again to resume (exit {EXIT_RESUME}; torchrun reports it as a failed worker)")
        # every rank has closed its files before any exits: a launcher that ends the others when
        # the first one exits (torchrun, srun --kill-on-bad-exit) cuts nothing short
        if dist.get_world_size() > 1:
            dist.barrier()
        return code
    finally:
        if trainer is not None:
            # the loader's worker processes end now: they ignore SIGTERM (a scheduler's stop signal is
            # the training process's to act on, data/loader.py), so the interpreter's exit, which
            # terminates and joins its children, would wait for them for good
            trainer.close_loader()
        shutdown_distributed()

