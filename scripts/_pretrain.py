"""The training loop the backbone pretraining scripts share (seeded shifts, one epoch, accuracy).

Example:
    >>> import torch
    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> shift(x, torch.Generator().manual_seed(0)).shape
    torch.Size([1, 1, 4, 4])
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def shift(x: torch.Tensor, gen: torch.Generator, max_px: int = 2) -> torch.Tensor:
    """The batch rolled by one random (dy, dx) of at most ``max_px`` pixels."""
    dx, dy = (int(v) for v in torch.randint(-max_px, max_px + 1, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def train_epoch(model: torch.nn.Module, xs: torch.Tensor, ys: torch.Tensor, batch_size: int, gen: torch.Generator,
                opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler) -> torch.Tensor:
    """One shuffled epoch of shifted batches (cross-entropy, a scheduler step per batch); the last loss."""
    model.train()
    perm = torch.randperm(len(xs), generator=gen)
    loss = torch.zeros(())
    for i in range(0, len(xs), batch_size):
        b = perm[i : i + batch_size]
        loss = F.cross_entropy(model(shift(xs[b], gen)), ys[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return loss


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy in eval mode, ``batch`` images at a time."""
    model.eval()
    hits = sum(int((model(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return hits / len(x)
