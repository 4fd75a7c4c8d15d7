"""What the server asks of a client: typed local plans, compiled by the strategy, run by the executor.

A strategy decides everything a client does and writes it down as a plan; the
:class:`~hilora_lightning.federation.runtime.ClientRuntime` executes plans and interprets no policy:

* :class:`LocalPlan`: a local update (``kind``: a round's training, a probe, an unseen client's
  fine-tune, FDLoRA's fusion). Every slot's starting state is resolved (:class:`Start`: sent by the
  server, the frozen copy the client holds, the client's own kept state, fresh from a seed), then
  the :class:`Step` s run in order (active and trained slots, head, gates, seed, budget, the
  orthogonality penalty), then the plan says what goes back (``upload``, ``return_head``) and what stays
  on the client (``keep``, ``keep_head``, gates).
* :class:`ScorePlan`: score a client with some slots active (accuracy on its test split, or loss on
  its training split to route a newcomer).
* :class:`ClientStore`: what stays on a client between plans, a value with ``to_dict`` / ``from_dict``.

A plan carries exactly what travels to the client: a state the client holds is not in it. No
Lightning, no timm here.

Example:
    >>> from hilora_lightning.federation.plan import Budget, HeadStart, Kind, LocalPlan, Start, Step
    >>> from hilora_lightning.tiers import Tier
    >>> plan = LocalPlan(Kind.TRAIN, client_id=3, round=1, slots={Tier.ROOT: Start.server({})},
    ...                  head=HeadStart(None), steps=(Step((Tier.ROOT,), (Tier.ROOT,), seed=7),),
    ...                  budget=Budget(batch_size=16, steps=20), upload=(Tier.ROOT, "AB"))
    >>> plan.kind.value, plan.uploads, plan.steps[0].penalty
    ('train', True, ())
    >>> Start.fresh(5).origin.value
    'fresh'
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from hilora_lightning.tiers import Tier

__all__ = ["METRICS", "SIDES", "SPLITS", "Budget", "ClientStore", "FitReply", "HeadStart", "Kind", "LocalPlan",
           "Origin",
           "Phase", "ScorePlan", "Start", "State", "Step"]

State = dict[str, Tensor]

#: Which part of a slot a plan uploads or keeps: both factors, ``A`` only, ``B`` only.
SIDES = ("AB", "A", "B")
#: What a :class:`ScorePlan` measures.
METRICS = ("accuracy", "loss")
#: the client splits a score plan may read (``val`` of a client without one: its test split)
SPLITS = ("train", "val", "test")


class Kind(str, enum.Enum):
    """Why a client runs a plan."""

    TRAIN = "train"  #: a round's local update
    PROBE = "probe"  #: a short update whose factors describe the client (clustering, routing); nothing is kept
    FINETUNE = "finetune"  #: an unseen client personalizes its part
    FUSE = "fuse"  #: fusion weights train on the client's data (FDLoRA)
    SCORE = "score"  #: evaluation


class Origin(str, enum.Enum):
    """Where a slot's starting state comes from."""

    SERVER = "server"  #: sent with the plan
    FROZEN = "frozen"  #: the frozen copy the client keeps since the server first sent it
    KEPT = "kept"  #: the client's own trained state of the slot (its leaf); fresh from ``seed`` if it has none
    FRESH = "fresh"  #: a fresh no-op slot: ``B = 0``, ``A`` drawn from ``seed``


