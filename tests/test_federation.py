from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from hilora_lightning import HiLoRAViT, Tier
from hilora_lightning.data import digits_federation
from hilora_lightning.export import client_copy
from hilora_lightning.federation import (
    ClientData,
    ClusteringConfig,
    FederatedOrchestrator,
    FederationConfig,
    FederationError,
    Payload,
    transition,
)
from hilora_lightning.federation.checkpoint import load_checkpoint
from hilora_lightning.federation.hilora import HiLoRAStrategy
from hilora_lightning.federation.plan import Kind
from hilora_lightning.strategy.aggregation import factor_pairs, subspace_change

FAST = {"local_steps": 2, "batch_size": 16}


def _config(**kw) -> FederationConfig:
    base: dict = {"rounds": 4, "root_rounds": (2, 2), "cluster_rounds": (1, 1), **FAST}
    base.update(kw)
    return FederationConfig(**base)


def _orch(clients=None, config=None, **kw) -> FederatedOrchestrator:
    return FederatedOrchestrator(HiLoRAViT(lr=3e-3), clients or digits_federation(4), config or _config(),
                                 progress=False, **kw)


def _dense(payloads: list[Payload], prefix: str, rank: int) -> np.ndarray:
    w = np.array([p.num_samples for p in payloads], dtype=np.float64)
    w /= w.sum()
    total = sum(wi * (p.factors[f"{prefix}.lora_B"].double() @ p.factors[f"{prefix}.lora_A"].double()).numpy()
                for wi, p in zip(w, payloads))
    u, s, vh = np.linalg.svd(total, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_three_stages_and_dense_reference_aggregation() -> None:
    seen: list[Payload] = []
    orch = _orch(config=_config(clustering=ClusteringConfig(method="given", assignment={0: 0, 1: 0, 2: 1, 3: 1})),
                 upload_hook=seen.append)
    result = orch.run(stop_after=1)
    root_payloads = [p for p in seen if p.round == 1]
    assert len(root_payloads) == 4 and all(p.tier is Tier.ROOT for p in root_payloads)
    for prefix in factor_pairs(orch.root):
        got = (orch.root[f"{prefix}.lora_B"] @ orch.root[f"{prefix}.lora_A"]).double().numpy()
        np.testing.assert_allclose(got, _dense(root_payloads, prefix, 8), atol=1e-5)
    result = orch.run()
    assert [r.stage for r in result.records] == ["root", "root", "cluster", "leaf"]
    assert set(result.tierwise) == {"root", "root+cluster", "root+cluster+leaf"}
    assert result.assignment == {0: 0, 1: 0, 2: 1, 3: 1}
    # the final-head table: every row on the client's own head; checked by hand for root only
    assert result.tierwise_fixed_head["root+cluster+leaf"] == result.tierwise["root+cluster+leaf"]
    by_hand = []
    for cid, data in orch.clients.items():
        tiers, head = orch.client_model(cid)
        model = client_copy(orch.model, {Tier.ROOT: tiers[Tier.ROOT]}, head)
        x, y = (torch.stack(v) for v in zip(*[data.test[i] for i in range(len(data.test))]))
        with torch.no_grad():
            by_hand.append((model(x).argmax(-1) == y).float().mean().item())
    assert result.tierwise_fixed_head["root"]["mean"] == pytest.approx(np.mean(by_hand), abs=1e-6)
    cluster_payloads = [p for p in seen if p.round == 3]
    assert all(p.tier is Tier.CLUSTER for p in cluster_payloads)
    for j, members in ((0, [0, 1]), (1, [2, 3])):  # each cluster aggregates its members only
        mine = [p for p in cluster_payloads if p.client_id in members]
        for prefix in factor_pairs(orch.clusters[j]):
            got = (orch.clusters[j][f"{prefix}.lora_B"] @ orch.clusters[j][f"{prefix}.lora_A"]).double().numpy()
            np.testing.assert_allclose(got, _dense(mine, prefix, 8), atol=1e-5)
    assert all(0.0 <= a <= 1.0 for a in result.client_accuracy.values())
    assert result.records[-1].acc_mean is not None and result.records[-1].bytes_up_per_client == 0.0


def test_no_leaf_or_personal_head_is_ever_uploaded() -> None:
    seen: list[Payload] = []
    orch = _orch(config=_config(head_policy="local", clustering=ClusteringConfig(method="given",
                                                                                 assignment={0: 0, 1: 1, 2: 0, 3: 1})),
                 upload_hook=seen.append)
    orch.run()
    assert seen and all(p.tier in (Tier.ROOT, Tier.CLUSTER) and p.head is None for p in seen)
    assert not [p for p in seen if p.round == 4]  # the leaf round uploads nothing
    leaves = [t for c in orch.clients for t in orch.client_store(c).kept.get(Tier.LEAF, {}).values()]
    heads = [t for c in orch.clients for t in (orch.client_store(c).head or {}).values()]
    assert leaves and heads
    uploaded = [t for p in seen for t in p.factors.values()]
    assert not any(t.shape == u.shape and torch.equal(t, u) for t in leaves + heads for u in uploaded)


def test_tier_head_policy_shares_the_head_before_the_leaf_stage_only() -> None:
    seen: list[Payload] = []
    _orch(config=_config(clustering=ClusteringConfig(method="given", assignment={0: 0, 1: 1, 2: 0, 3: 1})),
          upload_hook=seen.append).run()
    assert all(p.head is not None for p in seen) and {p.round for p in seen} == {1, 2, 3}


@pytest.mark.parametrize(("tau", "expected"), [(1e12, ["root", "root", "cluster", "cluster", "leaf"]),
                                               (0.0, ["root", "root", "root", "cluster", "leaf"])])
def test_root_stage_ends_on_the_rho_rule(tau: float, expected: list[str]) -> None:
    cfg = _config(rounds=5, root_rounds=(1, 3), cluster_rounds=(1, 2), tau_rel=tau,
                  clustering=ClusteringConfig(method="given", assignment={0: 0, 1: 0, 2: 0, 3: 0}))
    result = _orch(config=cfg).run()
    assert [r.stage for r in result.records] == expected
    roots = [r for r in result.records if r.stage == "root"]
    assert roots[0].rho is None  # from the fresh (B = 0) root there is no relative change yet
    assert all(r.rho is not None and r.rho > 0 for r in roots[1:])


def test_subspace_rho_rule_is_bounded_and_ends_the_stage_past_its_minimum() -> None:
    snaps: list[dict] = []
    cfg = _config(rounds=5, root_rounds=(2, 3), cluster_rounds=(1, 2), tau_rel=1.0, rho_rule="subspace",
                  clustering=ClusteringConfig(method="given", assignment={0: 0, 1: 0, 2: 0, 3: 0}))
    orch = _orch(config=cfg)
    for _ in range(2):
        orch.run(stop_after=len(snaps) + 1)
        snaps.append({k: v.clone() for k, v in orch.root.items()})
    result = orch.run()
    assert [r.stage for r in result.records] == ["root", "root", "cluster", "cluster", "leaf"]  # 1.0 bounds it
    assert result.records[1].rho == pytest.approx(subspace_change(*snaps), abs=1e-12)
    assert 0.0 <= result.records[1].rho <= 1.0
    with pytest.raises(ValueError, match=r"rho_rule must be 'relative' or 'subspace', got 'x'"):
        FederationConfig(rho_rule="x")


class Exploding(Dataset):
    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        raise OSError("disk on fire")


def test_failing_and_nan_clients_are_dropped_and_recorded() -> None:
    clients = digits_federation(4)
    x, y = clients[3].train.tensors
    clients[2] = ClientData(2, Exploding(clients[2].train), clients[2].test, clients[2].group, val=clients[2].val)
    clients[3] = ClientData(3, TensorDataset(torch.full_like(x, float("nan")), y), clients[3].test, clients[3].group)
    orch = _orch(clients, _config(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), min_clients=2,
                                  clustering=ClusteringConfig(method="given", assignment={0: 0, 1: 0, 2: 0, 3: 0})))
    result = orch.run()
    first = result.records[0]
    assert first.succeeded == [0, 1]
    assert "OSError: disk on fire" in first.failed[2]
    assert "AdapterStateError" in first.failed[3] and "NaN or Inf" in first.failed[3]
    assert all(torch.isfinite(v).all() for v in orch.root.values())


