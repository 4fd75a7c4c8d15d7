"""The Flower App as the README runs it: ``flwr run`` in a subprocess (flwr 1.42's local SuperLink, 2 simulated
SuperNodes, a tiny config), its out-dir, the run's status in ``flwr ls``, a server waiting for nodes that never
come; every process the test started is stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from helpers import TINY_FLOWER, free_port  # noqa: E402
from hilora_lightning.cli import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower_app"
BIN = Path(sys.executable).parent


def _ours(port: int) -> list[int]:
    """Pids of the processes serving this test's local SuperLink (the SuperLink and its SuperExec)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ("flower-superlink" in cmd and f"--port {port}" in cmd) or f"--runtime-api-address 127.0.0.1:{port}" in cmd:
            found.append(int(entry.name))
    return found


@pytest.fixture
def flower(tmp_path: Path):
    """An isolated Flower home on free ports; afterwards every process of its local SuperLink is stopped."""
    http, control = free_port(), free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    (tmp_path / "tiny.yaml").write_text(TINY_FLOWER)

    def flwr(*args: str, timeout: float = 420) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=APP, env=env, capture_output=True, text=True,
                              timeout=timeout)

    yield flwr, tmp_path
    for pid in _ours(http):
        try:
            os.killpg(os.getpgid(pid), signal.SIGTERM)  # each runs in its own session, with its children
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    while _ours(http) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _ours(http):
        os.kill(pid, signal.SIGKILL)
    assert not _ours(http)


def _runs(flwr) -> list[dict]:
    listed = flwr("ls", "--format", "json", timeout=60)
    return json.loads(listed.stdout[listed.stdout.index("{"):])["runs"]


def test_flwr_run_as_the_readme_writes_it(flower) -> None:
    flwr, tmp = flower
    out = tmp / "out"
    run = flwr("run", ".", "--stream", "--federation-config", "num-supernodes=2", "--run-config",
               f"config='{tmp / 'tiny.yaml'}' min-nodes=2 out-dir='{out}'")
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert "round 3/3 [leaf] clients 2/2" in log and f"hilora: results go to {out}" in log
    assert {"config.yaml", "federation.pt", "result.json", "rounds.csv", "accuracy_per_round.png",
            "client_accuracy.png"} <= {p.name for p in out.iterdir()}
    assert load_config(out / "config.yaml")["federation"]["rounds"] == 3
    assert len(json.loads((out / "result.json").read_text())["records"]) == 3
    assert [r["status"] for r in _runs(flwr)] == ["finished:completed"]
    again = flwr("run", ".", "--stream", "--federation-config", "num-supernodes=2", "--run-config",
                 f"config='{tmp / 'tiny.yaml'}' min-nodes=2 out-dir='{out}'")
    assert "already holds a run" in again.stdout + again.stderr  # refused, and flwr ls says so
    assert sorted(r["status"] for r in _runs(flwr)) == ["finished:completed", "finished:failed"]


def test_a_server_short_of_supernodes_says_so_and_gives_up(flower) -> None:
    flwr, tmp = flower
    run = flwr("run", ".", "--stream", "--federation-config", "num-supernodes=2", "--run-config",
               f"config='{tmp / 'tiny.yaml'}' min-nodes=3 wait-s=6 out-dir='{tmp / 'short'}'")
    log = run.stdout + run.stderr
    assert "hilora: waiting for 3 SuperNodes, 2 connected" in log
    assert "only 2 of the 3 SuperNodes that min-nodes asks for connected within 6s" in log
    assert 'flwr run . --federation-config "num-supernodes=3"' in log
    assert [r["status"] for r in _runs(flwr)] == ["finished:failed"]
    relative = flwr("run", ".", "--stream", "--federation-config", "num-supernodes=2", "--run-config",
                    f"config='{tmp / 'tiny.yaml'}' min-nodes=2 out-dir='runs/x'")
    assert "out-dir 'runs/x' is relative" in relative.stdout + relative.stderr
