"""Fault tolerance: a bad client, file or setting is dropped and recorded, or refused with a clear error."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from hilora_lightning import HiLoRAViT
from hilora_lightning.data import ClientData, digits_federation
from hilora_lightning.federation import ClusteringConfig, FederatedOrchestrator, FederationConfig
from hilora_lightning.federation.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hilora_lightning.federation.engine import FederationError

FAST = {"local_steps": 2, "batch_size": 16}
GIVEN = ClusteringConfig(method="given", assignment={0: 0, 1: 1, 2: 0, 3: 1, 4: 0})


def _config(**kw) -> FederationConfig:
    return FederationConfig(**{"rounds": 3, "root_rounds": (1, 1), "cluster_rounds": (1, 1), **FAST, **kw})


def _orch(clients=None, config=None, model=None, **kw) -> FederatedOrchestrator:
    return FederatedOrchestrator(model or HiLoRAViT(lr=3e-3), clients or digits_federation(4), config or _config(),
                                 progress=False, **kw)


class Unreadable(Dataset):
    """A test set with one image that cannot be decoded (as PIL's UnidentifiedImageError would say)."""

    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if i == 1:
            raise OSError("cannot identify image file 'img_0001.png'")
        return self.base[i]


def test_an_unreadable_test_image_drops_the_client_from_evaluation_only() -> None:
    clients = digits_federation(4)
    c = clients[2]
    clients[2] = ClientData(2, c.train, Unreadable(c.test), c.group, val=Unreadable(c.val))
    result = _orch(clients).run()
    assert all(not r.failed for r in result.records)  # it trains fine
    assert all("cannot identify image file" in r.eval_failed[2] for r in result.records)  # per round: validation
    assert 2 not in result.client_accuracy and len(result.client_accuracy) == 3
    assert "cannot identify image file" in result.failures["final root+cluster+leaf"][2]  # the end: test
    assert "not evaluated [2]" in result.records[0].progress_line(3)


def test_an_unreadable_test_image_is_only_seen_at_the_end() -> None:
    clients = digits_federation(4)
    clients[2] = ClientData(2, clients[2].train, Unreadable(clients[2].test), clients[2].group, val=clients[2].val)
    result = _orch(clients).run()
    assert all(not r.eval_failed for r in result.records)  # per-round figures never touch the test split
    assert all(r.split == "val" for r in result.records)
    assert "cannot identify image file" in result.failures["final root+cluster+leaf"][2]


def test_a_client_that_failed_every_root_round_is_probed_and_routed() -> None:
    clients = digits_federation(5)
    base = clients[4].train

    class Flaky(Dataset):  # unreadable during the root stage only (e.g. its disk came back later)
        broken = True

        def __len__(self) -> int:
            return len(base)

        def __getitem__(self, i: int):
            if Flaky.broken:
                raise OSError("disk offline")
            return base[i]

    clients[4] = ClientData(4, Flaky(), clients[4].test, clients[4].group, val=clients[4].val)
    orch = _orch(clients, _config(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1)))
    orch.run(stop_after=1)
    assert "disk offline" in orch.records[0].failed[4]
    Flaky.broken = False
    result = orch.run()  # the transition probes client 4 on its own data and routes it
    assert set(orch.assignment) == {0, 1, 2, 3, 4} and not result.records[-1].failed


