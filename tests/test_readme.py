"""The README's own-data examples run as written: every python block of "## Your own data", in order,
in one namespace, in a fresh folder."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def _blocks(section: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_own_data_section_has_its_examples():
    blocks = _blocks(_section("Your own data"))
    assert len(blocks) >= 7  # datasets, dicts, DataModules, Hugging Face, folder per client, builder, predict


def test_the_own_data_examples_run_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.modules.pop("my_sites", None)
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(_blocks(_section("Your own data"))):
        try:
            exec(compile(block, f"README.md[own data block {i}]", "exec"), namespace)  # noqa: S102
        except Exception as exc:  # name the block that broke
            raise AssertionError(f"README own-data block {i} failed: {type(exc).__name__}: {exc}\n{block}") from exc
    out = capsys.readouterr().out
    assert "evaluated with (test)" in out and "unseen clients (test)" in out
    assert (tmp_path / "runs" / "my_sites").is_dir()  # the builder's --check made (and probed) its out_dir
    assert namespace["result"].splits == {"rounds": "val", "final": "test"}
    sys.modules.pop("my_sites", None)
