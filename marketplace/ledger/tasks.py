"""Ledger tasks: thin, take no ORM objects, safe to run twice (every posting is idempotent by key)."""

from __future__ import annotations

from celery import shared_task

from marketplace.ledger import services, wallets


def _client():
    from marketplace.chain.client import chain_client

    return chain_client()


@shared_task(name="ledger.sweep", acks_late=True)
def sweep_earnings() -> dict:
    # Payout-address changes take effect here too, within a sweep period of their time, not only when an
    # epoch closes: GET /api/v1/wallet/ then shows the address in effect.
    activated = wallets.wallet_changes_activate()
    return {**services.earnings_sync(), "wallet_changes_activated": activated}


@shared_task(name="ledger.settle_epoch", acks_late=True)
def settle_epoch() -> int | None:
    epoch = services.epoch_settle(client=_client())
    return epoch.number if epoch else None


@shared_task(name="ledger.follow_deposits", acks_late=True)
def follow_deposits() -> int:
    from marketplace.ledger.epochs import epoch_confirm
    from marketplace.ledger.models import Epoch

    client = _client()
    credited = services.deposits_follow(client=client)
    for epoch_id in Epoch.objects.filter(state=Epoch.State.PUBLISHED).values_list("pk", flat=True):
        epoch_confirm(epoch_id=epoch_id, client=client)
    return credited


@shared_task(name="ledger.reconcile_chain", acks_late=True)
def reconcile_chain() -> dict:
    report = services.chain_reconcile(client=_client())
    return {"ok": report.ok, "differences": report.differences, **report.figures}
