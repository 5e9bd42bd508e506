"""The lease endpoint's long poll, served under ASGI (marketplace/asgi.py; docs/protocol.md, "Long poll").

A lease request with `wait_seconds` that finds nothing to lease is held, as one coroutine, until work is
announced (marketplace/workunits/notify.py) or the wait runs out; then it is answered like any lease. An
idle agent so costs one request per wait instead of one per poll, and new work reaches it at once.

How a request goes:
1. In a thread of the event loop's executor: LeaseApi itself, the DRF view, runs as it does under WSGI
   (authentication, permission, the lease throttle, the bounded parser, validation, the hardware update,
   a first lease) with one difference: an empty first answer that may wait is handed back here instead of
   being sent. Everything the DRF view refuses is refused the same way, in the same error shape.
2. On the event loop: wait for a wake-up, holding no thread and no database connection.
3. Woken: one more attempt, `workunit_lease` as LeaseApi calls it, in an executor thread; leased: the
   answer; nothing: wait again; the wait over: the empty answer, with retry_after 0 (come back at once:
   the wait was the pause), or the cool-down's remainder.

The executor's threads are few (asyncio's default: cpu count + 4), so the lease statements of one process
run at most that many at a time, and each thread keeps its database connection as a sync worker would
(closed when too old or broken: close_old_connections around each call, as Django's request signals do).
Lease requests are served outside Django's per-request thread context (LongPollASGIHandler), which would
otherwise give each waiting request a thread of its own for its whole life.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIHandler
from django.db import close_old_connections
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from marketplace.api.v1.agent import LeaseApi, lease_attempt, lease_batch
from marketplace.workers.models import Device
from marketplace.workunits.leasing import Lease, cooldown_remaining
from marketplace.workunits.notify import CHAIN_WAKE, notifier
from marketplace.workunits.results import result_release

log = logging.getLogger(__name__)

LEASE_PATH = "/api/v1/agent/lease"


@dataclass(frozen=True)
class _Waiting:
    device: Device
    data: dict[str, Any]


class _FirstAttempt(LeaseApi):
    """LeaseApi, whose empty answer to a request that may wait is kept back (on `idlegrid_waiting`)."""

    def post(self, request):
        data = self.lease_request(request)
        leases = lease_attempt(device=request.auth, data=data)
        if leases or not data["wait_seconds"] or cooldown_remaining(device=request.auth) > 0:
            # A device cooling down after a give-up can lease nothing before the cool-down ends: told so now.
            return Response(lease_batch(device=request.auth, leases=leases))
        response = Response(lease_batch(device=request.auth, leases=[], waited=True))
        response.idlegrid_waiting = _Waiting(device=request.auth, data=data)  # type: ignore[attr-defined]
        return response


_first_attempt_view = _FirstAttempt.as_view()


def _in_thread(function: Any) -> Any:
    """`function` run in an executor thread with that thread's own connection, checked before and after."""
    def call(*args: Any, **kwargs: Any) -> Any:
        close_old_connections()
        try:
            return function(*args, **kwargs)
        finally:
            close_old_connections()

    return sync_to_async(call, thread_sensitive=False)


@_in_thread
def _first(request: HttpRequest) -> tuple[HttpResponse, _Waiting | None]:
    response = _first_attempt_view(request)
    response.render()  # here: Django would render it in a thread of its own
    return _plain(response, response.content), getattr(response, "idlegrid_waiting", None)


@_in_thread
def _attempt(waiting: _Waiting) -> list[Lease]:
    return lease_attempt(device=waiting.device, data=waiting.data)


@_in_thread
def _answer(template: HttpResponse, waiting: _Waiting, leases: list[Lease]) -> HttpResponse:
    # JSON whatever the first answer was rendered as (a browser's HTML form has nobody waiting on it).
    answer = _plain(template, JSONRenderer().render(lease_batch(device=waiting.device, leases=leases, waited=True)))
    answer["Content-Type"] = "application/json"
    return answer


@_in_thread
def _hand_back(waiting: _Waiting, leases: list[Lease]) -> None:
    for lease in leases:
        try:
            result_release(device=waiting.device, result_id=lease.result_id)
        except Exception:  # noqa: BLE001 - one that cannot go back expires like any unanswered lease
            log.exception("a lease for a request that went away could not be handed back (result %s)", lease.result_id)


def _plain(response: Any, content: bytes) -> HttpResponse:
    """A plain HttpResponse of the DRF answer's status and headers: nothing left for Django to render."""
    plain = HttpResponse(content, status=response.status_code)
    for name, value in response.items():
        plain[name] = value
    return plain


@csrf_exempt  # as DRF's views are: DRF itself enforces CSRF for session-authenticated requests (none here)
async def lease(request: HttpRequest) -> HttpResponse:
    """POST /api/v1/agent/lease under ASGI: LeaseApi's answer, after a wait when asked and nothing is there."""
    response, waiting = await _first(request)
    if waiting is None:
        return response
    leases = await _wait_for_work(waiting)
    return await _answer(response, waiting, leases)


async def _wait_for_work(waiting: _Waiting) -> list[Lease]:
    loop = asyncio.get_running_loop()
    hub = notifier()
    deadline = loop.time() + waiting.data["wait_seconds"]
    while (remaining := deadline - loop.time()) > 0:
        if not await hub.wait(remaining):
            break  # the wait ran out: the next request begins with an attempt of its own
        leases = await _attempt_kept(waiting)
        if leases:
            hub.wake(CHAIN_WAKE)  # there may be more where this came from
            return leases
    return []


async def _attempt_kept(waiting: _Waiting) -> list[Lease]:
    """An attempt whose leases go back if the request is cancelled meanwhile (the agent went away): they
    would otherwise wait out their expiry, which costs the device its trust run."""
    attempt = asyncio.ensure_future(_attempt(waiting))
    try:
        return await asyncio.shield(attempt)
    except asyncio.CancelledError:
        leases = await attempt
        if leases:
            await _hand_back(waiting, leases)
        raise


class LongPollASGIHandler(ASGIHandler):
    """Django's ASGI handler, serving the lease route with its long-polling twin (`lease` above).

    Two differences, both for lease requests alone: the resolved view is `lease` instead of LeaseApi (the
    URLconf, the schema and WSGI keep LeaseApi), and the request runs outside a ThreadSensitiveContext. In
    one, the first thread-sensitive call (the request_started signal's receivers) makes a thread for the
    request that lives until the request ends: a thread per waiting agent. Outside one, the few
    thread-sensitive calls of a lease request (signal receivers, the response's close) share one thread
    per process; the view's own work runs in the executor (above)."""

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") == LEASE_PATH and scope.get("method") == "POST":
            await self.handle(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    def resolve_request(self, request):
        match = super().resolve_request(request)
        if getattr(match.func, "cls", None) is LeaseApi:
            match.func = lease
        return match
