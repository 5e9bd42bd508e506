from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from marketplace.core.signing import KeyringError, key_retire
from marketplace.workunits.creation import units_resign


class Command(BaseCommand):
    help = (
        "Retire a unit-signing key (never the active one: rotate first). Its pending units are signed again "
        "by the active key, and agents stop trusting it when they next fetch the keys. Safe to run again, "
        "e.g. a minute later, to re-sign units a process with a stale keyring signed meanwhile."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("key_id")

    def handle(self, *args: Any, key_id: str, **options: Any) -> None:
        try:
            key_retire(key_id=key_id)
        except KeyringError as exc:
            raise CommandError(str(exc)) from None
        resigned = units_resign(key_id=key_id)
        self.stdout.write(f"{key_id} retired; {resigned} pending unit(s) signed again")
