"""The nine federated LoRA baselines of the HiLoRA paper, as declarative strategies.

Every method runs on the same :class:`~hilora_lightning.model.HiLoRAViT` (same frozen backbone, same
targets, ranks and optimizer) and reuses its three tier slots as *adapter slots*:

* ``Tier.ROOT`` holds the **global** (shared) LoRA,
* ``Tier.CLUSTER`` holds FedALT's frozen **rest-of-world** LoRA,
* ``Tier.LEAF`` holds the **personal** LoRA, which never leaves the client.

A method says, per round, which slots are active and which train in each *phase* of the local
update (phases split the round's local steps, so every method spends the same compute per round),
how the server aggregates (``rule``), what is evaluated, and how an unseen client adapts.
The orthogonality penalty is off (``gamma = 0``) for all of them.

Choices shared by every method (the papers leave them open or differ): the head follows the run's
``head_policy`` (``"tier"``: it travels and is averaged whenever a LoRA is uploaded, and stays
personal in rounds without upload; ``"local"``: never leaves); aggregation weights are sample
counts; unseen clients fine-tune their personal part for ``finetune_epochs`` (global-only methods
their copy of the global LoRA), as the HiLoRA paper's protocol.

Example:
    >>> from hilora_lightning.baselines.methods import BASELINES
    >>> sorted(BASELINES)[:3]
    ['fdlora', 'fedalt', 'feddpa-f']
    >>> BASELINES["fedsa-lora"].rule
    'A'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from torch import Tensor

from hilora_lightning.federation.config import FederationConfig
from hilora_lightning.federation.plan import Phase
from hilora_lightning.strategy.aggregation import fedavg_states, leave_one_out_states, product_space_aggregate_states
from hilora_lightning.tiers import Tier

__all__ = [
    "BASELINES",
    "RULES",
    "FDLoRA",
    "FedALT",
    "FedDPAF",
    "FedDPAT",
    "FedIT",
    "FedSALoRA",
    "FlexLoRA",
    "LocalLoRA",
    "Method",
    "PF2LoRA",
    "Phase",
    "local_rounds",
    "make_method",
    "server_aggregate",
]

G, R, P = Tier.ROOT, Tier.CLUSTER, Tier.LEAF  # global, rest-of-world, personal slots

#: Server rules: ``None`` (nothing uploaded), ``"fedavg"`` (A and B averaged separately),
#: ``"product"`` (sum pi B A, truncated SVD back to factors), ``"A"`` (only A uploaded and averaged,
#: B stays local), ``"others"`` (personal LoRAs uploaded; each client gets the mean of the others').
RULES = (None, "fedavg", "product", "A", "others")


def server_aggregate(
    rule: str | None,
    uploads: Mapping[int, Mapping[str, Tensor]],
    weights: Mapping[int, float],
    global_state: Mapping[str, Tensor],
    latest: Mapping[int, Mapping[str, Tensor]],
    rank: int,
) -> tuple[dict[str, Tensor], dict[int, dict[str, Tensor]], dict[int, dict[str, Tensor]]]:
    """One server step of a rule: the new global state, every client's latest upload, and each
    client's rest-of-world state (FedALT).

    Args:
        rule: one of :data:`RULES`.
        uploads: this round's uploads by client id (``"A"``: only the ``lora_A`` keys).
        weights: aggregation weight (sample count) of every client in ``uploads`` and ``latest``.
        global_state: the current global LoRA (its ``B`` is kept by ``"A"``).
        latest: every client's previous upload (``"others"`` keeps clients absent from this round).
        rank: the global LoRA's rank (``"product"``).

    Example:
        >>> import torch
        >>> up = {0: {"m.lora_A": torch.ones(1, 2)}, 1: {"m.lora_A": 3 * torch.ones(1, 2)}}
        >>> g, _, _ = server_aggregate("A", up, {0: 1, 1: 1}, {"m.lora_A": torch.zeros(1, 2),
        ...                            "m.lora_B": torch.ones(2, 1)}, {}, rank=1)
        >>> g["m.lora_A"].tolist(), g["m.lora_B"].tolist()
        ([[2.0, 2.0]], [[1.0], [1.0]])
    """
    ids = sorted(uploads)
    states, w = [dict(uploads[c]) for c in ids], [weights[c] for c in ids]
    new_global = {k: v for k, v in global_state.items()}
    new_latest = {c: dict(v) for c, v in latest.items()}
    row: dict[int, dict[str, Tensor]] = {}
    if rule is None or not ids:
        return new_global, new_latest, row
    if rule == "fedavg":
        new_global = fedavg_states(states, w)
    elif rule == "product":
        new_global = product_space_aggregate_states(states, w, rank)
    elif rule == "A":
        if any(not k.endswith(".lora_A") for st in states for k in st):
            raise ValueError("rule 'A' (FedSA-LoRA) aggregates only lora_A keys; an upload holds other keys")
        new_global.update(fedavg_states(states, w))
    elif rule == "others":
        new_latest.update({c: st for c, st in zip(ids, states)})
        row = leave_one_out_states(new_latest, {c: weights[c] for c in new_latest})
    else:
        raise ValueError(f"unknown rule {rule!r}: expected one of {RULES}")
    return new_global, new_latest, row


class Method:
    """A federated LoRA strategy over the shared slots (subclasses set the class attributes).

    Attributes:
        name: the registry key (``hilora-fl compare ... methods=<name>``).
        rule: the server rule (see :data:`RULES`).
        slots: the slots the method uses.
        eval_active: the slots active when a client is evaluated.
        gate_mode: ``"input"`` or ``"scalar"`` gates over ``gate_tiers`` (``None``: no gate).
        gate_init: starting weights of scalar gates.
        fusion_share: after training, a gates-only fusion phase of this share of a round's steps.
        zero_shot_gate: scalar-gate weights an unseen client starts from (``None``: fresh gates).
    """

    name: ClassVar[str] = ""
    rule: ClassVar[str | None] = None
    slots: ClassVar[tuple[Tier, ...]] = (G,)
    eval_active: ClassVar[tuple[Tier, ...]] = (G,)
    gate_mode: ClassVar[str | None] = None
    gate_tiers: ClassVar[tuple[Tier, ...]] = ()
    gate_init: ClassVar[tuple[float, ...] | None] = None
    fusion_share: ClassVar[float] = 0.0
    zero_shot_gate: ClassVar[tuple[float, ...] | None] = None

    def __init__(self, rounds: int, local_rounds: int = 0) -> None:
        self.rounds = rounds
        self.local_rounds = local_rounds

    def phases(self, round_idx: int) -> list[Phase]:
        """The phases of client updates in round ``round_idx`` (1-based)."""
        return [Phase(self.eval_active, self.eval_active)]

    def uploads(self, round_idx: int) -> bool:
        """Whether clients upload in round ``round_idx``."""
        return self.rule is not None

    def unseen_phases(self) -> list[Phase]:
        """How an unseen client fine-tunes (each phase gets the whole fine-tuning budget; the slots
        it trains stay on the client for its evaluation)."""
        personal = P in self.slots
        trained = (P,) if personal else (G,)
        return [Phase(self.eval_active, trained, gates=self.gate_mode is not None)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rounds={self.rounds})"


class LocalLoRA(Method):
    """Local-LoRA: every client trains its own LoRA on its own data; nothing is communicated.

    The lower bound of collaboration (personalization without federation). Reference: Hu et al.,
    "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, applied per client.
    """

    name = "local-lora"
    rule = None
    slots = (P,)
    eval_active = (P,)


class FedIT(Method):
    """FedIT: FedAvg of one LoRA, ``A`` and ``B`` averaged separately.

    Reference: Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
    ICASSP 2024. Averaging the factors separately adds cross terms (``mean(B) mean(A) != mean(B A)``),
    which FlexLoRA and HiLoRA avoid.
    """

    name = "fedit"
    rule = "fedavg"


class FlexLoRA(Method):
    """FlexLoRA: average in product space ``sum_i pi_i B_i A_i``, then a truncated SVD back to rank ``r``.

    Reference: Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
    and Client Resources", NeurIPS 2024. With one rank for all clients (as in the HiLoRA comparison)
    this is exactly HiLoRA's root aggregation, shared code included
    (:func:`~hilora_lightning.strategy.aggregation.product_space_aggregate_states`).
    """

    name = "flexlora"
    rule = "product"


class FedSALoRA(Method):
    """FedSA-LoRA: ``A`` (general knowledge) is shared and averaged, ``B`` (client-specific) stays local.

    Reference: Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
    ICLR 2025. Both factors train every round. Our choice for unseen clients: they get the global
    ``A`` and start ``B`` from zero (no client's ``B`` ever reaches the server), then fine-tune both.
    """

    name = "fedsa-lora"
    rule = "A"


class FDLoRA(Method):
    """FDLoRA: a global and a personal LoRA, trained alternately, combined by adaptive fusion.

    Reference: Qi et al., "FDLoRA: Personalized Federated Learning of Large Language Model via Dual
    LoRA Tuning", arXiv 2406.07925, 2024. Each round trains the global LoRA alone (half the steps,
    then FedAvg) and the personal LoRA alone (the other half). The two are fused by per-layer scalar
    weights (start 0.5 / 0.5). Our choices: the fusion weights are learned by gradient descent on the
    client's training data (the paper uses a gradient-free search) in a gates-only phase of a quarter
    round's steps after the last round. An unseen client arrives with the global LoRA alone (weights
    1 / 0); its fine-tune is a client's own update (the global LoRA alone, then the personal one, each
    for the fine-tuning budget, neither uploaded) from the weights every client trains with, then the
    fusion.
    """

    name = "fdlora"
    rule = "fedavg"
    slots = (G, P)
    eval_active = (G, P)
    gate_mode = "scalar"
    gate_tiers = (G, P)
    gate_init = (0.5, 0.5)
    fusion_share = 0.25
    zero_shot_gate = (1.0, 0.0)

    def phases(self, round_idx: int) -> list[Phase]:
        return [Phase((G,), (G,), 0.5), Phase((P,), (P,), 0.5)]

    def unseen_phases(self) -> list[Phase]:
        return self.phases(1)


class FedDPAF(Method):
    """FedDPA-F: dual personalizing adapters, sequential: the global adapter first, then the local one.

    Reference: Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models", NeurIPS 2024
    ("F": the local adapter is fine-tuned after federated training of the global one). The global
    adapter trains with FedAvg for ``rounds - local_rounds`` rounds; in the last ``local_rounds``
    rounds (the rounds HiLoRA keeps for its leaf stage at least) each client trains its local
    adapter on the frozen global one, without communication. Omitted: the paper's instance-wise
    dynamic weighting at test time (global and local adapters are summed).
    """

    name = "feddpa-f"
    rule = "fedavg"
    slots = (G, P)
    eval_active = (G, P)

    def _global_round(self, round_idx: int) -> bool:
        return round_idx <= self.rounds - self.local_rounds

    def phases(self, round_idx: int) -> list[Phase]:
        if self._global_round(round_idx):
            return [Phase((G,), (G,))]
        return [Phase((G, P), (P,))]

    def uploads(self, round_idx: int) -> bool:
        return self._global_round(round_idx)


class FedDPAT(Method):
    """FedDPA-T: dual personalizing adapters trained alternately within each round.

    Reference: Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models", NeurIPS 2024
    ("T": training variant). Each round trains the local adapter on the frozen global one (half the
    steps), then the global adapter with the local one frozen and active (the other half); only the
    global adapter is uploaded (FedAvg). Omitted, as for FedDPA-F: instance-wise dynamic weighting.
    """

    name = "feddpa-t"
    rule = "fedavg"
    slots = (G, P)
    eval_active = (G, P)

    def phases(self, round_idx: int) -> list[Phase]:
        return [Phase((G, P), (P,), 0.5), Phase((G, P), (G,), 0.5)]


class PF2LoRA(Method):
    """PF2LoRA: a common LoRA shared by all clients plus a personal LoRA per client, trained jointly.

    Reference: Hao et al., "Personalized Federated Fine-tuning for Heterogeneous Data: An Automatic
    Rank Learning Approach via Two-Level LoRA" (PF2LoRA), arXiv 2503.03920, 2025. Both levels train
    together each round; the common one is averaged (FedAvg). Our simplification: joint first-order
    training instead of the paper's bilevel optimization, and the personal rank is the configured
    leaf rank (no automatic rank learning).
    """

    name = "pf2lora"
    rule = "fedavg"
    slots = (G, P)
    eval_active = (G, P)

    def phases(self, round_idx: int) -> list[Phase]:
        return [Phase((G, P), (G, P))]


class FedALT(Method):
    """FedALT: an individual LoRA plus a frozen rest-of-world LoRA, mixed by a learned input gate.

    Reference: Bian et al., "FedALT: Federated Fine-Tuning through Adaptive Local Training with
    Rest-of-World LoRA", AAAI 2026 (arXiv 2503.11880). Every round a client receives the average of the
    *other* clients' latest individual LoRAs (``A`` and ``B`` averaged separately; our choice), keeps
    it frozen, and trains its individual LoRA and a per-layer softmax router over the two (zero
    initialized: 0.5 / 0.5); it uploads its individual LoRA. An unseen client gets the average of all
    clients' individual LoRAs and fresh gates.
    """

    name = "fedalt"
    rule = "others"
    slots = (R, P)
    eval_active = (R, P)
    gate_mode = "input"
    gate_tiers = (R, P)

    def phases(self, round_idx: int) -> list[Phase]:
        return [Phase((R, P), (P,), gates=True)]


#: Registry of the paper's nine baselines by name.
BASELINES: dict[str, type[Method]] = {
    cls.name: cls for cls in (LocalLoRA, FedIT, FlexLoRA, FedSALoRA, FDLoRA, FedDPAF, FedDPAT, PF2LoRA, FedALT)
}


def local_rounds(config: FederationConfig) -> int:
    """The rounds HiLoRA keeps for its leaf stage at least; FedDPA-F's local-adapter rounds."""
    rest = config.rounds - config.root_rounds[1] - config.cluster_rounds[1]
    return rest if rest > 0 else max(1, config.rounds // 5)


def make_method(name: str, config: FederationConfig) -> Method:
    """The baseline ``name`` sized to the run's round budget.

    Example:
        >>> from hilora_lightning.federation.config import FederationConfig
        >>> make_method("fedit", FederationConfig(rounds=10, schedule="per_round")).rounds
        10
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}: available {sorted(BASELINES)}")
    return BASELINES[name](rounds=config.rounds, local_rounds=local_rounds(config))
