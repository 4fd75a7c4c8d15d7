"""Hostile clients for simulations: model poisoning of uploads and data poisoning of training splits.

An :class:`Attack` describes what a hostile client does; :class:`HostileBackend` wraps any in-process
backend and applies it to the clients it names, so the strategy, the checks and the robust rules see
exactly what an attacker would send. Model attacks rewrite an honest client's upload after it has
trained (``U = B A - B_0 A_0``: its update against the tier the round started from, ``h - h_0`` for
its head); data attacks poison its training split before it trains.

* ``sign_flip``: sends ``B_0 A_0 - U`` (the update reversed);
* ``scale``: sends ``B_0 A_0 + scale U`` (``scale=5`` stays under the default outlier bound of 10x
  the round's median norm);
* ``noise``: sends ``B_0 A_0 + N``, ``N`` a random rank-``r`` matrix of the honest update's norm
  (per adapted matrix), the head likewise;
* ``free_ride``: sends back what it received (``B_0, A_0``, ``h_0``), training on nothing it shares;
* ``label_flip``: trains on labels ``y -> num_classes - 1 - y`` (data poisoning);
* ``backdoor``: model replacement (Bagdasaryan et al., AISTATS 2020): a ``poison_fraction`` of its
  training images carry a ``trigger_size`` square of the image's brightest value in the bottom-right
  corner and the label ``target``, and the update is boosted by ``scale`` so it survives averaging;
  success is the share of other clients' triggered test images (not of class ``target``) classified
  as ``target`` (:func:`triggered_test`).

Uploads keep their rank: an attacker's target product ``P`` is sent as its rank-``r`` truncated SVD,
the best an attacker bound to the protocol's shapes can do (exact whenever ``P`` has rank ``<= r``,
e.g. a sign flip from a zero start).

Example:
    >>> import torch
    >>> from hilora_lightning.federation.attacks import hostile_factors
    >>> start = {"m.lora_A": torch.randn(2, 6), "m.lora_B": torch.zeros(5, 2)}
    >>> honest = {"m.lora_A": start["m.lora_A"], "m.lora_B": torch.randn(5, 2)}
    >>> sent = hostile_factors("sign_flip", honest, start)
    >>> bool(torch.allclose(sent["m.lora_B"] @ sent["m.lora_A"], -(honest["m.lora_B"] @ honest["m.lora_A"]),
    ...                     atol=1e-5))
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from hilora_lightning.data.clients import ClientData
from hilora_lightning.data.samples import IMAGE_KEYS, LABEL_KEYS, dataset_labels
from hilora_lightning.federation.plan import FitReply, LocalPlan, Origin
from hilora_lightning.strategy.aggregation import factor_pairs, product_space_aggregate

__all__ = ["ATTACKS", "DATA_ATTACKS", "MODEL_ATTACKS", "Attack", "HostileBackend", "add_trigger", "hostile_factors",
           "hostile_head", "poison_client", "triggered_test"]

#: attacks that rewrite the upload after honest training
MODEL_ATTACKS = ("sign_flip", "scale", "noise", "free_ride")
#: attacks that poison the training split (``backdoor`` also boosts its upload by ``scale``)
DATA_ATTACKS = ("label_flip", "backdoor")
ATTACKS = (*MODEL_ATTACKS, *DATA_ATTACKS)

State = Mapping[str, Tensor]


@dataclasses.dataclass(frozen=True)
class Attack:
    """What a hostile client does (see the module docstring for each ``kind``).

    Attributes:
        kind: one of :data:`ATTACKS`.
        scale: the ``scale`` attack's factor and the backdoor's boost.
        num_classes: the label space (``label_flip`` maps ``y`` to ``num_classes - 1 - y``).
        target: the backdoor's target class; ``poison_fraction``: the share of its training images
            it triggers; ``trigger_size``: the trigger square's side in pixels.
        seed: seeds the noise attack and which samples the backdoor poisons.
    """

    kind: str
    scale: float = 5.0
    num_classes: int = 10
    target: int = 0
    poison_fraction: float = 0.5
    trigger_size: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ValueError(f"attack kind must be one of {ATTACKS}, got {self.kind!r}")
        if not 0 < self.poison_fraction <= 1:
            raise ValueError(f"poison_fraction must be in (0, 1], got {self.poison_fraction!r}")
        if not 0 <= self.target < self.num_classes:
            raise ValueError(f"the backdoor target must be a class in [0, {self.num_classes}), got {self.target!r}")


def _signed_sum(terms: list[tuple[float, Tensor, Tensor]], rank: int) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors of ``sum_k c_k B_k A_k`` for signed ``c_k`` (the factored SVD takes weights >= 0)."""
    total = sum(abs(c) for c, _, _ in terms)
    b, a = product_space_aggregate([(1.0 if c >= 0 else -1.0) * bk.double() for c, bk, _ in terms],
                                   [ak for _, _, ak in terms], [abs(c) for c, _, _ in terms], rank)
    return b * total, a


