from __future__ import annotations

import json
from pathlib import Path

import pytest

from hilora_lightning.cli import load_config, main
from hilora_lightning.experiment import validate_config

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "digits_cpu.yaml"
SMALL = ["data.num_clients=5", "data.num_groups=2", "federation.rounds=3", "federation.root_rounds=[1,1]",
         "federation.cluster_rounds=[1,1]", "federation.local_steps=2", "federation.finetune_epochs=1"]


def test_cli_runs_end_to_end_and_writes_results(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", str(CONFIG), *SMALL, f"out_dir={out}"]) == 0
    text = capsys.readouterr().out
    assert "round 3/3 [leaf]" in text and "root+cluster+leaf" in text and "unseen clients" in text
    names = sorted(p.name for p in out.iterdir())
    assert names == ["accuracy_per_round.png", "client_accuracy.png", "client_similarity.png", "config.yaml",
                     "federation.pt", "result.json", "rounds.csv"]
    result = json.loads((out / "result.json").read_text())
    assert len(result["records"]) == 3 and result["generalization"]
    resolved = load_config(out / "config.yaml")
    assert resolved["federation"]["rounds"] == 3 and resolved["data"]["num_clients"] == 5
    assert (out / "accuracy_per_round.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_runs_on_the_batched_backend_and_refuses_an_unknown_one(tmp_path: Path, capsys) -> None:
    out = tmp_path / "batched"
    assert main(["run", str(CONFIG), *SMALL, "backend.name=batched", "backend.clients_per_pass=3",
                 f"out_dir={out}"]) == 0
    assert "round 3/3 [leaf]" in capsys.readouterr().out
    assert load_config(out / "config.yaml")["backend"] == {"name": "batched", "clients_per_pass": 3}
    assert main(["run", str(CONFIG), *SMALL, "backend.name=parallel", f"out_dir={tmp_path / 'x'}"]) == 2
    assert "backend.name must be one of ('sequential', 'batched'), got 'parallel'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "match"),
    [("federation.round=3", r"unknown config key 'federation.round'; did you mean 'federation.rounds'\?"),
     ("model.adapter.root.rnak=4",
      r"unknown config key 'model.adapter.root.rnak'; did you mean 'model.adapter.root.rank'"),
     ("federation.clustering.methd=lsac", r"did you mean 'federation.clustering.method'"),
     ("dataa.name=x", r"unknown config key 'dataa'; did you mean 'data'")],
)
def test_mistyped_keys_name_the_closest_valid_one(override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_config(load_config(CONFIG, [override]))


def test_cli_errors_are_reported_not_raised(tmp_path: Path, capsys) -> None:
    assert main(["run", str(CONFIG), "federation.rounds=0", f"out_dir={tmp_path}"]) == 2
    assert "rounds must be an int >= 1, got 0" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", str(CONFIG), "rounds"]) == 2
    assert "overrides must look like key=value" in capsys.readouterr().err
    assert main(["run", str(CONFIG), "data.name=cifar10", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert ("data: unknown data set 'cifar10': available ['digits', 'fashion-mnist', 'cifar100', 'domainnet', "
            "'imagefolder']") in err


@pytest.mark.parametrize("name", ["cifar100_gl_dir", "cifar100_sc_dir", "cifar100_patho", "domainnet",
                                  "cifar100_gl_dir_cpu", "cifar100_sc_dir_cpu", "cifar100_patho_cpu", "domainnet_cpu",
                                  "digits_cpu", "compare_digits_cpu"])
def test_paper_configs_are_valid(name: str) -> None:
    validate_config(load_config(CONFIG.parent / f"{name}.yaml"))


def test_cifar100_config_runs_on_a_fake_cifar_folder(tmp_path: Path, capsys) -> None:
    from test_images import write_fake_cifar100

    write_fake_cifar100(tmp_path / "cifar")
    overrides = [f"data.root={tmp_path / 'cifar'}", "data.verify=false", "data.num_clients=10", "data.img_size=32",
                 "model.backbone=test_vit", "model.pretrained=false", "model.backbone_kwargs.img_size=32",
                 "federation.rounds=3", "federation.root_rounds=[1,1]", "federation.cluster_rounds=[1,1]",
                 "federation.local_steps=1", "federation.batch_size=8", "federation.finetune_epochs=0",
                 "trainer.precision=32-true", "trainer.accelerator=cpu", f"out_dir={tmp_path / 'out'}"]
    assert main(["run", str(CONFIG.parent / "cifar100_sc_dir.yaml"), *overrides]) == 0
    assert "root+cluster+leaf" in capsys.readouterr().out
    # the same paper config drives the comparison (a gated and a dual-adapter baseline here)
    assert main(["compare", str(CONFIG.parent / "cifar100_sc_dir.yaml"), "methods=fedalt,feddpa-t", *overrides]) == 0
    assert "[2/2] feddpa-t" in capsys.readouterr().out


def test_cli_compare_prints_one_table_and_writes_it(tmp_path: Path, capsys) -> None:
    config = CONFIG.parent / "compare_digits_cpu.yaml"
    assert main(["compare", str(config), "methods=fedsa-lora,flexlora", *SMALL, f"out_dir={tmp_path}"]) == 0
    text = capsys.readouterr().out
    assert "2 methods" in text and "[2/2] flexlora" in text
    header = next(line for line in text.splitlines() if line.startswith("method"))
    assert "unseen zero-leaf" in header and "up KiB/client/round" in header
    out = tmp_path / "compare"
    assert sorted(p.name for p in out.iterdir()) == ["accuracy_per_method.png", "comparison.csv", "comparison.json",
                                                     "comparison.txt", "fedsa-lora", "flexlora"]
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["fedsa-lora", "flexlora"]


def test_cli_compare_rejects_unknown_methods(tmp_path: Path, capsys) -> None:
    assert main(["compare", str(CONFIG), "methods=fedit,fedprox", f"out_dir={tmp_path}"]) == 2
    assert "unknown method(s) ['fedprox']" in capsys.readouterr().err


def test_export_and_predict_from_a_run_folder(tmp_path: Path, capsys) -> None:
    import timm
    import torch
    from PIL import Image

    from hilora_lightning.cli import load_run
    from hilora_lightning.predict import image_transform

    out = tmp_path / "run"
    assert main(["run", str(CONFIG), *SMALL, f"out_dir={out}"]) == 0
    run = load_run(out)
    cid = run.client_ids[0]
    from hilora_lightning.experiment import build_clients

    clients = {c.client_id: c for c in build_clients(run.cfg["data"], int(run.cfg["seed"]))[0]}
    assert main(["export", str(out), "--client", str(cid), "--format", "timm", "--out", str(tmp_path / "m")]) == 0
    plain = timm.create_model(f"local-dir:{tmp_path / 'm'}", pretrained=True).eval()
    images = tmp_path / "images"
    images.mkdir()
    x, y = clients[cid].test[:4]
    for i, img in enumerate(x):  # the digits as 8-bit PNGs, as a user would have them
        gray = ((img[0] * 0.5 + 0.5).clamp(0, 1) * 255).round().byte().numpy()
        Image.fromarray(gray, mode="L").save(images / f"d{i}.png")
    capsys.readouterr()
    assert main(["predict", str(out), str(images), "--client", str(cid), "--topk", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [Path(r["image"]).name for r in rows] == [f"d{i}.png" for i in range(4)]
    transform = image_transform(run.cfg["data"])
    batch = torch.stack([transform(Image.open(images / f"d{i}.png").convert("RGB")) for i in range(4)])
    with torch.no_grad():
        want = plain(batch).softmax(-1).topk(3, dim=-1)  # the exported timm model: an independent path
    assert [r["classes"] for r in rows] == want.indices.tolist()
    for r, probs in zip(rows, want.values.tolist()):
        assert r["probabilities"] == pytest.approx(probs, abs=1e-5)
    assert main(["predict", str(out), str(tmp_path / "none"), "--client", str(cid)]) == 2
    assert "no image file or folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--client", "0", "--out", str(tmp_path / "x")]) == 2
    assert "is not a run folder: it has no config.yaml" in capsys.readouterr().err
