import json
import uuid
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from marketplace.core.exceptions import ApplicationError
from marketplace.ledger.grants import verification_budget_fund
from marketplace.ledger.selectors import verification_budget_available


class Command(BaseCommand):
    help = ("Fund the platform's verification budget (base units) from the platform's grants account; audited. "
            "Known-answer copies and re-verification past a job's escrow are paid from it, and issued only while "
            "it can pay.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--amount", required=True, help="integer base units")
        parser.add_argument("--reason", required=True)
        parser.add_argument("--key", help="idempotency key: the same key funds once (default: a new funding)")

    def handle(self, *args: Any, amount: str, reason: str, key: str | None, **options: Any) -> None:
        if not (amount.isascii() and amount.isdigit() and len(amount) <= 78):
            raise CommandError(f"--amount must be a positive integer of base units, got {amount!r}")
        try:
            posting = verification_budget_fund(amount=int(amount), actor="command:verification_budget_fund",
                                               reason=reason, idempotency_key=key or uuid.uuid4().hex)
        except ApplicationError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(json.dumps({"funded": posting is not None, "available": str(verification_budget_available())}))
