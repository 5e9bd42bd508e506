import json
import uuid
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from marketplace.core.exceptions import ApplicationError
from marketplace.ledger.grants import balance_grant
from marketplace.ledger.selectors import balances_for


class Command(BaseCommand):
    help = "Grant a submitter balance (base units) from the platform's grants account; audited. For admins and dev."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--amount", required=True, help="integer base units")
        parser.add_argument("--reason", required=True)
        parser.add_argument("--key", help="idempotency key: the same key grants once (default: a new grant)")

    def handle(self, *args: Any, username: str, amount: str, reason: str, key: str | None, **options: Any) -> None:
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no account named {username!r}")
        if not (amount.isascii() and amount.isdigit() and len(amount) <= 78):
            raise CommandError(f"--amount must be a positive integer of base units, got {amount!r}")
        try:
            posting = balance_grant(user=user, amount=int(amount), actor="command:ledger_grant", reason=reason,
                                    idempotency_key=key or uuid.uuid4().hex)
        except ApplicationError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(json.dumps({"username": username, "granted": posting is not None, **balances_for(user=user)}))
