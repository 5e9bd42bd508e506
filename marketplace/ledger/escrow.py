"""A job's escrow: its price taken from the spec, what it can cost at most funded from the submitter's
balance when the job is submitted, and what is left returned when it ends."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import transaction

from marketplace.core.exceptions import ValidationFailed
from marketplace.jobs.models import Job
from marketplace.ledger.exceptions import InsufficientBalance
from marketplace.ledger.models import Account, Posting
from marketplace.ledger.postings import account_get, account_lock, balance, posting_write

K = Account.Kind
ENDED = (Job.State.COMPLETED, Job.State.FAILED, Job.State.CANCELLED)  # what is left in their escrow goes back
MAX_PRICE = 10**36  # per result; keeps price x units x replication far inside 78 digits


def price_default() -> int:
    return settings.IDLEGRID_PRICE_PER_RESULT


PRICE_PROBLEM = "must be an integer number of base units between 0 and 10**36 (a string for large values)"


def job_price_take(spec: Any) -> tuple[Any, str]:
    """Split `price_per_result` (base units, an integer or a string of digits) off a job spec before the
    kind validates the rest; returns (the spec without it, the price as a decimal string)."""
    if not isinstance(spec, dict) or "price_per_result" not in spec:
        return spec, str(price_default())
    rest = {k: v for k, v in spec.items() if k != "price_per_result"}
    value = spec["price_per_result"]
    if isinstance(value, str):
        # ASCII digits only ("²".isdigit() is true) and short: int() refuses past 4,300 digits with a
        # ValueError, and 10**36 has 37.
        value = int(value) if value.isascii() and value.isdigit() and len(value) <= 40 else None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PRICE:
        raise ValidationFailed("the job spec is invalid", fields={"price_per_result": PRICE_PROBLEM})
    return rest, str(value)


def job_price(job: Job) -> int:
    return int(job.spec.get("price_per_result", price_default()))


def escrow_amount(*, kind_module: Any, spec: dict[str, Any]) -> int:
    """What a job's own spec can cost at most: every unit it plans, each paid for up to its cap of results
    (`max_results_per_unit`, which bounds the quorum and every replica disagreement can ask for). Unused
    escrow returns when the job ends; nothing the submitter ordered is ever paid by the platform."""
    units: object = kind_module.units_expected(spec)
    if isinstance(units, bool) or not isinstance(units, int) or units < 0:
        raise TypeError(f"{kind_module.__name__}.units_expected returned {units!r}, not a count")
    return int(spec.get("price_per_result", price_default())) * units * int(spec["max_results_per_unit"])


def job_escrow_fund(*, job: Job, amount: int) -> Posting | None:
    """Move `amount` from the submitter's balance into the job's escrow, or refuse with 402.

    Runs inside job_submit's durable transaction, so the job and its escrow commit together: a refusal
    rolls the job back and changes nothing."""
    if amount == 0:
        return None
    source = account_get(K.SUBMITTER_BALANCE, user_id=job.owner_id)
    account_lock(source)
    available = balance(source)
    if available < amount:
        raise InsufficientBalance(
            f"this job escrows {amount} base units (price x units x max_results_per_unit) but your balance is "
            f"{available}; deposit or ask for a grant first",
            fields={"required": str(amount), "available": str(available)},
        )
    return posting_write(
        kind=Posting.Kind.ESCROW, key=f"escrow:job={job.pk}", actor=f"user:{job.owner_id}", reason="job submitted",
        entries=[(source, -amount), (account_get(K.JOB_ESCROW, job_id=job.pk), amount)], data={"job": job.pk},
    )


def job_escrow_release(*, job_id: int) -> Posting | None:
    """Return what is left in an ended job's escrow to its submitter. Safe to repeat: an empty escrow
    posts nothing, and a job reopened and ended again (a ban re-verified it) releases again."""
    with transaction.atomic(durable=True):
        job = Job.objects.get(pk=job_id)
        if job.state not in ENDED:
            return None
        escrow = account_get(K.JOB_ESCROW, job_id=job_id)
        account_lock(escrow)
        left = balance(escrow)
        if left <= 0:
            return None
        sequence = Posting.objects.filter(kind=Posting.Kind.RELEASE, idempotency_key__startswith=f"release:job={job_id}:").count()
        return posting_write(
            kind=Posting.Kind.RELEASE, key=f"release:job={job_id}:{sequence}", actor="system:jobs",
            reason=f"job {job.state}: unused escrow returned",
            entries=[(escrow, -left), (account_get(K.SUBMITTER_BALANCE, user_id=job.owner_id), left)],
            data={"job": job_id, "state": job.state},
        )
