"""Grants: money the platform puts in, out of its grants account: a submitter's balance topped up (admin,
development, tests) and the verification budget that pays for the work the platform orders itself."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from marketplace.core.exceptions import ValidationFailed
from marketplace.ledger.models import Account, Posting
from marketplace.ledger.postings import account_get, posting_write

K = Account.Kind


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
            entries=[(account_get(K.PLATFORM_GRANTS), -amount), (target, amount)], data={"user": user.pk},
        )


def verification_budget_fund(*, amount: int, actor: str, reason: str, idempotency_key: str) -> Posting | None:
    """Put `amount` into the platform's verification budget, out of the platform's grants: the only money
    the platform spends on work it orders itself (known-answer copies, re-verification past a job's
    escrow). What it spends can never exceed what was put here (`ledger_check`)."""
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise ValidationFailed("a budget is a positive integer in base units", fields={"amount": "must be > 0"})
    if not reason.strip():
        raise ValidationFailed("funding the budget needs a reason for the audit", fields={"reason": "required"})
    with transaction.atomic(durable=True):
        return posting_write(
            kind=Posting.Kind.BUDGET, key=f"budget:{idempotency_key}", actor=actor, reason=reason,
            entries=[(account_get(K.PLATFORM_GRANTS), -amount), (account_get(K.PLATFORM_VERIFICATION), amount)],
        )
