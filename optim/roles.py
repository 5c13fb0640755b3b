"""Which optimizer each parameter gets, decided by what the parameter is, not by its shape.

Muon: every matrix that maps one activation space to another: attention QKV (split into Q, K
and V) and output projections, dense-MLP gate/up (split) and down, each routed expert's
gate/up (split) and down separately, shared experts, the MTP projection, and the router.
AdamW: the word embedding and output layer (rows are looked up or scored one token at a time,
not applied as a linear map to a whole activation), biases and RMSNorm weights.

The router weight [experts, hidden] gets Muon, as in GLM-4.5 (only embedding, biases and
norms are excluded there): it is a linear map from the hidden state to expert scores like any
projection, and an orthogonalised update moves all expert rows at a comparable rate instead of
letting the most-used experts' rows dominate. The expert bias is not a parameter: Megatron-Core
keeps it as a buffer and moves it by loss-free balancing (a fixed step against each expert's load
error, in finalize_model_grads), so no optimizer touches it and no weight decay pulls it to zero.

A parameter no rule knows is an error, so a new module never silently gets the wrong optimizer.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

import torch

from model import sharding
from optim import newton_schulz


@dataclass(frozen=True)
class Split:
    """How a whole weight splits into the matrices that are orthogonalised separately."""
    kind: str = "whole"  # whole | gate_up | qkv
    groups: int = 1  # qkv: query groups
    sizes: tuple = ()  # qkv: rows of Q, K, V per group

    def shapes(self, rows: int, cols: int) -> list[tuple[int, int]]:
        if self.kind == "gate_up":
            return [(rows // 2, cols)] * 2
        if self.kind == "qkv":
            return [(self.groups * s, cols) for s in self.sizes]
        return [(rows, cols)]

    def views(self, w: torch.Tensor) -> list[torch.Tensor]:
        """The blocks of a whole weight as views of it: gate and up halves; Q, K and V as
        [groups, rows per group, cols] slices; or the weight itself."""
        if self.kind == "gate_up":
            return list(w.chunk(2, 0))
        if self.kind == "qkv":
            return list(w.view(self.groups, sum(self.sizes), w.size(-1)).split(list(self.sizes), 1))
        return [w]

    def block(self, w: torch.Tensor, j: int) -> torch.Tensor:
        """Matrix `j` of those orthogonalised separately (Q, K or V gathered over the query groups:
        a copy)."""
        return self.views(w)[j].reshape(-1, w.size(-1))

    def blocks(self, w: torch.Tensor) -> list[torch.Tensor]:
        return [self.block(w, j) for j in range(len(self.shapes(*w.shape)))]

    def put(self, w: torch.Tensor, j: int, block: torch.Tensor) -> None:
        """Write matrix `j` (shaped as `blocks(w)[j]`) back into `w`, in place."""
        view = self.views(w)[j]
        view.copy_(block.reshape(view.shape))

    def describe(self, rows: int, cols: int) -> str:
        shapes = self.shapes(rows, cols)
        names = {"gate_up": ["gate", "up"], "qkv": ["Q", "K", "V"]}.get(self.kind, [""])
        return ", ".join(f"{n} {r}x{c}".strip() for n, (r, c) in zip(names, shapes))


@dataclass
class Role:
    name: str  # whole-model name (global layer and expert ids)
    param: torch.nn.Parameter
    what: str
    side: str  # muon | adam
    decay: bool
    split: Split
    whole_shape: tuple  # the unsharded shape
    tp_dim: int | None  # partition dim when sharded over a tensor-parallel group of size > 1
    expert: bool  # routed expert: data-parallel over the expert-data-parallel group

    def block_shapes(self) -> list[tuple[int, int]]:
        return self.split.shapes(*self.whole_shape) if self.side == "muon" else []

    def cost(self, ns_steps: int) -> int:
        """FLOPs of this parameter's update, the weight for spreading work over ranks."""
        if self.side == "adam":
            return 16 * self.param.numel()
        return sum(newton_schulz.flops(r, c, ns_steps) for r, c in self.block_shapes())


