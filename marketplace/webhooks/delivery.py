"""Sending: one attempt of one delivery, its retry schedule, and the sweep that sends what is due.

The schedule (after a failed attempt n, the next is due RETRY_DELAYS[n - 1] seconds later, +-10%), as
Svix sends: at once, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h -- 8 attempts over 27.6 hours (24.8 at
the least, with the jitter). The jitter is bounded rather than "full" (uniform from 0): full jitter would
make the span random too, and a receiver down for a day must still get the event. It spreads the retries
of many deliveries that failed together (one receiver's outage) over a tenth of each interval.

Every due time is a column (`Delivery.next_attempt_at`); nothing waits in a broker's countdown (which the
Redis transport redelivers past its visibility timeout, and a lost broker forgets). The first attempt is
enqueued when the event commits; every later one by `deliveries_sweep` (beat, every IDLEGRID_SWEEP_SECONDS),
which also re-sends any message a broker lost (`queued_at` older than REQUEUE_SECONDS).

Single flight: an attempt first claims its row with one conditional UPDATE (pending, due, not locked):
two workers given the same delivery (a redelivered message, a sweep's copy) never send it twice at once;
a worker killed mid-attempt leaves a lock that passes after LOCK_SECONDS. The sweep claims its batch with
SELECT ... FOR UPDATE SKIP LOCKED on PostgreSQL (SQLite's IMMEDIATE transactions serialize sweeps).

A receiver cannot slow the marketplace: the attempt runs in a Celery task on its own queue
(IDLEGRID_WEBHOOKS_QUEUE), bounded as a whole by IDLEGRID_WEBHOOKS_TIMEOUT_SECONDS (connect, TLS, send and
answer together, not per read), reading at most BODY_EXCERPT_BYTES of the answer, following no redirect.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from marketplace.core.exceptions import ValidationFailed
from marketplace.core.tasks import enqueue
from marketplace.webhooks.models import BODY_EXCERPT_BYTES, Attempt, Delivery, Endpoint, Event
from marketplace.webhooks.services import secrets_live
from marketplace.webhooks.signing import signed_headers
from marketplace.webhooks.targets import Target, target_check

log = logging.getLogger(__name__)

RETRY_DELAYS = (5, 300, 1800, 7200, 18_000, 36_000, 36_000)  # seconds after failed attempt 1, 2, ... 7
MAX_ATTEMPTS = len(RETRY_DELAYS) + 1
JITTER = 0.1
LOCK_SECONDS = 120  # past the attempt's timeout and the task's hard time limit
REQUEUE_SECONDS = 300  # a due delivery queued this long ago and still not attempted: its message was lost
USER_AGENT = "Idlegrid-Webhooks/1.0"
Outcome = Attempt.Outcome


def retry_delay(attempt: int, *, rand: Callable[[], float] = random.random) -> timedelta | None:
    """How long after failed attempt number `attempt` the next one is due; None after the last one."""
    if attempt >= MAX_ATTEMPTS:
        return None
    base = RETRY_DELAYS[attempt - 1]
    return timedelta(seconds=base * (1 - JITTER + 2 * JITTER * rand()))


def payload(event: Event) -> bytes:
    """The body, as the spec shapes it: type, timestamp (when it happened) and data. Keys sorted: every
    attempt sends the same bytes."""
    body = {"type": event.type, "timestamp": event.created_at.isoformat().replace("+00:00", "Z"), "data": event.data}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Sent:
    outcome: str
    status_code: int | None = None
    error: str = ""
    body: bytes = b""
    address: str = ""
    duration_ms: int = 0


@functools.cache
def _tls() -> ssl.SSLContext:
    """One verifying TLS context per process: loading the CA bundle costs ~150 ms, more than most attempts."""
    return httpx.create_ssl_context()


async def _post(target: Target, headers: dict[str, str], body: bytes, timeout: float) -> tuple[int, bytes]:
    extensions = {"sni_hostname": target.sni_hostname} if target.scheme == "https" and target.sni_hostname else {}
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False,
                                 verify=_tls()) as client:
        # The whole exchange inside one deadline: httpx's own timeout bounds each read, not their sum
        # (a receiver answering a byte every few seconds would hold the worker).
        async with asyncio.timeout(timeout):
            request = client.build_request("POST", target.connect_url, content=body, headers=headers,
                                           extensions=extensions)
            response = await client.send(request, stream=True)
            try:
                excerpt = b""
                async for chunk in response.aiter_raw():
                    excerpt += chunk
                    if len(excerpt) >= BODY_EXCERPT_BYTES:
                        break
            finally:
                await response.aclose()
            return response.status_code, excerpt[:BODY_EXCERPT_BYTES]


def send(*, endpoint: Endpoint, event: Event, now: datetime) -> Sent:
    """POST the event to the endpoint now: checked target, pinned address, signed with the live secrets."""
    started = time.monotonic()

    def took() -> int:
        return int((time.monotonic() - started) * 1000)

    if not endpoint.enabled:
        return Sent(Outcome.REFUSED, error="the endpoint is disabled")
    try:
        target = target_check(endpoint.url)
    except ValidationFailed as exc:
        return Sent(Outcome.REFUSED, error=exc.message, duration_ms=took())
    body = payload(event)
    # The real time, not `now` (which may be a test's clock): receivers refuse a timestamp far from theirs.
    headers = signed_headers(secrets_live=secrets_live(endpoint=endpoint, now=now), msg_id=event.msg_id,
                             timestamp=int(time.time()), body=body)
    headers.update({"host": target.host_header, "content-type": "application/json", "user-agent": USER_AGENT,
                    "accept-encoding": "identity"})  # an excerpt of raw bytes: no decompression bomb
    try:
        status, excerpt = asyncio.run(_post(target, headers, body, settings.IDLEGRID_WEBHOOKS_TIMEOUT_SECONDS))
    except (TimeoutError, httpx.TimeoutException):
        return Sent(Outcome.TIMEOUT, error=f"no answer within {settings.IDLEGRID_WEBHOOKS_TIMEOUT_SECONDS} s",
                    address=target.address, duration_ms=took())
    except httpx.HTTPError as exc:
        return Sent(Outcome.CONNECTION_ERROR, error=f"{type(exc).__name__}: {exc}", address=target.address, duration_ms=took())
    except Exception as exc:  # anything else the receiver provoked is its failed attempt, logged and retried
        log.exception("delivery to endpoint %s failed unexpectedly", endpoint.pk)
        return Sent(Outcome.CONNECTION_ERROR, error=f"{type(exc).__name__}: {exc}", address=target.address, duration_ms=took())
    outcome = Outcome.SUCCEEDED if 200 <= status < 300 else Outcome.HTTP_ERROR
    return Sent(outcome, status_code=status, body=excerpt, address=target.address, duration_ms=took(),
                error="" if outcome == Outcome.SUCCEEDED else f"answered {status}")


def _claim(delivery_id: int, now: datetime) -> datetime | None:
    lock = now + timedelta(seconds=LOCK_SECONDS)
    claimed = Delivery.objects.filter(
        Q(locked_until__isnull=True) | Q(locked_until__lt=now),
        pk=delivery_id, state=Delivery.State.PENDING, next_attempt_at__lte=now,
    ).update(locked_until=lock)
    return lock if claimed else None


def _record(delivery: Delivery, sent: Sent, *, lock: datetime, now: datetime,
            rand: Callable[[], float]) -> str:
    scheduled = delivery.attempts_made + (0 if delivery.replaying else 1)
    if sent.outcome == Outcome.SUCCEEDED:
        changes = {"state": Delivery.State.SUCCEEDED, "finished_at": now, "next_attempt_at": None}
    else:
        delay = None if delivery.replaying else retry_delay(scheduled, rand=rand)
        changes = ({"state": Delivery.State.FAILED, "finished_at": now, "next_attempt_at": None} if delay is None
                   else {"next_attempt_at": now + delay})
    with transaction.atomic():
        # Only while our claim holds: a worker that outlived its lock (and was replaced) writes nothing.
        moved = Delivery.objects.filter(pk=delivery.pk, locked_until=lock).update(
            attempts_made=scheduled, locked_until=None, queued_at=None, replaying=False,
            last_status_code=sent.status_code, **changes)
        if not moved:
            log.warning("delivery %s: the attempt outlived its lock; its result is not recorded", delivery.pk)
            return "lost"
        Attempt.objects.create(
            delivery=delivery, number=_next_number(delivery.pk),
            replay=delivery.replaying, started_at=now, duration_ms=sent.duration_ms, outcome=sent.outcome,
            status_code=sent.status_code, error=sent.error[:500], address=sent.address,
            response_body=sent.body.decode("utf-8", "replace").replace("\x00", "\ufffd"))
    return str(changes.get("state", "retry"))


def _next_number(delivery_id: int) -> int:
    return Attempt.objects.filter(delivery_id=delivery_id).count() + 1


def delivery_attempt(*, delivery_id: int, now: datetime | None = None,
                     rand: Callable[[], float] = random.random) -> str:
    """Make the due attempt of a delivery, once, and schedule the next or end it. Returns succeeded,
    retry, failed, or not_due (not pending, not yet due, or another worker is at it)."""
    now = now or timezone.now()
    lock = _claim(delivery_id, now)
    if lock is None:
        return "not_due"
    delivery = Delivery.objects.select_related("event", "endpoint").get(pk=delivery_id)
    sent = send(endpoint=delivery.endpoint, event=delivery.event, now=now)
    if sent.outcome != Outcome.SUCCEEDED:
        log.info("delivery %s to endpoint %s: %s %s", delivery_id, delivery.endpoint_id, sent.outcome, sent.error)
    return _record(delivery, sent, lock=lock, now=now, rand=rand)


def deliveries_sweep(*, now: datetime | None = None, limit: int = 500) -> int:
    """Hand the broker every delivery that is due and not in anyone's hands (beat runs it). Returns how many."""
    now = now or timezone.now()
    due = Delivery.objects.filter(
        Q(queued_at__isnull=True) | Q(queued_at__lt=now - timedelta(seconds=REQUEUE_SECONDS)),
        Q(locked_until__isnull=True) | Q(locked_until__lt=now),
        state=Delivery.State.PENDING, next_attempt_at__lte=now,
    )
    with transaction.atomic():
        ids = list(due.select_for_update(skip_locked=True).order_by("next_attempt_at")
                   .values_list("pk", flat=True)[:limit])
        Delivery.objects.filter(pk__in=ids).update(queued_at=now)
    for pk in ids:
        try:
            enqueue("webhooks.deliver", pk)
        except Exception:  # the broker is down: queued_at ages and a later sweep sends it again
            log.warning("could not send webhooks.deliver(%s) to the broker", pk, exc_info=True)
            break
    return len(ids)
