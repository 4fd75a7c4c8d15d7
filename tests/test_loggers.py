"""Round metrics, hyper-parameters and figures in Lightning loggers; the progress bar."""

from __future__ import annotations

import csv
import io

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from hilora_lightning import HiLoRAViT
from hilora_lightning.data import digits_federation, split_unseen
from hilora_lightning.federation import ClusteringConfig, FederatedOrchestrator, FederationConfig
from hilora_lightning.federation.progress import RoundProgress

CFG = FederationConfig(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), local_steps=2, batch_size=16,
                       clustering=ClusteringConfig(k_min=2, k_max=2), finetune_epochs=1)


def test_csv_logger_gets_every_round_at_its_step(tmp_path) -> None:
    logger = CSVLogger(tmp_path, name="fed")
    orch = FederatedOrchestrator(HiLoRAViT(lr=3e-3), digits_federation(4, num_groups=2), CFG, progress=False,
                                 logger=logger)
    result = orch.run()
    rows = list(csv.DictReader(open(logger.log_dir + "/metrics.csv")))
    by_step: dict[int, dict[str, str]] = {}
    for row in rows:
        by_step.setdefault(int(row["step"]), {}).update({k: v for k, v in row.items() if v != ""})
    assert sorted(by_step) == [1, 2, 3]
    for record in result.records:
        got = by_step[record.round]
        assert float(got["fed/acc_mean"]) == pytest.approx(record.acc_mean)
        assert float(got["fed/clients_ok"]) == len(record.succeeded) and float(got["fed/clients_failed"]) == 0
        assert float(got["fed/bytes_up"]) == pytest.approx(record.bytes_up_per_client)
        assert float(got["fed/stage"]) == {"root": 0, "cluster": 1, "leaf": 2}[record.stage]
    assert float(by_step[1]["fed/k"]) == 2 and float(by_step[1]["fed/ari"]) == pytest.approx(result.clustering_ari)
    import yaml

    hparams = yaml.safe_load((tmp_path / "fed" / "version_0" / "hparams.yaml").read_text())
    assert hparams["federation.rounds"] == 3 and hparams["model.lr"] == 0.003  # typed, not '3'
    assert hparams["federation.clustering.method"] == "lsac" and len(hparams["model.backbone_sha256"]) == 64
    final = by_step[3]
    for view, summary in result.tierwise.items():
        assert float(final[f"fed/final/{view}/mean"]) == pytest.approx(summary["mean"])
    for cid, acc in result.client_accuracy.items():
        assert float(final[f"fed/client/{cid}/final_acc"]) == pytest.approx(acc)
    pngs = sorted(p.name for p in (tmp_path / "fed" / "version_0").glob("*.png"))
    assert pngs == ["accuracy_per_round_round3.png", "client_accuracy_round3.png", "client_similarity_round3.png"]


def test_a_logger_in_trainer_kwargs_gets_each_client_under_its_id_at_the_round(tmp_path) -> None:
    logger = CSVLogger(tmp_path, name="clients")
    orch = FederatedOrchestrator(HiLoRAViT(lr=3e-3), digits_federation(3, num_groups=1), CFG, progress=False,
                                 trainer_kwargs={"logger": logger, "log_every_n_steps": 1})
    orch.run()
    rows = list(csv.DictReader(open(logger.log_dir + "/metrics.csv")))
    names = {k for row in rows for k, v in row.items() if v != ""} - {"step"}
    assert names and all(k.startswith("client/") for k in names)
    assert {"client/0/train/loss", "client/1/train/loss", "client/2/train/loss"} <= names
    assert {int(r["step"]) for r in rows} == {1, 2, 3}  # the federation's rounds, not each fit's restart at 0
    for row in rows:  # a client's row is at a round it trained in
        cid = next(int(k.split("/")[1]) for k, v in row.items() if v != "" and k != "step")
        assert 1 <= int(row["step"]) <= 3 and cid in (0, 1, 2)
    assert not (tmp_path / "clients" / "version_0" / "hparams.yaml").exists()  # no client fit's own hparams


def test_tensorboard_logger_gets_scalars_and_figures(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    clients, unseen = split_unseen(digits_federation(5, num_groups=2), 0.2)
    logger = TensorBoardLogger(tmp_path, name="fed", default_hp_metric=False)
    FederatedOrchestrator(HiLoRAViT(lr=3e-3), clients, CFG, unseen=unseen, progress=False, logger=logger).run()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"fed/acc_mean", "fed/bytes_down", "fed/k", "fed/ari", "fed/seconds"} <= set(scalars)
    assert [e.step for e in events.Scalars("fed/acc_mean")] == [1, 2, 3]
    assert {"fed/accuracy_per_round", "fed/client_similarity", "fed/client_accuracy"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("fed/client_accuracy")] == [3]  # at the last round
    assert events.Scalars("hp_metric")[-1].value > 0  # the final personalized accuracy, not -1
    assert "fed/unseen/finetuned/mean" in scalars


def test_progress_bar_draws_only_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    quiet = RoundProgress(3, 0, enabled=True, stream=io.StringIO())
    assert not quiet.active
    out = Tty()
    bar = RoundProgress(3, 1, enabled=True, stream=out)
    bar.start_round(2, "cluster", 4)
    bar.client_done(3, 4)
    bar.end_round("round 2/3 [cluster] clients 4/4", 0.5)
    bar.close()
    text = out.getvalue()
    assert "round 2/3 [cluster]" in text and "3/4" in text and "acc=0.500" in text and "2/3" in text
    assert not RoundProgress(3, 0, enabled=False, stream=Tty()).active