def test_too_few_successes_fail_the_round_and_keep_the_last_good_state(tmp_path) -> None:
    clients = digits_federation(4)
    clients[1] = ClientData(1, Exploding(clients[1].train), clients[1].test, val=clients[1].val)
    ckpt = tmp_path / "fed.pt"
    orch = _orch(clients, _config(min_clients=4), checkpoint_path=ckpt)
    with pytest.raises(FederationError, match=r"round 1: only 3 of 4 clients succeeded, fewer than min_clients=4"):
        orch.run()
    assert orch.round == 0 and not ckpt.exists()
    assert all(torch.count_nonzero(v) == 0 for k, v in orch.root.items() if k.endswith("lora_B"))


def test_update_norm_bound_rejects_large_updates() -> None:
    orch = _orch(config=_config(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), max_update_norm=1e-6,
                                min_clients=1))
    with pytest.raises(FederationError, match=r"exceeds the bound"):
        orch.run()


def _final_state(orch: FederatedOrchestrator) -> dict[str, torch.Tensor]:
    out = {f"root/{k}": v for k, v in orch.root.items()}
    for j, st in orch.clusters.items():
        out.update({f"cluster{j}/{k}": v for k, v in st.items()})
    for cid in orch.clients:
        out.update({f"leaf{cid}/{k}": v for k, v in orch.client_store(cid).kept.get(Tier.LEAF, {}).items()})
        out.update({f"head{cid}/{k}": v for k, v in (orch.client_store(cid).head or {}).items()})
    return out


