from django.apps import AppConfig


class LedgerConfig(AppConfig):
    name = "marketplace.ledger"
    label = "ledger"
    verbose_name = "Ledger"

    def ready(self) -> None:
        from django.db.backends.signals import connection_created

        from marketplace.ledger.fields import sqlite_register

        connection_created.connect(sqlite_register, dispatch_uid="ledger-sqlite-amount-sum")
