"""Running the Megatron-Core model in tests."""

import torch


def positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)


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
