"""This toolkit against a peer on the same model shape and the same device, in one run: forward +
backward (loss included) of our `torch` path and of torchtitan's MoE decoder (its Qwen3 model: GQA
with QK-Norm, the common MoE block with a sigmoid top-k router, expert bias, shared expert and
`torch._grouped_mm` experts). Tokens/s, TFLOP/s and MFU by one FLOP formula for both
(model/accounting.py, on our config of the shape), peak memory, and the ratio of each to ours.

What differs, and stays different: the peer rotates the whole head (GLM rotates half of it:
partial RoPE), has no MTP (ours runs with `--mtp 0` unless asked), has no q/k/v bias, computes its
loss as a plain cross-entropy over bf16 logits (ours: Megatron's fused loss), and uses
FlexAttention compiled by itself (ours: SDPA for unpacked rows). `--balanced` forces both routers
to a uniform expert load (Megatron's moe_router_force_load_balancing, torchtitan's
_debug_force_load_balance), so that neither side's speed depends on how its random
initialisation happens to route.

torchtitan is not a dependency of this project: `pip install torchtitan==0.3.0` with its small
dependencies (`--peer-wheels DIR` downloads them into DIR for a machine without a network; pass the
same DIR there, or `--peer-path` a directory that holds them unpacked). Without it the peer's row
says why and the run still exits 0. On a CPU the peer runs forward only: FlexAttention has no
backward there. torchtitan's expert-parallel kernels import triton at module level, which the CPU
build of torch lacks; they are not used on one device and are stood in for when triton is missing.

  python benchmarks/peer_step.py [--model glm45_air] [--layers 4] [--batch 1] [--seq 4096]
                                 [--balanced] [--mtp N] [--steps 5] [--peer-path DIR]
  python benchmarks/peer_step.py --smoke            # the CPU, a tiny shape: both sides if they import
  python benchmarks/peer_step.py --peer-wheels DIR  # download torchtitan and what it needs here
"""

from __future__ import annotations

import argparse
import gc
import importlib
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_step import CUDA, measure, timed  # noqa: E402

PEER = "torchtitan==0.3.0"
# what torchtitan's model code imports (its trainer's dependencies, datasets, wandb, ..., are not needed)
PEER_DEPENDENCIES = ("tyro", "docstring_parser", "typeguard", "shtab", "einops", "spmd_types==0.2.3")
_TRITON_KERNELS = "torchtitan.distributed.minimal_async_ep.kernels"


