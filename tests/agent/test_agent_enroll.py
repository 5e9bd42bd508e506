"""Enrolment: the proof, the hardware facts, and state files only this user can read."""

from __future__ import annotations

import json
import stat
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_stub import key_record
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from worker_agent import cli, protocol
from worker_agent.client import AgentClient, AgentError
from worker_agent.enroll import AlreadyEnrolled, enroll
from worker_agent.pinning import load_pins
from worker_agent.state import HOME_ENV, StateDir, default_state_dir

SECRET = "s3cret-device-secret"


class EnrolmentDesk:
    """The server side of POST /api/v1/agent/enroll: checks the proof like the marketplace must."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.marketplace_keys = [key_record("mk-1", Ed25519PrivateKey.generate())]

    def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/agent/enroll"
        assert "Authorization" not in request.headers
        body = json.loads(request.content)
        self.bodies.append(body)
        public_key = Ed25519PublicKey.from_public_bytes(protocol.b64decode(body["public_key"]))
        message = protocol.enroll_message(token=body["token"], public_key_b64=body["public_key"])
        public_key.verify(protocol.b64decode(body["proof"]), message)  # raises when the proof is bad
        return httpx.Response(201, json={"device_id": 42, "device_secret": SECRET, "lease_seconds": 90,
                                         "marketplace_keys": self.marketplace_keys})


def enroll_with(desk: EnrolmentDesk, state: StateDir, **overrides: Any) -> Any:
    client = AgentClient("http://server", transport=httpx.MockTransport(desk.handle))
    arguments = {"state": state, "client": client, "server": "http://server/", "token": "tok-1", "name": "box"}
    return enroll(**{**arguments, **overrides})


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_enrolment_sends_a_valid_proof_and_stores_the_device_in_0600_files(tmp_path: Path) -> None:
    desk, state = EnrolmentDesk(), StateDir(tmp_path / "home")

    device = enroll_with(desk, state)

    assert (device.device_id, device.lease_seconds, device.server) == (42, 90.0, "http://server")
    assert mode(state.device_file) == 0o600 and mode(state.key_file) == 0o600
    stored = json.loads(state.device_file.read_text())
    assert stored["device_id"] == 42 and stored["device_secret"] == SECRET
    assert state.key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8 PEM
    assert protocol.b64encode(state.load_key().public_key().public_bytes_raw()) == desk.bodies[0]["public_key"]
    assert len(protocol.b64decode(desk.bodies[0]["public_key"])) == 32


def test_enrolment_pins_the_marketplace_keys_of_the_answer(tmp_path: Path) -> None:
    desk, state = EnrolmentDesk(), StateDir(tmp_path / "home")

    enroll_with(desk, state)

    assert mode(state.pins_file) == 0o600
    assert load_pins(state).trusted("mk-1").public_key == desk.marketplace_keys[0]["public_key"]


def test_enrolment_refuses_an_answer_that_names_no_marketplace_key(tmp_path: Path) -> None:
    desk, state = EnrolmentDesk(), StateDir(tmp_path / "home")
    desk.marketplace_keys = []

    with pytest.raises(AgentError, match="names no marketplace key"):
        enroll_with(desk, state)

    assert not state.is_enrolled()


def test_enrolment_reports_hardware_facts_without_importing_torch(tmp_path: Path) -> None:
    desk = EnrolmentDesk()

    enroll_with(desk, StateDir(tmp_path / "home"))

    hardware = desk.bodies[0]["hardware"]
    assert hardware["torch_version"] == metadata.version("torch")  # the child's torch.__version__
    assert hardware["cpu_count"] >= 1 and hardware["memory_bytes"] > 0
    assert {"os", "os_release", "machine", "cpu_flags", "python", "agent_version"} <= set(hardware)


def test_enrolment_refuses_to_replace_a_device_unless_forced(tmp_path: Path) -> None:
    desk, state = EnrolmentDesk(), StateDir(tmp_path / "home")
    enroll_with(desk, state)

    with pytest.raises(AlreadyEnrolled, match="use --force"):
        enroll_with(desk, state)
    enroll_with(desk, state, force=True)

    assert len(desk.bodies) == 2
    assert desk.bodies[0]["public_key"] != desk.bodies[1]["public_key"]  # --force made a fresh key


def test_the_cli_exits_2_when_already_enrolled(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = StateDir(tmp_path / "home")
    enroll_with(EnrolmentDesk(), state)

    code = cli.main(["enroll", "--server", "http://unreachable.invalid", "--token", "t", "--state-dir", str(state.root)])

    assert code == 2
    assert "already holds device 42" in caplog.text


def test_the_cli_exits_2_when_asked_to_run_before_enrolling(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code = cli.main(["run", "--burst", "--state-dir", str(tmp_path / "empty")])

    assert code == 2
    assert "run `idlegrid-agent enroll` first" in caplog.text


def test_the_secret_never_appears_in_a_device_repr(tmp_path: Path) -> None:
    device = enroll_with(EnrolmentDesk(), StateDir(tmp_path / "home"))

    assert SECRET not in repr(device)


def test_the_state_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "elsewhere"))

    assert default_state_dir() == tmp_path / "elsewhere"


def test_the_cli_exits_2_when_another_agent_runs_on_the_same_state_dir(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = StateDir(tmp_path / "home")
    enroll_with(EnrolmentDesk(), state)

    with state.exclusive():
        code = cli.main(["run", "--burst", "--state-dir", str(state.root)])

    assert code == 2
    assert "another agent is already running" in caplog.text