RESUME_CFG = {"rounds": 5, "root_rounds": (2, 2), "cluster_rounds": (1, 2), "clustering": {"k_min": 1, "k_max": 3}}


@pytest.fixture(scope="module")
def straight_run() -> FederatedOrchestrator:
    orch = _orch(config=_config(**RESUME_CFG))
    orch.run()
    return orch


def _assert_same_run(a: FederatedOrchestrator, b: FederatedOrchestrator) -> None:
    sa, sb = _final_state(a), _final_state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.assignment == b.assignment
    assert [r.stage for r in a.records] == [r.stage for r in b.records]
    assert [r.rho for r in a.records] == [r.rho for r in b.records]


def test_resume_is_bitwise_identical(tmp_path, straight_run) -> None:
    first = _orch(config=_config(**RESUME_CFG), checkpoint_path=tmp_path / "fed.pt")
    first.run(stop_after=3)
    resumed = _orch(config=_config(**RESUME_CFG), checkpoint_path=tmp_path / "fed.pt")
    resumed.run(resume=True)
    _assert_same_run(straight_run, resumed)
    assert [p.name for p in tmp_path.iterdir()] == ["fed.pt"]


KILLER = """
import os, signal, sys
from hilora_lightning import HiLoRAViT
from hilora_lightning.data import digits_federation
from hilora_lightning.federation import FederatedOrchestrator, FederationConfig

def hook(payload):
    if payload.round == 4 and payload.client_id == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # dies in the middle of round 4

cfg = FederationConfig(local_steps=2, batch_size=16, **{cfg})
FederatedOrchestrator(HiLoRAViT(lr=3e-3), digits_federation(4), cfg, checkpoint_path=sys.argv[1],
                      upload_hook=hook, progress=False).run()
"""


