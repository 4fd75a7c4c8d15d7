"""HiLoRA on Flower: simulation against the in-process orchestrator (skipped without flwr)."""

from __future__ import annotations

import json
import types

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from hilora_lightning.experiment import build_experiment  # noqa: E402
from hilora_lightning.federation.plan import HeadStart, Kind, LocalPlan, Start, Step  # noqa: E402
from hilora_lightning.flower import FlowerBackend, RemoteData, run_simulation  # noqa: E402
from hilora_lightning.flower.codec import from_record, to_record  # noqa: E402
from hilora_lightning.tiers import Tier  # noqa: E402

CFG = {"seed": 0, "data": {"name": "digits", "num_clients": 4, "num_groups": 2, "unseen_fraction": 0.0},
       "model": {"lr": 0.003},
       "federation": {"rounds": 4, "root_rounds": [1, 1], "cluster_rounds": [1, 1], "local_steps": 2,
                      "batch_size": 16, "clustering": {"method": "lsac", "k_min": 2, "k_max": 2}},
       "trainer": {"accelerator": "cpu"}}


def _assert_same_products(got, want) -> None:
    """Compare what a tier computes, ``B A``, not its factors: an SVD-split factor pair is unique only up to
    rotations within near-equal singular values, and Ray workers sum in another order than this process
    (float32 sums of a few hundred terms differ by ~1e-6 relative). 1e-3 of the product's norm is far
    above that and far below any real difference (a different client set moves it by > 1e-1)."""
    from hilora_lightning.strategy.aggregation import factor_pairs

    for prefix in factor_pairs(want):
        a = (got[f"{prefix}.lora_B"] @ got[f"{prefix}.lora_A"]).double()
        b = (want[f"{prefix}.lora_B"] @ want[f"{prefix}.lora_A"]).double()
        assert (a - b).norm() <= 1e-3 * max(b.norm(), 1e-6), prefix


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory):
    seen: list[tuple[str, str, dict[str, list[str]]]] = []

    def hook(direction, msg):
        content = {} if msg.has_error() else {k: sorted(getattr(v, "keys", list)()) for k, v in msg.content.items()}
        config = None if msg.has_error() else msg.content.get("config")
        steps = json.loads(str(config["steps"])) if config is not None and "steps" in config else []
        tier = steps[-1][1][-1] if steps and steps[-1][1] else ""  # the slot the plan's last step trains
        seen.append((direction, tier, content))

    out = tmp_path_factory.mktemp("flower")
    orch, result = run_simulation(CFG, num_supernodes=4, out_dir=out, message_hook=hook, audit_dir=out / "audit")
    return orch, result, seen, out


def test_simulation_runs_all_stages_and_matches_the_in_process_orchestrator(flower_run) -> None:
    orch, result, _, out = flower_run
    assert [r.stage for r in result.records] == ["root", "cluster", "leaf", "leaf"]
    assert all(not r.failed for r in result.records)
    ref = build_experiment(CFG)
    ref.checkpoint_path = None
    ref.progress = False
    expected = ref.run()
    assert orch.assignment == ref.assignment and result.clustering_ari == expected.clustering_ari
    _assert_same_products(orch.root, ref.root)
    for j, cluster in ref.clusters.items():
        _assert_same_products(orch.clusters[j], cluster)
    # the leaves live on the nodes: compare what they produce, per client and per tier view
    assert result.client_accuracy.keys() == expected.client_accuracy.keys()
    for cid, acc in expected.client_accuracy.items():
        assert abs(result.client_accuracy[cid] - acc) <= 0.02
    for view, summary in expected.tierwise.items():
        assert abs(result.tierwise[view]["mean"] - summary["mean"]) <= 0.02
    assert (out / "result.json").exists() and (out / "federation.pt").exists()
    # the bytes the server accounts for match the in-process run (same caching of frozen tiers)
    assert [r.bytes_down_per_client for r in result.records] == [r.bytes_down_per_client for r in expected.records]


