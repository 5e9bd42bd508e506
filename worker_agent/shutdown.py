"""Signals: the first SIGINT/SIGTERM asks for a warm shutdown, the second forces a cold one.

Warm: finish and report the running unit, give the others back, exit 0. Cold: raise ColdShutdown
in the main thread wherever it is (a wait on the child, a socket read, a retry sleep); the agent
then kills the child, gives back what it can in a few seconds and exits 1.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ColdShutdown(BaseException):
    """Raised in the main thread by the second signal. A BaseException (like KeyboardInterrupt),
    so no `except Exception` on the way up can swallow it."""


class WaitInterrupted(Exception):
    """The first signal cut short a wait in the main thread that had nothing started (a long-polling lease
    request: docs/protocol.md, "Long poll"); the warm shutdown goes on from there."""


class Shutdown:
    def __init__(self) -> None:
        self.warm = threading.Event()
        self.cold = False
        self._previous: dict[int, Any] = {}
        self._interruptible = False

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """Inside, the first signal also raises WaitInterrupted in the main thread, wherever it waits: a long poll
        may hold the agent 25 s, longer than a service manager's stop timeout (docker stop: 10 s). Only for a
        wait that nothing was leased to yet: the server hands back what it leases to a request that went away."""
        if self.warm.is_set():
            raise WaitInterrupted("already stopping")
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def __enter__(self) -> Shutdown:
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def request_warm(self, why: str) -> None:
        if self.warm.is_set():
            return
        # Set before logging: a second signal can land while the log line is being written, and it
        # must then see the warm shutdown and go cold, not start another warm one.
        self.warm.set()
        log.info("warm shutdown (%s): finishing the current unit; signal again to stop now", why)

    def sleep(self, seconds: float) -> bool:
        """Sleep unless a shutdown is requested; True when woken by one."""
        return self.warm.wait(seconds)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self.warm.is_set():
            self.request_warm(name)
            if self._interruptible:
                self._interruptible = False
                raise WaitInterrupted(name)
            return
        if self.cold:
            return  # already unwinding; a third signal must not interrupt the give-back
        self.cold = True  # before logging, for the same reason as in request_warm
        log.warning("cold shutdown (%s): killing the running unit and giving back leases", name)
        raise ColdShutdown(name)
