from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from hilora_lightning import HiLoRAViT, Tier
from hilora_lightning.baselines import BASELINES, BaselineRunner, FedALT, FedDPAF, FedIT, FedSALoRA, Method
from hilora_lightning.baselines.methods import local_rounds, server_aggregate
from hilora_lightning.compare import (
    METHODS,
    Comparison,
    SeedComparison,
    parse_methods,
    parse_seeds,
    run_comparison,
)
from hilora_lightning.data import digits_federation
from hilora_lightning.federation import ClientData, FederatedResult, FederationConfig, FederationError, Payload
from hilora_lightning.federation.result import RoundRecord
from hilora_lightning.strategy.aggregation import leave_one_out_states, select_side

G, R, P = Tier.ROOT, Tier.CLUSTER, Tier.LEAF


def _uploads(n: int, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {c: {"m.lora_A": torch.randn(3, 7, generator=gen), "m.lora_B": torch.randn(5, 3, generator=gen)}
            for c in range(n)}


W = {0: 1.0, 1: 2.0, 2: 5.0}
INIT = {"m.lora_A": torch.full((3, 7), 0.5), "m.lora_B": torch.zeros(5, 3)}


def _np_mean(states, ids, key):
    w = np.array([W[c] for c in ids]) / sum(W[c] for c in ids)
    return sum(wi * states[c][key].double().numpy() for wi, c in zip(w, ids))


# ----------------------------------------------------------------------------- aggregation rules
def test_fedavg_rule_averages_a_and_b_separately_over_the_participants() -> None:
    up = _uploads(3)
    g, latest, row = server_aggregate("fedavg", up, W, INIT, {}, rank=3)
    for key in ("m.lora_A", "m.lora_B"):
        np.testing.assert_allclose(g[key].numpy(), _np_mean(up, [0, 1, 2], key), rtol=1e-5, atol=1e-6)
    assert latest == {} and row == {}


def test_product_rule_is_the_dense_truncated_svd_of_the_weighted_products() -> None:
    up = _uploads(3)
    g, _, _ = server_aggregate("product", up, W, INIT, {}, rank=3)
    w = np.array([W[c] for c in range(3)]) / sum(W.values())
    dense = sum(wi * (up[c]["m.lora_B"].double() @ up[c]["m.lora_A"].double()).numpy() for wi, c in zip(w, range(3)))
    u, s, vh = np.linalg.svd(dense)
    want = (u[:, :3] * s[:3]) @ vh[:3]
    np.testing.assert_allclose((g["m.lora_B"].double() @ g["m.lora_A"].double()).numpy(), want, atol=1e-5)


def test_fedsa_rule_averages_only_a_and_keeps_the_global_b() -> None:
    up = {c: select_side(s, "A") for c, s in _uploads(3).items()}
    g, _, _ = server_aggregate("A", up, W, INIT, {}, rank=3)
    np.testing.assert_allclose(g["m.lora_A"].numpy(), _np_mean(up, [0, 1, 2], "m.lora_A"), rtol=1e-5, atol=1e-6)
    assert torch.equal(g["m.lora_B"], INIT["m.lora_B"])
    with pytest.raises(ValueError, match="aggregates only lora_A keys"):
        server_aggregate("A", _uploads(2), W, INIT, {}, rank=3)


def test_fedalt_rule_gives_each_client_the_mean_of_the_others_including_absent_ones() -> None:
    up = _uploads(3)
    previous = {2: up.pop(2)}  # client 2 uploaded in an earlier round, not in this one
    g, latest, row = server_aggregate("others", up, W, INIT, previous, rank=3)
    assert sorted(latest) == [0, 1, 2] and g == INIT
    all_up = {**up, **previous}
    for c in range(3):
        others = [o for o in range(3) if o != c]
        for key in ("m.lora_A", "m.lora_B"):
            np.testing.assert_allclose(row[c][key].numpy(), _np_mean(all_up, others, key), rtol=1e-5, atol=1e-6)


def test_no_rule_changes_nothing_and_unknown_rules_fail() -> None:
    g, latest, row = server_aggregate(None, _uploads(2), W, INIT, {}, rank=3)
    assert g == INIT and latest == {} and row == {}
    with pytest.raises(ValueError, match="unknown rule 'median'"):
        server_aggregate("median", _uploads(2), W, INIT, {}, rank=3)


def test_leave_one_out_of_a_lone_client_is_empty_and_select_side_checks() -> None:
    assert leave_one_out_states({4: INIT}, {4: 1.0}) == {}
    with pytest.raises(ValueError, match="side must be 'A' or 'B'"):
        select_side(INIT, "C")


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("name", sorted(BASELINES))
def test_phases_split_the_round_and_train_only_active_slots(name: str) -> None:
    method: Method = BASELINES[name](rounds=10, local_rounds=3)
    for t in range(1, 11):
        phases = method.phases(t)
        assert sum(p.share for p in phases) == pytest.approx(1.0)
        for p in phases:
            assert set(p.train) <= set(p.active) <= set(method.slots)
    assert set(method.eval_active) <= set(method.slots)


def test_feddpa_f_trains_global_then_local_without_upload() -> None:
    m = FedDPAF(rounds=10, local_rounds=3)
    assert [m.uploads(t) for t in range(1, 11)] == [True] * 7 + [False] * 3
    assert m.phases(7)[0].train == (G,) and m.phases(8)[0].train == (P,)
    assert local_rounds(FederationConfig(rounds=50, root_rounds=(5, 20), cluster_rounds=(5, 20))) == 10


# ----------------------------------------------------------------------------- runner
# baselines ignore HiLoRA's stage split; per_round frees two-round runs from the stagewise minimums
FAST = {"rounds": 2, "schedule": "per_round", "root_rounds": (1, 1), "cluster_rounds": (1, 1), "local_steps": 2,
        "batch_size": 16, "finetune_epochs": 1}


def _runner(method: Method, clients=None, **kw) -> BaselineRunner:
    return BaselineRunner(method, HiLoRAViT(lr=3e-3), clients or digits_federation(3),
                          FederationConfig(**{**FAST, **kw.pop("config", {})}), progress=False, **kw)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_personal_state_never_leaves_the_client(name: str) -> None:
    seen: list[Payload] = []
    runner = _runner(BASELINES[name](rounds=2, local_rounds=1), upload_hook=seen.append)
    result = runner.run()
    method = runner.method
    if method.rule is None:
        assert seen == [] and all(r.bytes_up_per_client == 0 for r in result.records)
        return
    for p in seen:
        if method.rule == "others":  # FedALT uploads the individual LoRA, which is its only trained LoRA
            assert p.tier is P
        else:
            assert p.tier is G
        if method.rule == "A":
            assert p.factors and all(k.endswith(".lora_A") for k in p.factors)
        # the uploaded tensors are never the personal slot's values
        for cid in runner.clients:
            personal = runner.client_store(cid).kept.get(P)
            if personal is not None and method.rule != "others":
                assert not any(torch.equal(p.factors[k], personal[k]) for k in p.factors if k in personal)
    assert all(set(p.factors) and not any("tier_gate" in k for k in p.factors) for p in seen)


def test_fedit_upload_bytes_and_global_average() -> None:
    seen: list[Payload] = []
    runner = _runner(FedIT(rounds=1), upload_hook=seen.append, config={"rounds": 1, "cluster_rounds": (0, 0)})
    result = runner.run()
    w = [p.num_samples for p in seen]
    for key in runner.global_state:
        want = sum(wi * p.factors[key].double() for wi, p in zip(w, seen)) / sum(w)
        torch.testing.assert_close(runner.global_state[key].double(), want, rtol=1e-5, atol=1e-7)
    nbytes = sum(v.numel() * 4 for v in seen[0].factors.values()) + sum(v.numel() * 4 for v in seen[0].head.values())
    assert result.records[0].bytes_up_per_client == nbytes


def test_fedsa_keeps_b_local_and_uploads_about_half() -> None:
    fedsa, fedit = _runner(FedSALoRA(rounds=2)), _runner(FedIT(rounds=2))
    up_sa = fedsa.run().records[0].bytes_up_per_client
    up_it = fedit.run().records[0].bytes_up_per_client
    assert up_sa < up_it
    local_b = [fedsa.client_store(c).kept.get(G) for c in fedsa.clients]
    assert all(b and all(k.endswith(".lora_B") for k in b) for b in local_b)


def test_fdlora_unseen_client_fine_tunes_as_a_client_updates_then_fuses() -> None:
    """An FDLoRA newcomer arrives with the global LoRA alone (1 / 0), then trains the global LoRA alone
    and the personal one alone from the 0.5 / 0.5 weights its clients use, keeps both, and fuses."""
    from hilora_lightning.baselines import FDLoRA

    *clients, newcomer = digits_federation(4)
    runner = _runner(FDLoRA(rounds=2), clients, unseen=[newcomer])
    global_before = {k: v.clone() for k, v in runner.global_state.items()}
    assert FDLoRA(rounds=2).unseen_phases() == FDLoRA(rounds=2).phases(1)
    result = runner.run()
    store = runner.client_store(newcomer.client_id)
    kept = store.kept[G]  # its own fine-tuned global LoRA: neither the server's nor uploaded
    assert set(kept) == set(runner.global_state) and any(
        not torch.equal(kept[k], runner.global_state[k]) for k in kept)
    assert not any(torch.equal(runner.global_state[k], global_before[k]) for k in global_before if "lora_B" in k)
    assert store.kept[P] and any(v.abs().sum() > 0 for k, v in store.kept[P].items() if k.endswith(".lora_B"))
    weights = [v for k, v in (store.gates or {}).items() if k.endswith(".weights")]
    start = torch.tensor([0.5, 0.5])  # the fusion moved the weights from where the fine-tune started
    assert weights and any(not torch.allclose(w, start) for w in weights)
    assert {"zero_leaf", "finetuned"} <= set(result.generalization)


def test_fedalt_needs_equal_cluster_and_leaf_ranks() -> None:
    model = HiLoRAViT(adapter={"cluster": {"rank": 4}, "leaf": {"rank": 8}})
    with pytest.raises(ValueError, match="needs cluster rank == leaf rank, got 4 and 8"):
        BaselineRunner(FedALT(rounds=2), model, digits_federation(2), FederationConfig(**FAST))


def test_failing_clients_are_dropped_and_too_few_fail_the_round() -> None:
    clients = digits_federation(3)
    x, y = clients[2].train.tensors
    clients[2] = ClientData(2, TensorDataset(torch.full_like(x, float("nan")), y), clients[2].test)
    result = _runner(FedIT(rounds=2), clients).run()
    assert result.records[0].succeeded == [0, 1] and "NaN or Inf" in result.records[0].failed[2]
    with pytest.raises(FederationError, match="only 2 of 3 clients succeeded, fewer than min_clients=3"):
        _runner(FedIT(rounds=2), clients, config={"min_clients": 3}).run()


# ----------------------------------------------------------------------------- compare, end to end
TINY = {"seed": 0, "data": {"name": "digits", "num_clients": 5, "num_groups": 2, "unseen_fraction": 0.2},
        "model": {"lr": 0.003}, "federation": FAST, "trainer": {"accelerator": "cpu"}}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory) -> tuple[Comparison, object]:
    out = tmp_path_factory.mktemp("compare")
    return run_comparison(TINY, None, progress=False, out_dir=out), out