def test_no_leaf_or_personal_head_in_any_message(flower_run) -> None:
    _, _, seen, _ = flower_run
    assert seen and not any({"leaf", "slot-leaf"} & set(content) for _, _, content in seen)
    leaf_out = [c for d, tier, c in seen if d == "out" and tier == "leaf"]
    # the root is held frozen since the cluster stage; the cluster travels once, in the first leaf round
    assert len(leaf_out) == 8 and all("slot-cluster" in c and "slot-root" not in c for c in leaf_out[:4])
    assert all(not any(k.startswith("slot-") for k in c) for c in leaf_out[4:])  # frozen copies held after round 3
    replies = [c for d, _, c in seen if d == "in" and "metrics" in c and "factors" not in c and "accuracy" not in
               str(c)]
    assert all(set(c) == {"metrics"} for c in replies)  # leaf-stage replies: a sample count, nothing else
    assert sum(1 for d, _, c in seen if d == "in" and "factors" in c) == 8  # root and cluster rounds, 4 clients


def test_every_message_on_every_node_is_audited_and_nothing_personal_travels(flower_run) -> None:
    """The nodes' own audit (a ClientApp mod): every request and reply, checked by value against the leaf and
    personal head the node holds in ``context.state``, and every array against the shared factor and head
    shapes (raw data has neither)."""
    _, _, seen, out = flower_run
    entries = [json.loads(line) for path in sorted((out / "audit").glob("node-*.jsonl"))
               for line in path.read_text().splitlines()]
    assert len(list((out / "audit").glob("node-*.jsonl"))) == 4
    sent = sum(1 for d, _, _ in seen if d == "out")
    assert len(entries) >= sent  # every plan the server sent (and the discovery queries) was audited
    assert {e["type"] for e in entries} >= {"query", "train", "evaluate"}
    assert [e for e in entries if e["problems"]] == []
    assert sum(1 for e in entries if e["private_arrays"] > 0) >= 8  # the leaf stage: the check had a leaf to find


def test_nodes_serving_two_clients_each_run_them_batched_and_match_the_in_process_run(tmp_path) -> None:
    """2 SuperNodes x 2 clients (a site with several data sets), the batched backend on each node: one message per
    node carries both clients' plans, the node trains them in one pass, stores each client's leaf under its id,
    and the federation matches the in-process batched run (as the one-client-per-node simulation does)."""
    cfg = {**CFG, "backend": {"name": "batched"}}
    seen: list[tuple[str, list[str]]] = []

    def hook(direction, msg):
        seen.append((direction, [] if msg.has_error() else sorted(msg.content.keys())))

    orch, result = run_simulation(cfg, num_supernodes=2, clients_per_node=2, out_dir=tmp_path / "run",
                                  message_hook=hook, audit_dir=tmp_path / "audit")
    assert [r.stage for r in result.records] == ["root", "cluster", "leaf", "leaf"]
    assert all(not r.failed and r.succeeded == [0, 1, 2, 3] for r in result.records)
    out = [keys for d, keys in seen if d == "out" and any(k.endswith("/config") for k in keys)]
    assert out and all(sorted({k.split("/")[0] for k in keys}) in (["0", "1"], ["2", "3"]) for keys in out)
    ref = build_experiment(cfg)
    ref.checkpoint_path, ref.progress = None, False
    expected = ref.run()
    assert orch.assignment == ref.assignment
    _assert_same_products(orch.root, ref.root)
    for j, cluster in ref.clusters.items():
        _assert_same_products(orch.clusters[j], cluster)
    for cid, acc in expected.client_accuracy.items():
        assert abs(result.client_accuracy[cid] - acc) <= 0.02
    entries = [json.loads(line) for path in sorted((tmp_path / "audit").glob("node-*.jsonl"))
               for line in path.read_text().splitlines()]
    assert len(list((tmp_path / "audit").glob("node-*.jsonl"))) == 2 and entries
    assert [e for e in entries if e["problems"]] == []
    assert max(e["private_arrays"] for e in entries) >= 2 * 2 * 8  # both clients' leaves (and heads) checked


