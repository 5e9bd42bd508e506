"""The ledger's hooks into verification, trust and jobs: each registers its work to run after the
caller's transaction commits (a posting is a durable transaction of its own, never nested in another).

A hook that fails, or a process that dies between the commit and the hook, loses nothing: the database
still says what is owed, and `earnings_sync` (the ledger's periodic sweep) does it then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from django.db import transaction

from marketplace.ledger.earnings import device_forfeit, results_credit, results_withdrawn_reverse
from marketplace.ledger.escrow import job_escrow_release

log = logging.getLogger(__name__)


def _after_commit(work: Callable[..., Any], **kwargs: Any) -> None:
    def run() -> None:
        try:
            work(**kwargs)
        except Exception:  # the sweep redoes it; the caller's own work is committed and must not fail now
            log.exception("ledger: %s(%s) failed after commit; the ledger sweep will retry", work.__name__, kwargs)

    transaction.on_commit(partial(run))


def results_valid(result_ids: list[int]) -> None:
    """Credit results just judged valid: one batch of credits for all of them (earnings.results_credit)."""
    if result_ids:
        _after_commit(results_credit, result_ids=list(result_ids))


def results_withdrawn(result_ids: list[int]) -> None:
    if result_ids:
        _after_commit(results_withdrawn_reverse, result_ids=list(result_ids))


def device_banned(device_id: int) -> None:
    _after_commit(device_forfeit, device_id=device_id)


def job_ended(job_id: int) -> None:
    _after_commit(job_escrow_release, job_id=job_id)
