"""The round engine: a failed round commits nothing, state as a value, stores, callbacks, lazy imports."""

from __future__ import annotations

import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch

from hilora_lightning import AdapterConfig, HiLoRAViT, Tier
from hilora_lightning.baselines import BaselineRunner, FedSALoRA
from hilora_lightning.data import digits_federation
from hilora_lightning.federation import FederatedOrchestrator, FederationConfig, FederationError, ServerState
from hilora_lightning.federation.local import LoaderSpec, fresh_callbacks
from hilora_lightning.inject import inject_tiers
from hilora_lightning.state import export_tier, import_tier

FAST = {"local_steps": 2, "batch_size": 16}


def _tensors(state: ServerState, stores: dict) -> dict[str, torch.Tensor]:
    out = {f"root/{k}": v for k, v in state.root.items()}
    for j, st in state.clusters.items():
        out.update({f"c{j}/{k}": v for k, v in st.items()})
    for cid, store in stores.items():
        for name, st in store.items():
            out.update({f"{cid}/{name}/{k}": v for k, v in st.items()})
    return out


def test_a_failed_per_round_round_commits_nothing_and_a_rerun_equals_a_clean_run() -> None:
    """The cluster half of a per_round round fails below min_clients after the root half aggregated:
    nothing of that round may stay (state, client stores); run() again must equal a run that never failed."""
    cfg = FederationConfig(rounds=4, root_rounds=(1, 1), cluster_rounds=(1, 1), schedule="per_round", min_clients=4,
                           **FAST)
    clean = FederatedOrchestrator(HiLoRAViT(lr=3e-3), digits_federation(4), cfg, progress=False)
    clean.run()
    flaky = FederatedOrchestrator(HiLoRAViT(lr=3e-3), digits_federation(4), cfg, progress=False)
    flaky.run(stop_after=2)  # root, then the first round that trains all three tiers
    before = _tensors(flaky.state, flaky.backend.state_dict())
    fit = flaky.backend.fit

    def failing_cluster_half(requests):  # the root half succeeds, the cluster half loses a client
        replies = fit(requests)
        if next(iter(requests.values())).upload[0] is Tier.CLUSTER:
            replies[0] = RuntimeError("node lost")
        return replies

    flaky.backend.fit = failing_cluster_half  # type: ignore[method-assign]
    with pytest.raises(FederationError, match="round 3: only 3 of 4 clients succeeded"):
        flaky.run()
    after = _tensors(flaky.state, flaky.backend.state_dict())
    assert flaky.round == 2 and len(flaky.records) == 2 and after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    flaky.backend.fit = fit  # type: ignore[method-assign]
    flaky.run()
    a, b = _tensors(flaky.state, flaky.backend.state_dict()), _tensors(clean.state, clean.backend.state_dict())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_server_state_round_trips_through_to_dict() -> None:
    orch = FederatedOrchestrator(HiLoRAViT(lr=3e-3), digits_federation(4),
                                 FederationConfig(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), **FAST),
                                 progress=False)
    orch.run()
    state = orch.state
    back = ServerState.from_dict(state.to_dict())
    assert back.to_dict().keys() == state.to_dict().keys()
    assert back.round == state.round and back.stage is state.stage and back.assignment == state.assignment
    assert all(torch.equal(back.root[k], v) for k, v in state.root.items())
    assert [r.to_dict() for r in back.records] == [r.to_dict() for r in state.records]
    assert {t: sorted(v) for t, v in back.has_final.items()} == {t: sorted(v) for t, v in state.has_final.items()}


def test_tier_keys_are_relative_to_the_backbone_both_ways() -> None:
    model = HiLoRAViT()
    model.reset_tier(Tier.CLUSTER, 3)
    with torch.no_grad():
        for layer in model.tiered_layers.values():
            for b in layer.lora_B["cluster"]:
                b.normal_()
    state = export_tier(model, Tier.CLUSTER)
    assert all(k.startswith("blocks.") for k in state)
    bare = model.build_backbone()  # the same frozen timm ViT, without the LightningModule around it
    inject_tiers(bare, AdapterConfig())
    import_tier(bare, Tier.CLUSTER, state)  # a HiLoRAViT export loads into a bare injected timm model
    back = export_tier(bare, Tier.CLUSTER)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    other = HiLoRAViT()
    import_tier(other, Tier.LEAF, back)  # and back into a HiLoRAViT slot
    assert all(torch.equal(export_tier(other, Tier.LEAF)[k], state[k]) for k in state)


