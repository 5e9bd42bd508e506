"""Reads of the ledger: a person's balances and entries, proofs, and the ledger-wide checks."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Q, QuerySet

from marketplace.ledger.exceptions import NoProof
from marketplace.ledger.fields import AmountSum
from marketplace.ledger.models import Account, Epoch, EpochLeaf, Line, Posting, WalletLink

K = Account.Kind


def _accounts_of(user: AbstractBaseUser) -> Q:
    addresses = list(WalletLink.objects.filter(user=user).values_list("address", flat=True))
    return (Q(user=user) | Q(job__owner=user) | Q(device__owner=user)
            | Q(kind__in=(K.PAYOUT_ADDRESS, K.CHAIN_SUSPENSE), address__in=addresses))


def balances_for(*, user: AbstractBaseUser) -> dict[str, Any]:
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


def entries_for(*, user: AbstractBaseUser) -> QuerySet[Line]:
    """The person's ledger lines, newest first."""
    return (Line.objects.filter(account__in=Account.objects.filter(_accounts_of(user)))
            .select_related("posting", "account").order_by("-posting_id", "-pk"))


def proof_for(*, user: AbstractBaseUser, address: str | None = None) -> dict[str, Any]:
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
        "root": epoch.root, "state": epoch.state, "contract": getattr(settings, "IDLEGRID_CHAIN_CONTRACT", "") or "",
        "chain_id": epoch.chain_id,
    }


def ledger_totals() -> dict[str, int]:
    """Balance per account kind; all kinds together sum to zero."""
    rows = Line.objects.values("account__kind").annotate(total=AmountSum("amount")).values_list("account__kind", "total")
    return {kind: int(total or 0) for kind, total in rows}


def ledger_check() -> list[str]:
    """Invariants of the whole ledger: every posting balances, all balances sum to zero. [] when sound."""
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
    return problems
