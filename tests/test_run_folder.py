"""Run management: Ctrl-C exits 130 and resumes bitwise, a finished run is extended, an out_dir holding a run is
not overwritten, export and predict read the run folder alone (the data deleted), the demo's folder is a run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from hilora_lightning.cli import load_config, main
from hilora_lightning.run_folder import SavedRun, saved_round

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "digits_cpu.yaml"
SMALL = ["data.num_clients=5", "data.num_groups=2", "federation.root_rounds=[1,1]", "federation.cluster_rounds=[1,1]",
         "federation.local_steps=2", "federation.finetune_epochs=1"]


def _outcome(out: Path) -> dict[str, Any]:
    """result.json without wall-clock times: what must be equal bit for bit between two runs."""
    result = json.loads((out / "result.json").read_text())
    result.pop("seconds")
    for record in result["records"]:
        record.pop("seconds")
    return result


def test_ctrl_c_exits_130_with_the_resume_hint_and_resume_continues_bitwise(tmp_path: Path, capsys) -> None:
    hook = ["loader.collate_fn=hilora_test_hooks:interrupt_after_checkpoint"]  # SIGINT in round 2's first fit
    args = [*SMALL, "federation.rounds=4", *hook]
    out = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "HILORA_TEST_INTERRUPT_AT": str(out / "federation.pt")}
    proc = subprocess.run([sys.executable, "-m", "hilora_lightning.cli", "run", str(CONFIG), *args, f"out_dir={out}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 130, proc.stderr[-2000:]
    hint = proc.stderr.strip().splitlines()[-1]
    assert hint.startswith("hilora-fl: interrupted (SIGINT) after round 1; continue with: hilora-fl run ")
    assert hint.endswith(f"out_dir={out} --resume") and "loader.collate_fn=hilora_test_hooks" in hint
    assert "round 2/4" not in proc.stdout.split("round 1/4")[-1].split("\n", 1)[-1].split("\n")[0]  # round 2 unfinished
    assert saved_round(out) == 1 and not (out / "result.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "federation.pt"]  # no temp file, nothing half
    assert main(["run", str(CONFIG), *args, f"out_dir={out}", "--resume"]) == 0
    straight = tmp_path / "straight"
    assert main(["run", str(CONFIG), *args, f"out_dir={straight}"]) == 0
    assert _outcome(out) == _outcome(straight)


def test_a_finished_run_is_extended_and_equals_the_longer_run(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["run", str(CONFIG), *SMALL, "federation.rounds=5", f"out_dir={run}"]) == 0
    assert main(["run", str(CONFIG), *SMALL, "federation.rounds=7", f"out_dir={run}", "--resume"]) == 0
    assert "resuming round 5 with a longer schedule: federation.rounds: 5 -> 7" in capsys.readouterr().out
    longer = tmp_path / "longer"
    assert main(["run", str(CONFIG), *SMALL, "federation.rounds=7", f"out_dir={longer}"]) == 0
    assert _outcome(run) == _outcome(longer)  # the leaf stage simply ran on
    before = (run / "config.yaml").read_bytes(), (run / "federation.pt").read_bytes()
    capsys.readouterr()
    assert main(["run", str(CONFIG), *SMALL, "federation.rounds=6", f"out_dir={run}", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "federation.rounds: checkpoint 7, this run 6" in err and "more federation.rounds is the one change" in err
    assert ((run / "config.yaml").read_bytes(), (run / "federation.pt").read_bytes()) == before  # nothing lost


def test_an_out_dir_holding_a_run_is_not_overwritten(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", str(CONFIG), *SMALL, "federation.rounds=3", f"out_dir={out}"]) == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["run", str(CONFIG), *SMALL, "federation.rounds=3", "seed=1", f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert f"'{out}' already holds a run (federation.pt, result.json); continue it with --resume, replace it with " \
           "--overwrite, or choose another out_dir=..." in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert main(["run", str(CONFIG), *SMALL, f"out_dir={out}", "--resume", "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert main(["run", str(CONFIG), *SMALL, "federation.rounds=3", "seed=1", f"out_dir={out}", "--overwrite"]) == 0
    assert load_config(out / "config.yaml")["seed"] == 1 and (out / "notes.txt").read_text() == "mine"
    assert (out / "result.json").read_bytes() != files["result.json"]


def test_compare_into_a_finished_comparison_is_refused(tmp_path: Path, capsys) -> None:
    args = ["compare", str(CONFIG), *SMALL, "federation.rounds=3", "methods=fedit", f"out_dir={tmp_path}"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a run (comparison.json, fedit/result.json)" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0


def _image_federation(tmp_path: Path) -> dict[str, Any]:
    from helpers import digits_tensors, write_png_sites

    write_png_sites(tmp_path / "sites", digits_tensors(4))
    return {"seed": 0, "out_dir": str(tmp_path / "run"),
            "data": {"name": "imagefolder", "layout": "per_client", "root": str(tmp_path / "sites"), "img_size": 32,
                     "unseen": [3]},
            "model": {"backbone": "hilora-digits-vit", "num_classes": 10, "lr": 3e-3},
            "federation": {"rounds": 3, "root_rounds": [1, 1], "cluster_rounds": [1, 1], "local_steps": 2,
                           "batch_size": 8, "finetune_epochs": 1, "clustering": {"k_min": 2, "k_max": 2}},
            "trainer": {"precision": "32-true", "accelerator": "cpu"}}


def test_export_and_predict_after_the_data_is_deleted(tmp_path: Path, capsys) -> None:
    import timm
    from PIL import Image

    from hilora_lightning.experiment import run_experiment
    from hilora_lightning.export import client_copy
    from hilora_lightning.predict import image_transform

    cfg = _image_federation(tmp_path)
    orch, _ = run_experiment(cfg)  # writes config.yaml and federation.pt: all that export reads
    image = tmp_path / "query.png"
    shutil.copy(next((tmp_path / "sites" / "site0").rglob("*.png")), image)
    shutil.rmtree(tmp_path / "sites")  # the training data is gone
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for cid, fmt in ((0, "timm"), (3, "timm")):  # a training client and the unseen (routed, fine-tuned) one
        target = tmp_path / f"client{cid}"
        assert main(["export", cfg["out_dir"], "--client", str(cid), "--format", fmt, "--out", str(target)]) == 0
        plain = timm.create_model(f"local-dir:{target}", pretrained=True).eval()
        federated = client_copy(orch.model, *orch.client_model(cid))
        with torch.no_grad():
            got, want = plain(x), federated(x)
        # merged weights vs W x + s B (A x): float32 sums in another order, |logits| ~ 10
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    capsys.readouterr()
    assert main(["predict", cfg["out_dir"], str(image), "--client", "0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        logits = client_copy(orch.model, *orch.client_model(0))(
            image_transform(cfg["data"])(Image.open(image).convert("RGB"))[None])
    assert rows[0]["classes"][0] == int(logits.argmax())
    assert main(["export", cfg["out_dir"], "--client", "7", "--out", str(tmp_path / "x")]) == 2
    assert "no client 7 in" in (err := capsys.readouterr().err) and "training clients [0, 1, 2], unseen [3]" in err


def test_export_refuses_a_config_edited_after_the_run(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", str(CONFIG), *SMALL, "federation.rounds=3", f"out_dir={out}"]) == 0
    text = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(text.replace("lr: 0.003", "lr: 0.01"))
    capsys.readouterr()
    assert main(["export", str(out), "--client", "0", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "config.yaml' does not describe" in err and "model.lr: checkpoint 0.003, this run 0.01" in err
    assert not (tmp_path / "m").exists()
    (out / "config.yaml").write_text(text)
    assert main(["export", str(out), "--client", "9", "--out", str(tmp_path / "m")]) == 2
    assert "no client 9 in" in capsys.readouterr().err


def test_export_imports_only_what_it_needs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", str(CONFIG), *SMALL, "federation.rounds=3", f"out_dir={out}"]) == 0
    code = f"""