def test_every_client_fit_gets_fresh_callbacks() -> None:
    class Counter(pl.Callback):
        def __init__(self) -> None:
            self.fits = 0

        def on_fit_start(self, trainer, pl_module) -> None:
            self.fits += 1
            assert self.fits == 1, "a callback object was reused across client fits"

    shared = Counter()
    made = fresh_callbacks([shared])
    assert made[0] is not shared and isinstance(made[0], Counter)
    assert fresh_callbacks(lambda: [shared])[0] is shared  # a factory's objects are used as made
    orch = FederatedOrchestrator(HiLoRAViT(lr=3e-3), digits_federation(3),
                                 FederationConfig(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), **FAST),
                                 trainer_kwargs={"callbacks": [shared], "enable_progress_bar": False},
                                 progress=False, raise_client_errors=True)  # an assert inside a client fails here
    orch.run()  # six client fits, each with its own Counter (the assertion inside would fail otherwise)
    assert shared.fits == 0


def test_loader_spec_validates() -> None:
    with pytest.raises(ValueError, match=r"unknown loader option\(s\) \['workers'\]"):
        LoaderSpec.from_dict({"workers": 2})
    with pytest.raises(ValueError, match="num_workers must be an int >= 0, got -1"):
        LoaderSpec(num_workers=-1)


def test_baselines_leave_the_callers_model_alone_and_resume_mid_method(tmp_path) -> None:
    model = HiLoRAViT(lr=3e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FederationConfig(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), **FAST)
    straight = BaselineRunner(FedSALoRA(rounds=3), model, digits_federation(3), cfg, progress=False).run()
    assert model.hparams["gamma_c"] == 0.1 and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    path = tmp_path / "fedsa.pt"
    BaselineRunner(FedSALoRA(rounds=3), HiLoRAViT(lr=3e-3), digits_federation(3), cfg, progress=False,
                   checkpoint_path=path).run(stop_after=2)
    resumed = BaselineRunner(FedSALoRA(rounds=3), HiLoRAViT(lr=3e-3), digits_federation(3), cfg, progress=False,
                             checkpoint_path=path).run(resume=True)
    assert [r.round for r in resumed.records] == [1, 2, 3]
    assert resumed.client_accuracy == straight.client_accuracy


def test_pure_modules_import_without_lightning_or_timm() -> None:
    code = ("import sys; import hilora_lightning.strategy.aggregation, hilora_lightning.strategy.subspace, "
            "hilora_lightning.federation.server_state, hilora_lightning.federation.plan, "
            "hilora_lightning.data.clients, hilora_lightning.federation.config; "
            "bad = sorted(m for m in ('lightning', 'timm', 'lightning.pytorch') if m in sys.modules); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_leaf_stage_reply_carrying_factors_or_a_head_is_rejected() -> None:
    from hilora_lightning.errors import AdapterStateError
    from hilora_lightning.federation.engine import Expected, check_reply
    from hilora_lightning.federation.plan import FitReply

    leaf = Expected(None, None)
    check_reply(FitReply(None, None, 3), leaf)  # what a leaf round sends back: nothing
    with pytest.raises(AdapterStateError, match="carries factors, but this round's factors stay on the client"):
        check_reply(FitReply({"m.lora_A": torch.ones(1)}, None, 3), leaf)
    with pytest.raises(AdapterStateError, match="carries a head, but this round's head stays on the client"):
        check_reply(FitReply(None, {"w": torch.ones(1)}, 3), leaf)
    shared = Expected({"m.lora_A": (1,)}, {"w": (1,)})
    with pytest.raises(AdapterStateError, match=r"head update has keys/shapes \[\('w', \(2,\)\)\]"):
        check_reply(FitReply({"m.lora_A": torch.ones(1)}, {"w": torch.ones(2)}, 3), shared)