@dataclasses.dataclass(frozen=True)
class Start:
    """One slot's starting state.

    Attributes:
        origin: see :class:`Origin`.
        state: the server's state (``SERVER``); with ``FROZEN``, the server's copy for a backend that
            shares memory with it (in process), used only when the client's store has none; never sent.
        seed: the seed of a fresh slot (``FRESH``, and ``KEPT`` when the client has none yet).
        overlay: the client's kept part of this slot (FedSA-LoRA's local ``B``) goes on top.
        freeze: the client keeps the sent state as its frozen copy; later plans say ``FROZEN``.
    """

    origin: Origin
    state: Mapping[str, Tensor] | None = None
    seed: int | None = None
    overlay: bool = False
    freeze: bool = False

    def __post_init__(self) -> None:
        if self.origin is Origin.SERVER and self.state is None:
            raise ValueError("a slot the server sends needs its state")
        if self.origin in (Origin.KEPT, Origin.FRESH) and self.seed is None:
            raise ValueError(f"a {self.origin.value} slot needs the seed of a fresh one")
        if self.freeze and self.origin is not Origin.SERVER:
            raise ValueError("only a state the server sends can be frozen on the client")

    @classmethod
    def server(cls, state: Mapping[str, Tensor], overlay: bool = False, freeze: bool = False) -> Start:
        """The server's state (``freeze``: the client keeps it as a frozen copy)."""
        return cls(Origin.SERVER, state, overlay=overlay, freeze=freeze)

    @classmethod
    def frozen(cls, local_copy: Mapping[str, Tensor] | None = None) -> Start:
        """The frozen copy the client holds (``local_copy``: the server's, for in-process backends only)."""
        return cls(Origin.FROZEN, local_copy)

    @classmethod
    def kept(cls, seed: int) -> Start:
        """The client's own state of the slot, or a fresh one from ``seed``."""
        return cls(Origin.KEPT, seed=seed)

    @classmethod
    def fresh(cls, seed: int) -> Start:
        """A fresh no-op slot from ``seed``."""
        return cls(Origin.FRESH, seed=seed)

    @property
    def sent(self) -> Mapping[str, Tensor] | None:
        """The state that travels to the client (``None`` when it holds or makes it)."""
        return self.state if self.origin is Origin.SERVER else None


@dataclasses.dataclass(frozen=True)
class HeadStart:
    """The head a plan starts from: the client's own if ``own`` and it has one, else ``state``, else the
    model's initial head (``state=None``: nothing is sent)."""

    state: Mapping[str, Tensor] | None
    own: bool = False


@dataclasses.dataclass(frozen=True)
class Phase:
    """A method's declarative phase of a local update (compiled into a :class:`Step` with a seed).

    Attributes:
        active: slots that contribute to the forward pass.
        train: slots that get gradients (a subset of ``active``).
        share: fraction of the round's local steps this phase takes.
        gates: whether the gates train in this phase.
        head: whether the head trains in this phase.
    """

    active: tuple[Tier, ...]
    train: tuple[Tier, ...]
    share: float = 1.0
    gates: bool = False
    head: bool = True


@dataclasses.dataclass(frozen=True)
class Step:
    """One part of a local update, fully resolved.

    Attributes:
        active, train: slots in the forward pass; slots that get gradients (a subset of ``active``).
        seed: the seed of this step's sampling and dropout.
        head, gates: whether the head and the gates train.
        share: ``None``: the plan's whole budget (``steps`` batches, else ``epochs`` epochs); a number:
            ``max(1, round(share * total))`` batches, ``total`` the budget in batches.
        penalty: ``(frozen slot, gamma)`` pairs: the trained slot is kept orthogonal to these.
    """

    active: tuple[Tier, ...]
    train: tuple[Tier, ...]
    seed: int
    head: bool = True
    gates: bool = False
    share: float | None = None
    penalty: tuple[tuple[Tier, float], ...] = ()

    def __post_init__(self) -> None:
        missing = [t.value for t in self.train if t not in self.active]
        if missing:
            raise ValueError(f"trained slots {missing} must also be active, got {[t.value for t in self.active]}")

    @classmethod
    def of(cls, phase: Phase, seed: int, whole: bool = False) -> Step:
        """A method's phase with its seed (``whole``: the phase runs the plan's whole budget)."""
        return cls(phase.active, phase.train, seed, phase.head, phase.gates, None if whole else phase.share)


