"""The local control socket of a running agent: `idlegrid-agent status`, `pause` and `resume` talk to it.

A Unix socket, `control.sock` in the state directory (0700), created 0600, and every peer's uid is checked
(SO_PEERCRED on Linux, LOCAL_PEERCRED on macOS): only the user the agent runs as may ask it anything. One
JSON request line, one JSON answer line, then the connection closes:

    {"command": "status"}                                   -> {"ok": true, "result": {...}}
    {"command": "pause", "seconds": 1800, "reason": "..."}   (seconds null: until resumed)
    {"command": "resume"}
    anything else                                           -> {"ok": false, "error": "..."}

A request is bounded (MAX_REQUEST_BYTES, parsed by safejson) and a connection gets CONNECTION_SECONDS in
all, so a stuck or hostile local client costs the agent a couple of seconds, never a thread. The server is
one daemon thread serving connections one after the other. The state dir's agent.lock already makes one
agent per state dir; a socket file left by a killed agent is found stale (nothing answers) and replaced.
Windows has no AF_UNIX in Python's socket module: there the agent runs without a control socket.
"""

from __future__ import annotations

import json
import logging
import math
import os
import selectors
import socket
import stat
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from worker_agent import safejson

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST_BYTES = 4096
MAX_ANSWER_BYTES = 1 << 20
CONNECTION_SECONDS = 2.0
MAX_PAUSE_SECONDS = 366 * 86_400.0
MAX_REASON_CHARS = 200
# AF_UNIX paths are at most 108 bytes on Linux (104 on macOS), terminator included.
MAX_PATH_BYTES = 103
COMMANDS = ("status", "pause", "resume")


class ControlError(Exception):
    """The control socket could not be served or the agent refused a command; the message says why."""


class ControlUnsupported(ControlError):
    """This platform has no Unix sockets with peer credentials (Windows)."""


class AgentNotRunning(ControlError):
    """Nothing answers on the control socket: no agent runs with this state directory."""


class ControlTarget(Protocol):
    def status(self) -> dict[str, Any]: ...

    def pause(self, seconds: float | None, reason: str) -> dict[str, Any]: ...

    def resume(self) -> dict[str, Any]: ...


def supported() -> bool:
    return hasattr(socket, "AF_UNIX") and (sys.platform.startswith("linux") or sys.platform == "darwin")


