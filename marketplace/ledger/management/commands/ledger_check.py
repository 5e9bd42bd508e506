import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from marketplace.ledger.selectors import ledger_check, ledger_totals


class Command(BaseCommand):
    help = ("Check the ledger's invariants (every posting balances, all balances sum to zero, nothing owed or held "
            "is negative, every credit traces to a valid result and a funded source); print totals per kind.")

    def handle(self, *args: Any, **options: Any) -> None:
        problems = ledger_check()
        self.stdout.write(json.dumps({"totals": {k: str(v) for k, v in sorted(ledger_totals().items())},
                                      "problems": problems}))
        if problems:
            raise CommandError(f"the ledger is unsound: {'; '.join(problems)}")