def test_sigkill_mid_round_loses_at_most_that_round(tmp_path, straight_run) -> None:
    import subprocess
    import sys

    script = tmp_path / "killer.py"
    script.write_text(KILLER.replace("{cfg}", repr(RESUME_CFG)))
    ckpt = tmp_path / "fed.pt"
    proc = subprocess.run([sys.executable, str(script), str(ckpt)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    resumed = _orch(config=_config(**RESUME_CFG), checkpoint_path=ckpt)
    resumed.load_state_dict(load_checkpoint(ckpt))
    assert resumed.round == 3  # rounds 1-3 survived, round 4 was lost
    resumed.run(resume=True)
    _assert_same_run(straight_run, resumed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fed.pt", "killer.py"]  # no temp file left


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch) -> None:
    from hilora_lightning.federation import checkpoint as ck

    path = ck.save_checkpoint({"round": 1}, tmp_path / "fed.pt")

    def broken_save(obj, fh):
        fh.write(b"half a checkp")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint({"round": 2}, path)
    monkeypatch.undo()
    assert ck.load_checkpoint(path) == {"round": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["fed.pt"]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=r"is not a hilora-lightning federation checkpoint \(no checksum header"):
        ck.load_checkpoint(tmp_path / "junk.pt")


def test_checkpoint_of_another_run_is_refused(tmp_path) -> None:
    _orch(config=_config(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1)),
          checkpoint_path=tmp_path / "fed.pt").run(stop_after=1)
    other = _orch(config=_config(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), seed=1),
                  checkpoint_path=tmp_path / "fed.pt")
    with pytest.raises(RuntimeError, match=r"the checkpoint belongs to a different run"):
        other.run(resume=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rounds": 0}, r"rounds must be an int >= 1, got 0"),
        ({"fraction_fit": 1.5}, r"fraction_fit must be in \(0, 1\], got 1.5"),
        ({"root_rounds": (3, 2)}, r"root_rounds must have min_rounds <= max_rounds, got \(3, 2\)"),
        ({"rounds": 3, "root_rounds": (2, 4), "cluster_rounds": (2, 2)},
         r"rounds=3 cannot fit the minimum stage lengths"),
        ({"aggregation": "median"}, r"aggregation must be one of \('product', 'fedavg'\), got 'median'"),
        ({"clustering": {"method": "given"}}, r"clustering.method='given' needs an assignment"),
        ({"clustering": {"feature": "C"}}, r"clustering.feature must be one of \('A', 'B', 'delta'\), got 'C'"),
        ({"local_steps": 0}, r"local_steps must be an int >= 1, got 0"),
    ],
)
def test_invalid_configs_fail_at_construction(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        FederationConfig(**kwargs)


def test_invalid_federations_fail_at_construction() -> None:
    clients = digits_federation(4)
    with pytest.raises(ValueError, match=r"a federation needs at least one client, got none"):
        FederatedOrchestrator(HiLoRAViT(), [], _config())
    with pytest.raises(ValueError, match=r"client ids must be unique across clients and unseen clients, repeated: \[0"):
        FederatedOrchestrator(HiLoRAViT(), clients, _config(), unseen=clients[:1])
    with pytest.raises(ValueError, match=r"min_clients=5 exceeds the 4 training clients"):
        FederatedOrchestrator(HiLoRAViT(), clients, _config(min_clients=5))
    with pytest.raises(ValueError, match=r"client 7 has an empty test set"):
        ClientData(7, clients[0].train, TensorDataset(torch.zeros(0, 3, 32, 32), torch.zeros(0)))


def test_per_round_schedule_trains_all_tiers_each_round_after_clustering() -> None:
    seen: list[Payload] = []
    cfg = _config(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), schedule="per_round",
                  clustering=ClusteringConfig(method="given", assignment={0: 0, 1: 0, 2: 1, 3: 1}))
    orch = _orch(config=cfg, upload_hook=seen.append)
    orch.run()
    by_round = {r: sorted({p.tier.value for p in seen if p.round == r}) for r in (1, 2, 3)}
    assert by_round == {1: ["root"], 2: ["cluster", "root"], 3: ["cluster", "root"]}
    assert all(Tier.LEAF in orch.client_store(c).kept for c in orch.clients)