# (pattern on the whole-model name, what it is, side, weight decay, split)
_RULES = [
    (r"^embedding\.word_embeddings\.weight$", "word embedding", "adam", True, "whole"),
    (r"^output_layer\.weight$", "output layer", "adam", True, "whole"),
    (r"\.bias$", "bias", "adam", False, "whole"),
    (r"(layernorm|norm)\.weight$", "RMSNorm weight", "adam", False, "whole"),
    (r"\.linear_qkv\.weight$", "attention QKV", "muon", True, "qkv"),
    (r"\.self_attention\.linear_proj\.weight$", "attention output", "muon", True, "whole"),
    (r"\.mlp\.experts\..*linear_fc1\.weight$", "routed expert gate/up", "muon", True, "gate_up"),
    (r"\.mlp\.experts\..*linear_fc2\.weight$", "routed expert down", "muon", True, "whole"),
    (r"\.mlp\.shared_experts\.linear_fc1\.weight$", "shared expert gate/up", "muon", True, "gate_up"),
    (r"\.mlp\.shared_experts\.linear_fc2\.weight$", "shared expert down", "muon", True, "whole"),
    (r"\.mlp\.linear_fc1\.weight$", "dense MLP gate/up", "muon", True, "gate_up"),
    (r"\.mlp\.linear_fc2\.weight$", "dense MLP down", "muon", True, "whole"),
    (r"\.mlp\.router\.weight$", "router", "muon", True, "whole"),
    (r"\.eh_proj\.weight$", "MTP projection", "muon", True, "whole"),
]
_RULES = [(re.compile(p), *rest) for p, *rest in _RULES]


def _whole_shape(name: str, param: torch.nn.Parameter) -> tuple[tuple, int | None]:
    shape = list(param.shape)
    if not getattr(param, "tensor_model_parallel", False):
        return tuple(shape), None
    _, size, _ = sharding.tp_split(name)
    if size == 1:
        return tuple(shape), None
    shape[param.partition_dim] *= size
    return tuple(shape), param.partition_dim


def assign(model, muon: bool = True, qkv_split: str = "qkv") -> list[Role]:
    """The role of every trainable parameter of this rank's model chunk, in model order.

    muon=False puts everything on the AdamW side (decay on matrices only): the baseline.
    """
    config = model.config
    qkv = Split("qkv", config.num_query_groups,
                (config.num_attention_heads // config.num_query_groups * config.kv_channels,
                 config.kv_channels, config.kv_channels))
    roles = []
    for local, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = sharding.whole_name(local, model)
        rule = next((r for r in _RULES if r[0].search(name)), None)
        if rule is None:
            raise KeyError(f"no optimizer rule for parameter {name} {tuple(param.shape)}: "
                           f"add one to optim/roles.py")
        _, what, side, decay, split = rule
        split = qkv if split == "qkv" and qkv_split == "qkv" else Split(split if split != "qkv" else "whole")
        if not muon:
            side, decay, split = "adam", param.dim() >= 2, Split()
        whole, tp_dim = _whole_shape(name, param)
        roles.append(Role(name, param, what, side, decay, split if side == "muon" else Split(),
                          whole, tp_dim, ".mlp.experts." in name))
    return roles


_IDS = re.compile(r"\.(\d+)\.")


def table(roles: list[Role]) -> str:
    """One line per kind of parameter (layer and expert ids folded into `*`), for the start-up log."""
    rows: "OrderedDict[tuple, list]" = OrderedDict()
    for r in roles:
        pattern = _IDS.sub(".*.", _IDS.sub(".*.", r.name))
        key = (pattern, r.whole_shape, r.side, r.decay, r.split.describe(*r.whole_shape) if r.side == "muon" else "")
        rows.setdefault(key, [r.what, 0, 0])
        rows[key][1] += 1
        rows[key][2] += r.param.numel()
    head = ("parameter", "count", "whole shape", "optimizer", "orthogonalised as", "decay", "what")
    lines = [(p, str(n), "x".join(map(str, shape)), side, split, "yes" if decay else "no", what)
             for (p, shape, side, decay, split), (what, n, _) in rows.items()]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    muon = sum(r.param.numel() for r in roles if r.side == "muon")
    total = sum(r.param.numel() for r in roles) or 1
    out.append(f"Muon: {muon:,} parameters on this rank ({100 * muon / total:.1f}%); "
               f"AdamW: {total - muon:,}. The expert bias is a buffer moved by loss-free balancing, "
               f"not by the optimizer.")
    return "\n".join(out)