@dataclasses.dataclass(frozen=True)
class Budget:
    """A local update's budget: ``steps`` batches of ``batch_size`` (wins), else ``epochs`` epochs.

    Example:
        >>> Budget(batch_size=32, epochs=2).total_steps(100), Budget(steps=5).total_steps(100)
        (8, 5)
    """

    batch_size: int = 32
    epochs: int = 1
    steps: int | None = None

    def total_steps(self, num_samples: int) -> int:
        """The budget in batches for a client with ``num_samples`` training samples."""
        return self.steps or self.epochs * math.ceil(num_samples / self.batch_size)

    def of_step(self, share: float | None, num_samples: int) -> tuple[int, int | None]:
        """``(epochs, steps)`` of a :class:`Step` with this ``share`` for a client with ``num_samples``: the
        whole budget (``share=None``), else ``max(1, round(share * total))`` batches in one epoch.

        Example:
            >>> Budget(batch_size=32, epochs=2).of_step(None, 100), Budget(batch_size=32, epochs=2).of_step(0.5, 100)
            ((2, None), (1, 4))
        """
        if share is None:
            return self.epochs, self.steps
        return 1, max(1, round(share * self.total_steps(num_samples)))


@dataclasses.dataclass(frozen=True)
class LocalPlan:
    """One client's local update, every decision made.

    Attributes:
        kind, client_id, round: why, who, and the round it belongs to.
        slots: every slot the update loads, with its starting state.
        head: the head it starts from.
        steps: what trains, in order.
        budget: batch size and the local budget the steps share.
        upload: ``(slot, side)`` whose trained factors go back (``None``: nothing).
        keep: ``(slot, side)`` whose trained state stays on the client (a leaf; FedSA-LoRA's ``B``).
        keep_head: the trained head stays on the client; ``return_head``: it goes back.
        gates: the gates a client without its own starts from (``None``: no gates); trained gates stay on it.
    """

    kind: Kind
    client_id: int
    round: int
    slots: Mapping[Tier, Start]
    head: HeadStart
    steps: tuple[Step, ...]
    budget: Budget = Budget()
    upload: tuple[Tier, str] | None = None
    keep: tuple[tuple[Tier, str], ...] = ()
    keep_head: bool = False
    return_head: bool = False
    gates: Mapping[str, Tensor] | None = None

    def __post_init__(self) -> None:
        if self.kind is Kind.SCORE:
            raise ValueError("a LocalPlan trains; scoring is a ScorePlan")
        if not self.steps:
            raise ValueError(f"plan for client {self.client_id} has no steps")
        for slot, side in (*((self.upload,) if self.upload else ()), *self.keep):
            if side not in SIDES:
                raise ValueError(f"a slot's side must be one of {SIDES}, got {side!r}")
            if slot not in self.slots:
                raise ValueError(f"plan uploads or keeps the {slot.value} slot, which it does not load")
        for step in self.steps:
            unloaded = [t.value for t in step.active if t not in self.slots]
            if unloaded:
                raise ValueError(f"a step uses slots {unloaded} that the plan does not load")

    @property
    def uploads(self) -> bool:
        """Whether trained factors go back."""
        return self.upload is not None

    @property
    def outputs(self) -> set[Tier]:
        """The slots whose trained state the plan uploads or keeps (what an executor hands back)."""
        return {slot for slot, _ in (*self.keep, *((self.upload,) if self.upload else ()))}