def test_fedavg_option_averages_factors() -> None:
    seen: list[Payload] = []
    orch = _orch(config=_config(aggregation="fedavg"), upload_hook=seen.append)
    orch.run(stop_after=1)
    w = torch.tensor([p.num_samples for p in seen], dtype=torch.float64)
    w = w / w.sum()
    for key, value in orch.root.items():
        expected = sum(wi * p.factors[key].double() for wi, p in zip(w, seen))
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)


def test_lightning_options_pass_through_to_every_client_trainer() -> None:
    import lightning.pytorch as pl

    class CountFits(pl.Callback):
        fits = 0
        precisions: set = set()

        def on_fit_start(self, trainer, pl_module) -> None:
            CountFits.fits += 1
            CountFits.precisions.add(trainer.precision)

    orch = _orch(config=_config(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1),
                                clustering=ClusteringConfig(method="given", assignment={0: 0, 1: 0, 2: 0, 3: 0})),
                 trainer_kwargs={"precision": "bf16-mixed", "callbacks": [CountFits()]})
    result = orch.run()
    assert CountFits.fits == 12 and CountFits.precisions == {"bf16-mixed"}
    assert all(np.isfinite(v) for v in result.client_accuracy.values())


def test_result_files_and_summary(tmp_path) -> None:
    import csv
    import json

    clients = digits_federation(5)
    orch = FederatedOrchestrator(HiLoRAViT(lr=3e-3), clients[:4], _config(rounds=3, root_rounds=(1, 1),
                                 cluster_rounds=(1, 1), finetune_epochs=1, clustering={"k_min": 1, "k_max": 2}),
                                 unseen=clients[4:], progress=False)
    result = orch.run()
    data = json.loads(result.to_json(tmp_path / "r.json").read_text())
    assert data["num_clusters"] == result.num_clusters and len(data["records"]) == 3
    assert set(data["generalization"]) == {"root", "zero_leaf", "finetuned"} and "4" in data["routing"]
    rows = list(csv.DictReader(result.to_csv(tmp_path / "r.csv").open()))
    assert [r["stage"] for r in rows] == ["root", "cluster", "leaf"]
    text = result.summary()
    assert "root+cluster+leaf" in text and "unseen clients" in text and "clusters found" in text


@pytest.mark.parametrize("method", ["lsac", "kmeans", "random"])
def test_end_to_end_lsac_recovers_latent_groups(method: str) -> None:
    """Digits at 0 and 90 degrees: LSAC finds both groups from the root-stage LoRA subspaces."""
    clients = digits_federation(6, num_groups=2)
    cfg = FederationConfig(rounds=4, root_rounds=(2, 2), cluster_rounds=(1, 1), local_steps=10, batch_size=16,
                           clustering=ClusteringConfig(method=method, k_min=2, k_max=4,
                                                       k=None if method == "lsac" else 2))
    orch = FederatedOrchestrator(HiLoRAViT(lr=3e-3), clients, cfg, progress=False)
    orch.run(stop_after=2)
    assert orch.stage is Tier.CLUSTER and orch.num_clusters == 2
    if method == "lsac":
        assert orch.clustering_ari is not None and orch.clustering_ari >= 0.9
    assert all(cs.features is None for cs in orch.client_states.values())  # dropped after clustering
    assert set(orch.cluster_centers) == set(orch.assignment.values())


