"""Money flows of the marketplace: grants, job escrow, earnings per valid result (held, settled, taken
back, forfeited), and the release of unused escrow. Each posting is its own durable transaction.

The chain side (deposits, epochs, reconciliation) lives in `epochs.py` and `chain.py` and is re-exported
here, the names the chain engineer codes against.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from marketplace.core.exceptions import ValidationFailed
from marketplace.jobs.models import Job
from marketplace.ledger.exceptions import InsufficientBalance
from marketplace.ledger.fields import AmountSum
from marketplace.ledger.models import Account, Earning, Posting
from marketplace.ledger.postings import account_get, account_lock, balance, posting_exists, posting_write
from marketplace.workers.models import Device
from marketplace.workunits.models import Result

log = logging.getLogger(__name__)
K = Account.Kind
MAX_PRICE = 10**36  # per result; keeps price x units x replication far inside 78 digits


# --- settings -------------------------------------------------------------------------------------

def price_default() -> int:
    return int(getattr(settings, "IDLEGRID_PRICE_PER_RESULT", 10**15))


def fee_bps() -> int:
    return int(getattr(settings, "IDLEGRID_PLATFORM_FEE_BPS", 500))


def replication_expected() -> int:
    return int(getattr(settings, "IDLEGRID_EXPECTED_REPLICATION", 2))


def fee_of(gross: int) -> int:
    """The platform's share, rounded down: the contributor never gets less than their exact share."""
    return gross * fee_bps() // 10_000


def _platform(kind: str) -> Account:
    return account_get(kind)


# --- grants ---------------------------------------------------------------------------------------

def balance_grant(*, user: AbstractBaseUser, amount: int, actor: str, reason: str, idempotency_key: str) -> Posting | None:
    """Credit a submitter's balance out of the platform's grants (admin top-ups, development, tests)."""
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise ValidationFailed("a grant is a positive integer in base units", fields={"amount": "must be > 0"})
    if not reason.strip():
        raise ValidationFailed("a grant needs a reason for the audit", fields={"reason": "required"})
    with transaction.atomic(durable=True):
        target = account_get(K.SUBMITTER_BALANCE, user_id=user.pk)
        return posting_write(
            kind=Posting.Kind.GRANT, key=f"grant:{idempotency_key}", actor=actor, reason=reason,
            entries=[(_platform(K.PLATFORM_GRANTS), -amount), (target, amount)], data={"user": user.pk},
        )


# --- escrow ---------------------------------------------------------------------------------------

def job_price_take(spec: Any) -> tuple[Any, str]:
    """Split `price_per_result` (base units, an integer or a string of digits) off a job spec before the
    kind validates the rest; returns (the spec without it, the price as a decimal string)."""
    if not isinstance(spec, dict) or "price_per_result" not in spec:
        return spec, str(price_default())
    rest = {k: v for k, v in spec.items() if k != "price_per_result"}
    value = spec["price_per_result"]
    problem = "must be an integer number of base units between 0 and 10**36 (a string for large values)"
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValidationFailed("the job spec is invalid", fields={"price_per_result": problem})
    if isinstance(value, str) and not value.isdigit():
        raise ValidationFailed("the job spec is invalid", fields={"price_per_result": problem})
    if not 0 <= int(value) <= MAX_PRICE:
        raise ValidationFailed("the job spec is invalid", fields={"price_per_result": problem})
    return rest, str(int(value))


def job_price(job: Job) -> int:
    return int(job.spec.get("price_per_result", price_default()))


def escrow_amount(*, kind_module: Any, spec: dict) -> int:
    units = kind_module.units_expected(spec)
    if isinstance(units, bool) or not isinstance(units, int) or units < 0:
        raise TypeError(f"{kind_module.__name__}.units_expected returned {units!r}, not a count")
    return int(spec.get("price_per_result", price_default())) * units * replication_expected()


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
            f"this job escrows {amount} base units (price x units x expected replication) but your balance is "
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
        if job.state not in (Job.State.COMPLETED, Job.State.FAILED):
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


# --- earnings -------------------------------------------------------------------------------------