def test_the_audit_flags_a_leaked_leaf_head_or_raw_image() -> None:
    from flwr.app import ConfigRecord, RecordDict

    from hilora_lightning.federation.plan import ClientStore
    from hilora_lightning.flower.audit import audit_message

    leaf = {"m.lora_A": torch.randn(2, 3), "m.lora_B": torch.randn(4, 2)}
    head = {"weight": torch.randn(5, 4), "bias": torch.randn(5)}
    store = ClientStore(kept={Tier.LEAF: leaf}, head=head)
    factor_shapes = {k: [tuple(v.shape)] for k, v in leaf.items()}
    head_shapes = {k: [tuple(v.shape)] for k, v in head.items()}
    fine = RecordDict({"factors": to_record({k: v + 1 for k, v in leaf.items()}),
                       "metrics": ConfigRecord({"num_samples": 3})})
    assert audit_message(fine, store, factor_shapes, head_shapes) == []
    leaked = RecordDict({"head": to_record(head), "metrics": ConfigRecord({"num_samples": 3, "loss_per_image": 1})})
    assert audit_message(leaked, store, factor_shapes, head_shapes) == [
        "head/weight equals the client's own personal head/weight",
        "head/bias equals the client's own personal head/bias",
        "metrics ['loss_per_image'] are not among ['num_examples', 'num_samples', 'score']"]
    image = RecordDict({"factors": to_record({"m.lora_A": torch.rand(1, 8, 8)}), "slot-leaf": to_record(leaf)})
    assert audit_message(image, store, factor_shapes, head_shapes) == [
        "factors/m.lora_A of shape (1, 8, 8) is not a shared factor array",
        "record 'slot-leaf' may not travel (allowed: ['config', 'error', 'factors', 'gates', 'head', 'info', "
        "'metrics', 'slot-cluster', 'slot-root'])"]
    # a node serving two clients: client 3's part may not carry client 5's head, nor its own leaf
    other = ClientStore(head={k: v + 2 for k, v in head.items()})
    mixed = RecordDict({"3/head": to_record(other.head), "3/metrics": ConfigRecord({"num_samples": 3}),
                        "5/factors": to_record(leaf)})
    assert audit_message(mixed, [ClientStore(), store, other], factor_shapes, head_shapes) == [
        "head/weight equals the client's own personal head/weight (store 2)",
        "head/bias equals the client's own personal head/bias (store 2)",
        "factors/m.lora_A equals the client's own leaf/m.lora_A (store 1)",
        "factors/m.lora_B equals the client's own leaf/m.lora_B (store 1)"]


def test_a_failing_client_is_dropped_and_the_run_completes() -> None:
    def fault(client_id: int, round_idx: int, kind: str) -> None:
        if client_id == 3 and round_idx == 2 and kind == "train":
            raise OSError("disk on fire")

    cfg = {**CFG, "federation": {**CFG["federation"], "rounds": 3, "min_clients": 2}}
    _, result = run_simulation(cfg, num_supernodes=4, fault=fault)
    assert len(result.records) == 3
    assert 3 in result.records[1].failed and "disk on fire" in result.records[1].failed[3]
    assert result.records[1].succeeded == [0, 1, 2] and not result.records[2].failed


def _reply(content=None, error=None):
    return types.SimpleNamespace(content=content or {}, has_error=lambda: error is not None,
                                 error=types.SimpleNamespace(code=1, reason=error))


def test_malformed_or_failed_replies_are_rejected_with_reasons() -> None:
    req = LocalPlan(Kind.TRAIN, 2, 5, {Tier.ROOT: Start.server({})}, HeadStart(None),
                    (Step((Tier.ROOT,), (Tier.ROOT,), seed=0),), upload=(Tier.ROOT, "AB"))
    with pytest.raises(TimeoutError, match="no reply from client 2 for its train plan of round 5"):
        FlowerBackend._fit_reply(None, req)
    with pytest.raises(ValueError, match="leaves never leave the client"):
        FlowerBackend._fit_reply({"leaf": 1, "metrics": 1}, req)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no 'metrics' record"):
        FlowerBackend._fit_reply({"factors": to_record({"a": torch.ones(1)})}, req)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected an ArrayRecord of tensors, got dict"):
        FlowerBackend._fit_reply({"metrics": 1, "factors": {"a": 1}}, req)  # type: ignore[arg-type]
    # a node serving several clients: each client's part, its own error, or nothing for it
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from hilora_lightning.flower.server_app import _per_client

    parts = _per_client(RecordDict({"2/metrics": MetricRecord({"num_samples": 3}),
                                    "4/error": ConfigRecord({"message": "OSError: disk on fire"})}), 17, [2, 4, 6])
    assert FlowerBackend._fit_reply(parts[2], req).num_samples == 3  # type: ignore[arg-type]
    assert str(parts[4]) == "client error: OSError: disk on fire"
    assert str(parts[6]) == "malformed reply: node 17 sent nothing for client 6"
    bad = _per_client(RecordDict({"metrics": MetricRecord({})}), 17, [2])
    assert str(bad[2]).startswith("malformed reply from node 17: a message for several clients holds only")


