"""Fashion-MNIST: IDX reading (raw and gzip), where the files are looked for, the four federations."""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hilora_lightning.data import fashion
from hilora_lightning.data.fashion import DEBIAN_ROOT, FILES, fashion_mnist_federation, load_fashion_mnist, read_idx


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(folder: Path, n_train: int = 400, n_test: int = 100, gz: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10  # balanced classes
        data[split] = (images, labels)
        for name, arr in zip(FILES[split], (images, labels)):
            raw = _idx(arr)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
    return data


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    """Make the search independent of whether the Debian package is installed on this machine."""
    monkeypatch.setattr(fashion, "DEBIAN_ROOT", tmp_path / "no-debian")


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_read_back_exactly(tmp_path, no_debian, gz) -> None:
    data = _write(tmp_path / "fm", gz=gz)
    images, labels = load_fashion_mnist(tmp_path / "fm", "train")
    assert np.array_equal(images, data["train"][0]) and np.array_equal(labels, data["train"][1])
    both, _ = load_fashion_mnist(tmp_path / "fm", "all")
    assert np.array_equal(both, np.concatenate([data["train"][0], data["test"][0]]))
    _write(tmp_path / "tv" / "FashionMNIST" / "raw", seed=1)  # where torchvision downloads to
    assert load_fashion_mnist(tmp_path / "tv", "test")[0].shape == (100, 28, 28)


def test_missing_or_corrupt_files_are_clear_errors(tmp_path, no_debian) -> None:
    with pytest.raises(FileNotFoundError, match=r"apt-get install -y dataset-fashion-mnist.*data.download=true"):
        load_fashion_mnist(None)
    # a given root is never silently replaced by another copy (the Debian one): it is an error that says so
    with pytest.raises(FileNotFoundError, match=r"data.root '.*empty' does not exist .* Fix data.root, add "
                                                r"data.download=true .* or leave data.root out"):
        load_fashion_mnist(tmp_path / "empty")
    (tmp_path / "hollow").mkdir()
    with pytest.raises(FileNotFoundError, match=r"data.root '.*hollow' holds no Fashion-MNIST IDX files"):
        load_fashion_mnist(tmp_path / "hollow")
    bad = tmp_path / "bad"
    bad.write_bytes(bytes([0, 0, 0x08, 1]) + (5).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(ValueError, match="is truncated or corrupt: header says \\(5,\\)"):
        read_idx(bad)
    bad.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="is not an IDX file of unsigned bytes"):
        read_idx(bad)
    with pytest.raises(ValueError, match="download=True needs a root folder"):
        load_fashion_mnist(None, download=True)


@pytest.mark.parametrize(("partition", "groups"), [("sc-dir", {0, 1, 2}), ("gl-dir", {None}), ("patho", {None}),
                                                   ("domain", {0, 1, 2, 3})])
def test_the_four_federations(tmp_path, no_debian, partition, groups) -> None:
    _write(tmp_path / "fm", n_train=1800, n_test=600)
    clients = fashion_mnist_federation(tmp_path / "fm", num_clients=12, partition=partition, per_client=40,
                                       classes_per_client=3, seed=0)
    assert len(clients) == 12 and {c.group for c in clients} == groups
    assert all(len(c.train) + len(c.val) + len(c.test) == 40 and 5 <= len(c.test) <= 15 for c in clients)
    x, y = clients[0].train.tensors
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and -1.0 <= float(x.min()) <= float(x.max()) <= 1
    if partition == "sc-dir":  # a latent group's clients hold the labels of one class group, each its own
        owner: dict[int, set[int]] = {}
        for c in clients:
            labels = set(c.train.tensors[1].tolist()) | set(c.test.tensors[1].tolist())
            owner.setdefault(c.group, set()).update(fashion.SUPERCLASS_OF[v] for v in labels)
        assert all(len(sup) == 1 for sup in owner.values()) and len(set.union(*owner.values())) == 3
    if partition == "patho":
        assert all(len(set(c.train.tensors[1].tolist())) <= 3 for c in clients)
    again = fashion_mnist_federation(tmp_path / "fm", num_clients=12, partition=partition, per_client=40,
                                     classes_per_client=3, seed=0)
    assert torch.equal(again[3].train.tensors[0], clients[3].train.tensors[0])  # seeded


def test_oracle_is_skipped_where_the_partition_has_no_latent_groups(tmp_path, no_debian, capsys) -> None:
    from hilora_lightning.compare import run_comparison

    _write(tmp_path / "fm", n_train=600, n_test=200)
    cfg = {"seed": 0, "data": {"name": "fashion-mnist", "root": str(tmp_path / "fm"), "partition": "gl-dir",
                               "num_clients": 4, "per_client": 40}}
    comp = run_comparison(cfg, ["hilora-oracle"], progress=False)
    assert comp.results == {} and comp.groups == {}
    assert "[1/1] hilora-oracle: skipped, this partition has no latent groups" in capsys.readouterr().out


def test_domain_transforms() -> None:
    x = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    assert torch.equal(fashion._apply_domain(x, 1), torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(fashion._apply_domain(x, 2), -x)
    blurred = fashion._apply_domain(x, 3)
    assert blurred.shape == x.shape and float((blurred - x).abs().max()) < 0.1  # a smooth ramp barely changes
    spike = torch.zeros(1, 3, 9, 9)
    spike[..., 4, 4] = 1.0
    assert float(fashion._apply_domain(spike, 3)[0, 0, 4, 4]) == pytest.approx(36 / 256)
    with pytest.raises(ValueError, match="needs num_clients divisible by 4"):
        fashion_mnist_federation(num_clients=10, partition="domain")


@pytest.mark.skipif(not DEBIAN_ROOT.is_dir(), reason="Fashion-MNIST is not installed here (CI installs Debian's "
                    "dataset-fashion-mnist; apt-get install -y dataset-fashion-mnist)")
def test_real_fashion_mnist_sc_dir_end_to_end(tmp_path) -> None:
    from hilora_lightning.cli import main

    images, labels = load_fashion_mnist(None, "all")
    assert images.shape == (70000, 28, 28) and np.bincount(labels).tolist() == [7000] * 10
    config = Path(__file__).resolve().parents[1] / "examples" / "configs" / "fmnist_sc_dir.yaml"
    out = tmp_path / "run"
    assert main(["run", str(config), "federation.rounds=3", "federation.root_rounds=[1,1]",
                 "federation.cluster_rounds=[1,1]", "federation.local_steps=1", "federation.finetune_epochs=1",
                 "federation.eval_every=3", f"out_dir={out}"]) == 0
    import json

    result = json.loads((out / "result.json").read_text())
    assert len(result["records"]) == 3 and len(result["client_accuracy"]) == 30
    assert result["generalization"] and result["num_clusters"] >= 2


def _quality():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality_benchmark", path)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)  # type: ignore[union-attr]
    return quality


def test_quality_benchmark_runs_methods_side_by_side_in_child_processes(tmp_path, capsys) -> None:
    """--jobs 2: each (method, seed) in its own process; the parent reads them back; failures are named."""
    import json

    quality = _quality()
    _write(tmp_path / "fm", n_train=600, n_test=200)
    small = ["data.num_clients=6", "data.per_client=60", "data.unseen_fraction=0.2", "federation.rounds=3",
             "federation.root_rounds=[1,1]", "federation.cluster_rounds=[1,1]", "federation.local_steps=1",
             "federation.finetune_epochs=1", "federation.probe_steps=1", "federation.batch_size=8"]
    runs = tmp_path / "runs"
    args = ["--methods", "fedit,local-lora", "--seeds", "0,1", "--out", str(runs), "--jobs", "2",
            f"data.root={tmp_path / 'fm'}", *small]
    assert quality.main(args) == 0
    printed = capsys.readouterr().out
    assert len(re.findall(r"\] \S+, seed [01]: started \(\d+ thread\(s\); log ", printed)) == 4 and "[4/4]" in printed
    cores = os.cpu_count() or 1  # the last run to start gets every core; the first shares them with the second
    assert re.search(rf"\[4/4\] \S+, seed 1: started \({cores} thread", printed)
    assert re.search(rf"\[1/4\] \S+, seed 0: started \({max(1, cores // 2)} thread", printed)
    for seed in (0, 1):
        for name in ("fedit", "local-lora"):
            assert json.loads((runs / f"seed{seed}" / name / "result.json").read_text())["settings"]
            assert (runs / f"seed{seed}" / f"{name}.log").read_text()
    table = printed[printed.index("method "):]  # read back by the parent: the mean ± std table of both
    assert "fedit" in table and "local-lora" in table and " ± " in table
    assert quality.pending_runs(quality.DEFAULT_CONFIG, ["fedit", "local-lora"], [0, 1], runs,
                                [f"data.root={tmp_path / 'fm'}", *small]) == []
    assert quality.main(args) == 0 and "started" not in capsys.readouterr().out  # all finished: nothing spawned
    # a child that fails (here: a corrupt data file) is named with the end of its log; nothing is half-written
    _write(tmp_path / "corrupt", n_train=600, n_test=200)
    (tmp_path / "corrupt" / f"{FILES['train'][0]}.gz").write_bytes(gzip.compress(b"PK not idx"))
    bad = ["--methods", "fedit,fedalt", "--seeds", "0", "--out", str(tmp_path / "bad"), "--jobs", "2",
           f"data.root={tmp_path / 'corrupt'}", *small]
    assert quality.main(bad) == 1
    printed = capsys.readouterr().out
    assert "2 run(s) failed; the others are saved under" in printed and "fedalt, seed 0: exit 1 after" in printed
    assert "is not an IDX file of unsigned bytes" in printed and not list((tmp_path / "bad").rglob("result.json"))


def test_quality_benchmark_quick_mode_writes_its_headline_figures(tmp_path, no_debian, monkeypatch, capsys) -> None:
    import json

    quality = _quality()
    _write(tmp_path / "fm", n_train=1200, n_test=300)
    out = tmp_path / "figures.json"
    args = ["--quick", "--out", str(tmp_path / "runs"), "--json", str(out), "--jobs=1", f"data.root={tmp_path / 'fm'}",
            "data.num_clients=12", "data.per_client=60", "data.unseen_fraction=0.25", "federation.rounds=3",
            "federation.root_rounds=[1,1]", "federation.cluster_rounds=[1,1]", "federation.local_steps=1",
            "federation.finetune_epochs=1", "federation.eval_every=3", "federation.probe_steps=1",
            "federation.batch_size=8", "federation.clustering.study=true"]
    assert quality.main(args) == 0
    figures = json.loads(out.read_text())
    assert set(quality.KEYS) <= set(figures)
    assert all(isinstance(v, float) for v in figures.values())
    runs = json.loads((tmp_path / "runs" / "seed0" / "hilora" / "result.json").read_text())["result"]
    best = max(figures[f"{m}_mean"] for m in quality.QUICK_METHODS if m != "hilora")
    assert figures["hilora_minus_best_baseline_mean"] == pytest.approx(figures["hilora_mean"] - best)
    assert figures["lsac_ari"] == runs["clustering_ari"]
    # the study's row for the run's own feature and sigma is the run's clustering
    assert figures["lsac_study_B_median_ari"] == runs["clustering_ari"] == runs["lsac_study"]["B/median"]["ari"]
    assert figures["lsac_study_delta_local_k1_k"] == runs["lsac_study"]["delta/local/k1"]["k"]
    # --report runs nothing: the methods finished in every seed are read back, the others named
    import hilora_lightning.compare as cmp
    from hilora_lightning.federation import FederatedResult

    def boom(*a, **k):
        raise AssertionError("--report must not run anything")

    monkeypatch.setattr(cmp, "run_method", boom)
    capsys.readouterr()
    report = tmp_path / "report.json"
    assert quality.main(["--report", "--methods", "hilora,fedit", "--seeds", "0", "--out", str(tmp_path / "runs"),
                         "--json", str(report), *args[5:]]) == 0
    assert "not finished in every seed, left out: fedit (seeds [0])" in capsys.readouterr().out
    assert json.loads(report.read_text())["lsac_ari"] == figures["lsac_ari"]
    with pytest.raises(SystemExit, match="no method has a saved result for this config in every seed"):
        quality.main(["--report", "--methods", "hilora", "--seeds", "0,1", "--out", str(tmp_path / "runs"), *args[5:]])
    # a result run under another library default is stale: named, never read back as this default's
    saved_path = tmp_path / "runs" / "seed0" / "pf2lora" / "result.json"
    saved = json.loads(saved_path.read_text())
    saved["settings"]["model"]["ortho_form"] = "scaled"
    saved_path.write_text(json.dumps(saved))
    capsys.readouterr()
    assert quality.main(["--report", "--methods", "hilora,pf2lora", "--seeds", "0", "--out", str(tmp_path / "runs"),
                         *args[5:]]) == 0
    assert ("left out: pf2lora (seed 0: run with other settings: model.ortho_form: 'scaled' -> 'raw')"
            in capsys.readouterr().out)
    monkeypatch.undo()
    # --lsac-only: the root stage alone gives the same study as the full run's (same seed and config)
    study_json = tmp_path / "study.json"
    assert quality.main(["--lsac-only", "--seeds", "0", "--json", str(study_json), *args[5:]]) == 0
    study = json.loads(study_json.read_text())
    assert {k: v for k, v in study.items() if k.startswith("lsac_study_") and not k.endswith("_std")} == \
        {k: v for k, v in figures.items() if k.startswith("lsac_study_") and not k.endswith("_std")}
    # unseen 7 (group 6) went to cluster 1, where group 6 trains: a hit; unseen 8 (group 5) did not
    hand = FederatedResult([], {}, {}, {0: 0, 1: 0, 2: 1}, 2, routing={7: 1, 8: 1})
    assert quality.routing_accuracy(hand, {0: 5, 1: 5, 2: 6}, {7: 6, 8: 5}) == 0.5