def result_credit(*, result_id: int, now: datetime | None = None) -> Earning | None:
    """Credit a VALID result's device owner: the price from the job's escrow (or from the platform for a
    known-answer unit or when the escrow is spent), the fee to the platform, the rest held for the audit
    window. Once per result, however often it is called."""
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        result = Result.objects.select_related("unit", "job").filter(pk=result_id).first()
        if result is None or result.state != Result.State.VALID or result.device_id is None:
            return None
        if Earning.objects.filter(result_id=result_id).exists() or posting_exists(f"credit:result={result_id}"):
            return None
        job, gross = result.job, job_price(result.job)
        if gross == 0:
            return None
        fee, net = fee_of(gross), gross - fee_of(gross)
        held = account_get(K.CONTRIBUTOR_HELD, device_id=result.device_id)
        escrow = account_get(K.JOB_ESCROW, job_id=job.pk)
        account_lock(escrow)
        if result.unit.known_answer_of_id is None and balance(escrow) >= gross:
            source = Earning.Source.ESCROW
            entries = [(escrow, -gross), (_platform(K.PLATFORM_FEE), fee), (held, net)]
        else:  # the platform pays verification the submitter did not order, and takes no fee from itself
            source, gross = Earning.Source.PLATFORM, net
            entries = [(_platform(K.PLATFORM_VERIFICATION), -net), (held, net)]
        posting = posting_write(
            kind=Posting.Kind.CREDIT, key=f"credit:result={result_id}", actor="system:verification",
            reason=f"valid result {result_id} of job {job.pk}", entries=entries,
            data={"result": result_id, "job": job.pk, "device": result.device_id, "source": source},
        )
        if posting is None:  # a racing credit of the same result committed first
            return None
        return Earning.objects.create(
            result_id=result_id, device_id=result.device_id, user_id=result.owner_id or result.device.owner_id,
            job_id=job.pk, source=source, gross=gross, net=net, credit=posting,
            settle_after=now + timedelta(seconds=settings.IDLEGRID_AUDIT_WINDOW_SECONDS),
        )


def _credit_lines_reversed(earning: Earning) -> list[tuple[Account, int]]:
    return [(line.account, -line.amount) for line in earning.credit.lines.select_related("account")]


def earning_reverse(*, earning_id: int, reason: str) -> bool:
    """Take back a held earning whose result was withdrawn: every line of its credit, mirrored, so the
    money returns to the escrow (which pays the re-verification) or the platform. Settled is final."""
    with transaction.atomic(durable=True):
        earning = Earning.objects.select_related("credit").get(pk=earning_id)
        if earning.state != Earning.State.HELD:
            if earning.state == Earning.State.SETTLED:
                log.warning("result %s was withdrawn after its earning settled; settled earnings are final", earning.result_id)
            return False
        posting = posting_write(
            kind=Posting.Kind.REVERSAL, key=f"reversal:result={earning.result_id}", actor="system:verification",
            reason=reason, entries=_credit_lines_reversed(earning), data={"result": earning.result_id},
        )
        return _earning_close(earning, Earning.State.REVERSED, posting)


def earning_forfeit(*, earning_id: int, reason: str) -> bool:
    """A banned device's held earning goes to the platform."""
    with transaction.atomic(durable=True):
        earning = Earning.objects.get(pk=earning_id)
        if earning.state != Earning.State.HELD:
            return False
        posting = posting_write(
            kind=Posting.Kind.FORFEIT, key=f"forfeit:result={earning.result_id}", actor="system:trust", reason=reason,
            entries=[(account_get(K.CONTRIBUTOR_HELD, device_id=earning.device_id), -earning.net),
                     (_platform(K.PLATFORM_FORFEIT), earning.net)],
            data={"result": earning.result_id, "device": earning.device_id},
        )
        return _earning_close(earning, Earning.State.FORFEITED, posting)


def _earning_close(earning: Earning, state: str, posting: Posting | None) -> bool:
    if posting is None:
        raise RuntimeError(f"earning {earning.pk} is held but its closing posting exists: ledger and rows disagree")
    return bool(Earning.objects.filter(pk=earning.pk, state=Earning.State.HELD).update(state=state, closed_by=posting))


