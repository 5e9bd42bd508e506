"""The ledger's one write primitive: a balanced posting with its audit row, idempotent by key.

`posting_write` must run inside a `transaction.atomic(durable=True)` block of its caller, which also
holds whatever state change goes with the money (an Earning settled, an Epoch created), so the two
commit together or not at all. Durable: no outer transaction can roll a posting back after it returned.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from django.db import IntegrityError, connection, transaction

from marketplace.ledger.fields import AmountSum, amount_parse
from marketplace.ledger.models import Account, AuditEntry, Line, Posting

log = logging.getLogger(__name__)

Entry = tuple[Account, int]


class Unbalanced(ValueError):
    """A posting whose lines do not sum to zero: a bug, never a user error."""


def account_key(kind: str, *, user_id: int | None = None, job_id: int | None = None, device_id: int | None = None,
                address: str = "") -> str:
    owner = (f"user={user_id}" if user_id is not None else f"job={job_id}" if job_id is not None
             else f"device={device_id}" if device_id is not None else address)
    return f"{kind}:{owner}" if owner else kind


def account_get(kind: str, *, user_id: int | None = None, job_id: int | None = None, device_id: int | None = None,
                address: str = "") -> Account:
    key = account_key(kind, user_id=user_id, job_id=job_id, device_id=device_id, address=address)
    account = Account.objects.filter(key=key).first()
    if account is not None:
        return account
    try:
        with transaction.atomic():  # a savepoint: a racing creator must not spoil the caller's transaction
            return Account.objects.create(key=key, kind=kind, user_id=user_id, job_id=job_id, device_id=device_id,
                                          address=address)
    except IntegrityError:
        return Account.objects.get(key=key)


def account_lock(account: Account) -> None:
    """Serialise writers of one account's balance (a no-op on SQLite, whose writers are serialised anyway)."""
    if connection.vendor == "postgresql":
        Account.objects.select_for_update().filter(pk=account.pk).values_list("pk").get()


def balance(account: Account | int) -> int:
    account_id = account.pk if isinstance(account, Account) else account
    return Line.objects.filter(account_id=account_id).aggregate(total=AmountSum("amount"))["total"] or 0


def posting_exists(key: str) -> bool:
    return Posting.objects.filter(idempotency_key=key).exists()


def posting_write(*, kind: str, key: str, entries: Iterable[Entry], actor: str, reason: str, memo: str = "",
                  data: dict[str, Any] | None = None) -> Posting | None:
    """Write one posting (lines per account merged, zero lines dropped) and its audit row. Returns None
    when a posting with this key exists already (the caller's work was done before)."""
    # Django keeps the stack of open atomic blocks (its own durability check reads it too).
    if not any(getattr(block, "durable", False) for block in getattr(connection, "atomic_blocks", [])):
        raise RuntimeError("posting_write runs inside the caller's transaction.atomic(durable=True)")
    merged: dict[int, int] = defaultdict(int)
    accounts: dict[int, Account] = {}
    for account, amount in entries:
        merged[account.pk] += amount_parse(amount)
        accounts[account.pk] = account
    lines = [(accounts[pk], amount) for pk, amount in merged.items() if amount != 0]
    if sum(amount for _, amount in lines) != 0:
        raise Unbalanced(f"posting {key!r} does not balance: {[(a.key, n) for a, n in lines]}")
    if not lines:
        return None
    if posting_exists(key):
        return None
    try:
        with transaction.atomic():
            posting = Posting.objects.create(kind=kind, idempotency_key=key, memo=memo[:500])
    except IntegrityError:  # a racing writer committed the same key first
        return None
    Line.objects.bulk_create([Line(posting=posting, account=account, amount=amount) for account, amount in lines])
    AuditEntry.objects.create(actor=actor, action=f"posting.{kind}", reason=reason, posting=posting,
                              data={"idempotency_key": key, **(data or {})})
    log.info("ledger %s %s: %s", kind, key, ", ".join(f"{a.key} {n:+d}" for a, n in lines))
    return posting
