"""Every benchmark runs at its ``--smoke`` size and writes its headline figures as a flat object of numbers,
so a figure the README quotes always comes from a script that still runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

#: script -> (a line its table prints, figures its JSON must hold)
EXPECTED = {
    "adapter_overhead.py": ("", {"tiny32_hilora_over_peft"}),
    "attacks.py": ("| sign_flip |", {"drop_one_default_sign_flip", "drop_10pct_robust_backdoor",
                                     "backdoor_asr_one_default", "clean_robust_minus_default"}),
    "clustering.py": ("LSAC step, 20 clients", {"lsac_seconds_20", "ari_20", "speedup_vs_dense"}),
    "faults.py": ("silent accepts", {"cases", "tracebacks", "silent_accepts"}),
    "federation_memory.py": ("per_client_over_state_max", {"rss_gib_vit_tiny_4", "per_client_over_state_max"}),
    "federation_overhead.py": ("overhead ratio", {"round_seconds", "plain_loop_seconds", "overhead_ratio"}),
    "privacy.py": ("| epsilon = 1 |", {"acc_no_dp", "acc_eps_1", "shared_acc_eps_8", "epsilon_spent_eps_4",
                                       "clip_norm"}),
    "quality.py": ("hilora", {"lsac_ari"}),
    "simulation_throughput.py": ("seq/batched", {"batched_speedup_2", "batched_over_floor_2", "peak_rss_mib"}),
}


def test_every_benchmark_has_a_smoke_case():
    assert sorted(p.name for p in BENCHMARKS.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_benchmark_smoke_writes_its_headline(script, tmp_path):
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line, keys = EXPECTED[script]
    assert line in done.stdout
    figures = json.loads(out.read_text())
    assert figures and keys <= set(figures), sorted(figures)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in figures.values()), figures
    assert all(math.isfinite(v) for v in figures.values()), figures
    if script == "faults.py":
        assert figures["tracebacks"] == 0 and figures["silent_accepts"] == 0