def results_withdrawn_reverse(*, result_ids: list[int]) -> int:
    reversed_ = 0
    for earning_id in Earning.objects.filter(result_id__in=result_ids, state=Earning.State.HELD).values_list("pk", flat=True):
        reversed_ += earning_reverse(earning_id=earning_id, reason="the result was withdrawn by re-verification")
    return reversed_


def device_forfeit(*, device_id: int) -> int:
    """After a ban: withdrawn results are reversed first (their money pays re-verification), then every
    other held earning of the device is forfeited."""
    if not Device.objects.filter(pk=device_id, state=Device.State.BANNED).exists():
        return 0
    held = Earning.objects.filter(device_id=device_id, state=Earning.State.HELD)
    results_withdrawn_reverse(result_ids=list(held.exclude(result__state=Result.State.VALID).values_list("result_id", flat=True)))
    return sum(earning_forfeit(earning_id=pk, reason=f"device {device_id} was banned")
               for pk in held.values_list("pk", flat=True))


def earnings_settle(*, now: datetime | None = None, limit: int = 10_000) -> Posting | None:
    """Move every held earning past its audit window (device not banned, result still valid) to its
    owner's settled account: one posting per batch, with the earnings' state in the same transaction."""
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        due = list(
            Earning.objects.filter(state=Earning.State.HELD, settle_after__lte=now, result__state=Result.State.VALID)
            .exclude(device__state=Device.State.BANNED).order_by("pk").values_list("pk", "device_id", "user_id", "net")[:limit]
        )
        if not due:
            return None
        entries = []
        for _, device_id, user_id, net in due:
            entries += [(account_get(K.CONTRIBUTOR_HELD, device_id=device_id), -net),
                        (account_get(K.CONTRIBUTOR_SETTLED, user_id=user_id), net)]
        ids = [pk for pk, *_ in due]
        digest = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:32]
        posting = posting_write(kind=Posting.Kind.SETTLEMENT, key=f"settle:{digest}", actor="system:settlement",
                                reason="audit window passed", entries=entries, data={"earnings": len(ids)})
        moved = Earning.objects.filter(pk__in=ids, state=Earning.State.HELD).update(state=Earning.State.SETTLED, closed_by=posting)
        if posting is None or moved != len(ids):
            raise RuntimeError("earnings changed while settling; nothing was settled")  # rolls back the posting
        return posting


def earnings_sync(*, now: datetime | None = None, limit: int = 1000) -> dict[str, int]:
    """The safety net behind the after-commit hooks: whatever the database says is owed or withdrawn and
    the ledger does not show yet (a crash between a commit and its hook), do now."""
    now = now or timezone.now()
    since = now - timedelta(seconds=settings.IDLEGRID_AUDIT_WINDOW_SECONDS)
    missing = list(Result.objects.filter(state=Result.State.VALID, earning__isnull=True, device__isnull=False)
                   .filter(Q(reported_at__gte=since) | Q(reported_at__isnull=True)).values_list("pk", flat=True)[:limit])
    credited = sum(result_credit(result_id=pk, now=now) is not None for pk in missing)
    withdrawn = list(Earning.objects.filter(state=Earning.State.HELD).exclude(result__state=Result.State.VALID)
                     .values_list("result_id", flat=True)[:limit])
    reversed_ = results_withdrawn_reverse(result_ids=withdrawn)
    banned = set(Earning.objects.filter(state=Earning.State.HELD, device__state=Device.State.BANNED)
                 .values_list("device_id", flat=True)[:limit])
    forfeited = sum(device_forfeit(device_id=device_id) for device_id in banned)
    ended = (Account.objects.filter(kind=K.JOB_ESCROW, job__state__in=(Job.State.COMPLETED, Job.State.FAILED))
             .annotate(left=AmountSum("lines__amount")).values_list("job_id", "left"))
    released = sum(job_escrow_release(job_id=job_id) is not None for job_id, left in ended if (left or 0) > 0)
    return {"credited": credited, "reversed": reversed_, "forfeited": forfeited, "released": released}


from marketplace.ledger.chain import chain_reconcile, deposit_credit, deposits_follow  # noqa: E402,F401  (the interface)
from marketplace.ledger.epochs import epoch_close, epoch_confirm, epoch_publish, epoch_settle  # noqa: E402,F401
