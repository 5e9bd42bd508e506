"""`idlegrid-agent status`, `pause`, `resume` and `service install`, run as the CLI (in-process: main(argv))."""

from __future__ import annotations

import json
import os
import plistlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_stub import StubMarketplace, serve_http

from worker_agent import cli, control, service
from worker_agent.policy.config import Policy
from worker_agent.state import DeviceState, StateDir
from worker_agent.status_screen import token_amount

REPO_ROOT = Path(__file__).resolve().parents[2]
EARNINGS = {"held": "1500000000000000000", "settled": "250000000000000000", "token_symbol": "IGT",
            "token_decimals": 18, "units_validated_today": 3, "day_started": "2026-01-01T00:00:00Z"}


class EarningStub:
    """The stub marketplace plus GET /api/v1/agent/earnings, with the same device check."""

    def __init__(self, stub: StubMarketplace) -> None:
        self.stub = stub

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/agent/earnings" and self.stub._authorised(request):
            return httpx.Response(200, json=EARNINGS)
        return self.stub.handle(request)


class RunningAgent:
    def __init__(self) -> None:
        self.paused: tuple[float | None, str] | None = None

    def status(self) -> dict[str, Any]:
        return {"running": True, "pid": 4242, "state": "paused" if self.paused else "working", "paused": bool(self.paused),
                "pause_reasons": [self.paused[1]] if self.paused else [], "paused_until": None,
                "unit": {"label": "unit 5 (result 50)", "result_id": 50, "started_at": 0.0, "progress": 0.4},
                "units_done_this_run": 2, "units_done_today": 7, "policy": {**Policy().values(), "cpu_percent": 50.0, "idle_source_in_use": "x11", "idle_seconds": 400.0}}

    def pause(self, seconds: float | None, reason: str) -> dict[str, Any]:
        self.paused = (seconds, reason)
        return {**self.status(), "paused_until": 2_000_000_000.0 if seconds else None}

    def resume(self) -> dict[str, Any]:
        self.paused = None
        return self.status()


@pytest.fixture
def home(tmp_path: Path) -> Iterator[StateDir]:
    # Short: the control socket's path must fit a sockaddr_un.
    with tempfile.TemporaryDirectory(prefix="ig-", dir="/tmp") as name:
        state = StateDir(Path(name) / "agent")
        state.ensure()
        yield state


def enrol(state: StateDir, stub: StubMarketplace, url: str) -> None:
    state.save_device(DeviceState(server=url, device_id=stub.device_id, device_secret=stub.device_secret, name="box"))


