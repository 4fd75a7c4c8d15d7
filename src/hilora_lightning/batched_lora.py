"""Many clients' LoRA factors over one frozen layer in one pass: the math of the batched backend.

The samples of ``C`` clients travel through the frozen network as one batch, client by client in
equal segments. Each tiered layer adds every client's own low-rank update to its segment with a
batched matmul over the stacked factors (``A``: ``C x segments x r x in``, ``B``: ``C x segments x
rows x r``), no gather; slots that every client shares are merged into the base weight beforehand.
The head is applied per client the same way. No Lightning here.

Example:
    >>> import torch
    >>> from hilora_lightning.batched_lora import stacked_lora_delta
    >>> x = torch.randn(2, 5, 4)                       # 2 clients, 5 tokens each, in_features 4
    >>> a, b = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 6, 3)
    >>> out = stacked_lora_delta(x, a, b, ((0, 6),), 0.5)
    >>> torch.allclose(out[1], 0.5 * x[1] @ a[1, 0].T @ b[1, 0].T, atol=1e-6)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["StackedDelta", "stacked_head", "stacked_lora_delta"]


def stacked_lora_delta(x: Tensor, a: Tensor, b: Tensor, rows: Sequence[tuple[int, int]], scale: float,
                       out_features: int | None = None, out: Tensor | None = None) -> Tensor:
    """Every client's ``scale * B_c A_c x_c``, written into its output rows.

    Args:
        x: ``C x N x in`` (client ``c``'s inputs in ``x[c]``).
        a: ``C x S x r x in``; b: ``C x S x rows_s x r`` (``S`` segments of the output rows).
        rows: ``(start, stop)`` of each segment in the output.
        scale: the LoRA scale ``alpha / r``.
        out_features: the layer's output width (default: the last segment's stop).
        out: ``C x N x out_features`` to add into in place (the layer's base output); default: zeros.

    Returns:
        ``out`` (or a new ``C x N x out_features``, zero outside the segments) with the updates added.
    """
    clients, n, _ = x.shape
    rank = a.shape[2]
    h = torch.bmm(x, a.flatten(1, 2).transpose(1, 2).to(x.dtype))  # C x N x (S r)
    width = out_features if out_features is not None else (out.shape[-1] if out is not None else rows[-1][1])
    if out is None:
        out = h.new_zeros(clients, n, width)
    for s, (start, stop) in enumerate(rows):
        seg = torch.bmm(h[..., s * rank:(s + 1) * rank], b[:, s].transpose(1, 2).to(h.dtype))
        out[..., start:stop].add_(seg.to(out.dtype), alpha=scale)
    return out


class StackedDelta:
    """A tiered layer's forward during a batched pass: its base (shared slots merged in) plus each
    client's low-rank terms on its own segment of the batch (set as ``TieredLoRALinear.batched``).

    Args:
        clients: ``C``; the batch's first dimension is ``C`` equal segments.
        terms: ``(A, B, scale)`` per client-specific slot (stacked as in :func:`stacked_lora_delta`).

    ``index`` (a ``LongTensor`` of client positions, default ``None``: all ``C``) narrows the batch to those
    clients' segments, in that order: clients whose batches have run out leave the pass.
    """

    def __init__(self, clients: int, terms: Sequence[tuple[Tensor, Tensor, float]]) -> None:
        self.clients = clients
        self.terms = list(terms)
        self.index: Tensor | None = None

    def __call__(self, layer: Any, x: Tensor) -> Tensor:
        out = layer.base_layer(x)
        if not self.terms:
            return out  # type: ignore[no-any-return]
        index = self.index
        clients = self.clients if index is None else len(index)
        xc = x.reshape(clients, -1, x.shape[-1])
        oc = out.view(clients, -1, out.shape[-1])  # the base output, fresh: the updates go in place
        rows = [(start, stop) for _, start, stop in layer.segments]
        for a, b, scale in self.terms:
            if index is not None:
                a, b = a[index], b[index]
            stacked_lora_delta(xc, a, b, rows, scale, out=oc)
        return out  # type: ignore[no-any-return]


def stacked_head(features: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Each client's linear head on its own features: ``C x n x d`` features, ``C x k x d`` weights,
    ``C x k`` biases, ``C x n x k`` logits.

    Example:
        >>> import torch
        >>> f, w, b = torch.randn(3, 4, 5), torch.randn(3, 2, 5), torch.randn(3, 2)
        >>> torch.allclose(stacked_head(f, w, b)[2], f[2] @ w[2].T + b[2], atol=1e-6)
        True
    """
    logits = torch.bmm(features, weight.transpose(1, 2).to(features.dtype))
    return logits if bias is None else logits + bias.unsqueeze(1).to(logits.dtype)