def test_lsac_study_clusters_every_feature_from_one_root_stage() -> None:
    """The study's row for a feature is exactly what a run with that feature clusters (same root stage)."""
    from hilora_lightning.federation.server_state import ServerState

    clients = digits_federation(6, num_groups=2)

    def orch(feature: str, study: bool) -> FederatedOrchestrator:
        cfg = FederationConfig(rounds=4, root_rounds=(2, 2), cluster_rounds=(1, 1), local_steps=10, batch_size=16,
                               clustering=ClusteringConfig(feature=feature, k_min=2, k_max=4, study=study))
        return FederatedOrchestrator(HiLoRAViT(lr=3e-3), clients, cfg, progress=False)

    studied = orch("B", True)
    studied.run(stop_after=1)
    kept = studied.client_states[0].study_features
    assert kept is not None and sorted(kept) == ["A", "B", "delta"]
    assert all(torch.equal(kept["B"][k], v) for k, v in studied.client_states[0].features.items())
    back = ServerState.from_dict(studied.state.to_dict()).clients[0].study_features
    assert back is not None and all(torch.equal(back[f][k], kept[f][k]) for f in kept for k in kept[f])
    studied.run(stop_after=2)
    study = studied.state.extra["lsac_study"]
    assert sorted(study) == sorted(f"{f}/{s}{k}" for f in ("A", "B", "delta") for s in ("median", "local")
                                   for k in ("", "/k1"))
    assert study["B/median"] == {"k": float(studied.num_clusters), "ari": studied.clustering_ari}
    assert all(cs.study_features is None for cs in studied.client_states.values())
    plain = orch("B", False)  # the study only reports: the run itself is the same, bit for bit
    plain.run(stop_after=2)
    assert plain.assignment == studied.assignment
    assert all(torch.equal(v, studied.state.root[k]) for k, v in plain.state.root.items())
    other = orch("A", False)
    other.run(stop_after=2)
    assert study["A/median"] == {"k": float(other.num_clusters), "ari": other.clustering_ari}
    assert "lsac_study" not in other.state.extra
    assert studied.run().lsac_study == study  # carried into the result (and its JSON)


@pytest.mark.parametrize("method,feature", [("kmeans", "delta"), ("lsac", "A"), ("lsac", "B")])
def test_a_feature_folded_by_the_study_is_the_one_update_features_computes(method: str, feature: str) -> None:

    g = torch.Generator().manual_seed(0)
    before = {"m.lora_B": torch.randn(6, 2, generator=g), "m.lora_A": torch.randn(2, 5, generator=g)}
    cfg = ClusteringConfig(method=method, feature=feature, k_min=2, k_max=3)
    fresh, study = None, None
    for _ in range(2):  # two rounds: the EMA carries over
        factors = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in before.items()}
        study = transition.study_features(study, factors, before, cfg, 2)
        reused = transition.update_features(fresh, factors, before, cfg, 2, study[feature])
        fresh = transition.update_features(fresh, factors, before, cfg, 2)
        assert sorted(reused) == sorted(fresh) and all(torch.equal(reused[k], fresh[k]) for k in fresh)
    assert (transition.UPDATE_KEY in fresh) == (method == "kmeans")


def test_split_unseen_is_stratified_and_seeded() -> None:
    from hilora_lightning.federation import split_unseen

    clients = digits_federation(20, num_groups=4)
    train, unseen = split_unseen(clients, 0.2, seed=3)
    assert len(unseen) == 4 and sorted(c.group for c in unseen) == [0, 1, 2, 3]
    assert {c.client_id for c in train} | {c.client_id for c in unseen} == set(range(20))
    assert [c.client_id for c in split_unseen(clients, 0.2, seed=3)[1]] == [c.client_id for c in unseen]
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\), got 1.0"):
        split_unseen(clients, 1.0)


@pytest.mark.parametrize("route_by", ["subspace", "loss"])
def test_unseen_clients_are_routed_to_their_groups_cluster(route_by: str) -> None:
    everyone = digits_federation(8, num_groups=2)
    cfg = FederationConfig(rounds=4, root_rounds=(2, 2), cluster_rounds=(1, 1), local_steps=10, batch_size=16,
                           finetune_epochs=1, route_by=route_by, probe_steps=10,
                           clustering=ClusteringConfig(k_min=2, k_max=3))
    orch = FederatedOrchestrator(HiLoRAViT(lr=3e-3), everyone[:6], cfg, unseen=everyone[6:], progress=False)
    result = orch.run()
    assert orch.clustering_ari == 1.0
    group_cluster = {everyone[c].group: j for c, j in orch.assignment.items()}
    assert result.routing == {6: group_cluster[0], 7: group_cluster[1]}
    assert set(result.generalization) == {"root", "zero_leaf", "finetuned"}


