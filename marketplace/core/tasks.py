"""Enqueueing a Celery task by its registered name, after the caller's transaction commits.

Services name the task they want run (`"jobs.merge"`, `"workunits.validate"`) instead of importing the
`tasks` module that holds it: a tasks module imports the services it calls, so importing it back from a
service makes a circle, and the layers (docs/architecture.md) point only down. The name is the contract,
the same one beat's schedule and the queued messages already use.

A broker that is down when the transaction commits loses nothing and fails no request: every task sent
here has a marker in the database (a job left pending or merging, a unit with `need_validate`) that the
periodic sweep (marketplace/workunits/sweep.py) acts on, so the send is logged and left to it. The
caller's work is committed by then and must not answer 500 for a message.

A task that does whatever is waiting is sent once per burst (`enqueue_coalesced_on_commit`): the reports of
a thousand units send one validation message, not a thousand.
"""

from __future__ import annotations

import logging
from functools import partial

from celery import Task, current_app
from django.db import transaction

log = logging.getLogger(__name__)


def _task(name: str) -> Task:
    """The task registered as `name`. A name no tasks module registers raises celery's NotRegistered, here
    and not later in a worker."""
    tasks = current_app.tasks
    if name not in tasks:
        # A web process has not imported the apps' tasks modules (a worker does at start): do what it does.
        current_app.loader.import_default_modules()
    return tasks[name]


def enqueue_on_commit(name: str, *args: int) -> None:
    """Send the task registered as `name` with `args` once the current transaction commits (at once in
    autocommit): a worker must never look for rows the sender has not committed yet. A send that fails
    (the broker is down) is logged; the sweep does the work instead."""
    task = _task(name)  # an unknown name fails now, inside the caller's transaction
    transaction.on_commit(partial(_send_after_commit, task, args))


def _send_after_commit(task: Task, args: tuple[int, ...]) -> None:
    try:
        task.delay(*args)
    except Exception:  # kombu's OperationalError, a refused connection, a timeout: all the same here
        log.warning("could not send %s%s to the broker; the sweep will do it", task.name, args, exc_info=True)


def enqueue(name: str, *args: int) -> None:
    """Send the task registered as `name` now, for callers outside any transaction (the sweep)."""
    _task(name).delay(*args)


# --- one message per burst -------------------------------------------------------------------------
# A task that does everything waiting (validate every flagged unit) needs one message however many callers
# asked for it: while a message of it is queued and has not started, another would find the same work. The
# gate is a key in the shared cache (Redis in production, the file cache on the embedded defaults): a
# caller sends only when it adds the key; the task deletes it as it starts, before it reads what is waiting.
# So a caller that found the key present made its work visible before that delete, and the run that deletes
# it sees the work. A lost message (a broker outage, a purge) holds the gate shut for COALESCE_SECONDS at
# most, and the sweep does the work meanwhile.
COALESCE_SECONDS = 30


def _gate(name: str) -> str:
    return f"task-queued:{name}"


def enqueue_coalesced_on_commit(name: str, *, countdown: float = 0) -> None:
    """Send the task registered as `name` (no arguments) after the current transaction commits, unless a
    message of it is already queued and not started (see above)."""
    task = _task(name)
    transaction.on_commit(partial(_send_coalesced, task, countdown))


def _send_coalesced(task: Task, countdown: float) -> None:
    from django.core.cache import cache

    try:
        if not cache.add(_gate(task.name), 1, timeout=COALESCE_SECONDS):
            return
    except Exception:  # the cache is down: send anyway, an extra message only finds nothing to do
        log.warning("could not reach the cache to coalesce %s; sending it", task.name, exc_info=True)
    try:
        task.apply_async(countdown=countdown or None)
    except Exception:
        log.warning("could not send %s to the broker; the sweep will do it", task.name, exc_info=True)
        _reopen(task.name)


def coalesced_started(name: str) -> None:
    """Called by the task `name` before it reads what is waiting: callers from now on send a new message."""
    _reopen(name)


def _reopen(name: str) -> None:
    from django.core.cache import cache

    try:
        cache.delete(_gate(name))
    except Exception:  # the cache is down: callers cannot add the key either, so they send
        log.warning("could not reach the cache to reopen %s", name, exc_info=True)
