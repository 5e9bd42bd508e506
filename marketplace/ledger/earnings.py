"""Earnings: a valid result's credit (held for the audit window), taken back when the result is withdrawn,
forfeited when its device is banned, settled to its owner when the window passes; and the sweep that
does whatever an after-commit hook left undone. Each posting is its own durable transaction."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from marketplace.jobs.models import Job
from marketplace.ledger.escrow import ENDED, job_escrow_release, job_price
from marketplace.ledger.fields import AmountSum
from marketplace.ledger.models import Account, AuditEntry, Earning, Line, Posting
from marketplace.ledger.postings import account_get, account_lock, balance, posting_exists, posting_write
from marketplace.workers.models import Device
from marketplace.workunits.models import Result

log = logging.getLogger(__name__)
K = Account.Kind


def fee_of(gross: int) -> int:
    """The platform's share, rounded down: the contributor never gets less than their exact share."""
    return gross * settings.IDLEGRID_PLATFORM_FEE_BPS // 10_000


def result_credit(*, result_id: int, now: datetime | None = None) -> Earning | None:
    """Credit a VALID result's device owner, once per result however often it is called.

    Work the submitter ordered (a result of one of the job's own units) is paid at the job's price from
    the job's escrow, the fee to the platform, the rest held for the audit window. Work the platform
    ordered (a known-answer copy), or a re-verification past what the escrow still holds, is paid at
    IDLEGRID_VERIFICATION_PRICE out of the verification budget, without a fee; never at the job's price,
    which the submitter chose. When neither source can pay (a free job, a spent budget) the result is
    recorded unpaid, so that nothing is ever minted."""
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        result = Result.objects.select_related("unit", "job").filter(pk=result_id).first()
        if result is None or result.state != Result.State.VALID or result.device_id is None:
            return None
        if result.disputes_known_answer_id is not None:
            return None  # the same computation as the copy's answer, which is the one paid
        if Earning.objects.filter(result_id=result_id).exists() or posting_exists(f"credit:result={result_id}"):
            return None
        job = result.job
        held = account_get(K.CONTRIBUTOR_HELD, device_id=result.device_id)
        source, gross, net, entries = _credit_source(result, held)
        earning = {"result_id": result_id, "device_id": result.device_id, "job_id": job.pk,
                   "user_id": _earner_id(result), "source": source, "gross": gross, "net": net,
                   "settle_after": now + timedelta(seconds=settings.IDLEGRID_AUDIT_WINDOW_SECONDS)}
        if source == Earning.Source.UNPAID:
            return Earning.objects.create(**earning, state=Earning.State.UNPAID, credit=None)
        posting = posting_write(
            kind=Posting.Kind.CREDIT, key=f"credit:result={result_id}", actor="system:verification",
            reason=f"valid result {result_id} of job {job.pk}", entries=entries,
            data={"result": result_id, "job": job.pk, "device": result.device_id, "source": source},
        )
        if posting is None:  # a racing credit of the same result committed first
            return None
        return Earning.objects.create(**earning, credit=posting)


def results_credit(*, result_ids: Sequence[int], now: datetime | None = None) -> int:
    """result_credit for many results at once (a validation batch's): the same sources, amounts, postings
    and earnings, each posting still keyed by its result, written in one durable transaction with a few
    bulk INSERTs; each source's balance is read once, under its lock, instead of summed again per credit
    (the sum over a job's escrow lines grows with every credit it paid). Returns how many were credited.
    Should a racing credit of one of them commit first (a unique key refuses the batch), each is credited
    on its own instead, idempotently."""
    ids = sorted(set(result_ids))
    if len(ids) <= 1:
        return sum(result_credit(result_id=pk, now=now) is not None for pk in ids)
    now = now or timezone.now()
    try:
        with transaction.atomic(durable=True):
            return _credit_many(ids, now)
    except IntegrityError:
        log.warning("a credit of one of %s results raced the batch; they are credited one by one", len(ids))
        return sum(result_credit(result_id=pk, now=now) is not None for pk in ids)