def hostile_factors(kind: str, honest: State, start: State, scale: float = 5.0,
                    generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """What a client running model attack ``kind`` sends instead of its honest factors ``honest``
    (``start``: the tier the round started from; the rank of ``honest`` is kept)."""
    if kind == "free_ride":
        return {k: start[k].clone() for k in honest}
    out: dict[str, Tensor] = {}
    for prefix in factor_pairs(list(honest)):
        b, a = honest[f"{prefix}.lora_B"], honest[f"{prefix}.lora_A"]
        b0, a0 = start[f"{prefix}.lora_B"], start[f"{prefix}.lora_A"]
        rank = b.shape[1]
        if kind == "sign_flip":
            terms = [(2.0, b0, a0), (-1.0, b, a)]
        elif kind in ("scale", "backdoor"):
            terms = [(scale, b, a), (1.0 - scale, b0, a0)]
        elif kind == "noise":
            norm = float((b.double() @ a.double() - b0.double() @ a0.double()).norm())
            nb = torch.randn(b.shape, generator=generator, dtype=torch.float64)
            na = torch.randn(a.shape, generator=generator, dtype=torch.float64)
            nb *= norm / max(float((nb @ na).norm()), 1e-300)
            terms = [(1.0, b0, a0), (1.0, nb, na)]
        else:
            raise ValueError(f"{kind!r} is not a model attack; expected one of {(*MODEL_ATTACKS, 'backdoor')}")
        new_b, new_a = _signed_sum(terms, rank)
        out[f"{prefix}.lora_B"], out[f"{prefix}.lora_A"] = new_b.to(b.dtype), new_a.to(a.dtype)
    return {k: out[k] for k in honest}


def hostile_head(kind: str, honest: State, start: State, scale: float = 5.0,
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The head a client running ``kind`` sends (``start``: the head the server sent)."""
    out: dict[str, Tensor] = {}
    for k, h in honest.items():
        h0 = start[k].to(h.dtype)
        if kind == "free_ride":
            out[k] = h0.clone()
        elif kind == "sign_flip":
            out[k] = 2 * h0 - h
        elif kind in ("scale", "backdoor"):
            out[k] = h0 + scale * (h - h0)
        elif kind == "noise":
            noise = torch.randn(h.shape, generator=generator, dtype=torch.float64).to(h.dtype)
            out[k] = h0 + noise * (h - h0).norm() / noise.norm().clamp_min(1e-30)
        else:
            out[k] = h
    return out


def attack_reply(attack: Attack, reply: FitReply, plan: LocalPlan) -> FitReply:
    """``reply`` as a client running ``attack`` would send it (label flipping sends its honest reply:
    the poison is in its data)."""
    if attack.kind == "label_flip" or reply.factors is None or plan.upload is None:
        return reply
    start = plan.slots[plan.upload[0]]
    if start.origin is not Origin.SERVER or start.state is None:
        return reply  # nothing was sent to start from (a fresh slot): no update to turn
    gen = torch.Generator().manual_seed((attack.seed * 1_000_003 + plan.round) * 1_000_033 + plan.client_id)
    factors = hostile_factors(attack.kind, reply.factors, start.state, attack.scale, gen)
    head = reply.head
    if head is not None and plan.head.state is not None:
        head = hostile_head(attack.kind, head, plan.head.state, attack.scale, gen)
    return dataclasses.replace(reply, factors=factors, head=head)


# ---------------------------------------------------------------------------------------------- data poisoning
def add_trigger(image: Tensor, size: int) -> Tensor:
    """``image`` (``C x H x W``) with a ``size x size`` square of its brightest value in the bottom-right corner."""
    if not isinstance(image, Tensor) or image.ndim != 3:
        raise TypeError(f"the backdoor trigger goes on a C x H x W image tensor, got "
                        f"{type(image).__name__}{tuple(getattr(image, 'shape', ()))}; poison data whose "
                        "samples are transformed to tensors")
    out = image.clone()
    out[:, -size:, -size:] = image.max()
    return out


class _Mapped(Dataset):
    """A data set whose samples at ``indices`` (all when ``None``) pass through ``fn(image, label)``."""

    def __init__(self, base: Dataset, fn: Callable[[Any, int], tuple[Any, int]], indices: set[int] | None = None,
                 keep: list[int] | None = None) -> None:
        self.base, self.fn, self.indices, self.keep = base, fn, indices, keep

    def __len__(self) -> int:
        return len(self.keep) if self.keep is not None else len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        j = self.keep[i] if self.keep is not None else i
        sample = self.base[j]
        if self.indices is not None and j not in self.indices:
            return sample
        if isinstance(sample, Mapping):
            ik = next(k for k in IMAGE_KEYS if k in sample)
            lk = next(k for k in LABEL_KEYS if k in sample)
            x, y = self.fn(sample[ik], int(sample[lk]))
            return {**sample, ik: x, lk: y}
        x, y = self.fn(sample[0], int(sample[1]))
        return (x, y, *sample[2:])


def poison_client(client: ClientData, attack: Attack) -> ClientData:
    """``client`` with its training (and validation) split poisoned by data attack ``attack``; its test
    split untouched. Model attacks return ``client`` as it is."""
    if attack.kind == "label_flip":
        def fn(x: Any, y: int) -> tuple[Any, int]:
            return x, attack.num_classes - 1 - y

        def poison(data: Dataset) -> Dataset:
            return _Mapped(data, fn)
    elif attack.kind == "backdoor":
        def fn(x: Any, y: int) -> tuple[Any, int]:
            return add_trigger(x, attack.trigger_size), attack.target

        def poison(data: Dataset) -> Dataset:
            n = len(data)  # type: ignore[arg-type]
            gen = torch.Generator().manual_seed(attack.seed * 1_000_003 + client.client_id)
            chosen = torch.randperm(n, generator=gen)[: max(1, round(attack.poison_fraction * n))]
            return _Mapped(data, fn, set(chosen.tolist()))
    else:
        return client
    val = None if client.val is None else poison(client.val)
    return dataclasses.replace(client, train=poison(client.train), val=val)


def triggered_test(client: ClientData, attack: Attack) -> ClientData:
    """``client`` with a test split of its test images not of class ``attack.target``, triggered and
    labelled ``target``: its accuracy there is the backdoor's success rate on it."""
    labels = dataset_labels(client.test)
    if labels is None:
        raise ValueError(f"client {client.client_id}: cannot read its test labels to build the triggered test set")
    keep = [i for i, y in enumerate(labels.tolist()) if y != attack.target]
    if not keep:
        raise ValueError(f"client {client.client_id} has only class-{attack.target} test images; nothing to trigger")
    test = _Mapped(client.test, lambda x, y: (add_trigger(x, attack.trigger_size), attack.target), keep=keep)
    return dataclasses.replace(client, test=test)


# ---------------------------------------------------------------------------------------------- the backend
class HostileBackend:
    """Wraps an in-process backend (``None``: the default one): the clients in ``hostile`` run their
    :class:`Attack`, the rest are honest.

    Data attacks poison those clients' data when the runner binds the backend; model attacks rewrite
    their replies. Everything else (stores, evaluation, progress, checkpoints) is the wrapped backend's.

    Example:
        >>> from hilora_lightning.federation.backend import InProcessBackend
        >>> backend = HostileBackend(InProcessBackend(), {3: Attack("sign_flip")})
        >>> sorted(backend.hostile), backend.state_dict()
        ([3], {})
    """

    def __init__(self, backend: Any, hostile: Mapping[int, Attack]) -> None:
        from hilora_lightning.federation.backend import InProcessBackend

        self.backend = InProcessBackend() if backend is None else backend
        self.hostile = dict(hostile)

    def __getattr__(self, name: str) -> Any:  # evaluate, reject, store, state_dict, on_client ...
        if name in ("backend", "hostile"):
            raise AttributeError(name)
        return getattr(self.backend, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("backend", "hostile"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.backend, name, value)

    def bind(self, runtime: Any, data: Iterable[ClientData]) -> None:
        """Bind the wrapped backend to ``data``, the hostile clients' data poisoned."""
        self.backend.bind(runtime, [poison_client(c, self.hostile[c.client_id]) if c.client_id in self.hostile
                                    else c for c in data])

    def fit(self, requests: Mapping[int, LocalPlan]) -> dict[int, FitReply | Exception]:
        replies = self.backend.fit(requests)
        for cid, reply in replies.items():
            if cid in self.hostile and isinstance(reply, FitReply):
                replies[cid] = attack_reply(self.hostile[cid], reply, requests[cid])
        return replies
