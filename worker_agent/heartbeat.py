"""Keeping leases alive: the book of held results and the heartbeat thread that renews them.

The thread never touches a child or the network state of a unit: it only marks results lost in
the book, and the main loop (which checks the book while it waits) acts on that.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterable

from worker_agent.client import ONE_SHOT, AgentClient, AgentError, RetryPolicy
from worker_agent.wire import HeartbeatAnswer, WireError

log = logging.getLogger(__name__)

HEARTBEAT_BACKOFF = RetryPolicy(base_seconds=1.0)


class LeaseBook:
    """Result ids this agent holds, shared by the main loop and the heartbeat thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: set[int] = set()
        self._lost: set[int] = set()

    def hold(self, result_ids: Iterable[int]) -> None:
        with self._lock:
            self._held.update(result_ids)

    def release(self, result_id: int) -> None:
        with self._lock:
            self._held.discard(result_id)
            self._lost.discard(result_id)

    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._held)

    def mark_lost(self, result_ids: Iterable[int]) -> list[int]:
        """Record leases the server took back; returns those we still held (a unit just reported
        and released is 'lost' to the server too, and is no news)."""
        with self._lock:
            newly = sorted(set(result_ids) & (self._held - self._lost))
            self._lost.update(newly)
            return newly

    def is_lost(self, result_id: int) -> bool:
        with self._lock:
            return result_id in self._lost


class Heartbeat(threading.Thread):
    def __init__(
        self,
        client: AgentClient,
        book: LeaseBook,
        *,
        interval: float,
        backoff: RetryPolicy = HEARTBEAT_BACKOFF,
        rng: random.Random | None = None,
        progress: Callable[[], dict[int, float]] = dict,
    ) -> None:
        super().__init__(name="heartbeat", daemon=True)  # daemon: a cold shutdown never waits on it
        self.client = client
        self.progress = progress  # result id -> fraction done of the units being computed (read each beat)
        self.book = book
        self.interval = interval
        self.backoff = backoff
        self._rng = rng or random.Random()
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        failures = 0
        while not self._stopped.wait(self._next_delay(failures)):
            held = self.book.held()
            if not held:
                failures = 0
                continue
            failures = 0 if self.beat(held) else failures + 1

    def beat(self, held: list[int]) -> bool:
        try:
            # One attempt per beat: this loop is its own retry, and the next beat supersedes this one.
            progress = {rid: fraction for rid, fraction in self.progress().items() if rid in held}
            answer = self.client.heartbeat(held, progress=progress, retry=ONE_SHOT)
            renewal = HeartbeatAnswer.from_wire(answer)
        except AgentError as exc:
            log.warning("heartbeat failed: %s", exc)
            return False
        except WireError as exc:
            # Nothing in it can be trusted, "lost" included: a failed beat, retried sooner.
            log.warning("heartbeat failed: the server's answer is refused: %s", exc)
            return False
        for result_id in self.book.mark_lost(renewal.lost):
            log.warning("the lease on result %d was lost", result_id)
        log.debug("heartbeat renewed %s until %s", list(renewal.renewed), renewal.expires_at)
        return True

    def _next_delay(self, failures: int) -> float:
        if failures == 0:
            return self.interval
        # Retry sooner than the regular beat (the lease is ticking), backing off up to one interval.
        return min(self.interval, max(0.1, self.backoff.delay(failures, self._rng)))