@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_two_rounds_end_to_end(comparison, name: str) -> None:
    comp, _ = comparison
    res = comp.results[name]
    assert [r.round for r in res.records] == [1, 2]
    assert len(res.client_accuracy) == 4 and all(0.0 <= a <= 1.0 for a in res.client_accuracy.values())
    assert {"zero_leaf", "finetuned"} <= set(res.generalization)
    if name != "local-lora":
        assert res.records[0].bytes_up_per_client > 0


def test_oracle_variant_clusters_by_the_latent_groups(comparison) -> None:
    import dataclasses

    from hilora_lightning.compare import run_method
    from hilora_lightning.experiment import build_clients

    comp, _ = comparison
    oracle = comp.results["hilora-oracle"]
    assert oracle.clustering_ari == 1.0 and oracle.num_clusters == len(set(comp.groups.values())) == 2
    for c, j in oracle.assignment.items():  # one cluster per latent group, numbered by group
        assert j == comp.groups[c]
    clients, unseen = build_clients(TINY["data"], 0)
    no_groups = [dataclasses.replace(c, group=None) for c in clients]
    ids = [c.client_id for c in clients]
    with pytest.raises(ValueError, match="hilora-oracle clusters clients by their latent groups, but clients "
                                         + re.escape(str(ids[:5])) + " have none"):
        run_method("hilora-oracle", TINY, no_groups, unseen, progress=False)