def test_probe_root_routes_unseen_clients_by_a_root_slot_update() -> None:
    everyone = digits_federation(6, num_groups=2)
    cfg = FederationConfig(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), finetune_epochs=0, probe="root",
                           route_by="subspace", probe_steps=3, clustering=ClusteringConfig(k_min=2, k_max=2), **FAST)
    orch = FederatedOrchestrator(HiLoRAViT(lr=3e-3), everyone[:4], cfg, unseen=everyone[4:], progress=False)
    seen: list = []
    fit = orch.backend.fit

    def recording(requests):
        seen.extend(requests.values())
        return fit(requests)

    orch.backend.fit = recording  # type: ignore[method-assign]
    result = orch.run()
    probes = [r for r in seen if r.kind is Kind.PROBE]
    assert sorted(r.client_id for r in probes) == [4, 5] and {r.upload for r in probes} == {(Tier.ROOT, "AB")}
    assert all(torch.equal(r.slots[Tier.ROOT].sent[k], orch.root[k]) for r in probes for k in orch.root)
    assert set(result.routing) == {4, 5} and set(result.routing.values()) <= set(orch.clusters)


def test_root_probe_trains_the_root_slot_from_the_final_root() -> None:
    root = {"blocks.0.attn.qkv.lora_A": torch.ones(2, 4, 8), "blocks.0.attn.qkv.lora_B": torch.zeros(2, 8, 4)}
    strategy = HiLoRAStrategy(HiLoRAViT(), FederationConfig(probe="root", probe_steps=7, seed=1))
    state = dataclasses.replace(strategy.initial_state([0]), root=root)
    req = strategy.probe_plan(state, 5, {})
    assert (req.kind, req.client_id, set(req.slots), req.budget.steps) == (Kind.PROBE, 5, {Tier.ROOT}, 7)
    assert req.slots[Tier.ROOT].sent is root and not req.return_head and req.upload == (Tier.ROOT, "AB")
    assert req.steps[0].active == req.steps[0].train == (Tier.ROOT,) and req.steps[0].penalty == ()
    with pytest.raises(ValueError, match=r"probe must be 'cluster' or 'root', got 'leaf'"):
        FederationConfig(probe="leaf")


def test_reclustering_splits_a_given_single_cluster_and_keeps_ids_by_overlap() -> None:
    clients = digits_federation(6, num_groups=2)
    cfg = FederationConfig(rounds=5, root_rounds=(1, 1), cluster_rounds=(3, 3), local_steps=10, batch_size=16,
                           clustering=ClusteringConfig(method="given", assignment=dict.fromkeys(range(6), 0),
                                                       recluster_every=2, k_min=2, k_max=3))
    snapshots: list[dict] = []

    class Watched(FederatedOrchestrator):
        def should_recluster(self, round_idx: int) -> bool:  # the override point; snapshot when it fires
            fire = super().should_recluster(round_idx)
            if fire:
                snapshots.append({k: v.clone() for k, v in self.clusters[0].items()})
            return fire

    orch = Watched(HiLoRAViT(lr=3e-3), clients, cfg, progress=False)
    orch.run(stop_after=3)  # second cluster-stage round: re-cluster
    assert len(snapshots) == 1
    before = snapshots[0]
    assert orch.num_clusters == 2 and set(orch.clusters) == {0, 1}
    groups = {c.client_id: c.group for c in clients}
    by_cluster = {j: sorted(groups[c] for c, k in orch.assignment.items() if k == j) for j in (0, 1)}
    assert sorted(map(tuple, by_cluster.values())) == [(0, 0, 0), (1, 1, 1)]
    assert all(torch.equal(orch.clusters[0][k], before[k]) for k in before)  # the matched cluster kept its adapter
    for prefix in factor_pairs(before):  # the split-off one starts from its members' mean of cluster 0
        new = orch.clusters[1]
        torch.testing.assert_close(new[f"{prefix}.lora_B"] @ new[f"{prefix}.lora_A"],
                                   before[f"{prefix}.lora_B"] @ before[f"{prefix}.lora_A"], atol=1e-5, rtol=1e-4)
    orch.run()
    assert [r.stage for r in orch.records] == ["root", "cluster", "cluster", "cluster", "leaf"]