def test_codec_and_remote_data() -> None:
    state = {"x.lora_A": torch.randn(3, 4, dtype=torch.bfloat16)}
    back = from_record(to_record(state))
    assert back["x.lora_A"].dtype == torch.float32 and torch.equal(back["x.lora_A"], state["x.lora_A"].float())
    data = RemoteData(7, client_id=4)
    assert len(data) == 7
    with pytest.raises(RuntimeError, match="client 4's data lives on its Flower SuperNode"):
        data[0]


def test_a_killed_server_resumes_from_its_checkpoint_with_fresh_nodes(tmp_path, flower_run) -> None:
    straight, _, _, _ = flower_run
    run_simulation(CFG, num_supernodes=4, out_dir=tmp_path, stop_after=2)  # root and cluster rounds
    orch, result = run_simulation(CFG, num_supernodes=4, out_dir=tmp_path, resume=True)  # new nodes: no state
    assert [r.round for r in result.records] == [1, 2, 3, 4] and not any(r.failed for r in result.records)
    for j, cluster in straight.clusters.items():
        _assert_same_products(orch.clusters[j], cluster)
    # the frozen tiers were sent again once after the restart (the new nodes did not hold them)
    assert result.records[2].bytes_down_per_client > straight.records[2].bytes_down_per_client


def test_partial_participation_and_unseen_clients_run_on_flower() -> None:
    """fraction_fit=0.5: some clients have no root-stage features at the transition; they are probed
    through their SuperNodes (the server never reads their data), and unseen clients are routed,
    scored and fine-tuned on theirs, as in process."""
    cfg = {**CFG, "data": {**CFG["data"], "num_clients": 6, "unseen_fraction": 0.34},
           "federation": {**CFG["federation"], "rounds": 3, "fraction_fit": 0.5, "finetune_epochs": 1,
                          "probe_steps": 2}}
    orch, result = run_simulation(cfg, num_supernodes=6)
    assert [r.stage for r in result.records] == ["root", "cluster", "leaf"]
    assert all(not r.failed for r in result.records)
    assert len(orch.unseen) == 2 and set(result.routing) == set(orch.unseen)
    assert set(orch.assignment) == set(orch.clients)  # every training client has a cluster, probed or not
    assert {"root", "zero_leaf", "finetuned"} <= set(result.generalization)
    ref = build_experiment(cfg)
    ref.checkpoint_path, ref.progress = None, False
    expected = ref.run()
    assert expected.routing == result.routing and orch.assignment == ref.assignment


def test_a_baseline_runs_on_flower_like_in_process() -> None:
    """FedSA-LoRA over Flower: the same requests on the same runtime; each node keeps its own B."""
    cfg = {**CFG, "method": "fedsa-lora", "federation": {**CFG["federation"], "rounds": 3}}
    runner, result = run_simulation(cfg, num_supernodes=4)
    ref = build_experiment(cfg)
    ref.runner.checkpoint_path, ref.runner.progress = None, False
    expected = ref.run()
    assert [r.stage for r in result.records] == ["federated"] * 3 and not any(r.failed for r in result.records)
    assert result.records[0].bytes_up_per_client == expected.records[0].bytes_up_per_client  # A and the head only
    for key, value in ref.global_state.items():  # A averaged, B untouched: compare within float32 sum noise
        assert (runner.global_state[key] - value).norm() <= 1e-3 * max(float(value.norm()), 1e-6), key
    for cid, acc in expected.client_accuracy.items():
        assert abs(result.client_accuracy[cid] - acc) <= 0.02


