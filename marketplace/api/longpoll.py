"""The lease endpoint's long poll, and the ASGI handler that serves it (marketplace/asgi.py; docs/protocol.md,
"Long poll").

A lease request with `wait_seconds` that finds nothing to lease is held, as one coroutine, until work is
announced (marketplace/workunits/notify.py) or the wait runs out; then it is answered like any lease. An
idle agent so costs one request per wait instead of one per poll, and new work reaches it at once.

How a lease request goes (LongPollASGIHandler.get_response_async):
1. In a thread of the event loop's executor: Django's sync middleware chain and LeaseApi itself, exactly as
   under WSGI (authentication, permission, the lease throttle, the bounded parser, validation, the hardware
   update, a first lease, the middleware's headers), with one difference: an empty answer to a request that
   may wait comes back marked (`idlegrid_waiting`) instead of being sent. Everything LeaseApi refuses is
   refused the same way, in the same error shape.
2. On the event loop: wait for a wake-up, holding no thread and no database connection.
3. Woken: one more attempt, `workunit_lease` as LeaseApi calls it, in an executor thread; leased: that
   answer replaces the marked one's body; nothing: wait again; the wait over: the empty answer, with
   retry_after 0 (come back at once: the wait was the pause).

The executor's threads are few (asyncio's default: cpu count + 4), so the lease statements of one process
run at most that many at a time, and each thread's database connection is checked before and given back
after each call (close_old_connections, as Django's request signals do; with the pool, back to the pool).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.base import BaseHandler
from django.db import close_old_connections
from django.http import FileResponse, HttpRequest, HttpResponse
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from marketplace.api.v1.agent import LeaseApi, lease_attempt, lease_batch
from marketplace.workers.models import Device
from marketplace.workunits.leasing import Lease, cooldown_remaining
from marketplace.workunits.notify import CHAIN_WAKE, notifier
from marketplace.workunits.results import result_release

log = logging.getLogger(__name__)

LEASE_PATH = "/api/v1/agent/lease"
STREAM_BLOCK_BYTES = 1 << 20  # a thread hop per block of a streamed file: 1 MiB keeps them few, memory small


@dataclass(frozen=True)
class Waiting:
    """A lease request that found nothing and may wait: who asked, and what (LeaseApi's validated members)."""

    device: Device
    data: dict[str, Any]


class FirstAttemptApi(LeaseApi):
    """LeaseApi, whose empty answer to a request that may wait is marked (`idlegrid_waiting`), not final."""

    def post(self, request):
        data = self.lease_request(request)
        leases = lease_attempt(device=request.auth, data=data)
        if leases or not data["wait_seconds"] or cooldown_remaining(device=request.auth) > 0:
            # A device cooling down after a give-up can lease nothing before the cool-down ends: told so now.
            return Response(lease_batch(device=request.auth, leases=leases))
        response = Response(lease_batch(device=request.auth, leases=[], waited=True))
        response.idlegrid_waiting = Waiting(device=request.auth, data=data)  # type: ignore[attr-defined]
        return response


_first_attempt = FirstAttemptApi.as_view()


class _LeaseHandler(BaseHandler):
    """Django's sync handler whose lease route is FirstAttemptApi (the URLconf keeps LeaseApi, for WSGI and
    the schema)."""

    def resolve_request(self, request):
        match = super().resolve_request(request)
        if getattr(match.func, "cls", None) is LeaseApi:
            match.func = _first_attempt
        return match


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
def _attempt(waiting: Waiting) -> list[Lease]:
    return lease_attempt(device=waiting.device, data=waiting.data)


@_in_thread
def _answer(response: HttpResponse, waiting: Waiting, leases: list[Lease]) -> None:
    """The marked answer, its body replaced by the lease batch the wait ended with (headers as they were)."""
    response.content = JSONRenderer().render(lease_batch(device=waiting.device, leases=leases, waited=True))
    response["Content-Type"] = "application/json"  # whatever the first answer was rendered as
    if response.has_header("Content-Length"):
        response["Content-Length"] = str(len(response.content))


@_in_thread
def _hand_back(waiting: Waiting, leases: list[Lease]) -> None:
    for lease in leases:
        try:
            result_release(device=waiting.device, result_id=lease.result_id)
        except Exception:  # noqa: BLE001 - one that cannot go back expires like any unanswered lease
            log.exception("a lease for a request that went away could not be handed back (result %s)", lease.result_id)


async def wait_for_work(waiting: Waiting) -> list[Lease]:
    """Wait until woken and a lease attempt brings something, or the request's wait runs out (then [])."""
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


async def _attempt_kept(waiting: Waiting) -> list[Lease]:
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
    """Django's ASGI handler, with the lease route long-polling and every route as cheap as it can be.

    - Every request runs Django's SYNC middleware chain and its view in one hop to a thread. Through the
      async chain, each of Django's MiddlewareMixin middlewares hops to a thread and back twice per
      request, which doubled a plain view's CPU here (bench/asgi_cost.py; figures in docs/protocol.md).
    - Other requests hop to the request's own thread (thread-sensitive), where the request_started and
      request_finished signals run too: the view's connection is checked and given back where it was used.
    - The lease route hops to an executor thread instead, and runs outside a ThreadSensitiveContext: in
      one, the first thread-sensitive call (the request_started signal's receivers) makes a thread for the
      request that lives until the request ends, a thread per waiting agent. Outside one, the few
      thread-sensitive calls of a lease request (signal receivers, the response's close) share one thread
      per process.
    - A sync streaming response (an artifact download, a CSV statement) is streamed a block at a time from
      the request's thread; Django's ASGI handler would read all of it into memory before sending a byte.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sync_handler = BaseHandler()
        self._sync_handler.load_middleware(is_async=False)
        self._lease_handler = _LeaseHandler()
        self._lease_handler.load_middleware(is_async=False)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") == LEASE_PATH and scope.get("method") == "POST":
            await self.handle(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def get_response_async(self, request: HttpRequest) -> HttpResponse:
        if request.path == LEASE_PATH and request.method == "POST":
            return await self.lease(request)
        return await sync_to_async(self._sync_handler.get_response, thread_sensitive=True)(request)

    async def lease(self, request: HttpRequest) -> HttpResponse:
        response = await _in_thread(self._lease_handler.get_response)(request)
        waiting = getattr(response, "idlegrid_waiting", None)
        if waiting is not None:
            await _answer(response, waiting, await wait_for_work(waiting))
        return response

    async def send_response(self, response, send):
        if response.streaming and not response.is_async:
            if isinstance(response, FileResponse):
                response.block_size = STREAM_BLOCK_BYTES
            response.streaming_content = _blocks_in_thread(response.streaming_content)
        await super().send_response(response, send)


async def _blocks_in_thread(content):
    blocks = iter(content)
    next_block = sync_to_async(next, thread_sensitive=True)
    while (block := await next_block(blocks, None)) is not None:
        yield block
