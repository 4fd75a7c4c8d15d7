"""Config validation through the CLI: every bad value is one line naming its key, exit code 2, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from hilora_lightning.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "digits_cpu.yaml"
SMALL = ["data.num_clients=5", "data.num_groups=2", "federation.rounds=3", "federation.root_rounds=[1,1]",
         "federation.cluster_rounds=[1,1]", "federation.local_steps=1"]


@pytest.mark.parametrize(("override", "match"), [
    ("model.lr=.nan", "model.lr: expected a finite number, got nan"),
    ("model.lr=nan", r"model.lr: expected a number, got 'nan' \(a str\)"),
    ("model.lr=true", r"model.lr: expected a number, got True \(a boolean\)"),
    ("model.gamma_c=.inf", "model.gamma_c: expected a finite number, got inf"),
    ("model.weight_decay=.nan", "model.weight_decay: expected a finite number, got nan"),
    ("data.num_clients=6.7", r"data.num_clients: expected an integer, got 6.7 \(a float\)"),
    ("federation.rounds=true", r"federation.rounds: expected an integer, got True \(a boolean\)"),
    ("federation.fraction_fit=0", r"federation.fraction_fit must be in \(0, 1\], got 0"),
    ("federation.root_rounds=[1]", r"federation.root_rounds: expected a \[min, max\] pair of integers"),
    ("federation.clustering.k_max=x", "federation.clustering.k_max: expected an integer, got 'x' \\(a str\\)"),
    ("model.train_head=1", "model.train_head: expected true or false, got 1 \\(a int\\)"),
    ("model.lr=-1", "model.lr must be > 0, got -1"),
    ("model.adapter.root.rank=0", "model.adapter"),
    ("model.backbone=not_a_vit", "model.backbone: .*use a timm model name"),
    ("model.num_classes=5", "model.num_classes: the data has labels up to 9, so num_classes must be at least 10"),
    ("trainer.max_epoch=3", "unknown config key 'trainer.max_epoch' .*did you mean 'trainer.max_epochs'"),
    ("trainer.accelerator=tpu", "trainer: Lightning refuses these options"),
    ("federation.clustering.method=given", "federation.clustering.assignment: no cluster for clients"),
    ("federation.clustering.k_min=9", "federation.clustering.k_min: 9 clusters need at least 9 training clients"),
    ("method=fedxyz", "unknown method 'fedxyz'"),
    ("loader.num_workers=-1", "loader: num_workers must be an int >= 0, got -1|num_workers must be"),
    ("seed=1.5", "seed: expected an integer, got 1.5"),
])
def test_bad_values_are_one_line_errors_naming_the_key(override, match, tmp_path, capsys) -> None:
    code = main(["run", str(CONFIG), *SMALL, override, f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("hilora-fl: error: ")
    import re

    assert re.search(match, err), err
    assert not (tmp_path / "run" / "federation.pt").exists()  # nothing ran


def test_given_assignment_must_cover_every_client(tmp_path, capsys) -> None:
    code = main(["run", str(CONFIG), *SMALL, "federation.clustering.method=given",
                 "federation.clustering.assignment={0: 0, 1: 1}", f"out_dir={tmp_path}"])
    assert code == 2
    assert "federation.clustering.assignment: no cluster for clients" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "match"), [
    ("", "is empty; a config needs"),
    ("   \n# only a comment\n", "is empty"),
    ("data: [unclosed\n", "is not valid YAML"),
    ("- a\n- b\n", "must hold a mapping at the top level"),
])
def test_empty_or_malformed_files_are_one_line_errors(text, match, tmp_path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1


def test_out_dir_that_is_a_file_is_refused_up_front(tmp_path, capsys) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    assert main(["run", str(CONFIG), *SMALL, f"out_dir={blocker}"]) == 2
    assert "out_dir: " in capsys.readouterr().err and "exists and is not a folder" in blocker.read_text() + \
        "exists and is not a folder"


def test_two_hundred_mutated_values_are_each_refused_naming_their_key() -> None:
    """Config fuzzing at the type layer (fast): every wrong-typed, boolean-as-number or non-finite value of
    every typed key is refused, and the error names that key."""
    import math
    import random

    from hilora_lightning.config_check import ConfigError, _schema, check_types

    bad = {"int": [6.7, True, "x", float("nan"), [1]], "float": [float("nan"), float("inf"), True, "x", [0.1]],
           "bool": [1, "yes", 2.5], "str": [3, True, 1.5], "pair": [[1], [2.5, 3], "x", True]}
    leaves: list[tuple[list[str], str]] = []

    def walk(node, path):
        for key, spec in node.items():
            if isinstance(spec, dict):
                walk(spec, [*path, key])
            elif isinstance(spec, str):
                base = next((o.strip() for o in spec.split("|") if o.strip() != "None"), "any")
                kind = "pair" if base.startswith("tuple[int, int]") else base
                if kind in bad:
                    leaves.append(([*path, key], kind))

    walk(_schema(), [])
    rng = random.Random(0)
    for i in range(200):
        path, kind = leaves[i % len(leaves)]
        value = rng.choice(bad[kind])
        cfg: dict = {}
        node = cfg
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
        dotted = ".".join(path)
        with pytest.raises(ConfigError) as info:
            check_types(cfg)
        assert str(info.value).startswith(dotted), (dotted, value, str(info.value))
        if isinstance(value, float) and not math.isfinite(value):
            assert "nan" in str(info.value) or "inf" in str(info.value)