def socket_path(state_root: Path) -> Path:
    return state_root / SOCKET_NAME


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket."""
    platform: str = sys.platform  # a plain str: mypy would otherwise judge the other platforms' branch unreachable
    if platform.startswith("linux"):
        fmt = "3i"  # struct ucred: pid, uid, gid
        pid, uid, gid = struct.unpack(fmt, conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt)))
        return int(uid)
    if platform == "darwin":
        sol_local, local_peercred = 0, 0x001  # <sys/un.h>
        raw = conn.getsockopt(sol_local, local_peercred, 128)  # struct xucred: cr_version, cr_uid, ...
        if len(raw) < 8:
            raise ControlError("cannot read the peer's credentials")
        version, uid = struct.unpack_from("=II", raw)
        if version != 0:  # XUCRED_VERSION
            raise ControlError("cannot read the peer's credentials")
        return int(uid)
    raise ControlUnsupported(f"peer credentials are not supported on {platform}")


class ControlServer:
    """Serves `target` on a Unix socket at `path` from a daemon thread, until stop()."""

    def __init__(self, path: Path, target: ControlTarget) -> None:
        self.path = path
        self.target = target
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = -1, -1  # stop() writes here: the thread sleeps in select, no polling
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if not supported():
            raise ControlUnsupported(f"the control socket is not supported on {sys.platform}; status, pause and resume "
                                     "cannot reach this agent")
        if len(os.fsencode(self.path)) > MAX_PATH_BYTES:
            raise ControlError(f"the state directory's path is too long for a Unix socket ({self.path})")
        self._remove_stale()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # created 0600: never connectable by others, not even for a moment
        try:
            listener.bind(str(self.path))
        except OSError as exc:
            listener.close()
            raise ControlError(f"cannot create the control socket {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        listener.listen(8)
        listener.setblocking(False)
        info = os.stat(self.path)
        self._listener, self._inode = listener, (info.st_dev, info.st_ino)
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name="idlegrid-control", daemon=True)
        self._thread.start()
        log.debug("control socket at %s", self.path)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join(CONNECTION_SECONDS + 1.0)
            self._thread = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r, self._wake_w = -1, -1
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._unlink_own()

    # --- serving ------------------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._listener is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                selector.select()
                if self._stopping.is_set():
                    return
                try:
                    conn, _ = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    log.error("control socket stopped accepting: %s", exc)
                    return
                with conn:
                    self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        conn.settimeout(CONNECTION_SECONDS)
        try:
            uid = peer_uid(conn)
            # The request is read (bounded) before any answer, a refusal too: a Unix socket closed with bytes
            # unread resets the connection, and the client would lose the answer it was sent.
            try:
                line = _read_line(conn, MAX_REQUEST_BYTES, seconds=CONNECTION_SECONDS)
            except ControlError as exc:
                _send(conn, {"ok": False, "error": str(exc)})
                return
            if uid != os.getuid():
                log.warning("control socket: refused a connection from uid %d", uid)
                _send(conn, {"ok": False, "error": "only the user running the agent may control it"})
                return
            _send(conn, self._answer(line))
        except (OSError, ControlError) as exc:  # a timeout, a client gone away, a refused request
            log.debug("control socket: connection dropped: %s", exc)

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            command, seconds, reason = parse_request(line)
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        try:
            if command == "status":
                result = self.target.status()
            elif command == "pause":
                result = self.target.pause(seconds, reason)
            else:
                result = self.target.resume()
        except Exception as exc:  # the agent keeps running whatever a command did
            log.exception("control command %s failed", command)
            return {"ok": False, "error": f"the agent could not {command}: {exc}"}
        return {"ok": True, "result": result}

    # --- the socket file ------------------------------------------------------------------------

    def _remove_stale(self) -> None:
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket; remove it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing the control socket left by an agent that did not stop cleanly")
            self.path.unlink(missing_ok=True)
            return
        except OSError as exc:
            raise ControlError(f"cannot check the control socket {self.path}: {exc.strerror}") from None
        finally:
            probe.close()
        raise ControlError(f"another agent answers on {self.path}")

    def _unlink_own(self) -> None:
        # Only our own socket: a later agent may have replaced a file we left (we were thought dead).
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (info.st_dev, info.st_ino) == self._inode:
            self.path.unlink(missing_ok=True)


def parse_request(line: bytes) -> tuple[str, float | None, str]:
    """(command, pause seconds or None, reason) from one request line; ControlError says what is wrong."""
    try:
        request = safejson.loads(line, max_bytes=MAX_REQUEST_BYTES, max_depth=4, max_items=64)
    except ValueError as exc:
        raise ControlError(f"the request is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ControlError("the request must be a JSON object")
    command = request.get("command")
    if command not in COMMANDS:
        raise ControlError(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    seconds = request.get("seconds")
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
            raise ControlError("seconds must be a number or null")
        if not 0 < seconds <= MAX_PAUSE_SECONDS:
            raise ControlError(f"seconds must be above 0 and at most {MAX_PAUSE_SECONDS:g}")
        seconds = float(seconds)
    reason = request.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
        raise ControlError(f"reason must be a string of at most {MAX_REASON_CHARS} characters")
    return str(command), seconds, reason


class ControlClient:
    """Asks the agent running on a state directory; AgentNotRunning when none answers."""

    def __init__(self, path: Path, *, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout

    def status(self) -> dict[str, Any]:
        return self.call({"command": "status"})

    def pause(self, seconds: float | None, reason: str = "") -> dict[str, Any]:
        return self.call({"command": "pause", "seconds": seconds, "reason": reason})

    def resume(self) -> dict[str, Any]:
        return self.call({"command": "resume"})

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        if not supported():
            raise ControlUnsupported(f"the control socket is not supported on {sys.platform}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(self.timeout)
            try:
                conn.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError):
                raise AgentNotRunning(f"no agent is running with {self.path.parent}") from None
            except OSError as exc:
                raise ControlError(f"cannot reach the agent at {self.path}: {exc.strerror or exc}") from None
            try:
                try:
                    _send(conn, request)
                except BrokenPipeError:
                    pass  # the agent answered (a refusal) and closed before our request was sent: read that answer
                line = _read_line(conn, MAX_ANSWER_BYTES)
            except OSError as exc:
                raise ControlError(f"the agent did not answer: {exc}") from None
        if not line:
            raise ControlError("the agent closed the connection without an answer")
        try:
            answer = safejson.loads(line, max_bytes=MAX_ANSWER_BYTES, max_depth=16, max_items=100_000)
        except ValueError as exc:
            raise ControlError(f"the agent's answer is not JSON: {exc}") from None
        if not isinstance(answer, dict):
            raise ControlError("the agent's answer is not a JSON object")
        if answer.get("ok") is not True:
            raise ControlError(str(answer.get("error") or "the agent refused the command"))
        result = answer.get("result")
        return result if isinstance(result, dict) else {}


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")


def _read_line(conn: socket.socket, limit: int, *, seconds: float | None = None) -> bytes:
    """One line, at most `limit` bytes; within `seconds` in all (a client sending a byte at a time too)."""
    deadline = time.monotonic() + seconds if seconds is not None else None
    buffer = b""
    while b"\n" not in buffer:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ControlError("the request took too long")
            conn.settimeout(remaining)
        chunk = conn.recv(4096)
        if not chunk:
            break
        buffer += chunk
        if len(buffer) > limit:
            raise ControlError(f"the message is over {limit} bytes")
    line = buffer.split(b"\n", 1)[0]
    if len(line) > limit:
        raise ControlError(f"the message is over {limit} bytes")
    return line