def test_plans_and_stores_survive_the_wire_format() -> None:
    """Every field of a plan comes back; a state the client holds (frozen, kept, fresh) never travels."""
    from flwr.app import RecordDict

    from hilora_lightning.baselines import FDLoRA
    from hilora_lightning.federation.plan import Budget, ClientStore, Phase, ScorePlan
    from hilora_lightning.flower.messages import decode_plan, encode_plan, load_store, save_store

    gates = {"blocks.0.attn.qkv.tier_gate.weights": torch.tensor([0.5, 0.5])}
    state = {"m.lora_A": torch.randn(2, 3), "m.lora_B": torch.randn(4, 2)}
    steps = tuple(Step.of(p, seed=20 + i, whole=True) for i, p in enumerate(FDLoRA(rounds=2).phases(1)))
    steps += (Step.of(Phase((Tier.ROOT,), (), 0.25, gates=True, head=False), seed=9),
              Step((Tier.ROOT, Tier.CLUSTER), (Tier.CLUSTER,), 4, penalty=((Tier.ROOT, 0.1),)))
    slots = {Tier.ROOT: Start.frozen(state), Tier.CLUSTER: Start.server(state, freeze=True), Tier.LEAF: Start.kept(12)}
    plan = LocalPlan(Kind.FINETUNE, 5, 3, slots,
                     HeadStart({"w": torch.ones(2)}, own=True), steps, Budget(8, 2, None), upload=(Tier.ROOT, "A"),
                     keep=((Tier.ROOT, "B"), (Tier.LEAF, "AB")), keep_head=True, gates=gates)
    content = encode_plan(plan)
    assert sorted(k for k in content if k != "config") == ["gates", "head", "slot-cluster"]  # the frozen root stays
    back = decode_plan(content)
    assert isinstance(back, LocalPlan)
    assert back.slots[Tier.ROOT] == Start.frozen() and back.slots[Tier.LEAF] == Start.kept(12)
    assert back.slots[Tier.CLUSTER].freeze and torch.equal(back.slots[Tier.CLUSTER].sent["m.lora_B"], state["m.lora_B"])
    for field in ("kind", "client_id", "round", "steps", "budget", "upload", "keep", "keep_head", "return_head"):
        assert getattr(back, field) == getattr(plan, field), field
    assert back.head.own and torch.equal(back.head.state["w"], torch.ones(2))
    assert torch.equal(back.gates["blocks.0.attn.qkv.tier_gate.weights"], gates[next(iter(gates))])
    score = ScorePlan(5, 4, (Tier.ROOT, Tier.CLUSTER), {Tier.ROOT: Start.server(state), Tier.CLUSTER: Start.fresh(3)},
                      HeadStart(None), gates, metric="loss")
    got = decode_plan(encode_plan(score))
    assert isinstance(got, ScorePlan) and got.kind is Kind.SCORE
    assert (got.metric, got.active, got.head, got.slots[Tier.CLUSTER]) == ("loss", score.active, HeadStart(None),
                                                                           Start.fresh(3))
    context_state = RecordDict()
    store = ClientStore(kept={Tier.LEAF: state, Tier.ROOT: {"m.lora_B": state["m.lora_B"]}}, frozen={Tier.ROOT: state},
                        head={"w": torch.ones(2)}, gates=gates)
    save_store(context_state, store)
    assert load_store(context_state) == store
    save_store(context_state, ClientStore(head={"w": torch.zeros(2)}))  # entries it no longer holds are removed
    assert load_store(context_state) == ClientStore(head={"w": torch.zeros(2)})


class _DeadNodeGrid:
    """A Grid whose node 12 died (the SuperLink answers its message itself, from node 0, with its reason) and
    whose node 13 left without a word."""

    def get_node_ids(self):
        return [11]

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error, Message, MetricRecord, RecordDict

        out = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"  # as the Grid gives ids when it pushes
            if msg.metadata.dst_node_id == 13:
                continue
            if msg.metadata.dst_node_id == 12:
                reply = Message(Error(code=2, reason="node 12 is unavailable (offline since round 1)"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = 0
            else:
                reply = Message(RecordDict({"metrics": MetricRecord({"score": 0.5})}), reply_to=msg)
            out.append(reply)
        return out


def test_a_dead_node_is_recorded_with_the_superlinks_reason(monkeypatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from hilora_lightning.federation.plan import ScorePlan

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what a ServerApp's runtime sets
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)

    backend = FlowerBackend(_DeadNodeGrid(), {0: 11, 1: 12, 2: 13})  # type: ignore[arg-type]
    plans = {c: ScorePlan(c, 1, (Tier.ROOT,), {Tier.ROOT: Start.server({})}, HeadStart(None)) for c in (0, 1, 2)}
    scores = backend.evaluate(plans)
    assert scores[0] == 0.5
    assert isinstance(scores[1], RuntimeError) and isinstance(scores[2], RuntimeError)
    assert str(scores[1]) == "client error 2: node 12 is unavailable (offline since round 1)"  # not "no reply"
    assert str(scores[2]) == "no reply to its score plan of round 1 (its node 13 is no longer connected to the " \
                             "SuperLink)"

