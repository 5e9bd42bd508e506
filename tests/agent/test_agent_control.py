"""The control socket (worker_agent/control.py): owner-only, one bounded JSON line each way, a stale socket
replaced, and a running agent paused and resumed through it (its child stopped and continued)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_stub import StubMarketplace
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_agent_loop import SLOW_MLP, make_agent, mlp_unit

from worker_agent import control
from worker_agent.control import AgentNotRunning, ControlClient, ControlError, ControlServer
from worker_agent.state import DeviceState, StateDir


class FakeAgent:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def status(self) -> dict[str, Any]:
        self.calls.append(("status",))
        return {"running": True, "paused": False}

    def pause(self, seconds: float | None, reason: str) -> dict[str, Any]:
        self.calls.append(("pause", seconds, reason))
        return {"paused": True}

    def resume(self) -> dict[str, Any]:
        self.calls.append(("resume",))
        if len(self.calls) > 10:
            raise RuntimeError("boom")
        return {"paused": False}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # A Unix socket's path is at most ~104 bytes: a short private directory, as a state dir would be.
    with tempfile.TemporaryDirectory(prefix="ig-", dir="/tmp") as name:
        os.chmod(name, 0o700)
        yield Path(name)


@pytest.fixture
def served(short_dir: Path) -> Iterator[tuple[ControlServer, FakeAgent]]:
    target = FakeAgent()
    with ControlServer(short_dir / "control.sock", target) as server:
        yield server, target


def raw_request(path: Path, data: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect(str(path))
        conn.sendall(data)
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
    return json.loads(answer)


def test_commands_reach_the_target_and_their_answers_come_back(served: tuple[ControlServer, FakeAgent]) -> None:
    server, target = served
    client = ControlClient(server.path)

    assert client.status() == {"running": True, "paused": False}
    assert client.pause(1800.0, "a video call") == {"paused": True}
    assert client.pause(None) == {"paused": True}
    assert client.resume() == {"paused": False}
    assert target.calls == [("status",), ("pause", 1800.0, "a video call"), ("pause", None, ""), ("resume",)]


def test_the_socket_is_the_owners_alone_and_gone_after_stop(short_dir: Path) -> None:
    path = short_dir / "control.sock"
    with ControlServer(path, FakeAgent()):
        info = os.stat(path)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert not path.exists()
    with pytest.raises(AgentNotRunning):
        ControlClient(path).status()


def test_a_peer_of_another_uid_is_refused(served: tuple[ControlServer, FakeAgent], monkeypatch: pytest.MonkeyPatch) -> None:
    server, target = served
    # The server compares the real SO_PEERCRED uid (ours) with the uid it believes it runs as.
    monkeypatch.setattr(control.os, "getuid", lambda: 12345)

    with pytest.raises(ControlError, match="only the user running the agent"):
        ControlClient(server.path).pause(None)
    assert target.calls == []


def test_the_peer_uid_is_read_from_the_kernel() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert control.peer_uid(left) == os.getuid()


@pytest.mark.parametrize(("request_line", "error"), [
    (b"not json\n", "not JSON"),
    (b"[1]\n", "JSON object"),
    (b'{"command": "reboot"}\n', "unknown command"),
    (b'{"command": "pause", "seconds": -5}\n', "above 0"),
    (b'{"command": "pause", "seconds": true}\n', "a number"),
    (b'{"command": "pause", "seconds": 1e300}\n', "at most"),
    (b'{"command": "pause", "reason": 7}\n', "reason"),
])
def test_a_bad_request_gets_an_error_and_reaches_nothing(
    served: tuple[ControlServer, FakeAgent], request_line: bytes, error: str,
) -> None:
    server, target = served

    answer = raw_request(server.path, request_line)

    assert answer["ok"] is False and error in answer["error"]
    assert target.calls == []


def test_an_oversized_request_is_dropped_and_the_server_goes_on(served: tuple[ControlServer, FakeAgent]) -> None:
    server, target = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect(str(server.path))
        try:
            conn.sendall(b"x" * (control.MAX_REQUEST_BYTES * 4))
        except BrokenPipeError:
            pass  # the server closed on us mid-send: refused either way
        try:
            answer = conn.recv(4096)
        except ConnectionResetError:
            answer = b""  # closed with our bytes unread
        assert answer == b"" or b'"ok":false' in answer

    assert ControlClient(server.path).status()["running"] is True
    assert target.calls == [("status",)]


def test_a_silent_client_costs_a_bounded_wait(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "CONNECTION_SECONDS", 0.3)
    server = ControlServer(short_dir / "control.sock", FakeAgent())
    server.start()
    server_stop = server.stop
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(str(server.path))  # says nothing
        started = time.monotonic()
        assert ControlClient(server.path, timeout=10).status()["running"] is True
        assert time.monotonic() - started < 5  # mechanism bound (0.3 s per silent connection), not speed
    server_stop()


def test_a_failing_command_answers_an_error_and_the_server_survives(served: tuple[ControlServer, FakeAgent]) -> None:
    server, target = served
    client = ControlClient(server.path)
    target.calls.extend([("x",)] * 10)

    with pytest.raises(ControlError, match="could not resume: boom"):
        client.resume()
    assert client.status()["running"] is True


def test_a_socket_left_by_a_killed_agent_is_replaced(short_dir: Path) -> None:
    path = short_dir / "control.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays; nothing listens (as after a SIGKILL)

    with ControlServer(path, FakeAgent()):
        assert ControlClient(path).status()["running"] is True


def test_a_live_socket_is_never_taken_over(served: tuple[ControlServer, FakeAgent]) -> None:
    server, _ = served
    with pytest.raises(ControlError, match="another agent answers"):
        ControlServer(server.path, FakeAgent()).start()
    assert ControlClient(server.path).status()["running"] is True


def test_a_file_in_the_way_is_not_removed(short_dir: Path) -> None:
    path = short_dir / "control.sock"
    path.write_text("mine")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(path, FakeAgent()).start()
    assert path.read_text() == "mine"


# --- a running agent ---------------------------------------------------------------------------------


def process_state(pid: int) -> str:
    stat_line = Path(f"/proc/{pid}/stat").read_text()
    return stat_line.rsplit(")", 1)[1].split()[0]


def wait_for(condition: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_running_agent_is_paused_and_resumed_from_another_terminal(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    assert len(str(control.socket_path(state.root))) <= control.MAX_PATH_BYTES  # pytest's tmp_path is short enough
    stub.add_unit(mlp_unit(stub, rows=200_000, config=SLOW_MLP), result_id=50, unit_id=5)
    agent = make_agent(stub, dataclasses.replace(enrolled, lease_seconds=3.0), device_key, state)
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    client = ControlClient(control.socket_path(state.root))
    try:
        working = wait_for(lambda: (s := _status(client)) and s["unit"] and s)
        assert working["running"] is True and working["state"] == "working"
        assert working["policy"]["idle_source"] == "none" and working["policy"]["cpu_percent"] == 100
        assert working["unit"]["result_id"] == 50
        child = wait_for(lambda: agent.child.pid)

        paused = client.pause(None, "a video call")
        assert paused["paused"] is True and paused["pause_reasons"] == ["paused by the owner: a video call"]
        wait_for(lambda: process_state(child) == "T", timeout=5)
        assert client.status()["state"] == "paused"

        assert client.resume()["paused"] is False
        wait_for(lambda: process_state(child) != "T", timeout=5)
    finally:
        stub.lose_on_heartbeat.add(50)  # ends the unit (and with --burst, the run)
        runner.join(30)
    assert not runner.is_alive()
    assert agent.summary.lost == 1
    assert not control.socket_path(state.root).exists()


def _status(client: ControlClient) -> dict[str, Any] | None:
    try:
        return client.status()
    except AgentNotRunning:
        return None
