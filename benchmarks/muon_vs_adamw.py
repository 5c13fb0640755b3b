"""Loss per step of the tiny model trained with Muon (+AdamW for embedding, output, biases,
norms) against AdamW for everything, each at its best learning rate of a small sweep, on the
same batches: UTF-8 bytes (the tiny model's vocabulary is 256) of the embedded general corpus.

Done-when of the optimizer: Muon lowers the loss at least as fast per step as AdamW.

  .venv/bin/python benchmarks/muon_vs_adamw.py [--steps 300] [--lrs 1e-3,3e-3,1e-2]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from data.corpus import documents  # noqa: E402
from model.build import build_model, position_ids as positions  # noqa: E402
from optim.optimizer import Optimizer  # noqa: E402
from pretrain.config import compose  # noqa: E402
from pretrain.parallel import single_process  # noqa: E402


def byte_stream(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) token streams: bytes of the general corpus, documents split 95/5."""
    docs = list(documents("general"))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=g).tolist()
    cut = len(docs) * 95 // 100
    def cat(ids):
        return torch.tensor(list(b"\n".join(docs[i].text.encode() for i in ids)), dtype=torch.long)
    return cat(order[:cut]), cat(order[cut:])


def batches(stream: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq - 1, (steps, batch), generator=g)
    return [torch.stack([stream[s:s + seq + 1] for s in row.tolist()]) for row in starts]


def loss_of(model, window: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss: inputs are the window without its last byte, labels shifted by one."""
    ids, labels = window[:, :-1], window[:, 1:]
    return model(ids, positions(ids), None, labels=labels).mean()


def run(name: str, lr: float, train: list, held: list) -> tuple[list[float], float, float]:
    torch.manual_seed(0)
    cfg = compose(["model=tiny", f"optim={name}", f"optim.lr={lr}"])
    model = build_model(cfg.model, impl="local")
    opt = Optimizer(model, cfg.optim)
    losses = []
    start = time.perf_counter()
    for window in train:
        loss = loss_of(model, window)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    per_step = (time.perf_counter() - start) / len(train)
    with torch.no_grad():
        model.eval()
        # the main next-token loss only: the MTP head's loss is added to the gradient, not returned
        evals = [loss_of(model, window).item() for window in held]
    return losses, sum(evals) / len(evals), per_step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="learning rates tried for each optimizer")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train_stream, held_stream = byte_stream(0)
    train = batches(train_stream, args.steps, args.batch, args.seq, 1)
    held = batches(held_stream, 16, args.batch, args.seq, 2)
    print(f"tiny model, {args.steps} steps of {args.batch}x{args.seq} bytes; loss = mean of the last 20 steps")
    print(f"{'optimizer':<8} {'lr':>7} {'loss@50':>8} {'loss@150':>9} {'final':>7} {'held-out':>9} {'s/step':>7}")
    best = {}
    with single_process():
        for name in ("adamw", "muon"):
            for lr in map(float, args.lrs.split(",")):
                losses, held_loss, per_step = run(name, lr, train, held)
                final = sum(losses[-20:]) / 20
                at = lambda k: sum(losses[max(0, min(k, len(losses)) - 10):k]) / min(10, min(k, len(losses)))  # noqa: E731
                print(f"{name:<8} {lr:>7.0e} {at(50):>8.3f} {at(150):>9.3f} {final:>7.3f} {held_loss:>9.3f} {per_step:>7.3f}")
                if name not in best or held_loss < best[name][1]:
                    best[name] = (lr, held_loss, final)
    (alr, aheld, afinal), (mlr, mheld, mfinal) = best["adamw"], best["muon"]
    print(f"best AdamW (lr {alr:g}): train {afinal:.3f}, held-out {aheld:.3f}; "
          f"best Muon (lr {mlr:g}): train {mfinal:.3f}, held-out {mheld:.3f}; "
          f"Muon - AdamW held-out: {mheld - aheld:+.3f}")


if __name__ == "__main__":
    main()