def test_a_scaled_upload_is_rejected_by_default_like_a_dropped_client() -> None:
    """Factors x1e3 from one client: rejected by the default outlier bound, the run equals the one where
    that client fails every round (the issue's bar: within 0.02; here exactly)."""
    def poison(orch: FederatedOrchestrator, cid: int, how: str) -> None:
        fit = orch.backend.fit

        def wrapped(requests):
            replies = fit(requests)
            if cid in replies and not isinstance(replies[cid], Exception):
                r = replies[cid]
                if how == "scale" and r.factors is not None:
                    replies[cid] = type(r)({k: v * 1e3 for k, v in r.factors.items()},
                                           None if r.head is None else {k: v * 1e3 for k, v in r.head.items()},
                                           r.num_samples)
                elif how == "drop":
                    replies[cid] = RuntimeError("dropped")
            return replies

        orch.backend.fit = wrapped  # type: ignore[method-assign]

    cfg = _config(clustering=GIVEN, min_clients=2)
    poisoned, dropped = _orch(digits_federation(5), cfg), _orch(digits_federation(5), cfg)
    poison(poisoned, 3, "scale")
    poison(dropped, 3, "drop")
    a, b = poisoned.run(), dropped.run()
    assert "OutlierUpload" in a.records[0].failed[3] and "exceeds outlier_norm=10" in a.records[0].failed[3]
    assert a.client_accuracy == b.client_accuracy
    assert all(torch.equal(poisoned.root[k], dropped.root[k]) for k in dropped.root)
    off = _orch(digits_federation(5), _config(clustering=GIVEN, min_clients=2, outlier_norm=None))
    poison(off, 3, "scale")
    off.run()
    assert not off.records[0].failed  # switched off: the scaled upload is taken


def test_an_aggregate_that_overflows_fails_the_round_and_keeps_the_state(tmp_path) -> None:
    orch = _orch(config=_config(outlier_norm=None), checkpoint_path=tmp_path / "fed.pt")
    fit = orch.backend.fit

    def huge(requests):  # finite, but x1e21 overflows float32 in the product space
        replies = fit(requests)
        return {c: type(r)({k: v * 1e21 for k, v in r.factors.items()}, r.head, r.num_samples)
                if not isinstance(r, Exception) and r.factors else r for c, r in replies.items()}

    orch.backend.fit = huge  # type: ignore[method-assign]
    with pytest.raises(FederationError, match=r"round 1: the aggregate holds NaN or Inf values .* clients \["):
        orch.run()
    assert orch.round == 0 and not (tmp_path / "fed.pt").exists()
    assert all(torch.isfinite(v).all() for v in orch.root.values())


@pytest.mark.parametrize(("change", "key"), [
    ({"lr": 1e-2}, "model.lr: checkpoint 0.003, this run 0.01"),
    ({"gamma_c": 0.5}, "model.gamma_c: checkpoint 0.1, this run 0.5"),
    ({"adapter": {"root": {"rank": 4}}}, "model.adapter.root.rank: checkpoint 8, this run 4"),
])
def test_resume_refuses_a_different_model_naming_each_key(tmp_path, change, key) -> None:
    _orch(checkpoint_path=tmp_path / "fed.pt").run(stop_after=1)
    other = _orch(model=HiLoRAViT(**{"lr": 3e-3, **change}), checkpoint_path=tmp_path / "fed.pt")
    with pytest.raises(CheckpointError, match="belongs to a different run") as info:
        other.run(resume=True)
    assert key in str(info.value)


def test_resume_refuses_other_precision_weights_and_partition(tmp_path) -> None:
    _orch(checkpoint_path=tmp_path / "fed.pt").run(stop_after=1)
    with pytest.raises(CheckpointError, match=r"trainer.precision: checkpoint 32-true, this run bf16-mixed"):
        _orch(checkpoint_path=tmp_path / "fed.pt", trainer_kwargs={"precision": "bf16-mixed"}).run(resume=True)
    model = HiLoRAViT(lr=3e-3)
    with torch.no_grad():
        model.model.blocks[0].mlp.fc1.weight.add_(1e-3)  # a perturbed frozen backbone
    with pytest.raises(CheckpointError, match="model.backbone_sha256: checkpoint"):
        _orch(model=model, checkpoint_path=tmp_path / "fed.pt").run(resume=True)
    clients = digits_federation(4, train_fraction=0.7)
    with pytest.raises(CheckpointError, match="data.clients: checkpoint"):
        _orch(clients, checkpoint_path=tmp_path / "fed.pt").run(resume=True)


