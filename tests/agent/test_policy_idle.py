"""Idle sources: the parsers of what logind and ioreg say, the fake file source, and how `auto` picks."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker_agent.policy import idle
from worker_agent.policy.idle import (
    NO_SESSION_IDLE_SECONDS,
    IdleSourceUnavailable,
    MacSource,
    idle_from_ioreg,
    idle_from_sessions,
    open_idle_source,
)

NOW_USEC = 1_700_000_000_000_000


def session(**props: object) -> dict[str, object]:
    return {"State": "active", "Remote": False, "Class": "user", "IdleHint": False, "IdleSinceHint": 0, **props}


def test_a_local_session_with_recent_input_is_not_idle() -> None:
    assert idle_from_sessions([session()], now_usec=NOW_USEC) == 0.0


def test_an_idle_session_is_idle_since_its_hint() -> None:
    since = NOW_USEC - 240 * 1_000_000
    assert idle_from_sessions([session(IdleHint=True, IdleSinceHint=since)], now_usec=NOW_USEC) == 240.0


def test_the_least_idle_local_session_wins_and_remote_greeter_or_closing_ones_do_not_count() -> None:
    sessions = [
        session(IdleHint=True, IdleSinceHint=NOW_USEC - 600 * 1_000_000),
        session(IdleHint=True, IdleSinceHint=NOW_USEC - 90 * 1_000_000, State="online"),
        session(Remote=True),  # someone typing over ssh is not at this keyboard
        session(Class="greeter"),
        session(State="closing"),
    ]
    assert idle_from_sessions(sessions, now_usec=NOW_USEC) == 90.0


def test_a_machine_with_no_user_session_counts_as_idle() -> None:
    assert idle_from_sessions([], now_usec=NOW_USEC) == NO_SESSION_IDLE_SECONDS
    assert idle_from_sessions([session(Remote=True)], now_usec=NOW_USEC) == NO_SESSION_IDLE_SECONDS


IOREG = b'''+-o IOHIDSystem  <class IOHIDSystem, id 0x100000219, registered, matched, active, busy 0 (0 ms), retain 29>
    {
      "HIDIdleTimeDelta" = 1
      "HIDIdleTime" = 12345678901
      "HIDParameters" = {"HIDDefaultParameters"=Yes}
    }
'''


def test_ioreg_output_gives_hid_idle_time_in_seconds() -> None:
    assert idle_from_ioreg(IOREG) == pytest.approx(12.345678901)
    assert idle_from_ioreg(b"+-o IOHIDSystem {}") is None
    assert MacSource(run=lambda command: IOREG).seconds_idle() == pytest.approx(12.345678901)
    with pytest.raises(IdleSourceUnavailable):
        MacSource(run=lambda command: b"")


def test_the_file_source_is_read_at_every_poll(tmp_path: Path) -> None:
    presence = tmp_path / "presence"
    source = open_idle_source(f"file:{presence}")
    assert source.seconds_idle() is None  # no file yet: unknown
    presence.write_text("active\n")
    assert source.seconds_idle() == 0.0
    presence.write_text("idle")
    assert source.seconds_idle() == NO_SESSION_IDLE_SECONDS
    presence.write_text("asleep")
    assert source.seconds_idle() is None


class Fake:
    def __init__(self, name: str, seconds: float | None) -> None:
        self.name, self.seconds = name, seconds

    def seconds_idle(self) -> float | None:
        return self.seconds


def unavailable() -> Fake:
    raise IdleSourceUnavailable("not on this machine")


def test_auto_takes_the_first_backend_that_opens_and_answers() -> None:
    backends = {"x11": unavailable, "logind": lambda: Fake("logind", None), "macos": lambda: Fake("macos", 42.0),
                "windows": lambda: Fake("windows", 7.0)}
    assert open_idle_source("auto", backends=backends).name == "macos"


def test_auto_without_any_backend_counts_the_machine_as_idle() -> None:
    source = open_idle_source("auto", backends=dict.fromkeys(idle.AUTO_ORDER, unavailable))
    assert source.seconds_idle() == NO_SESSION_IDLE_SECONDS


def test_a_named_backend_that_does_not_work_here_is_an_error_not_a_silent_fallback() -> None:
    with pytest.raises(IdleSourceUnavailable):
        open_idle_source("windows")  # this suite runs on Linux/macOS
    assert open_idle_source("none").seconds_idle() == NO_SESSION_IDLE_SECONDS


def test_on_this_machine_auto_opens_something_that_answers() -> None:
    # Whatever this machine is (a desktop, a headless box, a container without a system bus), auto
    # must give an answer and never raise.
    assert open_idle_source("auto").seconds_idle() is not None