@dataclass
class _Sources:
    """The accounts a batch of credits draws on, each locked once (job escrows by id, then the verification
    budget, the order result_credit takes them in) and its balance read once, then kept in memory."""

    escrows: dict[int, Account] = field(default_factory=dict)
    balances: dict[int, int] = field(default_factory=dict)
    budget: Account | None = None
    accounts: dict[str, Account] = field(default_factory=dict)  # the credited ones, read or made once

    def account(self, kind: str, *, device_id: int | None = None) -> Account:
        key = f"{kind}:{device_id}"
        if key not in self.accounts:
            self.accounts[key] = account_get(kind, device_id=device_id)
        return self.accounts[key]

    def lock_escrows(self, job_ids: Iterable[int]) -> None:
        self.escrows = {job_id: account_get(K.JOB_ESCROW, job_id=job_id) for job_id in sorted(set(job_ids))}
        for account in sorted(self.escrows.values(), key=lambda a: a.pk):
            account_lock(account)
        self._read(self.escrows.values())

    def lock_budget(self) -> Account:
        if self.budget is None:
            self.budget = account_get(K.PLATFORM_VERIFICATION)
            account_lock(self.budget)
            self._read([self.budget])
        return self.budget

    def _read(self, accounts: Iterable[Account]) -> None:
        pks = [a.pk for a in accounts]
        self.balances.update(dict.fromkeys(pks, 0))
        self.balances.update(Line.objects.filter(account_id__in=pks).values_list("account_id")
                             .annotate(total=AmountSum("amount")).values_list("account_id", "total"))

    def take(self, account: Account, amount: int) -> bool:
        if self.balances[account.pk] < amount:
            return False
        self.balances[account.pk] -= amount
        return True


def _credit_many(ids: list[int], now: datetime) -> int:
    rows = list(Result.objects.filter(pk__in=ids, state=Result.State.VALID, device__isnull=False,
                                      disputes_known_answer__isnull=True)
                .values_list("pk", "device_id", "owner_id", "device__owner_id", "job_id", "unit__known_answer_of_id"))
    jobs = Job.objects.in_bulk({row[4] for row in rows})
    sources = _Sources()
    sources.lock_escrows(row[4] for row in rows if row[5] is None and job_price(jobs[row[4]]) > 0)
    # Checked under the locks: a racing credit of one of these has committed by now, or waits for this one.
    keys = {pk: f"credit:result={pk}" for pk, *_ in rows}
    done = set(Earning.objects.filter(result_id__in=list(keys)).values_list("result_id", flat=True))
    done |= {int(key.split("=")[1]) for key in
             Posting.objects.filter(idempotency_key__in=list(keys.values())).values_list("idempotency_key", flat=True)}
    window = now + timedelta(seconds=settings.IDLEGRID_AUDIT_WINDOW_SECONDS)
    earnings, postings, lines, audits = [], [], [], []
    for pk, device_id, owner_id, device_owner_id, job_id, copy_of in rows:
        if pk in done:
            continue
        held = sources.account(K.CONTRIBUTOR_HELD, device_id=device_id)
        source, gross, net, entries = _credit_source_many(jobs[job_id], copy_of is not None, held, sources, pk)
        earning = Earning(result_id=pk, device_id=device_id, job_id=job_id, user_id=owner_id or device_owner_id,
                          source=source, gross=gross, net=net, settle_after=window)
        if source == Earning.Source.UNPAID:
            earning.state = Earning.State.UNPAID
        else:
            postings.append(Posting(kind=Posting.Kind.CREDIT, idempotency_key=keys[pk]))
            lines.append([(account, amount) for account, amount in entries if amount != 0])
            audits.append(AuditEntry(actor="system:verification", action=f"posting.{Posting.Kind.CREDIT}",
                                     reason=f"valid result {pk} of job {job_id}", data={
                                         "idempotency_key": keys[pk], "result": pk, "job": job_id,
                                         "device": device_id, "source": source}))
            earning.credit = postings[-1]
        earnings.append(earning)
    Posting.objects.bulk_create(postings)
    Line.objects.bulk_create([Line(posting=posting, account=account, amount=amount)
                              for posting, entries in zip(postings, lines) for account, amount in entries])
    for posting, audit in zip(postings, audits):
        audit.posting = posting
    AuditEntry.objects.bulk_create(audits)
    for earning in earnings:
        earning.credit_id = earning.credit.pk if earning.credit is not None else None
    Earning.objects.bulk_create(earnings)
    if earnings:
        log.info("ledger: %s results credited (%s postings)", len(earnings), len(postings))
    return len(earnings)