def test_comparison_table_and_resume(comparison, monkeypatch) -> None:
    comp, out = comparison
    table = comp.table()
    assert table.splitlines()[0].startswith("method") and "hilora: root only" in table
    head = comp.headline()
    assert head["fedit_up_kib"] > head["fedsa-lora_up_kib"] > 0 and head["local-lora_up_kib"] == 0
    import hilora_lightning.compare as cmp

    def boom(*a, **k):
        raise AssertionError("resume must read finished methods back, not rerun them")

    monkeypatch.setattr(cmp, "run_method", boom)
    again = run_comparison(TINY, ["fedit", "hilora"], progress=False, out_dir=out, resume=True)
    assert again.results["hilora"].client_accuracy == comp.results["hilora"].client_accuracy
    saved = json.loads((out / "fedit" / "result.json").read_text())
    assert saved["result"]["records"][1]["round"] == 2


def test_comparison_rows_from_hand_made_results() -> None:
    rec = [RoundRecord(1, "root", [0, 1], [0, 1], {}, bytes_up_per_client=2048.0),
           RoundRecord(2, "leaf", [0, 1], [0, 1], {}, bytes_up_per_client=0.0)]
    accs = {0: 0.5, 1: 0.9, 2: 0.7}
    res = FederatedResult(rec, accs, {"root": {"mean": 0.3, "p10": 0.1, "min": 0.1, "std": 0.1}}, {}, 2,
                          generalization={"zero_leaf": {"mean": 0.4}, "finetuned": {"mean": 0.6}})
    row = Comparison({"hilora": res}, {"hilora": 12.0}).rows()
    assert row[0] == ["hilora", pytest.approx(0.7), pytest.approx(np.percentile([0.5, 0.9, 0.7], 10)), 0.4, 0.6,
                      1.0, 12.0]
    assert row[1][:3] == ["  hilora: root only", 0.3, 0.1]


