"""Enqueueing a Celery task by its registered name, after the caller's transaction commits.

Services name the task they want run (`"jobs.merge"`, `"workunits.validate"`) instead of importing the
`tasks` module that holds it: a tasks module imports the services it calls, so importing it back from a
service makes a circle, and the layers (docs/architecture.md) point only down. The name is the contract,
the same one beat's schedule and the queued messages already use.
"""

from __future__ import annotations

from celery import Task, current_app


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
    autocommit): a worker must never look for rows the sender has not committed yet."""
    _task(name).delay_on_commit(*args)


def enqueue(name: str, *args: int) -> None:
    """Send the task registered as `name` now, for callers outside any transaction (the sweep)."""
    _task(name).delay(*args)
