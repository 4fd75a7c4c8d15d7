"""Where a client's classification head starts and where it goes: the run's ``head_policy`` in one object.

``"tier"``: the head is shared at the level of the tier being trained — the global head while the
root trains (and for every client before clusters exist), its cluster's head while a cluster trains —
so an upload carries it and the server aggregates it with the tier; from the leaf stage on the head is
the client's own. ``"local"``: every client keeps its own head from the start; the server never
receives one, and one without a head of its own starts from the initial head.

Every strategy (HiLoRA's and the baselines') asks this object, never the policy's name.

Example:
    >>> import torch
    >>> from hilora_lightning.federation.heads import HeadPolicy
    >>> policy = HeadPolicy("tier", {"weight": torch.zeros(2, 3)})
    >>> policy.shared, policy.returns(leaf=False), policy.returns(leaf=True), policy.keeps(leaf=True)
    (True, True, False, True)
    >>> HeadPolicy("global", {})
    Traceback (most recent call last):
    ...
    ValueError: head_policy must be one of ('tier', 'local'), got 'global'
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from hilora_lightning.federation.config import HEAD_POLICIES
from hilora_lightning.federation.server_state import ServerState
from hilora_lightning.tiers import Tier

__all__ = ["HeadPolicy"]

State = dict[str, Tensor]


class HeadPolicy:
    """The head a plan starts from, whether it travels back, whether the client keeps it.

    Args:
        name: ``"tier"`` or ``"local"`` (see the module docstring).
        initial: the model's initial head (the start of a client without a head of its own).
    """

    def __init__(self, name: str, initial: Mapping[str, Tensor]) -> None:
        if name not in HEAD_POLICIES:
            raise ValueError(f"head_policy must be one of {HEAD_POLICIES}, got {name!r}")
        self.name, self.initial = name, dict(initial)

    @property
    def shared(self) -> bool:
        """Whether heads travel and are aggregated (``"tier"``)."""
        return self.name == "tier"

    def global_head(self, state: ServerState) -> State:
        """The server's root-level head (the initial head when heads are not shared)."""
        return state.global_head if self.shared else self.initial

    def cluster_head(self, state: ServerState, cluster: int) -> State:
        """The server's head of ``cluster`` (the initial head when heads are not shared)."""
        return state.cluster_heads[cluster] if self.shared else self.initial

    def for_tier(self, state: ServerState, cid: int, tier: Tier) -> State:
        """The server's head for client ``cid`` at ``tier``: the global one at the root or before clusters exist,
        its cluster's otherwise (a head of the client's own, where a plan lets it, wins on the client)."""
        if tier is Tier.ROOT or not state.assignment:
            return self.global_head(state)
        return self.cluster_head(state, state.assignment[cid])

    def own(self, leaf: bool) -> bool:
        """Whether a plan starts from the client's own head when it has one (always, unless shared and not leaf)."""
        return leaf or not self.shared

    def keeps(self, leaf: bool) -> bool:
        """Whether the trained head stays on the client."""
        return leaf or not self.shared

    def returns(self, leaf: bool) -> bool:
        """Whether the trained head goes back with the upload."""
        return self.shared and not leaf