def test_method_names_are_validated() -> None:
    assert parse_methods("all") == list(METHODS)
    with pytest.raises(ValueError, match="unknown method\\(s\\) \\['fedprox'\\]: choose from local-lora"):
        parse_methods("fedit,fedprox")


def test_seeds_are_parsed_and_validated() -> None:
    assert parse_seeds("0, 1,2,1", default=5) == [0, 1, 2] and parse_seeds(None, default=5) == [5]
    assert parse_seeds([3, 4], default=0) == [3, 4] and parse_seeds(7, default=0) == [7]
    for bad in ("a,b", "-1", ""):
        with pytest.raises(ValueError, match="seeds must be non-negative ints like 0,1,2"):
            parse_seeds(bad, default=0)


def test_seed_comparison_reports_mean_and_std_over_seeds() -> None:
    def result(accs, up):
        rec = [RoundRecord(1, "root", [0], [0], {}, acc_mean=float(np.mean(accs)), bytes_up_per_client=up)]
        return FederatedResult(rec, dict(enumerate(accs)), {}, {}, 0,
                               generalization={"zero_leaf": {"mean": accs[0]}, "finetuned": {"mean": accs[1]}})

    runs = {0: Comparison({"fedit": result([0.2, 0.6], 1024.0)}, {"fedit": 10.0}),
            1: Comparison({"fedit": result([0.4, 1.0], 3072.0)}, {"fedit": 14.0})}
    comp = SeedComparison(runs)
    mean, std = comp.rows()[0], comp.std_rows()[0]
    assert mean[1] == pytest.approx(np.mean([0.4, 0.7])) and std[1] == pytest.approx(np.std([0.4, 0.7]))
    assert mean[3] == pytest.approx(0.3) and mean[5] == pytest.approx(2.0) and std[6] == pytest.approx(2.0)
    assert "0.550 ± 0.150" in comp.table()
    head = comp.headline()
    assert head["fedit_mean"] == pytest.approx(0.55) and head["fedit_mean_std"] == pytest.approx(0.15)
    assert comp.curves() == ([1], {"fedit": [pytest.approx(0.55)]})


def test_comparison_over_two_seeds_end_to_end(tmp_path) -> None:
    comp = run_comparison(TINY, ["fedit"], progress=False, out_dir=tmp_path, seeds=[0, 1])
    assert isinstance(comp, SeedComparison) and sorted(comp.runs) == [0, 1]
    assert (tmp_path / "seed0" / "fedit" / "result.json").exists() and (tmp_path / "seed1" / "fedit").is_dir()
    # different seeds draw different partitions: the two runs differ
    assert comp.runs[0].results["fedit"].client_accuracy != comp.runs[1].results["fedit"].client_accuracy


