"""Muon + AdamW for a Megatron-Core model chunk, exact under tensor, expert and data parallelism.

One step, on every rank:
  1. gradients: Megatron DDP's reduced `main_grad` (or `.grad` without DDP);
  2. one global L2 norm over both sides, each gradient counted once across all ranks, and one
     clipping factor for all of them;
  3. each rank updates only the parameters it owns (optim/owners.py): Muon momentum, then the
     whole matrices (tensor-parallel pieces gathered in one collective per group) are split into
     blocks (Q/K/V, gate/up, ...), stacked by shape and orthogonalised as batches; AdamW likewise;
  4. the owners' updated parameters are all-gathered over each data-parallel group.
With the same gradients, the result does not depend on the layout (tests/test_optim_parallel.py).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from model import sharding
from optim import newton_schulz, owners, roles as roles_mod
from optim.config import OptimConfig

log = logging.getLogger(__name__)

# Matrices stacked into one batched Newton-Schulz call at most (elements), bounding its memory.
_BATCH_ELEMENTS = 1 << 28


def _per_batch(rows: int, cols: int) -> int:
    return max(1, _BATCH_ELEMENTS // (rows * cols))


def muon_workspace_bytes(blocks: dict[tuple[int, int], int], ns_dtype: torch.dtype, tp_elements: float = 0.0,
                         tp: int = 1) -> float:
    """The most memory a Muon update allocates beyond parameters, gradients and state (everything
    else is done in place): for owned blocks counted by shape, the largest Newton-Schulz batch;
    with tensor parallelism, the whole matrices gathered from `tp_elements` local elements of
    tensor-parallel pieces (held through the orthogonalisation), and while gathering, the send
    buffer and the received pieces beside them."""
    ns = max((newton_schulz.workspace_bytes(min(n, _per_batch(r, c)), r, c, ns_dtype)
              for (r, c), n in blocks.items()), default=0)
    if tp == 1:
        return float(ns)
    return max(4 * (1 + 2 * tp) * tp_elements, 4 * tp * tp_elements + ns)


def step_workspace_bytes(blocks: dict[tuple[int, int], int], ns_dtype: torch.dtype, tp_elements: float, tp: int,
                         owned: list[list[float]], element_bytes: int) -> float:
    """The most memory a step allocates beyond parameters, gradients and state: the Muon update's
    (`muon_workspace_bytes`) or the all-gather of updated parameters over each data-parallel group
    (`owned`: per group, the elements each rank owns; `owners.share_bytes`), whichever is larger.
    AdamW works in place."""
    share = max((owners.share_bytes(counts, element_bytes) for counts in owned), default=0.0)
    return max(muon_workspace_bytes(blocks, ns_dtype, tp_elements, tp), share)


# The fp32 tensors kept for each parameter its rank owns, by side; plus an fp32 master copy of a
# parameter that is not itself fp32.
MOMENTS = {"muon": ("momentum",), "adam": ("exp_avg", "exp_avg_sq")}


def state_bytes(side: str, numel: float, param_dtype: torch.dtype) -> float:
    """Bytes of optimizer state for a parameter of `numel` elements on its owner rank."""
    return 4 * numel * (len(MOMENTS[side]) + (param_dtype != torch.float32))


@dataclass
class StepInfo:
    grad_norm: float
    clip_factor: float
    skipped: bool


def _groups(expert: bool):
    if not dist.is_initialized():
        return None
    return ps.get_expert_data_parallel_group() if expert else ps.get_data_parallel_group(with_context_parallel=True)


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


class Optimizer:
    def __init__(self, model, cfg: OptimConfig):
        """`model`: this rank's model chunk, or its list of chunks (virtual pipeline stages)."""
        self.cfg = cfg.validate()
        self.model = model
        self.roles = [r for chunk in sharding.chunks_of(model)
                      for r in roles_mod.assign(chunk, muon=cfg.name == "muon", qkv_split=cfg.muon.qkv_split)]
        self.coefficients = cfg.coefficients()
        device = self.roles[0].param.device if self.roles else torch.device("cpu")
        self.ns_dtype = newton_schulz.resolve_dtype(cfg.muon.ns_dtype, device)
        # Deal each data-parallel group's parameters over its ranks by cost.
        self.by_rank: dict[bool, list[list[roles_mod.Role]]] = {}
        self.loads: dict[bool, list[int]] = {}
        for expert in (False, True):
            group = [r for r in self.roles if r.expert == expert]
            n = _size(_groups(expert))
            costs = [r.cost(cfg.muon.ns_steps) for r in group]
            deal = owners.deal(costs, n)
            self.by_rank[expert] = [[r for r, o in zip(group, deal) if o == k] for k in range(n)]
            self.loads[expert] = owners.loads(costs, deal, n)
        self.mine = [r for e in (False, True) for r in self.by_rank[e][_rank(_groups(e))]]
        self.reset()

    def reset(self) -> None:
        """Fresh state (zero moments, master copies of the current weights) and step count: at
        construction, and for weights loaded from elsewhere."""
        self.state: dict[str, dict[str, torch.Tensor]] = {r.name: self._new_state(r) for r in self.mine}
        self.steps = 0  # updates applied (AdamW bias correction counts these)
        self.skipped_in_a_row = 0

    def _new_state(self, role) -> dict[str, torch.Tensor]:
        p = role.param.detach()
        state = {"master": p.float().clone()} if p.dtype != torch.float32 else {}
        for name in MOMENTS[role.side]:
            state[name] = torch.zeros_like(p, dtype=torch.float32)
        return state

    # ---- the step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, lr: float | None = None) -> StepInfo:
        lr = self.cfg.lr if lr is None else lr
        grads = [self._grad(r) for r in self.mine]
        norm = self._global_norm(grads)
        if not math.isfinite(norm):
            self.skipped_in_a_row += 1
            msg = (f"optimizer step skipped: gradient norm is {norm} "
                   f"({self.skipped_in_a_row} in a row, limit optim.max_skipped_steps={self.cfg.max_skipped_steps})")
            if self.skipped_in_a_row >= self.cfg.max_skipped_steps:
                raise FloatingPointError(msg + "; stopping rather than training without updates")
            log.warning(msg)
            return StepInfo(norm, 0.0, True)
        self.skipped_in_a_row = 0
        clip = self.cfg.clip_grad
        factor = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
        self.steps += 1
        # In place from here on: a gradient is DDP's fp32 `main_grad` (zeroed before the next
        # step) or a fp32 copy of `.grad`. Each full-size temporary would cost the whole model's
        # fp32 gradient again at the step's memory peak.
        grads = [g.float() for g in grads]
        if factor != 1.0:
            torch._foreach_mul_(grads, factor)
        muon = [(r, g) for r, g in zip(self.mine, grads) if r.side == "muon"]
        adam = [(r, g) for r, g in zip(self.mine, grads) if r.side == "adam"]
        if muon:
            self.muon_update(lr, *zip(*muon))
        if adam:
            self._adam(lr, *zip(*adam))
        for expert in (False, True):
            ranks = self.by_rank[expert]
            owners.share([[r.param for r in rs] for rs in ranks], _groups(expert))
        return StepInfo(norm, factor, False)

    def zero_grad(self) -> None:
        """Drop `.grad` (Megatron DDP's `main_grad` buffers are zeroed by `zero_grad_buffer()`)."""
        for r in self.roles:
            r.param.grad = None

    @staticmethod
    def _grad(role) -> torch.Tensor:
        g = getattr(role.param, "main_grad", None)
        if g is None:
            g = role.param.grad
        return torch.zeros_like(role.param, dtype=torch.float32) if g is None else g

    def _global_norm(self, grads: list[torch.Tensor]) -> float:
        """L2 norm of the whole model's gradient: each owned gradient once; a dense parameter that
        every tensor-parallel rank holds whole (norms, router) only from tensor-parallel rank 0;
        the word embedding that Megatron duplicates on the last pipeline stage for MTP (marked
        `shared`) only from the first stage."""
        tp_rank = ps.get_tensor_model_parallel_rank() if dist.is_initialized() else 0
        counted = [g for r, g in zip(self.mine, grads) if (r.expert or r.tp_dim is not None or tp_rank == 0)
                   and not getattr(r.param, "shared", False)]
        norms = [n.double() for n in torch._foreach_norm([g.float() for g in counted])] if counted else []
        # A single fp32 sum of squares overflows from a norm of ~1.8e19; redo those in fp64.
        norms = [torch.linalg.vector_norm(g.double()) if not torch.isfinite(n) and torch.isfinite(g).all() else n
                 for n, g in zip(norms, counted)]
        sq = torch.stack(norms).square().sum() if norms else torch.zeros((), dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            sq = sq.to(grads[0].device if grads else sq.device)
            dist.all_reduce(sq)
        return math.sqrt(sq.item())

    def _apply(self, lr: float, roles, updates) -> None:
        """Decoupled weight decay, then p -= lr * update, on the fp32 master when there is one."""
        wd = self.cfg.weight_decay
        for role, u in zip(roles, updates):
            state = self.state[role.name]
            target = state.get("master", role.param)
            if role.decay and wd:
                target.mul_(1 - lr * wd)
            target.add_(u.to(target.dtype), alpha=-lr)
            if target is not role.param:
                role.param.copy_(target)

    @torch.no_grad()
    def muon_update(self, lr, roles, g) -> None:
        """Momentum, whole-matrix Newton-Schulz and the update for owned Muon `roles`, from their
        clipped fp32 gradients `g`, which become the updates (in place)."""
        m = self.cfg.muon
        bufs = [self.state[r.name]["momentum"] for r in roles]
        torch._foreach_lerp_(bufs, g, 1 - m.momentum)
        if m.nesterov:
            torch._foreach_lerp_(g, bufs, m.momentum)
        else:
            torch._foreach_copy_(g, bufs)
        wholes = self._gather_tp(roles, g)
        self._orthogonalize(roles, wholes)
        pieces = [sharding.shard(u, r.name, r.param) if r.tp_dim is not None else u for r, u in zip(roles, wholes)]
        self._apply(lr, roles, pieces)

    def _gather_tp(self, roles, pieces) -> list[torch.Tensor]:
        """Whole matrices from tensor-parallel pieces: one all-gather per tensor-parallel group."""
        out = list(pieces)
        split = [i for i, r in enumerate(roles) if r.tp_dim is not None]
        by_group = defaultdict(list)
        for i in split:
            by_group[roles[i].expert].append(i)
        for idx in by_group.values():
            _, size, group = sharding.tp_split(roles[idx[0]].name)
            flat = torch.cat([pieces[i].reshape(-1) for i in idx])
            gathered = torch.empty(size * flat.numel(), dtype=flat.dtype, device=flat.device)
            dist.all_gather_into_tensor(gathered, flat, group=group)
            gathered = gathered.view(size, -1)
            offset = 0
            for i in idx:
                n = pieces[i].numel()
                parts = [gathered[k, offset:offset + n].view_as(pieces[i]) for k in range(size)]
                out[i] = sharding.join_pieces(parts, roles[i].name, roles[i].tp_dim)
                offset += n
        return out

    def _orthogonalize(self, roles, wholes) -> None:
        """Replace each whole matrix by its update, in place: its blocks orthogonalised, same-shaped
        blocks as one batch of at most _BATCH_ELEMENTS, so the memory this needs beyond the
        matrices themselves is one batch's (`workspace_bytes`), whatever the model's size."""
        buckets = defaultdict(list)
        for i, r in enumerate(roles):
            for j, shape in enumerate(r.block_shapes()):
                buckets[shape].append((i, j))
        for (rows, cols), items in buckets.items():
            scale = newton_schulz.update_scale(rows, cols, self.cfg.muon.rms_scale)
            per_batch = _per_batch(rows, cols)
            for start in range(0, len(items), per_batch):
                chunk = items[start:start + per_batch]
                x = torch.stack([roles[i].split.block(wholes[i], j) for i, j in chunk])
                o = newton_schulz.orthogonalize(x, self.coefficients, self.ns_dtype).mul_(scale)
                del x
                for (i, j), oi in zip(chunk, o):
                    roles[i].split.put(wholes[i], j, oi)
                del o, oi  # before the next batch is stacked

    def _adam(self, lr, roles, g) -> None:
        a = self.cfg.adam
        m = [self.state[r.name]["exp_avg"] for r in roles]
        v = [self.state[r.name]["exp_avg_sq"] for r in roles]
        torch._foreach_lerp_(m, g, 1 - a.beta1)
        torch._foreach_mul_(v, a.beta2)
        torch._foreach_addcmul_(v, g, g, 1 - a.beta2)
        c1 = 1 - a.beta1 ** self.steps
        c2 = 1 - a.beta2 ** self.steps
        # the update m / c1 / (sqrt(v / c2) + eps), in place of the gradient, which is used up
        torch._foreach_copy_(g, v)
        torch._foreach_sqrt_(g)
        torch._foreach_div_(g, math.sqrt(c2))
        torch._foreach_add_(g, a.eps)
        for mi, gi in zip(m, g):
            torch.div(mi, gi, out=gi)
        torch._foreach_div_(g, c1)
        self._apply(lr, roles, g)

    # ---- reporting and state ----------------------------------------------------------------

    def workspace_bytes(self) -> float:
        """The most memory this rank's step allocates beyond parameters, gradients and state
        (`step_workspace_bytes`)."""
        blocks: dict[tuple[int, int], int] = defaultdict(int)
        tp_elements, tp = 0.0, 1
        for r in self.mine:
            for shape in r.block_shapes():
                blocks[shape] += 1
            if r.side == "muon" and r.tp_dim is not None:
                tp_elements += r.param.numel()
                tp = sharding.tp_split(r.name)[1]
        owned = [[sum(r.param.numel() for r in rs) for rs in self.by_rank[e]] for e in (False, True)]
        element = self.roles[0].param.element_size() if self.roles else 4
        return step_workspace_bytes(blocks, self.ns_dtype, tp_elements, tp, owned, element)


    def describe(self) -> str:
        """The assignment table and how evenly the work is dealt, for the start-up log."""
        lines = [roles_mod.table(self.roles)]
        for expert, name in ((False, "dense"), (True, "expert")):
            loads = self.loads[expert]
            if len(loads) > 1 and sum(loads):
                mean = sum(loads) / len(loads)
                lines.append(f"{name} parameters dealt over {len(loads)} data-parallel ranks: "
                             f"heaviest rank {max(loads) / mean:.3f}x the mean update cost")
        lines.append(f"Newton-Schulz: {len(self.coefficients)} steps in {str(self.ns_dtype).replace('torch.', '')}")
        return "\n".join(lines)

    def state_dict(self) -> dict:
        """This rank's state (owned parameters only), keyed by whole-model parameter names."""
        return {"steps": self.steps, "skipped_in_a_row": self.skipped_in_a_row,
                "state": {k: {n: t.clone() for n, t in s.items()} for k, s in self.state.items()}}

    def load_state_dict(self, sd: dict) -> None:
        missing = set(self.state) - set(sd["state"])
        if missing:
            raise KeyError(f"optimizer state lacks {len(missing)} parameters (first: {sorted(missing)[:3]})")
        for name, s in self.state.items():
            for k, t in s.items():
                if k not in sd["state"][name]:
                    raise KeyError(f"optimizer state of {name} lacks {k!r}")
                t.copy_(sd["state"][name][k])
        self.steps = int(sd["steps"])
        self.skipped_in_a_row = int(sd.get("skipped_in_a_row", 0))
