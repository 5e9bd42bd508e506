"""Wake-ups for long-polling lease requests (docs/protocol.md, "Long poll").

Two halves, one per side of a commit:

- `work_available()` is called inside every transaction that makes replicas leasable (a split, a new
  round, a replica issued or replaced, the extra replicas of an adaptive unit's first lease). On
  PostgreSQL it runs `SELECT pg_notify('idlegrid_work', '')`: the notification is transactional, sent
  at commit and dropped at rollback, and PostgreSQL folds identical notifications of one transaction
  into one, so a split of 10,000 units notifies once. On SQLite it does nothing: waiters poll there.
- `Notifier` lives in each ASGI web worker process, on its event loop: ONE psycopg connection LISTENs
  on the channel and fans each notification out to the lease requests waiting in this process
  (`marketplace/api/longpoll.py`). Waiting costs a coroutine and a future; no thread, no pooled
  connection.

The herd: one notification must not send every waiting agent at the database at once (1,000 idle agents
would run 1,000 lease statements for one unit). A notification wakes WAKE_BATCH waiters, oldest first;
a woken waiter that leases something wakes CHAIN_WAKE more, since there may be more work, and one that
leases nothing goes back to the end of the queue, which stops the chain. A split of many units so
reaches every waiter in a few rounds of lease statements (the batch doubles per round), and a single
unit costs a handful. A notification lost (the listener was reconnecting) or one that woke only
waiters that cannot take the work (the wrong capabilities, an owner kept off the unit) costs at most
RECHECK_SECONDS: the notifier wakes a batch that often while anyone waits, and each round starts from
the waiters that tried longest ago. Without PostgreSQL the same round runs every POLL_SECONDS instead.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from typing import Any

from django.conf import settings
from django.db import connection

log = logging.getLogger(__name__)

CHANNEL = "idlegrid_work"
WAKE_BATCH = 4  # waiters woken per notification, per process
CHAIN_WAKE = 2  # more waiters woken by each woken waiter that leased something
RECHECK_SECONDS = 5.0  # a round while anyone waits, in case a notification was lost or went to the wrong waiters
POLL_SECONDS = 1.0  # the round without LISTEN/NOTIFY (SQLite)
BACKOFF_SECONDS = (0.5, 30.0)  # the listener's reconnection delay: first, cap (doubling)
_random = random.SystemRandom()


def work_available() -> None:
    """Say that replicas became leasable, inside the caller's transaction (delivered at its commit)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, '')", [CHANNEL])


def listen_conninfo() -> str:
    """The listener's connection string: the default database's, as Django would connect to it."""
    from psycopg.conninfo import make_conninfo

    conf = settings.DATABASES["default"]
    params: dict[str, Any] = {"dbname": conf.get("NAME"), "user": conf.get("USER"), "password": conf.get("PASSWORD"),
                              "host": conf.get("HOST"), "port": conf.get("PORT"), "application_name": "idlegrid-listen"}
    # libpq options (sslmode, sslrootcert...) pass through; Django's own keys do not.
    django_only = {"pool", "isolation_level", "assume_role", "server_side_binding", "context", "cursor_factory"}
    params.update({k: v for k, v in conf.get("OPTIONS", {}).items() if k not in django_only and isinstance(v, str | int)})
    return make_conninfo(**{k: v for k, v in params.items() if v not in (None, "")})


class Notifier:
    """The waiting lease requests of one process, on one event loop, and what wakes them."""

    def __init__(self, *, listen: bool) -> None:
        self.listen = listen
        self.waiters: deque[asyncio.Future[bool]] = deque()
        self.notifications = 0  # received since start (bench and tests read it)
        self.connected = asyncio.Event()  # the listener's LISTEN is in force
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if self._tasks:
            return
        if self.listen:
            self._tasks.append(asyncio.create_task(self._listen(), name="idlegrid-listen"))
        self._tasks.append(asyncio.create_task(self._rounds(), name="idlegrid-recheck"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def wait(self, timeout: float) -> bool:
        """Wait until woken (True) or `timeout` seconds passed (False). Cancellation leaves no trace."""
        self.start()
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for may lose a cancellation (the agent hung up)
            # that arrives as the wake does, and the request would go on to lease for nobody.
            async with asyncio.timeout(timeout):
                return await asyncio.shield(future)
        except TimeoutError:
            return False
        finally:
            if not future.done():
                future.cancel()
                self._forget(future)

    def wake(self, count: int) -> int:
        """Wake up to `count` waiters, those queued longest first; returns how many."""
        woken = 0
        while woken < count and self.waiters:
            future = self.waiters.popleft()
            if not future.done():
                future.set_result(True)
                woken += 1
        return woken

    def _forget(self, future: asyncio.Future[bool]) -> None:
        try:
            self.waiters.remove(future)
        except ValueError:
            pass

    async def _rounds(self) -> None:
        period = RECHECK_SECONDS if self.listen else POLL_SECONDS
        while True:
            # Jittered, so that the processes of one server do not wake their batches in step.
            await asyncio.sleep(period * _random.uniform(0.8, 1.2))
            self.wake(WAKE_BATCH)

    async def _listen(self) -> None:
        import psycopg

        delay = BACKOFF_SECONDS[0]
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(listen_conninfo(), autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.connected.set()
                    delay = BACKOFF_SECONDS[0]
                    self.wake(WAKE_BATCH)  # whatever was notified while the listener was away
                    async for _ in conn.notifies():
                        self.notifications += 1
                        self.wake(WAKE_BATCH)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database restarted, the network broke: listen again
                log.warning("long-poll listener lost its connection (%s); reconnecting in %.1fs", exc, delay)
            self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_SECONDS[1])


_notifiers: dict[asyncio.AbstractEventLoop, Notifier] = {}


def notifier() -> Notifier:
    """This event loop's notifier, made on first use (an ASGI worker has one loop for its life)."""
    loop = asyncio.get_running_loop()
    found = _notifiers.get(loop)
    if found is None:
        for old in [other for other in _notifiers if other.is_closed()]:
            del _notifiers[old]
        found = _notifiers[loop] = Notifier(listen=connection.vendor == "postgresql")
    return found
