"""The lease's long poll (marketplace/api/longpoll.py, marketplace/workunits/notify.py; docs/protocol.md,
"Long poll"): what wait_seconds changes and what it must not.

In process, the ASGI handler's lease path (marketplace/api/longpoll.py LongPollASGIHandler.lease: the sync
middleware chain, LeaseApi, then the wait) is driven on an event loop of the test's own (AsyncRequestFactory),
with one executor thread whose database connection is closed at the end; on SQLite it is woken by the notifier's 1 s
rounds. On PostgreSQL a live server (gunicorn with a uvicorn worker, as production runs) is woken by NOTIFY
and watched through pg_stat_activity."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connection, connections
from django.test import AsyncRequestFactory

from demo.cluster import Cluster
from marketplace.api import longpoll
from marketplace.jobs.services import job_split
from marketplace.workunits import notify
from marketplace.workunits.models import Result

LEASE = "/api/v1/agent/lease"
postgresql_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="LISTEN/NOTIFY is PostgreSQL's")


@pytest.fixture
def device(make_device, contributor):
    return make_device(contributor)


@pytest.fixture
def unsplit(submit_job):
    """A job whose units do not exist yet: its split, during a wait, is the work that appears."""
    return submit_job(rows=8, rows_per_unit=4, split=False)


def run(scenario):
    """Run `scenario()` on a fresh event loop whose executor is one thread, whose connections are closed after."""
    async def main():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        try:
            return await scenario()
        finally:
            await notify.notifier().stop()
            await loop.run_in_executor(None, connections.close_all)

    return asyncio.run(main())


def long_poll(request):
    return longpoll.LongPollASGIHandler().lease(request)


def lease_request(device, body):
    return AsyncRequestFactory().post(LEASE, body, content_type="application/json",
                                      headers={"authorization": device.authorization})


def body_of(response):
    import json

    return json.loads(response.content)


# --- what does not change -------------------------------------------------------------------------

@pytest.mark.parametrize("wait", [None, 0])
def test_without_a_wait_an_empty_lease_is_answered_at_once_with_retry_after_as_before(db, device, wait, settings):
    settings.IDLEGRID_LEASE_RETRY_AFTER = 3
    body = {"max_units": 1} if wait is None else {"max_units": 1, "wait_seconds": wait}

    response = device.client().post(LEASE, body, format="json")

    assert response.status_code == 200
    assert response.json() == {"leases": [], "retry_after": 3}


def test_a_wsgi_server_reads_wait_seconds_and_answers_at_once(db, device, settings):
    """A sync worker held for the wait would be a worker per idle agent: under WSGI the wait is not served."""
    settings.IDLEGRID_LEASE_RETRY_AFTER = 3

    response = device.client().post(LEASE, {"max_units": 1, "wait_seconds": 25}, format="json")

    assert response.json() == {"leases": [], "retry_after": 3}


@pytest.mark.parametrize("wait", [-1, 26, "5", True, 2.5, None])
def test_a_wait_outside_0_to_25_whole_seconds_is_refused(db, device, wait):
    response = device.client().post(LEASE, {"max_units": 1, "wait_seconds": wait}, format="json")

    assert response.status_code == 400
    assert "wait_seconds" in response.json()["error"]["fields"]


def test_the_long_poll_refuses_a_bad_wait_before_waiting(transactional_db, device):
    response = run(lambda: long_poll(lease_request(device, {"max_units": 1, "wait_seconds": 99})))

    assert response.status_code == 400
    assert "wait_seconds" in body_of(response)["error"]["fields"]


def test_the_long_poll_refuses_an_unknown_device_as_the_lease_does(transactional_db, device):
    request = AsyncRequestFactory().post(LEASE, {"max_units": 1, "wait_seconds": 5}, content_type="application/json",
                                         headers={"authorization": f"Device {device.pk}:wrong"})

    response = run(lambda: long_poll(request))

    assert response.status_code == 401


def test_work_already_there_is_answered_without_waiting(transactional_db, device, submit_job):
    submit_job(rows=8, rows_per_unit=4)

    response = run(lambda: long_poll(lease_request(device, {"max_units": 1, "wait_seconds": 25})))

    assert response.status_code == 200
    assert len(body_of(response)["leases"]) == 1
    assert body_of(response)["retry_after"] == 0


# --- the wait -------------------------------------------------------------------------------------

def test_a_wait_that_runs_out_answers_empty_and_says_come_back_at_once(transactional_db, device):
    response = run(lambda: long_poll(lease_request(device, {"max_units": 1, "wait_seconds": 1})))

    assert response.status_code == 200
    assert body_of(response) == {"leases": [], "retry_after": 0}  # 0: the wait was the pause (unwaited: 2)
    assert response["Content-Type"] == "application/json"


def test_a_device_cooling_down_is_told_so_without_a_wait(transactional_db, device, settings):
    from datetime import timedelta

    from django.utils import timezone

    device.device.cooldown_until = timezone.now() + timedelta(seconds=600)
    device.device.save(update_fields=["cooldown_until"])

    response = run(lambda: long_poll(lease_request(device, {"max_units": 1, "wait_seconds": 25})))

    assert body_of(response)["leases"] == []
    assert body_of(response)["retry_after"] >= 599


def test_a_waiting_lease_is_answered_when_a_split_makes_work(transactional_db, device, unsplit):
    async def scenario():
        waiting = asyncio.ensure_future(long_poll(lease_request(device, {"max_units": 1, "wait_seconds": 20})))
        while not notify.notifier().waiters:  # the request is waiting (its first attempt found nothing)
            await asyncio.sleep(0.05)
        await sync_to_async(job_split, thread_sensitive=False)(job_id=unsplit.pk)
        return await waiting

    response = run(scenario)

    assert response.status_code == 200
    (lease,) = body_of(response)["leases"]
    assert Result.objects.get(pk=lease["result_id"]).device_id == device.pk
    assert body_of(response)["retry_after"] == 0


def test_a_lease_made_for_a_request_that_went_away_is_handed_back(transactional_db, device, unsplit):
    async def scenario():
        waiting = asyncio.ensure_future(long_poll(lease_request(device, {"max_units": 1, "wait_seconds": 20})))
        while not notify.notifier().waiters:
            await asyncio.sleep(0.05)
        # The attempt that would lease, cancelled while it runs (the agent hung up): its lease must go back.
        attempt = longpoll._attempt

        async def slow_attempt(waiting_):
            leases = await attempt(waiting_)
            waiting.cancel()
            return leases

        longpoll._attempt = slow_attempt
        try:
            await sync_to_async(job_split, thread_sensitive=False)(job_id=unsplit.pk)
            with pytest.raises(asyncio.CancelledError):
                await waiting
        finally:
            longpoll._attempt = attempt

    run(scenario)

    assert Result.objects.filter(device=device.device, state=Result.State.RELEASED).count() == 1
    assert not Result.objects.filter(device=device.device, state=Result.State.IN_PROGRESS).exists()


def test_a_wake_up_wakes_a_batch_of_the_longest_waiting_not_the_herd():
    async def scenario():
        hub = notify.Notifier(listen=False)
        waits = [asyncio.ensure_future(hub.wait(30)) for _ in range(10)]
        await asyncio.sleep(0.05)
        woken = hub.wake(notify.WAKE_BATCH)
        await asyncio.sleep(0.05)
        done = [index for index, w in enumerate(waits) if w.done()]
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        await hub.stop()
        return woken, done, len(hub.waiters)

    woken, done, left = asyncio.run(scenario())

    assert woken == notify.WAKE_BATCH
    assert done == list(range(notify.WAKE_BATCH))  # the first to wait, and only they
    assert left == 0  # cancelled waiters leave no trace


def test_work_available_is_a_statement_on_postgresql_and_nothing_on_sqlite(db, django_assert_num_queries):
    with django_assert_num_queries(1 if connection.vendor == "postgresql" else 0):
        notify.work_available()


# --- through a live server on PostgreSQL ----------------------------------------------------------

def _database_url() -> str:
    conf = connection.settings_dict
    password = f":{quote(conf['PASSWORD'])}" if conf.get("PASSWORD") else ""
    return (f"postgres://{quote(conf.get('USER') or '')}{password}@{conf.get('HOST') or '127.0.0.1'}:"
            f"{conf.get('PORT') or 5432}/{conf['NAME']}")


@pytest.fixture
def server(transactional_db, tmp_path):
    """gunicorn with one uvicorn worker on marketplace.asgi, as production serves, on the test database, its
    pool held to 2 connections; stopped by process group, always."""
    from bench.idle import server_args

    running = Cluster(var_dir=tmp_path / "web", env_overrides={"DATABASE_URL": _database_url(),
                                                              "IDLEGRID_DB_POOL_MAX": "2"})
    running.start("web", server_args("asgi", running.port, 1))
    try:
        running.wait_healthy()
        yield running
    finally:
        running.stop_all()


def _server_connections() -> list[tuple[str, str]]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT application_name, state FROM pg_stat_activity WHERE datname = current_database() "
                       "AND pid <> pg_backend_pid()")
        return cursor.fetchall()


def _wait_in_threads(server, devices, wait: int) -> tuple[list, list[threading.Thread]]:
    answers: list = []

    def ask(enrolled):
        answers.append(httpx.post(f"{server.url}{LEASE}", json={"max_units": 1, "wait_seconds": wait},
                                  headers={"Authorization": enrolled.authorization}, timeout=wait + 30))

    threads = [threading.Thread(target=ask, args=(d,)) for d in devices]
    for thread in threads:
        thread.start()
    return answers, threads


@postgresql_only
@pytest.mark.e2e
def test_waiting_requests_hold_no_database_connection(server, make_device, django_user_model):
    devices = [make_device(django_user_model.objects.create_user(f"idle-{i}")) for i in range(8)]
    answers, threads = _wait_in_threads(server, devices, wait=6)
    deadline = time.monotonic() + 20
    seen: list[tuple[str, str]] = []
    while time.monotonic() < deadline and not seen:
        time.sleep(0.2)
        listening = [row for row in _server_connections() if row[0] == "idlegrid-listen"]
        if listening:  # the first request began to wait: give the others their first attempt, then look
            time.sleep(1.0)
            seen = _server_connections()
    for thread in threads:
        thread.join()

    assert seen, "the server never started listening"
    pooled = [row for row in seen if row[0] != "idlegrid-listen"]
    # Eight requests wait; the server holds its LISTEN connection and at most its pool (2), none in a transaction.
    assert len(pooled) <= 2
    assert [row for row in seen if row[0] == "idlegrid-listen"] == [("idlegrid-listen", "idle")]
    assert not [row for row in seen if row[1] and row[1].startswith("idle in transaction")]
    assert len(answers) == 8 and all(a.status_code == 200 and a.json() == {"leases": [], "retry_after": 0} for a in answers)


@postgresql_only
@pytest.mark.e2e
def test_a_split_wakes_a_waiting_agent_through_notify(server, device, unsplit):
    answers, threads = _wait_in_threads(server, [device], wait=20)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not [r for r in _server_connections() if r[0] == "idlegrid-listen"]:
        time.sleep(0.1)
    time.sleep(0.5)  # the request is past its first attempt and waiting
    job_split(job_id=unsplit.pk)  # commits: pg_notify goes out
    for thread in threads:
        thread.join()

    (answer,) = answers
    assert answer.status_code == 200
    (lease,) = answer.json()["leases"]
    assert Result.objects.get(pk=lease["result_id"]).device_id == device.pk



# --- the handler's other routes -------------------------------------------------------------------

def test_a_file_is_streamed_block_by_block_not_read_whole_first(db):
    import io

    from django.http import FileResponse

    data = bytes(range(256)) * (3 * longpoll.STREAM_BLOCK_BYTES // 256 + 7)
    reads: list[int] = []

    class Counted(io.BytesIO):
        def read(self, size=-1):
            chunk = super().read(size)
            reads.append(len(chunk))
            return chunk

    sent: list[dict] = []

    async def send(message):
        if message["type"] == "http.response.body":
            sent.append({"read_so_far": sum(reads), "size": len(message.get("body", b""))})

    response = FileResponse(Counted(data))
    asyncio.run(longpoll.LongPollASGIHandler().send_response(response, send))

    assert sum(part["size"] for part in sent) == len(data)
    assert sent[0]["read_so_far"] <= longpoll.STREAM_BLOCK_BYTES  # the first bytes left before the rest was read


def test_other_routes_answer_through_the_handler_as_under_wsgi(db):
    request = AsyncRequestFactory().get("/healthz")

    response = asyncio.run(longpoll.LongPollASGIHandler().get_response_async(request))

    assert response.status_code == 200 and body_of(response) == {"status": "ok"}
    assert response["X-Frame-Options"] == "DENY"  # the middleware ran