def test_a_corrupted_or_tampered_checkpoint_is_refused_and_never_half_used(tmp_path) -> None:
    path = tmp_path / "fed.pt"
    _orch(checkpoint_path=path).run(stop_after=1)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # one flipped bit inside the payload
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(raw))
    orch = _orch(checkpoint_path=flipped)
    with pytest.raises(CheckpointError, match="is corrupted \\(its SHA-256 does not match its header\\)"):
        orch.run(resume=True)
    assert orch.round == 0
    data = load_checkpoint(path)
    data["state"]["round"] = 99
    save_checkpoint(data, tmp_path / "r99.pt")
    with pytest.raises(CheckpointError, match="says round 99 with 1 records, but this run has 3 rounds"):
        _orch(checkpoint_path=tmp_path / "r99.pt").run(resume=True)
    data = load_checkpoint(path)
    del data["state"]["clients"]
    save_checkpoint(data, tmp_path / "noclients.pt")
    with pytest.raises(CheckpointError, match="state is malformed \\(KeyError: 'clients'\\)"):
        _orch(checkpoint_path=tmp_path / "noclients.pt").run(resume=True)


def test_a_temp_file_orphaned_by_a_killed_save_is_removed(tmp_path) -> None:
    orphan = tmp_path / ".fed.pt.abc123.tmp"
    orphan.write_bytes(b"half")
    os.utime(orphan)
    save_checkpoint({"round": 1}, tmp_path / "fed.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fed.pt"]


def test_the_similarity_plot_survives_a_resume_past_clustering(tmp_path) -> None:
    from hilora_lightning.experiment import save_outputs

    cfg = _config(rounds=3, clustering=ClusteringConfig(k_min=2, k_max=2))
    first = _orch(config=cfg, checkpoint_path=tmp_path / "fed.pt")
    first.run(stop_after=2)  # past the transition
    again = _orch(config=cfg, checkpoint_path=tmp_path / "fed.pt")
    result = again.run(resume=True)
    assert again.strategy.last_clustering is None and again.last_clustering is not None
    ids, res = again.last_clustering
    assert ids == sorted(first.clients) and res.k == first.last_clustering[1].k
    assert (res.distances == first.last_clustering[1].distances).all()
    paths = save_outputs(again, result, {}, tmp_path / "out")
    assert tmp_path / "out" / "client_similarity.png" in paths


def test_a_client_that_cannot_be_scored_keeps_its_last_score() -> None:
    """A client missing from a round's evaluation (a node that died) does not move the mean by leaving it:
    its last score is carried, and the record says how many clients were scored."""
    clients = digits_federation(3, num_groups=1)
    config = FederationConfig(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), local_steps=1, batch_size=8)
    orch = FederatedOrchestrator(HiLoRAViT(lr=3e-3), clients, config, progress=False)
    real = orch.runner.ctx.evaluate
    seen: dict[str, dict[int, float]] = {}

    def flaky(plans, step="evaluate"):
        got = real(plans, step)
        seen[step] = {c: float(v) for c, v in got.items()}
        if step == "round 2 evaluate":
            got[2] = RuntimeError("node 7 is unavailable")
        return got

    orch.runner.ctx.evaluate = flaky
    result = orch.run()
    r1, r2 = result.records[0], result.records[1]
    assert (r1.evaluated, r1.carried) == (3, []) and (r2.evaluated, r2.carried) == (2, [2])
    kept = [seen["round 2 evaluate"][0], seen["round 2 evaluate"][1], seen["round 1 evaluate"][2]]
    assert r2.acc_mean == pytest.approx(sum(kept) / 3, abs=1e-12)
    assert "val acc mean" in r2.progress_line(3) and "(2 scored, 1 carried from their last round)" in \
        r2.progress_line(3)