@dataclasses.dataclass(frozen=True)
class ScorePlan:
    """Score one client with ``active`` slots: accuracy on its ``split`` (``"test"`` by default; the
    runner's per-round figures use ``"val"``), or (``metric="loss"``) the mean loss on its training
    split (routing an unseen client by loss). Slots, head and gates as in :class:`LocalPlan`; nothing
    is kept."""

    client_id: int
    round: int
    active: tuple[Tier, ...]
    slots: Mapping[Tier, Start]
    head: HeadStart
    gates: Mapping[str, Tensor] | None = None
    metric: str = "accuracy"
    split: str | None = None  # None: "train" for the loss, "test" for accuracy

    kind = Kind.SCORE

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.split is None:
            object.__setattr__(self, "split", "train" if self.metric == "loss" else "test")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        unloaded = [t.value for t in self.active if t not in self.slots]
        if unloaded:
            raise ValueError(f"scoring with slots {unloaded} that the plan does not load")


@dataclasses.dataclass(frozen=True)
class FitReply:
    """What came back: the uploaded factors and head (``None`` when they stay on the client)."""

    factors: State | None
    head: State | None
    num_samples: int = 0


_SLOTS = {t.value: t for t in Tier}


@dataclasses.dataclass(frozen=True)
class ClientStore:
    """What stays on a client between plans (a value: the executor returns a new one).

    Attributes:
        kept: trained slot states the client keeps, whole or one side (its leaf; FedSA-LoRA's ``B``).
        frozen: shared slots frozen since the server sent them (not sent again).
        head: its personal head; ``gates``: its gates.

    ``to_dict`` / ``from_dict`` give the flat form of checkpoints and Flower's ``context.state``
    (``"leaf"``, ``"keep-root"``, ``"frozen-root"``, ``"head"``, ``"gates"``).

    Example:
        >>> import torch
        >>> store = ClientStore(kept={Tier.LEAF: {"m.lora_B": torch.zeros(2, 1)}}, head={"w": torch.ones(1)})
        >>> sorted(store.to_dict()), ClientStore.from_dict(store.to_dict()) == store
        (['head', 'leaf'], True)
        >>> ClientStore.from_dict({"lief": {}})
        Traceback (most recent call last):
        ...
        ValueError: unknown client store entry 'lief'; expected 'leaf', 'head', 'gates', 'keep-<slot>' or ...
    """

    kept: Mapping[Tier, State] = dataclasses.field(default_factory=dict)
    frozen: Mapping[Tier, State] = dataclasses.field(default_factory=dict)
    head: State | None = None
    gates: State | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClientStore):
            return NotImplemented
        a, b = self.to_dict(), other.to_dict()
        return a.keys() == b.keys() and all(
            a[k].keys() == b[k].keys() and all(bool((a[k][n] == b[k][n]).all()) for n in a[k]) for k in a)

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self, frozen: bool = True) -> dict[str, State]:
        """The flat form (``frozen=False``: without the frozen copies, which the server can resend)."""
        out: dict[str, State] = {}
        for slot, state in self.kept.items():
            out["leaf" if slot is Tier.LEAF else f"keep-{slot.value}"] = dict(state)
        for slot, state in self.frozen.items() if frozen else ():
            out[f"frozen-{slot.value}"] = dict(state)
        if self.head is not None:
            out["head"] = dict(self.head)
        if self.gates is not None:
            out["gates"] = dict(self.gates)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClientStore:
        """The store of a flat form (an unknown entry is an error)."""
        kept: dict[Tier, State] = {}
        frozen: dict[Tier, State] = {}
        other: dict[str, State] = {}
        for key, value in data.items():
            prefix, _, name = str(key).partition("-")
            if key == "leaf":
                kept[Tier.LEAF] = dict(value)
            elif key in ("head", "gates"):
                other[key] = dict(value)
            elif prefix in ("keep", "frozen") and name in _SLOTS:
                (kept if prefix == "keep" else frozen)[_SLOTS[name]] = dict(value)
            else:
                raise ValueError(f"unknown client store entry {key!r}; expected 'leaf', 'head', 'gates', "
                                 "'keep-<slot>' or 'frozen-<slot>' (slots: root, cluster, leaf)")
        return cls(kept, frozen, other.get("head"), other.get("gates"))