def test_communication_bytes_count_each_frozen_tier_once() -> None:
    from hilora_lightning.federation.client import state_bytes

    orch = _orch(config=_config(rounds=5, root_rounds=(2, 2), cluster_rounds=(1, 1),
                                clustering=ClusteringConfig(method="given", assignment={0: 0, 1: 0, 2: 1, 3: 1})))
    result = orch.run()
    tier_b, head_b = state_bytes(orch.root), state_bytes(orch.global_head)
    downs = [r.bytes_down_per_client for r in result.records]
    ups = [r.bytes_up_per_client for r in result.records]
    # round 4, the first leaf round: the final cluster adapter and the cluster head the personal head
    # starts from; round 5: nothing (frozen tiers and the personal head are on the client already)
    assert downs == [tier_b + head_b, tier_b + head_b, 2 * tier_b + head_b, tier_b + head_b, 0.0]
    assert ups == [tier_b + head_b, tier_b + head_b, tier_b + head_b, 0.0, 0.0]


def _stage_lengths(cfg: FederationConfig, rho: float | None = None) -> list[int]:
    """Rounds per stage (root, cluster, leaf) that ``stage_over`` gives over the whole budget."""
    lengths, stage, in_stage = [0, 0, 0], 0, 0
    for t in range(cfg.rounds):
        lengths[stage] += 1
        in_stage += 1
        if stage < 2 and cfg.stage_over(stage == 0, in_stage, cfg.rounds - t - 1, rho):
            stage, in_stage = stage + 1, 0
    return lengths


@pytest.mark.parametrize(("kwargs", "rho", "expected"), [
    ({"rounds": 7, "root_rounds": (5, 5), "cluster_rounds": (1, 20)}, None, [5, 1, 1]),  # was 4/2/1
    ({"rounds": 7, "root_rounds": (5, 5), "cluster_rounds": (0, 20)}, None, [5, 1, 1]),
    ({"rounds": 12, "root_rounds": (2, 5), "cluster_rounds": (2, 5)}, None, [5, 5, 2]),
    ({"rounds": 12, "root_rounds": (2, 5), "cluster_rounds": (2, 5)}, 0.0, [2, 2, 8]),  # converged at the minimums
    ({"rounds": 9, "root_rounds": (2, 20), "cluster_rounds": (3, 20)}, None, [5, 3, 1]),  # budget keeps minimums
])
def test_every_stage_gets_its_minimum_and_the_leaf_a_round(kwargs, rho, expected) -> None:
    cfg = FederationConfig(**kwargs)
    assert _stage_lengths(cfg, rho) == expected
    assert expected[0] >= cfg.root_rounds[0] and expected[1] >= max(cfg.cluster_rounds[0], 1) and expected[2] >= 1


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rounds": 7, "root_rounds": (6, 6), "cluster_rounds": (1, 1)},
     r"rounds=7 cannot fit the minimum stage lengths: root 6 \+ cluster 1 \+ leaf 1 = 8; raise rounds to >= 8"),
    ({"rounds": 6, "root_rounds": (1, 1), "cluster_rounds": (0, 0)},
     r"cluster_rounds=\(0, 0\): a stagewise run always trains the cluster stage .* e.g. cluster_rounds=\(1, 1\)"),
])
def test_schedules_that_cannot_run_as_written_fail_at_construction(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        FederationConfig(**kwargs)
    FederationConfig(**kwargs, schedule="per_round")  # all stages every round: no stage lengths to fit
