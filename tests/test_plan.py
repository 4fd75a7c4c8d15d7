"""Typed local plans and the one executor: validation, slot starts, stores as values, equivalence with a
hand-driven Lightning fit."""

from __future__ import annotations

import pytest
import torch

from hilora_lightning import HiLoRAViT, Tier
from hilora_lightning.data import digits_federation
from hilora_lightning.errors import AdapterStateError
from hilora_lightning.federation.backend import InProcessBackend
from hilora_lightning.federation.local import fit_current, head_state
from hilora_lightning.federation.plan import (
    Budget,
    ClientStore,
    HeadStart,
    Kind,
    LocalPlan,
    Origin,
    ScorePlan,
    Start,
    Step,
)
from hilora_lightning.federation.runtime import ClientRuntime
from hilora_lightning.state import export_tier, import_tier

R, C, L = Tier.ROOT, Tier.CLUSTER, Tier.LEAF


def _state(model: HiLoRAViT, tier: Tier, seed: int) -> dict[str, torch.Tensor]:
    """A non-trivial slot state (random A and B) of the model's shapes."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in export_tier(model, tier).items()}


def _plan(slots, steps, **kw) -> LocalPlan:
    return LocalPlan(Kind.TRAIN, 0, 1, slots, kw.pop("head", HeadStart(None)), steps, kw.pop("budget", Budget(8, 1, 2)),
                     **kw)


@pytest.mark.parametrize("make,match", [
    (lambda: Start(Origin.SERVER), "a slot the server sends needs its state"),
    (lambda: Start(Origin.FRESH), "a fresh slot needs the seed of a fresh one"),
    (lambda: Start(Origin.KEPT, freeze=True, seed=1), "only a state the server sends can be frozen on the client"),
    (lambda: Step((R,), (R, C), 0), r"trained slots \['cluster'\] must also be active, got \['root'\]"),
    (lambda: _plan({R: Start.server({})}, ()), "plan for client 0 has no steps"),
    (lambda: _plan({R: Start.server({})}, (Step((R, C), (C,), 0),)), r"a step uses slots \['cluster'\] that the plan"),
    (lambda: _plan({R: Start.server({})}, (Step((R,), (R,), 0),), upload=(L, "AB")),
     "plan uploads or keeps the leaf slot, which it does not load"),
    (lambda: _plan({R: Start.server({})}, (Step((R,), (R,), 0),), keep=((R, "BA"),)),
     r"a slot's side must be one of \('AB', 'A', 'B'\), got 'BA'"),
    (lambda: LocalPlan(Kind.SCORE, 0, 1, {R: Start.server({})}, HeadStart(None), (Step((R,), (R,), 0),)),
     "a LocalPlan trains; scoring is a ScorePlan"),
    (lambda: ScorePlan(0, 1, (R,), {R: Start.server({})}, HeadStart(None), metric="f1"),
     r"metric must be one of \('accuracy', 'loss'\), got 'f1'"),
    (lambda: ScorePlan(0, 1, (R, L), {R: Start.server({})}, HeadStart(None)),
     r"scoring with slots \['leaf'\] that the plan does not load"),
])
def test_a_malformed_plan_is_refused_with_what_was_expected(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_store_round_trip_keeps_every_entry_and_checkpoints_leave_out_frozen_copies() -> None:
    t = {"m.lora_A": torch.randn(2, 3), "m.lora_B": torch.randn(4, 2)}
    store = ClientStore(kept={L: t, R: {"m.lora_B": t["m.lora_B"]}}, frozen={C: t}, head={"w": torch.ones(3)},
                        gates={"g.weights": torch.tensor([0.5, 0.5])})
    flat = store.to_dict()
    assert sorted(flat) == ["frozen-cluster", "gates", "head", "keep-root", "leaf"]
    assert ClientStore.from_dict(flat) == store and ClientStore.from_dict(flat) != ClientStore()
    assert "frozen-cluster" not in store.to_dict(frozen=False)
    backend = InProcessBackend()
    backend.stores = {3: store, 4: ClientStore()}
    saved = backend.state_dict()
    assert list(saved) == ["3"] and "frozen-cluster" not in saved["3"]  # the server resends frozen tiers in process
    restored = InProcessBackend()
    restored.load_state_dict(saved)
    assert restored.store(3) == ClientStore(kept=store.kept, head=store.head, gates=store.gates)
    assert restored.store(9) == ClientStore()  # a client never seen has an empty store


def test_the_executor_equals_a_hand_driven_stage_fit_and_keeps_only_what_the_plan_says() -> None:
    """A cluster-stage plan (root frozen, cluster trained against it with the penalty) gives bitwise what
    loading the same states and calling Lightning through set_stage gives; the store changes as planned."""
    client = digits_federation(2)[0]
    model = HiLoRAViT(lr=3e-3, gamma_c=0.5)
    root, cluster, head = _state(model, R, 1), _state(model, C, 2), head_state(model)
    step = Step((R, C), (C,), seed=11, penalty=((R, 0.5),))
    plan = _plan({R: Start.server(root, freeze=True), C: Start.server(cluster)}, (step,), head=HeadStart(head),
                 budget=Budget(8, 1, 3), upload=(C, "AB"), return_head=True)
    runtime = ClientRuntime(model)
    before = ClientStore(head={"w": torch.zeros(1)})
    reply, after = runtime.fit(plan, client, before)

    ref = HiLoRAViT(lr=3e-3, gamma_c=0.5)
    import_tier(ref, R, root)
    import_tier(ref, C, cluster)
    ref.head.load_state_dict(head)
    ref.set_stage(C)  # the stage path: cluster trains, root active and frozen, penalty from gamma_c
    fit_current(ref, client.train, 11, 8, 1, 3, {})
    expected = export_tier(ref, C)
    assert reply.factors is not None and all(torch.equal(reply.factors[k], expected[k]) for k in expected)
    assert reply.head is not None and all(torch.equal(reply.head[k], v) for k, v in head_state(ref).items())
    assert reply.num_samples == client.num_samples
    assert after == ClientStore(frozen={R: root}, head={"w": torch.zeros(1)})  # the frozen root, nothing else
    assert before == ClientStore(head={"w": torch.zeros(1)})  # a value: the old store is untouched


def test_slot_starts_resolve_as_named_frozen_kept_fresh_and_overlay() -> None:
    client = digits_federation(2)[0]
    model = HiLoRAViT(lr=3e-3)
    runtime = ClientRuntime(model)
    root, own_b, leaf = _state(model, R, 1), _state(model, R, 2), _state(model, L, 3)
    only_b = {k: v for k, v in own_b.items() if k.endswith(".lora_B")}
    store = ClientStore(kept={R: only_b, L: leaf}, frozen={C: root})
    score = ScorePlan(0, 1, (R, C, L), {R: Start.server(root, overlay=True), C: Start.frozen(), L: Start.kept(5)},
                      HeadStart(None))
    runtime.evaluate(score, client, store)
    got = {t: export_tier(model, t) for t in Tier}
    assert all(torch.equal(got[R][k], only_b[k] if k in only_b else root[k]) for k in root)  # B is the client's
    assert all(torch.equal(got[C][k], root[k]) for k in root)  # its frozen copy (root-shaped here)
    assert all(torch.equal(got[L][k], leaf[k]) for k in leaf)
    fresh = ScorePlan(0, 1, (R, L), {R: Start.fresh(7), L: Start.kept(8)}, HeadStart(None))
    runtime.evaluate(fresh, client, ClientStore())
    ref = HiLoRAViT()
    ref.reset_tier(R, 7)
    ref.reset_tier(L, 8)
    for tier in (R, L):
        assert all(torch.equal(export_tier(model, tier)[k], v) for k, v in export_tier(ref, tier).items())
    with pytest.raises(RuntimeError, match="client 0: the server expects it to hold the frozen cluster adapter"):
        runtime.evaluate(ScorePlan(0, 1, (R, C), {R: Start.fresh(1), C: Start.frozen()}, HeadStart(None)), client,
                         ClientStore())


def test_own_head_wins_then_the_sent_head_then_the_initial_one() -> None:
    client = digits_federation(2)[0]
    model = HiLoRAViT()
    runtime = ClientRuntime(model)
    initial = head_state(model)
    own = {k: torch.full_like(v, 0.5) for k, v in initial.items()}
    sent = {k: torch.full_like(v, -0.5) for k, v in initial.items()}
    for head, store, want in [(HeadStart(sent, own=True), ClientStore(head=own), own),
                              (HeadStart(sent, own=True), ClientStore(), sent),
                              (HeadStart(sent), ClientStore(head=own), sent),
                              (HeadStart(None, own=True), ClientStore(), initial)]:
        runtime.evaluate(ScorePlan(0, 1, (R,), {R: Start.fresh(1)}, head), client, store)
        assert all(torch.equal(head_state(model)[k], want[k]) for k in want)


def test_a_failing_plan_changes_no_store_and_a_non_finite_update_is_refused() -> None:
    client = digits_federation(2)[0]
    model = HiLoRAViT(lr=1e30)  # the update overflows
    backend = InProcessBackend()
    backend.bind(ClientRuntime(model), [client])
    kept = {L: _state(model, L, 4)}
    backend.stores[client.client_id] = ClientStore(kept=kept)
    plan = LocalPlan(Kind.FINETUNE, client.client_id, 1, {R: Start.fresh(1), L: Start.kept(2)}, HeadStart(None),
                     (Step((R, L), (L,), seed=3),), Budget(8, 1, 2), keep=((L, "AB"),), keep_head=True)
    reply = backend.fit({client.client_id: plan})[client.client_id]
    assert isinstance(reply, AdapterStateError) and "holds NaN or Inf values after training" in str(reply)
    assert backend.store(client.client_id) == ClientStore(kept=kept)


def test_the_adapter_spec_makes_the_states_the_model_makes_and_strategies_keep_no_model() -> None:
    """Fresh states from the spec equal reset_tier's bitwise (ranks and inits differing per tier); the shapes
    are what import_tier accepts; neither strategy holds a module."""
    from hilora_lightning import AdapterConfig, TierConfig
    from hilora_lightning.adapter_spec import AdapterSpec
    from hilora_lightning.baselines import FedSALoRA
    from hilora_lightning.baselines.strategy import BaselineStrategy
    from hilora_lightning.federation import FederationConfig
    from hilora_lightning.federation.hilora import HiLoRAStrategy
    from hilora_lightning.state import expected_shapes

    adapter = AdapterConfig(targets="all_linear", root=TierConfig(rank=4, alpha=8),
                            cluster=TierConfig(rank=2, alpha=2, init="gaussian"), leaf=TierConfig(rank=3, alpha=3))
    model = HiLoRAViT(adapter=adapter)
    spec = AdapterSpec.from_model(model)
    for tier in Tier:
        model.reset_tier(tier, 42)
        made = export_tier(model, tier)
        fresh = spec.fresh(tier, 42)
        assert fresh.keys() == made.keys() and all(torch.equal(fresh[k], made[k]) for k in made)
        assert spec.shapes(tier) == expected_shapes(model, tier)
    assert (spec.rank(R), spec.rank(C), spec.rank(L)) == (4, 2, 3)
    assert spec.penalty(L) == ((R, 0.1), (C, 0.1)) and spec.penalty(R) == ()
    config = FederationConfig(rounds=10, schedule="per_round")
    for strategy in (HiLoRAStrategy(model, config), HiLoRAStrategy(spec, config),
                     BaselineStrategy(FedSALoRA(rounds=10), HiLoRAViT(gamma_c=0, gamma_l=0), config)):
        assert not [k for k, v in vars(strategy).items() if isinstance(v, torch.nn.Module)]
    a, b = HiLoRAStrategy(model, config), HiLoRAStrategy(spec, config)
    assert a.fingerprint() == b.fingerprint()
    assert all(torch.equal(a.initial_root[k], v) for k, v in b.initial_root.items())


def test_a_baseline_sends_its_global_head_to_a_client_that_holds_none_and_only_then() -> None:
    """FedDPA-F's first local round: a client without a personal head starts from the global head, which
    must travel (over Flower nothing else would give it); a client holding its own head is sent nothing."""
    from hilora_lightning.baselines import FedDPAF
    from hilora_lightning.baselines.strategy import BaselineStrategy
    from hilora_lightning.federation import FederationConfig

    strategy = BaselineStrategy(FedDPAF(rounds=3, local_rounds=1), HiLoRAViT(gamma_c=0, gamma_l=0),
                                FederationConfig(rounds=3, schedule="per_round", local_steps=2))
    state = strategy.initial_state([0, 1])
    assert strategy.configure_fit(state, 1, [0], L)[0].head == HeadStart(state.global_head)  # a federated round
    assert strategy.configure_fit(state, 3, [0], L)[0].head == HeadStart(None, own=True)  # nothing aggregated yet
    state.global_head = {k: v + 1 for k, v in state.global_head.items()}
    state.extra["own_head"] = [1]
    plans = strategy.configure_fit(state, 3, [0, 1], L)
    assert plans[0].head.own and all(torch.equal(plans[0].head.state[k], v) for k, v in state.global_head.items())
    assert plans[1].head == HeadStart(None, own=True)
    assert strategy.download_bytes(state, plans[0]) > strategy.download_bytes(state, plans[1])
    assert strategy.configure_fit(state, 1, [0], L)[0].slots[L] == Start.kept(0)  # idle: the model's initial factors
    assert strategy.configure_fit(state, 3, [0], L)[0].slots[L] == Start.kept(_leaf_seed(strategy, 0))  # it trains


def _leaf_seed(strategy, cid: int) -> int:
    from hilora_lightning.federation.client import client_seed

    return client_seed(strategy.config.seed, 0, cid, "leaf")