def test_compare_resume_reruns_a_corrupt_method_result(comparison, tmp_path, monkeypatch, capsys) -> None:
    """A truncated file, or one whose config and settings match but whose result is broken, runs again."""
    import shutil

    import hilora_lightning.compare as cmp

    comp, out = comparison
    copy = tmp_path / "compare"
    shutil.copytree(out, copy)
    (copy / "fedit" / "result.json").write_text('{"config": "truncated')  # a kill mid-write of an old version
    saved = json.loads((copy / "fedsa-lora" / "result.json").read_text())
    del saved["result"]["records"]  # current config and settings, result from another version
    (copy / "fedsa-lora" / "result.json").write_text(json.dumps(saved))
    ran: list[str] = []
    real = cmp.run_method

    def counting(name, *a, **k):
        ran.append(name)
        return real(name, *a, **k)

    monkeypatch.setattr(cmp, "run_method", counting)
    again = run_comparison(TINY, ["fedit", "hilora", "fedsa-lora"], progress=False, out_dir=copy, resume=True)
    assert ran == ["fedit", "fedsa-lora"]  # only the corrupt ones ran again
    assert f"fedsa-lora: {copy / 'fedsa-lora' / 'result.json'} is unreadable (KeyError: 'records')" \
        in capsys.readouterr().out
    assert again.results["fedsa-lora"].client_accuracy == comp.results["fedsa-lora"].client_accuracy
    assert again.results["fedit"].client_accuracy == comp.results["fedit"].client_accuracy
    assert json.loads((copy / "fedit" / "result.json").read_text())["result"]["records"][1]["round"] == 2


def test_compare_resume_reruns_a_result_saved_under_other_settings(comparison, tmp_path, monkeypatch, capsys) -> None:
    """A changed library default (here: routing) re-runs the methods it changes, and only those."""
    import shutil

    import hilora_lightning.compare as cmp

    _, out = comparison
    copy = tmp_path / "compare"
    shutil.copytree(out, copy)
    for name in ("hilora", "fedit"):  # both saved when the default routed by probe subspaces
        path = copy / name / "result.json"
        saved = json.loads(path.read_text())
        assert saved["settings"] == cmp.method_settings(name, TINY)
        if "route_by" in saved["settings"]["federation"]:
            saved["settings"]["federation"]["route_by"] = "subspace"
        path.write_text(json.dumps(saved))
    legacy = json.loads((copy / "fedsa-lora" / "result.json").read_text())
    del legacy["settings"]  # saved before settings were recorded
    (copy / "fedsa-lora" / "result.json").write_text(json.dumps(legacy))
    ran: list[str] = []
    monkeypatch.setattr(cmp, "run_method", lambda name, *a, **k: ran.append(name) or cmp.FederatedResult(
        [], {0: 0.0}, {}, {}, 0))
    run_comparison(TINY, ["fedit", "hilora", "hilora-probe-routing", "fedsa-lora"], progress=True, out_dir=copy,
                   resume=True)
    printed = capsys.readouterr().out
    assert ran == ["hilora", "fedsa-lora"]  # fedit never routes: its settings leave routing out
    assert "hilora: " + str(copy / "hilora" / "result.json") + " was run with other settings " \
        "(federation.route_by: 'subspace' -> 'loss'); running the method again" in printed
    assert "no settings saved (a result from before they were recorded)" in printed
    assert json.loads((copy / "hilora" / "result.json").read_text())["settings"]["federation"]["route_by"] == "loss"


def test_method_settings_resolve_defaults_and_variants() -> None:
    from hilora_lightning.compare import HILORA_ONLY_FIELDS, HILORA_VARIANTS, method_settings
    from hilora_lightning.federation import FederationConfig

    hilora = method_settings("hilora", TINY)
    assert hilora["federation"]["route_by"] == FederationConfig.route_by == "loss"
    assert hilora["model"]["lr"] == 0.003 and hilora["model"]["gamma_c"] == 0.1  # given / library default
    assert "study" not in hilora["federation"]["clustering"]  # report-only
    for name, (model_over, fed_changes) in HILORA_VARIANTS.items():
        s = method_settings(name, TINY)
        assert {k: s["model"][k] for k in model_over} == model_over, name
        for key, value in fed_changes.items():
            node = s["federation"]
            for part in key.split("."):
                node = node[part]
            assert node == value, (name, key)
    assert method_settings("hilora-probe-routing", TINY)["federation"]["route_by"] == "subspace"
    fedit = method_settings("fedit", TINY)
    assert not set(HILORA_ONLY_FIELDS) & set(fedit["federation"]) and fedit["model"]["gamma_l"] == 0.0


def test_baselines_never_read_the_fields_their_settings_leave_out() -> None:
    """What keeps dropping HILORA_ONLY_FIELDS from a baseline's settings honest."""
    from pathlib import Path

    from hilora_lightning import baselines
    from hilora_lightning.compare import HILORA_ONLY_FIELDS

    for path in sorted(Path(baselines.__file__).parent.glob("*.py")):
        code = path.read_text()
        for field in HILORA_ONLY_FIELDS:
            assert not re.search(rf"\.{field}\b", code), f"{path.name} reads .{field}"
