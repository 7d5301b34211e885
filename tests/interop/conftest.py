"""Starts one real Macula node for the whole interop session.

The binary comes from ``$MACULA_BIN`` (default: ``<repo>/target/debug/macula``); it is
not built here.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REALM = "com.example.demo"
STARTUP_TIMEOUT = 30.0
CLI_TIMEOUT = 30.0


def macula_bin() -> Path:
    return Path(os.environ.get("MACULA_BIN") or REPO / "target" / "debug" / "macula")


@dataclass
class Node:
    """A running node, as described by the JSON line `macula --json up` prints first."""

    realm: str
    key_id: str
    key: str
    ws: str
    rawsocket: str
    http: str
    home: str
    wss: str
    rss: str
    ca: str
    binary: Path
    proc: subprocess.Popen = field(repr=False)
    log_path: Path = field(repr=False)

    def cli(self, *args: str) -> str:
        """Runs ``macula <args>`` against this node's config directory; returns stdout."""
        res = subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            env={k: v for k, v in os.environ.items() if k != "MACULA_HOME"},
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"`macula {' '.join(args)}` exited {res.returncode}:\n{res.stderr}"
            )
        return res.stdout

    def create_key(self, role: str = "service_account", name: str = "test") -> dict:
        """Issues a key: ``{"id", "key", "realm", "role"}``. Valid at once (keys are signed)."""
        out = self.cli(
            "--json", "keys", "create", "--config", self.home,
            "--realm", self.realm, "--role", role, "--name", name,
        )
        info = json.loads(out)
        assert info["role"] == role and info["realm"] == self.realm, info
        return info

    def revoke_key(self, key_id: str) -> None:
        """Revokes a key; the running node applies it on its next config reload (≤ ~1 s)."""
        self.cli("keys", "revoke", "--config", self.home, key_id)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _read_first_line(proc: subprocess.Popen, timeout: float) -> str | None:
    """The first stdout line of ``proc``, or ``None`` on timeout / EOF. Keeps draining after."""
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name="macula-stdout", daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        return None


@pytest.fixture(scope="session")
def node(tmp_path_factory) -> Node:
    binary = macula_bin()
    if not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.fail(
            f"macula binary not found at {binary}: build it (cargo build) or set MACULA_BIN",
            pytrace=False,
        )
    base = tmp_path_factory.mktemp("macula")
    home = base / "home"
    log_path = base / "node.log"
    env = {k: v for k, v in os.environ.items() if k != "MACULA_HOME"}
    env.setdefault("RUST_LOG", "info")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                str(binary), "--json", "up",
                "--home", str(home),
                "--http", "127.0.0.1:0",
                "--rawsocket", "127.0.0.1:0",
                "--realm", REALM,
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
    try:
        line = _read_first_line(proc, STARTUP_TIMEOUT)
        if not line:
            raise RuntimeError(
                f"macula up printed no startup line within {STARTUP_TIMEOUT} s "
                f"(exit code {proc.poll()}); log:\n{log_path.read_text(errors='replace')}"
            )
        info = json.loads(line)
        n = Node(
            realm=info["realm"],
            key_id=info["key_id"],
            key=info["key"],
            ws=info["ws"],
            rawsocket=info["rawsocket"],
            http=info["http"],
            home=info["home"],
            wss=info["wss"],
            rss=info["rss"],
            ca=info["ca"],
            binary=binary,
            proc=proc,
            log_path=log_path,
        )
        assert n.realm == REALM, info
        assert n.ws.startswith("ws://") and n.ws.endswith("/ws"), info
        assert n.rawsocket.startswith("rs://"), info
        yield n
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture(scope="session")
def service_key(node) -> dict:
    """A service_account key (pubsub:*:com.example.demo.* and rpc:*:com.example.demo.*)."""
    return node.create_key(role="service_account", name="interop service account")
