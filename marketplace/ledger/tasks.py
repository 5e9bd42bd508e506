"""Ledger tasks: thin, take no ORM objects, safe to run twice (every posting is idempotent by key). The
registered names are the contract with beat's schedule and queued messages: never rename them."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from marketplace.chain.client import chain_client
from marketplace.ledger.deposits import deposits_follow
from marketplace.ledger.earnings import earnings_sync
from marketplace.ledger.epochs import epoch_confirm, epoch_settle
from marketplace.ledger.models import Epoch
from marketplace.ledger.reconcile import chain_reconcile
from marketplace.ledger.wallets import wallet_changes_activate


@shared_task(name="ledger.sweep", acks_late=True)
def earnings_sync_task() -> dict[str, int]:
    # Payout-address changes take effect here too, within a sweep period of their time, not only when an
    # epoch closes: GET /api/v1/wallet/ then shows the address in effect.
    activated = wallet_changes_activate()
    return {**earnings_sync(), "wallet_changes_activated": activated}


@shared_task(name="ledger.settle_epoch", acks_late=True)
def epoch_settle_task() -> int | None:
    epoch = epoch_settle(client=chain_client())
    return epoch.number if epoch else None


@shared_task(name="ledger.follow_deposits", acks_late=True)
def deposits_follow_task() -> int:
    client = chain_client()
    credited = deposits_follow(client=client)
    for epoch_id in Epoch.objects.filter(state=Epoch.State.PUBLISHED).values_list("pk", flat=True):
        epoch_confirm(epoch_id=epoch_id, client=client)
    return credited


@shared_task(name="ledger.reconcile_chain", acks_late=True)
def chain_reconcile_task() -> dict[str, Any]:
    report = chain_reconcile(client=chain_client())
    return {"ok": report.ok, "differences": report.differences, **report.figures}