def _credit_source_many(job: Job, copy: bool, held: Account, sources: _Sources,
                        result_id: int) -> tuple[str, int, int, list[tuple[Account, int]]]:
    """_credit_source with the balances kept by `sources`."""
    if not copy:
        gross = job_price(job)
        if gross == 0:
            return Earning.Source.UNPAID, 0, 0, []
        escrow = sources.escrows[job.pk]
        if sources.take(escrow, gross):
            fee = fee_of(gross)
            return Earning.Source.ESCROW, gross, gross - fee, [
                (escrow, -gross), (sources.account(K.PLATFORM_FEE), fee), (held, gross - fee)]
    price = settings.IDLEGRID_VERIFICATION_PRICE
    budget = sources.lock_budget()
    if price == 0 or not sources.take(budget, price):
        log.warning("result %s is valid but unpaid: the verification budget cannot pay %s", result_id, price)
        return Earning.Source.UNPAID, 0, 0, []
    return Earning.Source.PLATFORM, price, price, [(budget, -price), (held, price)]


def job_earnings_credit(*, job_id: int) -> int:
    """Credit now every valid result of the job that its after-commit hook has not credited yet: a job
    about to end (cancelled) pays its validated work out of its escrow before the rest is returned, so a
    hook that failed or has not run yet cannot find the escrow empty. Returns how many were credited."""
    owed = Result.objects.filter(job_id=job_id, state=Result.State.VALID, earning__isnull=True, device__isnull=False,
                                 disputes_known_answer__isnull=True).order_by("pk").values_list("pk", flat=True)
    return sum(result_credit(result_id=pk) is not None for pk in list(owed))


def _earner_id(result: Result) -> int:
    """The person a result earns for: its owner (set with the lease), or else its device's."""
    if result.owner_id:
        return result.owner_id
    assert result.device is not None, f"result {result.pk} has no device"  # result_credit pays only those
    return result.device.owner_id


def _credit_source(result: Result, held: Account) -> tuple[str, int, int, list[tuple[Account, int]]]:
    """(source, gross, net, entries) of a valid result's credit; the source account is locked."""
    if result.unit.known_answer_of_id is None:
        gross = job_price(result.job)
        if gross == 0:
            return Earning.Source.UNPAID, 0, 0, []
        escrow = account_get(K.JOB_ESCROW, job_id=result.job_id)
        account_lock(escrow)
        if balance(escrow) >= gross:
            fee = fee_of(gross)
            return Earning.Source.ESCROW, gross, gross - fee, [
                (escrow, -gross), (account_get(K.PLATFORM_FEE), fee), (held, gross - fee)]
    price = settings.IDLEGRID_VERIFICATION_PRICE
    budget = account_get(K.PLATFORM_VERIFICATION)
    account_lock(budget)
    if price == 0 or balance(budget) < price:
        log.warning("result %s is valid but unpaid: the verification budget cannot pay %s", result.pk, price)
        return Earning.Source.UNPAID, 0, 0, []
    return Earning.Source.PLATFORM, price, price, [(budget, -price), (held, price)]


def _credit_lines_reversed(earning: Earning) -> list[tuple[Account, int]]:
    if earning.credit is None:  # an unpaid earning has no credit, and is never held
        raise RuntimeError(f"earning {earning.pk} is held but has no credit posting: ledger and rows disagree")
    return [(line.account, -line.amount) for line in earning.credit.lines.select_related("account")]