import sys
from hilora_lightning.cli import main
assert main(["export", {str(out)!r}, "--client", "0", "--format", "tiers", "--out", {str(tmp_path / "m")!r}]) == 0
ours = ("hilora_lightning.data.", "hilora_lightning.plots", "hilora_lightning.baselines", "hilora_lightning.flower")
needed = {{"hilora_lightning.data.clients", "hilora_lightning.data.samples", "hilora_lightning.data.hook"}}
print(sorted(m for m in sys.modules if m.split(".")[0] in {{"flwr", "datasets", "ray", "peft"}}
             or m.startswith(ours) and m not in needed))
"""  # Lightning itself brings matplotlib, scipy and torchvision
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_demo_folder_is_a_run(tmp_path: Path, capsys) -> None:
    from hilora_lightning.demo import main as demo

    out = tmp_path / "demo"
    small = ["--rounds", "3", "--clients", "4", "--groups", "2", "--unseen", "1", "--local-steps", "2",
             "--out", str(out)]
    demo(small)
    text = capsys.readouterr().out
    assert f"hilora-fl run {out}/config.yaml federation.rounds=9 --resume" in text
    assert {"federation.pt", "config.yaml", "result.json"} <= {p.name for p in out.iterdir()}
    assert SavedRun.open(out).unseen_ids == [4]
    assert main(["run", str(out / "config.yaml"), "federation.rounds=4", "--resume"]) == 0  # the hint's command
    assert len(json.loads((out / "result.json").read_text())["records"]) == 4
    with pytest.raises(Exception, match="already holds a run"):
        demo(small)
    capsys.readouterr()
    assert main(["demo", *small]) == 2  # the console command: one line, no traceback
    assert "hilora-fl: error: " in capsys.readouterr().err
