"""The README's encrypted, authenticated Flower deployment on loopback: keys from ``scripts/make_deployment_keys.py``,
a SuperLink with TLS and ``--enable-supernode-auth``, two registered SuperNodes that run the federation over TLS,
and two that are refused (an unregistered key; a plaintext connection). Every process it starts is stopped."""

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

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower_app"
BIN = Path(sys.executable).parent


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited ({proc.returncode}): {path.read_text()[-2000:]}")
        time.sleep(0.3)
    raise AssertionError(f"no {text!r} in {path} after {timeout}s: {path.read_text(errors='replace')[-2000:]}")


@pytest.fixture
def deployment(tmp_path: Path):
    """Keys, a TLS + authentication SuperLink on a free port and an isolated Flower home pointing at it."""
    keys = tmp_path / "keys"
    made = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_deployment_keys.py"), "--out", str(keys),
                           "--supernodes", "3"], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "tls"\n\n[superlink.tls]\naddress = "127.0.0.1:{port}"\n'
                                      f'root-certificates = "{keys / "ca.crt"}"\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=tmp_path, env=env, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)  # its own group, with children
        procs.append(proc)
        return proc, log

    def flwr(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=APP, env=env, capture_output=True, text=True,
                              timeout=timeout)

    link, link_log = start("superlink", "flower-superlink", "--ssl-ca-certfile", str(keys / "ca.crt"),
                           "--ssl-certfile", str(keys / "server.pem"), "--ssl-keyfile", str(keys / "server.key"),
                           "--enable-supernode-auth", "--disable-runtime-dependency-installation", "--port", str(port))
    try:
        _wait_for(link_log, f"Uvicorn running on https://127.0.0.1:{port}", link)
        yield {"keys": keys, "port": port, "start": start, "flwr": flwr, "link_log": link_log, "tmp": tmp_path}
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def test_the_tls_deployment_runs_and_refuses_unknown_and_plaintext_nodes(deployment) -> None:
    d = deployment
    keys, port, start, flwr = d["keys"], d["port"], d["start"], d["flwr"]
    for i in (0, 1):
        reg = flwr("supernode", "register", str(keys / f"supernode-{i}.pub"), "tls", timeout=120)
        assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout + reg.stderr
    link = f"127.0.0.1:{port}"
    for i in (0, 1):
        start(f"node{i}", "flower-supernode", "--superlink", link, "--root-certificates", str(keys / "ca.crt"),
              "--auth-supernode-private-key", str(keys / f"supernode-{i}"), "--node-config", f"partition-id={i}",
              "--port", str(free_port()))
    stranger, stranger_log = start("stranger", "flower-supernode", "--superlink", link, "--root-certificates",
                                   str(keys / "ca.crt"), "--auth-supernode-private-key", str(keys / "supernode-2"),
                                   "--node-config", "partition-id=1", "--port", str(free_port()), "--max-retries", "1")
    plain, plain_log = start("plaintext", "flower-supernode", "--superlink", link, "--insecure", "--node-config",
                             "partition-id=1", "--port", str(free_port()), "--max-retries", "1")
    assert stranger.wait(timeout=180) != 0 and plain.wait(timeout=180) != 0
    assert "Failed to activate SuperNode" in stranger_log.read_text()  # a key the SuperLink does not know
    assert "No SuperNode found with the given public key" in d["link_log"].read_text()
    assert "Failed to initialize the connection to the SuperLink" in plain_log.read_text()  # no TLS: no talk
    out = d["tmp"] / "out"
    (d["tmp"] / "tiny.yaml").write_text(TINY_FLOWER)
    run = flwr("run", ".", "tls", "--stream", "--run-config",
               f"config='{d['tmp'] / 'tiny.yaml'}' overrides='federation.eval_every=3' min-nodes=2 wait-s=240 "
               f"out-dir='{out}'")  # each message starts a ClientApp process (~20 s here): no per-round scores
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert "round 3/3 [leaf] clients 2/2" in log, log[-3000:]
    assert len(json.loads((out / "result.json").read_text())["records"]) == 3
    listed = flwr("supernode", "list", "tls", "--format", "json", timeout=120)
    nodes = json.loads(listed.stdout[listed.stdout.index("{"):])["nodes"]
    assert len(nodes) == 2  # only the two registered keys exist in the federation
    runs = flwr("ls", "tls", "--format", "json", timeout=120)
    assert [r["status"] for r in json.loads(runs.stdout[runs.stdout.index("{"):])["runs"]] == ["finished:completed"]
