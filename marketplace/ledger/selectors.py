"""Reads of the ledger: a person's balances and entries, proofs, and the ledger-wide checks."""

from __future__ import annotations

from typing import NamedTuple, TypedDict

from django.conf import settings
from django.contrib.auth.models import User
from django.db.models import Q, QuerySet

from marketplace.ledger.exceptions import NoProof
from marketplace.ledger.fields import AmountSum
from marketplace.ledger.models import Account, Earning, Epoch, EpochLeaf, Line, Posting, WalletLink
from marketplace.ledger.postings import account_key, balance
from marketplace.workunits.models import Result, ResultArchive

K = Account.Kind


class Balances(TypedDict):
    """Decimal strings of base units."""

    available: str
    escrowed: str
    earnings_held: str
    earnings_settled: str
    payout_addresses: dict[str, str]  # address -> its balance
    deposits_unlinked: str


class Proof(TypedDict):
    epoch: int
    account: str
    cumulative: str  # decimal base units
    proof: list[str]  # ["0x<64 hex>", ...]
    root: str
    state: str
    contract: str
    chain_id: int | None


def _accounts_of(user: User) -> Q:
    addresses = list(WalletLink.objects.filter(user=user).values_list("address", flat=True))
    return (Q(user=user) | Q(job__owner=user) | Q(device__owner=user)
            | Q(kind__in=(K.PAYOUT_ADDRESS, K.CHAIN_SUSPENSE), address__in=addresses))


def balances_for(*, user: User) -> Balances:
    """What the person has in each kind of account, as decimal strings (base units)."""
    totals: dict[str, int] = {}
    payout: dict[str, str] = {}
    rows = (Account.objects.filter(_accounts_of(user)).annotate(total=AmountSum("lines__amount"))
            .values_list("kind", "address", "total"))
    for kind, address, total in rows:
        totals[kind] = totals.get(kind, 0) + int(total or 0)
        if kind == K.PAYOUT_ADDRESS:
            payout[address] = str(int(total or 0))
    return {
        "available": str(totals.get(K.SUBMITTER_BALANCE, 0)),
        "escrowed": str(totals.get(K.JOB_ESCROW, 0)),
        "earnings_held": str(totals.get(K.CONTRIBUTOR_HELD, 0)),
        "earnings_settled": str(totals.get(K.CONTRIBUTOR_SETTLED, 0)),
        "payout_addresses": payout,
        "deposits_unlinked": str(totals.get(K.CHAIN_SUSPENSE, 0)),
    }


def entries_for(*, user: User) -> QuerySet[Line]:
    """The person's ledger lines, newest first."""
    return (Line.objects.filter(account__in=Account.objects.filter(_accounts_of(user)))
            .select_related("posting", "account").order_by("-posting_id", "-pk"))


def proof_for(*, user: User, address: str | None = None) -> Proof:
    """The latest published epoch's leaf and proof for the person's payout address (the active one, or
    another they linked before)."""
    links = WalletLink.objects.filter(user=user)
    link = links.filter(address=address).first() if address else links.filter(active=True).first()
    if link is None:
        raise NoProof("no payout address linked; link one with a signed challenge first"
                      if not address else f"{address} is not a payout address of this account")
    epoch = Epoch.objects.filter(state__in=(Epoch.State.PUBLISHED, Epoch.State.FINAL)).order_by("-number").first()
    if epoch is None:
        raise NoProof("no epoch has been published on chain yet")
    leaf = EpochLeaf.objects.filter(epoch=epoch, address=link.address).first()
    if leaf is None:
        raise NoProof(f"{link.address} has no earnings in epoch {epoch.number}, the latest published")
    return {
        "epoch": epoch.number, "account": leaf.address, "cumulative": str(leaf.cumulative), "proof": leaf.proof,
        "root": epoch.root, "state": epoch.state, "contract": settings.IDLEGRID_CHAIN_CONTRACT or "",
        "chain_id": epoch.chain_id,
    }


def verification_budget_available() -> int:
    """What the platform's verification budget still holds (funded minus spent; never below zero)."""
    account = Account.objects.filter(key=account_key(K.PLATFORM_VERIFICATION)).first()
    return 0 if account is None else max(0, balance(account))


def ledger_totals() -> dict[str, int]:
    """Balance per account kind; all kinds together sum to zero."""
    rows = Line.objects.values("account__kind").annotate(total=AmountSum("amount")).values_list("account__kind", "total")
    return {kind: int(total or 0) for kind, total in rows}


