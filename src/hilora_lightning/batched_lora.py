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

__all__ = ["StackedDelta", "StackedGate", "stacked_head", "stacked_lora_delta"]


def stacked_lora_delta(x: Tensor, a: Tensor, b: Tensor, rows: Sequence[tuple[int, int]], scale: float,
                       out_features: int | None = None, out: Tensor | None = None, gate: Tensor | None = None
                       ) -> Tensor:
    """Every client's ``scale * B_c A_c x_c`` (times ``gate``, per token, when given), written into its rows.

    Args:
        x: ``C x N x in`` (client ``c``'s inputs in ``x[c]``).
        a: ``C x S x r x in``; b: ``C x S x rows_s x r`` (``S`` segments of the output rows).
        rows: ``(start, stop)`` of each segment in the output.
        scale: the LoRA scale ``alpha / r``.
        out_features: the layer's output width (default: the last segment's stop).
        out: ``C x N x out_features`` to add into in place (the layer's base output); default: zeros.
        gate: ``C x N``: each token's weight of this term (a :class:`StackedGate` column); ``None``: 1.

    Returns:
        ``out`` (or a new ``C x N x out_features``, zero outside the segments) with the updates added.
    """
    clients, n, _ = x.shape
    rank = a.shape[2]
    h = torch.bmm(x, a.flatten(1, 2).transpose(1, 2).to(x.dtype))  # C x N x (S r)
    if gate is not None:
        h = h * gate.unsqueeze(-1).to(h.dtype)
    width = out_features if out_features is not None else (out.shape[-1] if out is not None else rows[-1][1])
    if out is None:
        out = h.new_zeros(clients, n, width)
    for s, (start, stop) in enumerate(rows):
        seg = torch.bmm(h[..., s * rank:(s + 1) * rank], b[:, s].transpose(1, 2).to(h.dtype))
        out[..., start:stop].add_(seg.to(out.dtype), alpha=scale)
    return out


class StackedGate:
    """Every client's :class:`~hilora_lightning.gates.TierGate` of one layer, stacked: ``"input"`` gates hold
    ``proj.weight`` (``C x n x in``) and ``proj.bias`` (``C x n``), ``"scalar"`` gates ``weights`` (``C x n``).

    Example:
        >>> import torch
        >>> from hilora_lightning.gates import TierGate
        >>> gates = [TierGate(4, ("root", "leaf")) for _ in range(2)]
        >>> with torch.no_grad():
        ...     _ = gates[1].proj.weight.normal_()
        >>> stacked = StackedGate("input", {k: torch.stack([g.state_dict()[k] for g in gates]) for k in
        ...                                 ("proj.weight", "proj.bias")})
        >>> x = torch.randn(2, 3, 4)
        >>> torch.allclose(stacked(x)[1], gates[1](x[1]), atol=1e-6)
        True
    """

    def __init__(self, mode: str, params: dict[str, Tensor]) -> None:
        self.mode, self.params = mode, params

    def __call__(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """``C x N x n``: each client's weights of its gated tiers for its inputs ``x`` (``C x N x in``)."""
        p = self.params if index is None else {k: v[index] for k, v in self.params.items()}
        if self.mode == "input":
            w, b = p["proj.weight"], p["proj.bias"]
            return torch.softmax(torch.baddbmm(b.unsqueeze(1).to(x.dtype), x, w.transpose(1, 2).to(x.dtype)), dim=-1)
        return p["weights"].unsqueeze(1).expand(-1, x.shape[1], -1)


class StackedDelta:
    """A tiered layer's forward during a batched pass: its base (shared slots merged in) plus each
    client's low-rank terms on its own segment of the batch (set as ``TieredLoRALinear.batched``).

    Args:
        clients: ``C``; the batch's first dimension is ``C`` equal segments.
        terms: ``(A, B, scale)`` or ``(A, B, scale, gate column)`` per client-specific slot (stacked as in
            :func:`stacked_lora_delta`; the column is the slot's place among the gate's tiers, ``None``: ungated).
        gate: the clients' gates of this layer (``None``: no gate).

    ``index`` (a ``LongTensor`` of client positions, default ``None``: all ``C``) narrows the batch to those
    clients' segments, in that order: clients whose batches have run out leave the pass.
    """

    def __init__(self, clients: int, terms: Sequence[tuple[Any, ...]], gate: StackedGate | None = None) -> None:
        self.clients = clients
        self.terms = [(*t, None) if len(t) == 3 else tuple(t) for t in terms]
        self.gate = gate
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
        weights = self.gate(xc, index) if self.gate is not None else None
        for a, b, scale, col in self.terms:
            if index is not None:
                a, b = a[index], b[index]
            gate = weights[..., col] if weights is not None and col is not None else None
            stacked_lora_delta(xc, a, b, rows, scale, out=oc, gate=gate)
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
