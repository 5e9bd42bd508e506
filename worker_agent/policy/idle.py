"""How long the user has been away: one small interface, a real backend per platform.

Each backend is guarded: `open_*` raises IdleSourceUnavailable when its platform piece is missing, and
`seconds_idle` answers None (unknown) when one reading fails, never raises. `auto` takes the first
backend that opens and answers; a machine with no user session at all (a headless server, a container)
counts as idle, which is what the logind backend says when it finds no local session and what `auto`
falls back to when nothing opens.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

NO_SESSION_IDLE_SECONDS = 1e9  # "nobody is here": idle for longer than any idle_minutes
READ_TIMEOUT_SECONDS = 1.0


class IdleSourceUnavailable(Exception):
    """This backend does not work on this machine."""


class IdleSource(Protocol):
    name: str

    def seconds_idle(self) -> float | None:
        """Seconds since the user's last input; None when it cannot be told right now."""
        ...


class AlwaysIdle:
    """`idle_source = "none"`, and a machine with no user session: compute whenever the rest allows."""

    def __init__(self, name: str = "none") -> None:
        self.name = name

    def seconds_idle(self) -> float | None:
        return NO_SESSION_IDLE_SECONDS


class FileSource:
    """`file:PATH`, for tests and scripts: the file says `active` (0 s idle) or `idle`; read every poll."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"file:{path}"

    def seconds_idle(self) -> float | None:
        try:
            text = self.path.read_text()[:64].strip().lower()
        except OSError:
            return None
        return {"active": 0.0, "idle": NO_SESSION_IDLE_SECONDS}.get(text)


# --- Linux X11: the XScreenSaver extension --------------------------------------------------------

class _XScreenSaverInfo(ctypes.Structure):
    _fields_ = [
        ("window", ctypes.c_ulong), ("state", ctypes.c_int), ("kind", ctypes.c_int),
        ("til_or_since", ctypes.c_ulong), ("idle", ctypes.c_ulong), ("event_mask", ctypes.c_ulong),
    ]


class X11Source:
    name = "x11"

    def __init__(self) -> None:
        if not os.environ.get("DISPLAY"):
            raise IdleSourceUnavailable("DISPLAY is not set")
        try:
            self._x11 = ctypes.CDLL("libX11.so.6")
            self._xss = ctypes.CDLL("libXss.so.1")
        except OSError as exc:
            raise IdleSourceUnavailable(f"libX11/libXss not found: {exc}") from None
        self._x11.XOpenDisplay.restype = ctypes.c_void_p
        self._x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
        self._x11.XDefaultRootWindow.restype = ctypes.c_ulong
        self._x11.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
        self._xss.XScreenSaverAllocInfo.restype = ctypes.POINTER(_XScreenSaverInfo)
        self._xss.XScreenSaverQueryInfo.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.POINTER(_XScreenSaverInfo)]
        self._xss.XScreenSaverQueryExtension.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
        self._display = self._x11.XOpenDisplay(None)
        if not self._display:
            raise IdleSourceUnavailable(f"cannot open the X display {os.environ['DISPLAY']}")
        event, error = ctypes.c_int(), ctypes.c_int()
        if not self._xss.XScreenSaverQueryExtension(self._display, ctypes.byref(event), ctypes.byref(error)):
            raise IdleSourceUnavailable("the X server has no MIT-SCREEN-SAVER extension")
        self._root = self._x11.XDefaultRootWindow(self._display)
        self._info = self._xss.XScreenSaverAllocInfo()

    def seconds_idle(self) -> float | None:
        if not self._xss.XScreenSaverQueryInfo(self._display, self._root, self._info):
            return None
        return float(self._info.contents.idle) / 1000.0


# --- Linux Wayland/GNOME/headless: logind over D-Bus ----------------------------------------------

def idle_from_sessions(sessions: Iterable[Mapping[str, Any]], *, now_usec: int) -> float:
    """Seconds idle from logind's session properties (IdleHint, IdleSinceHint in µs of the realtime
    clock, State, Remote, Class). Only local user sessions count: an ssh login is not someone at the
    keyboard. No such session -> nobody is here -> idle. The least idle session wins."""
    idle: list[float] = []
    for session in sessions:
        if session.get("Remote") or session.get("Class", "user") != "user":
            continue
        if session.get("State") not in ("active", "online"):
            continue
        if not session.get("IdleHint"):
            idle.append(0.0)
        else:
            since = int(session.get("IdleSinceHint") or 0)
            idle.append(max(0.0, (now_usec - since) / 1e6) if since else NO_SESSION_IDLE_SECONDS)
    return min(idle, default=NO_SESSION_IDLE_SECONDS)


class LogindSource:
    name = "logind"
    _SERVICE = "org.freedesktop.login1"

    def __init__(self) -> None:
        if not sys.platform.startswith("linux"):
            raise IdleSourceUnavailable("logind is Linux only")
        try:
            from jeepney.io.blocking import open_dbus_connection
        except ImportError:
            raise IdleSourceUnavailable("the jeepney package is not installed") from None
        try:
            self._connection = open_dbus_connection(bus="SYSTEM")
        except (OSError, KeyError, ValueError) as exc:
            raise IdleSourceUnavailable(f"no system D-Bus: {exc}") from None
        if self._sessions() is None:
            raise IdleSourceUnavailable("logind does not answer on the system bus")

    def seconds_idle(self) -> float | None:
        sessions = self._sessions()
        return None if sessions is None else idle_from_sessions(sessions, now_usec=time.time_ns() // 1000)

    def _sessions(self) -> list[dict[str, Any]] | None:
        from jeepney import DBusAddress, Properties, new_method_call
        from jeepney.wrappers import DBusErrorResponse, unwrap_msg

        manager = DBusAddress("/org/freedesktop/login1", bus_name=self._SERVICE, interface=f"{self._SERVICE}.Manager")
        try:
            listed = unwrap_msg(self._call(new_method_call(manager, "ListSessions")))[0]
            sessions = []
            for entry in listed:
                address = DBusAddress(entry[4], bus_name=self._SERVICE, interface=f"{self._SERVICE}.Session")
                props = unwrap_msg(self._call(Properties(address).get_all()))[0]
                sessions.append({name: value for name, (_signature, value) in props.items()})
        except (DBusErrorResponse, OSError, TimeoutError, IndexError, TypeError, ValueError) as exc:
            log.debug("logind idle query failed: %s", exc)
            return None
        return sessions

    def _call(self, message: Any) -> Any:
        return self._connection.send_and_get_reply(message, timeout=READ_TIMEOUT_SECONDS)


# --- macOS: HIDIdleTime from the IOHIDSystem registry entry ---------------------------------------

HID_IDLE = re.compile(rb'"HIDIdleTime"\s*=\s*(\d+)')


def idle_from_ioreg(output: bytes) -> float | None:
    """`ioreg -c IOHIDSystem -d 4` output -> seconds (HIDIdleTime is in nanoseconds)."""
    match = HID_IDLE.search(output)
    return int(match[1]) / 1e9 if match else None


class MacSource:
    name = "macos"

    def __init__(self, run: Callable[[list[str]], bytes] | None = None) -> None:
        if run is None and sys.platform != "darwin":
            raise IdleSourceUnavailable("macOS only")
        self._run = run or _run_ioreg
        if self.seconds_idle() is None:
            raise IdleSourceUnavailable("ioreg gave no HIDIdleTime")

    def seconds_idle(self) -> float | None:
        try:
            return idle_from_ioreg(self._run(["ioreg", "-c", "IOHIDSystem", "-d", "4"]))
        except (OSError, subprocess.SubprocessError):
            return None


def _run_ioreg(command: list[str]) -> bytes:
    return subprocess.run(command, capture_output=True, timeout=READ_TIMEOUT_SECONDS, check=True).stdout


# --- Windows: GetLastInputInfo --------------------------------------------------------------------

class _LastInputInfo(ctypes.Structure):
    _fields_ = [("cbSize", ctypes.c_uint), ("dwTime", ctypes.c_uint32)]


class WindowsSource:
    name = "windows"

    def __init__(self) -> None:
        windll: Any = getattr(ctypes, "windll", None)  # only Windows' ctypes has it
        if windll is None:
            raise IdleSourceUnavailable("Windows only")
        self._user32: Any = windll.user32
        self._kernel32: Any = windll.kernel32

    def seconds_idle(self) -> float | None:
        info = _LastInputInfo(cbSize=ctypes.sizeof(_LastInputInfo))
        if not self._user32.GetLastInputInfo(ctypes.byref(info)):
            return None
        ticks = int(self._kernel32.GetTickCount()) & 0xFFFFFFFF
        return ((ticks - int(info.dwTime)) & 0xFFFFFFFF) / 1000.0  # both wrap after 49.7 days


# --- choosing -------------------------------------------------------------------------------------

BACKENDS: dict[str, Callable[[], IdleSource]] = {
    "x11": X11Source, "logind": LogindSource, "macos": MacSource, "windows": WindowsSource,
}
AUTO_ORDER = ("x11", "logind", "macos", "windows")


def open_idle_source(spec: str, *, backends: Mapping[str, Callable[[], IdleSource]] = BACKENDS) -> IdleSource:
    """The source `idle_source` names. A named backend that does not work raises IdleSourceUnavailable;
    `auto` takes the first that opens and answers, else no session is assumed (idle)."""
    if spec == "none":
        return AlwaysIdle()
    if spec.startswith("file:"):
        return FileSource(Path(spec.removeprefix("file:")))
    if spec != "auto":
        return backends[spec]()
    for name in AUTO_ORDER:
        try:
            source = backends[name]()
        except IdleSourceUnavailable as exc:
            log.debug("idle source %s: %s", name, exc)
            continue
        if source.seconds_idle() is not None:
            log.info("idle source: %s", source.name)
            return source
    log.info("idle source: none found (no user session): the machine counts as idle")
    return AlwaysIdle("no session")