def _earning_held_locked(earning_id: int) -> Earning | None:
    """The earning, row-locked (PostgreSQL) so a concurrent reversal, forfeit or settlement waits; None
    unless it is still held."""
    earning = Earning.objects.select_for_update(of=("self",)).select_related("credit").get(pk=earning_id)
    if earning.state == Earning.State.HELD:
        return earning
    if earning.state == Earning.State.SETTLED:
        log.warning("result %s was withdrawn after its earning settled; settled earnings are final", earning.result_id)
    return None


def earning_reverse(*, earning_id: int, reason: str) -> bool:
    """Take back a held earning whose result was withdrawn: every line of its credit, mirrored, so the
    money returns to the escrow (which pays the re-verification) or the budget. Settled is final. The
    earning row is locked first and the posting and the state move commit together or not at all."""
    with transaction.atomic(durable=True):
        earning = _earning_held_locked(earning_id)
        if earning is None:
            return False
        posting = posting_write(
            kind=Posting.Kind.REVERSAL, key=f"reversal:result={earning.result_id}", actor="system:verification",
            reason=reason, entries=_credit_lines_reversed(earning), data={"result": earning.result_id},
        )
        return _earning_close(earning, Earning.State.REVERSED, posting)


def earning_forfeit(*, earning_id: int, reason: str) -> bool:
    """A banned device's held earning goes to the platform (locked and atomic, as earning_reverse)."""
    with transaction.atomic(durable=True):
        earning = _earning_held_locked(earning_id)
        if earning is None:
            return False
        posting = posting_write(
            kind=Posting.Kind.FORFEIT, key=f"forfeit:result={earning.result_id}", actor="system:trust", reason=reason,
            entries=[(account_get(K.CONTRIBUTOR_HELD, device_id=earning.device_id), -earning.net),
                     (account_get(K.PLATFORM_FORFEIT), earning.net)],
            data={"result": earning.result_id, "device": earning.device_id},
        )
        return _earning_close(earning, Earning.State.FORFEITED, posting)


def _earning_close(earning: Earning, state: str, posting: Posting | None) -> bool:
    """Close a held earning with its posting; raising rolls the posting back with it (the caller's
    durable block), so money never moves without the state that explains it."""
    if posting is None:
        raise RuntimeError(f"earning {earning.pk} is held but its closing posting exists: ledger and rows disagree")
    if not Earning.objects.filter(pk=earning.pk, state=Earning.State.HELD).update(state=state, closed_by=posting):
        raise RuntimeError(f"earning {earning.pk} changed while it was being closed; nothing was posted")
    return True


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
    missing = list(Result.objects.filter(state=Result.State.VALID, earning__isnull=True, device__isnull=False,
                                         disputes_known_answer__isnull=True)
                   .filter(Q(reported_at__gte=since) | Q(reported_at__isnull=True)).values_list("pk", flat=True)[:limit])
    credited = sum(result_credit(result_id=pk, now=now) is not None for pk in missing)
    withdrawn = list(Earning.objects.filter(state=Earning.State.HELD).exclude(result__state=Result.State.VALID)
                     .values_list("result_id", flat=True)[:limit])
    reversed_ = results_withdrawn_reverse(result_ids=withdrawn)
    banned = set(Earning.objects.filter(state=Earning.State.HELD, device__state=Device.State.BANNED)
                 .values_list("device_id", flat=True)[:limit])
    forfeited = sum(device_forfeit(device_id=device_id) for device_id in banned)
    ended = (Account.objects.filter(kind=K.JOB_ESCROW, job__state__in=ENDED)
             .annotate(left=AmountSum("lines__amount")).values_list("job_id", "left"))
    released = sum(job_escrow_release(job_id=job_id) is not None for job_id, left in ended if (left or 0) > 0)
    return {"credited": credited, "reversed": reversed_, "forfeited": forfeited, "released": released}
