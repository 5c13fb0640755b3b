"""What Megatron-Core 0.16 needs to run on a machine without CUDA, in one place.

`install()` changes nothing CUDA-related when CUDA is available: the GPU path never goes through
those patches. One patch is about Transformer Engine, not CUDA, and applies wherever it is missing
(`te_general_gemm`, below), on a GPU too.
Each patch names the Megatron-Core code that needs it; tests/test_cpu_support.py checks each one.
What is *not* patched here because configuration avoids it: the alltoall token dispatcher creates
a CUDA stream in its constructor, so CPU runs use the allgather dispatcher (same numbers).
"""

from __future__ import annotations

import logging

import torch

_installed = False


class _DropCpuRngWarning(logging.Filter):
    # On CPU the "CUDA" RNG tracked by Megatron's RNG tracker *is* the CPU generator, so its check
    # that the CPU state did not change inside `fork()` fires on every random op; it means nothing.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


class _TorchAllocatingOnCpu:
    """`torch` as Megatron's pipeline schedules see it on a CPU-only machine: the same module,
    except that tensors asked for on "cuda" are made on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kw):
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return torch.zeros(*args, device=device, **kw)


def _name_missing_te_gemm() -> None:
    # The router's gating GEMM tests `te_general_gemm is not None`, but the name is only bound
    # when Transformer Engine imports, so without it the router raises NameError, on CPU and GPU
    # alike. With Transformer Engine present the name exists and this does nothing.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _keep_on_cpu(setup):
    """`setup` run with `Tensor.cuda()` returning the tensor itself."""

    def wrapped(*args, **kwargs):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return setup(*args, **kwargs)
        finally:
            torch.Tensor.cuda = cuda

    wrapped.__wrapped__ = setup
    return wrapped


def _pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    # Megatron's `get_pos_emb_on_this_cp_rank` keeps this context-parallel rank's chunks of the
    # rotary table (chunks r and 2N-1-r) through an index it builds in pinned memory and moves with
    # `.cuda()`; pinned memory needs CUDA. The same chunks, indexed on the table's device.
    from model import context_parallel

    where = context_parallel.positions(pos_emb.shape[seq_dim], cp_group.size(), cp_group.rank(), pos_emb.device)
    return pos_emb.index_select(seq_dim, where)


def install() -> bool:
    """Patch Megatron-Core for CPU execution if CUDA is absent. Idempotent. Returns True if active."""
    global _installed
    _name_missing_te_gemm()
    if torch.cuda.is_available():
        return False
    if _installed:
        return True

    # Router buffers (expert_bias, tokens-per-expert), the router's weight move, DDP grad buffers
    # and dist-checkpointing all pass `device=torch.cuda.current_device()`.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # dist_checkpointing and the timers synchronise the device before and after I/O.
    torch.cuda.synchronize = lambda device=None: None

    # model_parallel_cuda_manual_seed() and the RNG tracker keep per-rank "CUDA" generator states
    # (tensor-parallel, expert-parallel and data-parallel streams). On CPU those streams are states
    # of the CPU generator, so initialisation under `fork()` still differs per rank as on GPU.
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.manual_seed = torch.manual_seed
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    logging.getLogger(mrandom.__name__).addFilter(_DropCpuRngWarning())

    # The unfused softmax builds its default causal mask with device="cuda".
    from megatron.core.fusions import fused_softmax

    fused_softmax.get_default_causal_mask = _cpu_causal_mask

    # Every schedule, the no-pipelining one included, allocates its token counter with
    # `torch.zeros([], dtype=torch.int, device="cuda")` (pipeline_parallel/schedules.py).
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchAllocatingOnCpu()

    # Under pipeline parallelism the last stage holds a copy of the word embedding for MTP, and
    # `LanguageModule.setup_embeddings_and_output_layer` (run at model construction) moves it with
    # `weight.data.cuda()` before the all-reduce that makes it equal to the first stage's.
    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _keep_on_cpu(LanguageModule.setup_embeddings_and_output_layer)

    # Context parallelism: RoPE keeps this rank's chunks of its table (see the function above).
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding

    rope_utils.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank

    _installed = True
    return True
