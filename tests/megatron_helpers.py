"""Running the Megatron-Core model in tests."""

import torch

from model.build import position_ids as positions  # noqa: F401  (the tests' name for it)


def logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(main logits, MTP logits), each [batch, seq, vocab], from one forward pass.

    GPTModel returns only the loss when MTP is on, so the output layer's results are captured: it
    runs once per MTP layer first, then for the main head. They are cloned because the loss
    (vocab-parallel cross-entropy) then works in place on the logits.
    """
    seen = []
    hook = model.output_layer.register_forward_hook(lambda mod, inp, out: seen.append(out[0].clone()))
    try:
        model(ids, positions(ids), None, labels=ids)
    finally:
        hook.remove()
    main = seen[-1].transpose(0, 1)
    mtp = seen[0].transpose(0, 1) if len(seen) > 1 else None
    return main, mtp


def segments_of(lengths: list[int], seq: int) -> torch.Tensor:
    """One packed row's segment ids: documents 1, 2, ... of the given lengths, then padding (0)."""
    seg = torch.zeros(seq, dtype=torch.long)
    at = 0
    for k, n in enumerate(lengths, 1):
        seg[at:at + n] = k
        at += n
    return seg


def tiny_in_ddp(parallel, state_path: str, impl: str = "local"):
    """(model config, model, Megatron DDP wrapper) of the tiny model on this rank, with the whole-model
    state saved at state_path. Megatron's process groups must exist."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from model.build import build_model
    from model.sharding import load_whole_state
    from pretrain.config import compose

    cfg = compose(["model=tiny"]).model
    model = build_model(cfg, parallel, impl=impl)
    load_whole_state(model, torch.load(state_path))
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    return cfg, model, ddp


def data_parallel_share(ids: torch.Tensor) -> torch.Tensor:
    """This data-parallel replica's rows of a global batch."""
    from megatron.core import parallel_state as ps

    return ids.chunk(ps.get_data_parallel_world_size())[ps.get_data_parallel_rank()]