def ledger_check() -> list[str]:
    """Invariants of the whole ledger; [] when sound.

    - every posting balances, all balances sum to zero, no posting is empty;
    - no balance the marketplace owes or holds runs negative (a submitter's balance, a job's escrow, the
      verification budget): the platform never spends more than its budget, a job never pays more than
      it escrowed;
    - every credit traces to one valid result and a funded source: one Earning per credit posting; its
      result exists, was computed by its device and is not a second row of one computation (a disputed
      known answer); it draws on that result's own job escrow (source `escrow`) or on the verification
      budget (source `platform`), and on nothing else; and it is still valid unless the money went back
      (reversed) or to the platform (forfeited)."""
    problems = []
    for posting_id, total in Line.objects.values("posting_id").annotate(total=AmountSum("amount")).values_list("posting_id", "total"):
        if int(total or 0) != 0:
            problems.append(f"posting {posting_id} sums to {total}")
    everything = Line.objects.aggregate(total=AmountSum("amount"))["total"] or 0
    if everything != 0:
        problems.append(f"all balances sum to {everything}")
    empty = Posting.objects.filter(lines__isnull=True).count()
    if empty:
        problems.append(f"{empty} postings have no lines")
    never_negative = (K.SUBMITTER_BALANCE, K.JOB_ESCROW, K.PLATFORM_VERIFICATION, K.CONTRIBUTOR_HELD,
                      K.CONTRIBUTOR_SETTLED)
    for key, total in (Account.objects.filter(kind__in=never_negative).annotate(total=AmountSum("lines__amount"))
                       .values_list("key", "total")):
        if int(total or 0) < 0:
            problems.append(f"{key} is negative ({total}): more was spent than it held")
    problems += _credits_traced()
    return problems


def _credits_traced() -> list[str]:

    problems = []
    credits = Posting.objects.filter(kind=Posting.Kind.CREDIT)
    earnings = {e.credit_id: e for e in Earning.objects.filter(credit__in=credits)}
    results = _paid_results()
    debits: dict[int, list[str]] = {}
    for posting_id, key in Line.objects.filter(posting__in=credits, amount__lt=0).values_list("posting_id", "account__key"):
        debits.setdefault(posting_id, []).append(key)
    for posting_id in credits.values_list("pk", flat=True):
        earning = earnings.get(posting_id)
        if earning is None:
            problems.append(f"credit posting {posting_id} has no earning (no result it pays for)")
            continue
        result = results.get(earning.result_id)
        where = f"credit posting {posting_id} (result {earning.result_id})"
        if result is None:
            problems.append(f"{where} pays a result that is neither in the hot table nor in the archive")
            continue
        if result.device_id != earning.device_id or result.job_id != earning.job_id:
            problems.append(f"{where} pays another device or job than the result's")
        if result.disputes_known_answer_id is not None:
            problems.append(f"{where} pays a disputed known answer's second row: one computation paid twice")
        sources: dict[str, list[str]] = {Earning.Source.ESCROW: [account_key(K.JOB_ESCROW, job_id=result.job_id)],
                                         Earning.Source.PLATFORM: [account_key(K.PLATFORM_VERIFICATION)]}
        expected = sources.get(earning.source)
        if debits.get(posting_id) != expected:
            problems.append(f"{where} draws on {debits.get(posting_id)}, not its funded source {expected}")
        if result.state != Result.State.VALID and earning.state not in (Earning.State.REVERSED, Earning.State.FORFEITED):
            problems.append(f"{where} is {earning.state} but its result is {result.state}")
    return problems


class _Paid(NamedTuple):
    device_id: int | None
    job_id: int
    disputes_known_answer_id: int | None
    state: str


def _paid_results() -> dict[int, _Paid]:
    """What the check needs of every result an earning names, wherever it is: the hot table, or the archive
    its job's results move to (workunits/archive.py; no foreign key binds Earning.result for that reason).
    The hot table is read first: a row that moves between the two reads is then seen twice, never missed."""
    fields = ("device_id", "job_id", "disputes_known_answer_id", "state")
    paid = Earning.objects.values("result_id")
    found: dict[int, _Paid] = {}
    for model in (Result, ResultArchive):
        for pk, *values in model.objects.filter(pk__in=paid).values_list("pk", *fields).iterator(chunk_size=5000):
            found[pk] = _Paid(*values)
    return found