def status_json(state: StateDir, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert cli.main(["--state-dir", str(state.root), "status", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_status_of_a_stopped_agent_still_shows_the_device_and_the_earnings(
    home: StateDir, stub: StubMarketplace, capsys: pytest.CaptureFixture[str],
) -> None:
    with serve_http(EarningStub(stub)) as url:  # type: ignore[arg-type]
        enrol(home, stub, url)
        status = status_json(home, capsys)
        assert cli.main(["--state-dir", str(home.root), "status"]) == 0
        screen = capsys.readouterr().out

    assert status["agent"]["running"] is False
    assert status["device"] == {"device_id": stub.device_id, "name": "box", "server": url}
    assert status["earnings"] == EARNINGS
    assert "not running" in screen and f"#{stub.device_id} box" in screen
    assert "1.5 IGT" in screen and "0.25 IGT" in screen and "3 unit(s) of this device today" in screen


def test_status_of_a_running_agent_shows_its_unit_progress_and_policy(
    home: StateDir, stub: StubMarketplace, capsys: pytest.CaptureFixture[str],
) -> None:
    with serve_http(EarningStub(stub)) as url, control.ControlServer(control.socket_path(home.root), RunningAgent()):  # type: ignore[arg-type]
        enrol(home, stub, url)
        status = status_json(home, capsys)
        assert cli.main(["--state-dir", str(home.root), "status"]) == 0
        screen = capsys.readouterr().out

    assert status["agent"]["running"] is True and status["agent"]["unit"]["progress"] == 0.4
    assert "working" in screen and "unit 5 (result 50)" in screen and "40%" in screen
    assert "7 unit(s) today" in screen and "computes after 3 min without input" in screen
    assert "idle source x11" in screen and "at most 50% CPU time" in screen


def test_status_says_why_earnings_are_missing_when_the_marketplace_is_down(
    home: StateDir, stub: StubMarketplace, capsys: pytest.CaptureFixture[str],
) -> None:
    enrol(home, stub, "http://127.0.0.1:9")  # discard: nothing listens

    status = status_json(home, capsys)

    assert "error" in status["earnings"] and status["device"]["device_id"] == stub.device_id


def test_pause_for_a_while_and_resume_reach_the_running_agent(home: StateDir, capsys: pytest.CaptureFixture[str]) -> None:
    agent = RunningAgent()
    with control.ControlServer(control.socket_path(home.root), agent):
        assert cli.main(["--state-dir", str(home.root), "pause", "--for", "1h30m", "--reason", "gaming"]) == 0
        assert agent.paused == (5400.0, "gaming")
        assert "paused until" in capsys.readouterr().out
        assert cli.main(["--state-dir", str(home.root), "resume"]) == 0
        assert agent.paused is None and capsys.readouterr().out.strip() == "resumed"


def test_pause_without_an_agent_fails_saying_so(home: StateDir, caplog: pytest.LogCaptureFixture) -> None:
    assert cli.main(["--state-dir", str(home.root), "pause"]) == cli.EXIT_FAILURE
    assert "no agent is running" in caplog.text


@pytest.mark.parametrize(("text", "seconds"), [("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("45s", 45), ("1d", 86400)])
def test_durations(text: str, seconds: float) -> None:
    assert cli._duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "30", "-5m", "0m", "400d", "1m1h"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(Exception, match="duration|at most|above 0"):
        cli._duration(text)


def test_token_amounts_are_exact() -> None:
    assert token_amount("1234500000000000000", 18) == "1.2345"
    assert token_amount("0", 18) == "0" and token_amount("100", 0) == "100"
    assert token_amount(str(10**40 + 1), 18) == "10000000000000000000000.000000000000000001"


# --- service install ---------------------------------------------------------------------------------


def test_service_install_writes_a_systemd_user_unit_that_runs_this_agent(
    home: StateDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(service.sys, "platform", "linux")

    assert cli.main(["--state-dir", str(home.root), "service", "install"]) == 0

    unit = tmp_path / ".config/systemd/user/idlegrid-agent.service"
    text = unit.read_text()
    assert f"ExecStart={sys.executable} -m worker_agent --state-dir {home.root.resolve()} run\n" in text
    for line in ("Restart=on-failure", "KillSignal=SIGTERM", "KillMode=mixed", "StandardError=journal",
                 f"TimeoutStopSec={service.STOP_TIMEOUT_SECONDS}", "WantedBy=default.target"):
        assert f"\n{line}\n" in text
    out = capsys.readouterr().out
    assert "systemctl --user daemon-reload" in out and "systemctl --user enable --now idlegrid-agent.service" in out

    assert cli.main(["--state-dir", str(home.root), "service", "install", "--uninstall"]) == 0
    assert not unit.exists()


def test_service_install_print_writes_nothing(home: StateDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(service.sys, "platform", "linux")

    assert cli.main(["--state-dir", str(home.root), "service", "install", "--print"]) == 0

    assert "ExecStart=" in capsys.readouterr().out
    assert not (tmp_path / ".config").exists()


def test_a_path_with_spaces_and_percent_is_quoted_for_systemd(tmp_path: Path) -> None:
    unit = service.service_file(state_dir=Path("/home/a b/100%"), home=tmp_path, platform="linux", python="/usr/bin/python3")
    assert 'ExecStart=/usr/bin/python3 -m worker_agent --state-dir "/home/a b/100%%" run\n' in unit.content


def test_the_launchd_agent_is_a_valid_plist_that_keeps_the_agent_alive(tmp_path: Path) -> None:
    unit = service.service_file(state_dir=Path("/Users/a/.idlegrid-agent"), home=tmp_path, platform="darwin",
                                python="/opt/py/bin/python3")
    service.install(unit)

    assert unit.path == tmp_path / "Library/LaunchAgents/org.idlegrid.agent.plist"
    plist = plistlib.loads(unit.path.read_bytes())
    assert plist["Label"] == "org.idlegrid.agent"
    assert plist["ProgramArguments"] == ["/opt/py/bin/python3", "-m", "worker_agent", "--state-dir",
                                         "/Users/a/.idlegrid-agent", "run"]
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True
    assert plist["StandardErrorPath"] == str(tmp_path / "Library/Logs/idlegrid-agent.log")
    assert any(command.startswith("launchctl bootstrap gui/") for command in unit.next_commands)


def test_windows_gets_a_schtasks_command_and_no_file(tmp_path: Path) -> None:
    unit = service.service_file(state_dir=Path("C:/Users/a/idlegrid"), home=tmp_path, platform="win32",
                                python="C:/Python311/python.exe")
    assert unit.path is None
    assert unit.content.startswith("schtasks /Create /TN IdlegridAgent /SC ONLOGON")
    assert "C:/Python311/python.exe -m worker_agent --state-dir" in unit.content


def test_run_never_imports_rich() -> None:
    # httpx imports rich for its own command line tool when click is installed too (the dev tools bring it);
    # an agent-only install has no click, so httpx's CLI module fails to import: as here.
    code = ("import sys; sys.modules['httpx._main'] = None; import worker_agent.cli, worker_agent.agent, worker_agent.control; "
            "sys.exit(1 if any(m == 'rich' or m.startswith('rich.') for m in sys.modules) else 0)")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    assert subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT).returncode == 0