def fetch_wheels(directory: Path) -> None:
    """Download the peer and the dependencies its model code needs, without theirs, into `directory`,
    and unpack them into `directory`/site (pure-Python wheels; torchtitan has namespace packages,
    which do not import from a zip)."""
    import zipfile

    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(directory), PEER,
                    *PEER_DEPENDENCIES], check=True)
    for wheel in sorted(directory.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(directory / "site")
    print(f"{directory}: {', '.join(sorted(p.name for p in directory.glob('*.whl')))}; unpacked in "
          f"{directory / 'site'} (pass --peer-path {directory})")


def import_peer(path: str | None):
    """torchtitan's Qwen3 building blocks, or the reason they do not import."""
    if path:
        root = Path(path)
        sys.path.insert(0, str(root / "site" if (root / "site").is_dir() else root))
    try:
        importlib.import_module("triton")
    except ImportError:  # CPU torch: the expert-parallel kernels (unused on one device) cannot compile
        stub = types.ModuleType(_TRITON_KERNELS)
        for name in ("copy_full_counts_to_peers_kernel", "copy_rows_to_peers_kernel", "expand_topk_grad_kernel",
                     "fill_combine_metadata_kernel", "fill_dispatch_metadata_kernel", "invert_flat_indices_kernel",
                     "reduce_topk_slots_kernel", "topk_scores_grad_kernel"):
            setattr(stub, name, None)
        sys.modules.setdefault(_TRITON_KERNELS, stub)
    try:
        qwen3 = importlib.import_module("torchtitan.models.qwen3")
        common = importlib.import_module("torchtitan.models.common")
        utils = importlib.import_module("torchtitan.models.common.config_utils")
        norms = importlib.import_module("torchtitan.models.common.nn_modules")
    except Exception as e:  # noqa: BLE001  (any import failure is a reason to report, not to crash)
        return None, f"{type(e).__name__}: {e}"
    return types.SimpleNamespace(qwen3=qwen3, common=common, utils=utils, norms=norms), ""


def peer_config(t, cfg, seq: int, balanced: bool):
    """torchtitan's Qwen3Model.Config of our model's shape: the same widths, heads, experts, top-k,
    shared expert, first dense layers, vocabulary and RoPE base."""
    from functools import partial

    import torch.nn as nn

    init = {"weight": partial(nn.init.normal_, std=cfg.init_std), "bias": nn.init.zeros_}
    out_init = {"weight": partial(nn.init.normal_, std=cfg.init_std / (2 * cfg.num_layers) ** 0.5),
                "bias": nn.init.zeros_}
    experts_init = {"w1_EFD": init["weight"], "w3_EFD": init["weight"], "w2_EDF": out_init["weight"]}

    def norm(dim):
        return t.norms.RMSNorm.Config(normalized_shape=dim, eps=cfg.rms_norm_eps, param_init={"weight": nn.init.ones_})

    rope = t.common.CosSinRoPE.Config(dim=cfg.head_dim, max_seq_len=max(seq, 4096), theta=cfg.rope_theta)
    layers = []
    for i in range(cfg.num_layers):
        attention = t.utils.make_gqa_config(
            dim=cfg.hidden_size, n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_query_groups,
            head_dim=cfg.head_dim, wqkv_param_init=init, wo_param_init=out_init,
            inner_attention=t.utils.get_attention_config("flex"), fuse_qkv=True, rope=rope,
            qk_norm=norm(cfg.head_dim) if cfg.qk_norm else None)
        if i < cfg.first_k_dense:
            mlp = {"feed_forward": t.utils.make_ffn_config(dim=cfg.hidden_size, hidden_dim=cfg.ffn_hidden_size,
                                                           w1_param_init=init, w2w3_param_init=out_init)}
        else:
            router = t.utils.make_router_config(
                dim=cfg.hidden_size, num_experts=cfg.num_experts, gate_param_init=init, top_k=cfg.moe_router_topk,
                score_func="sigmoid", route_norm=cfg.norm_topk_prob, route_scale=cfg.routed_scaling_factor)
            router._debug_force_load_balance = balanced
            shared = (t.utils.make_ffn_config(dim=cfg.hidden_size,
                                              hidden_dim=cfg.moe_ffn_hidden_size * cfg.num_shared_experts,
                                              w1_param_init=init, w2w3_param_init=out_init)
                      if cfg.num_shared_experts else None)
            mlp = {"moe": t.utils.make_moe_config(
                num_experts=cfg.num_experts, router=router,
                routed_experts=t.utils.make_routed_experts_config(
                    dim=cfg.hidden_size, hidden_dim=cfg.moe_ffn_hidden_size, num_experts=cfg.num_experts,
                    top_k=cfg.moe_router_topk, param_init=experts_init, comm_backend="standard"),
                shared_experts=shared, load_balance_coeff=1e-3)}  # the expert bias, as ours
        layers.append(t.qwen3.Qwen3TransformerBlock.Config(attention_norm=norm(cfg.hidden_size),
                                                            ffn_norm=norm(cfg.hidden_size), attention=attention,
                                                            **mlp))
    return t.qwen3.Qwen3Model.Config(
        vocab_size=cfg.vocab_size, dim=cfg.hidden_size, norm=norm(cfg.hidden_size),
        tok_embeddings=t.common.Embedding.Config(num_embeddings=cfg.vocab_size, embedding_dim=cfg.hidden_size,
                                                 param_init={"weight": init["weight"]}),
        lm_head=t.common.Linear.Config(in_features=cfg.hidden_size, out_features=cfg.vocab_size, param_init=init),
        layers=layers)


def measure_peer(t, cfg, dtype, batch: int, seq: int, steps: int, balanced: bool) -> dict:
    device = torch.device("cuda" if CUDA else "cpu")
    torch.manual_seed(0)
    with torch.device(device):
        model = peer_config(t, cfg, seq, balanced).build()
        model.init_weights() if hasattr(model, "init_weights") else None
    model = model.to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    pos = torch.arange(seq, device=device).expand(batch, seq)
    masks = model.get_attention_masks(pos)
    backward = CUDA  # FlexAttention has no backward on a CPU

    def step():
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):
            logits = model(ids, pos, masks)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
        if backward:
            loss.backward()

    seconds, peak = timed(step, steps)
    return {"s": seconds, "tokens/s": batch * seq / seconds, "backward": backward, "peak GiB": peak,
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="configs/model member (default glm45_air on a GPU, tiny on a CPU)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 4 on a GPU, the model's on a CPU)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 4096 on a GPU, 128 on a CPU)")
    ap.add_argument("--mtp", type=int, default=0, help="our MTP layers (the peer has none; default 0: the same shape)")
    ap.add_argument("--balanced", action="store_true", help="force a uniform expert load on both sides")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="a tiny shape on whatever device: does everything run")
    ap.add_argument("--peer-path", default=None, help="a directory holding torchtitan (wheels or unpacked)")
    ap.add_argument("--peer-wheels", default=None, metavar="DIR", help="download the peer's wheels into DIR, then exit")
    ap.add_argument("overrides", nargs="*", help="model overrides, e.g. model.num_experts=32")
    args = ap.parse_args(argv)
    if args.peer_wheels:
        fetch_wheels(Path(args.peer_wheels))
        return 0

    from model import quiet_megatron_warnings
    from model.accounting import train_flops_per_token
    from pretrain.config import compose
    from pretrain.metrics import peak_flops
    from pretrain.parallel import single_process

    quiet_megatron_warnings()
    small = args.smoke or not CUDA
    model_name = args.model or ("tiny" if small else "glm45_air")
    seq = args.seq or (128 if small else 4096)
    layers = args.layers or (None if small else 4)
    overrides = [f"model={model_name}", f"model.mtp_num_layers={args.mtp}", *args.overrides]
    if layers:
        overrides.append(f"model.num_layers={layers}")
    cfg = compose(overrides).model
    dtype = torch.bfloat16 if CUDA else torch.float32
    device = torch.device("cuda" if CUDA else "cpu")
    peak, peak_source = peak_flops(device, dtype)
    flops_per_token = train_flops_per_token(cfg, seq)
    where = torch.cuda.get_device_name() if CUDA else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}; torch {torch.__version__}; {cfg.name} widths, {cfg.num_layers} layers ({cfg.first_k_dense} dense), "
          f"{cfg.num_experts} experts top-{cfg.moe_router_topk} + {cfg.num_shared_experts} shared, MTP {cfg.mtp_num_layers}; "
          f"{args.batch} x {seq} tokens; {str(dtype)[6:]}; {'balanced' if args.balanced else 'learned'} routing; "
          f"{flops_per_token / 1e9:.3f} GFLOP/token (model/accounting.py, both rows); peak {peak / 1e12:.2f} TFLOP/s "
          f"({peak_source})")

    rows = []
    with single_process():
        fields = {"moe_router_force_load_balancing": True} if args.balanced else {}
        try:
            ours = measure(cfg, "torch", dtype, args.batch, seq, args.steps, False, False, fields)
        except torch.OutOfMemoryError:
            ours = None
        rows.append(("glm-pretrain (torch)", ours, "" if ours else "out of memory"))
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
    peer, why = import_peer(args.peer_path)
    if peer is None:
        rows.append(("torchtitan", None, f"not run: {why} (pip install {PEER}, or --peer-path)"))
    else:
        try:
            r = measure_peer(peer, cfg, dtype, args.batch, seq, args.steps, args.balanced)
            rows.append(("torchtitan" + ("" if r["backward"] else " (forward only)"), r, ""))
        except torch.OutOfMemoryError:
            rows.append(("torchtitan", None, "out of memory"))
        except Exception as e:  # noqa: BLE001  (the peer's own failure is a result to report)
            rows.append(("torchtitan", None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"))

    base = rows[0][1]
    print(f"\n{'':<30}{'params':>10}{'step':>10}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>8}{'peak mem':>11}"
          f"{'speed vs ours':>15}")
    for name, r, note in rows:
        if r is None:
            print(f"{name:<30}{note}")
            continue
        tflops = r["tokens/s"] * flops_per_token / 1e12
        mfu = f"{100 * tflops * 1e12 / peak:.1f}%" if peak else "-"
        ratio = f"{base['s'] / r['s']:.2f}x" if base and r.get("backward", True) else "-"
        memory = f"{r['peak GiB']:.1f}Gi" if CUDA else "-"
        params = f"{r['parameters'] / 1e6:.3f}M"
        print(f"{name:<30}{params:>10}{1000 * r['s']:>8.0f}ms{r['tokens/s']:>11,.0f}{tflops:>9.2f}{mfu:>8}{memory:>11}"
              f"{ratio:>15}")
    if any(r and not r.get("backward", True) for _, r, _ in rows):
        print("(forward only: its TFLOP/s and MFU count a whole training step's FLOPs and are not comparable)")
    print("(params differ by our q/k/v biases, and by MTP when --mtp is given)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
