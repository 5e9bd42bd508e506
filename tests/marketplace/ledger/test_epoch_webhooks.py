"""payout.epoch_published: once an epoch's root is on chain, each person paid in it who has a webhook
endpoint is told their payout addresses' cumulative amounts (claimable now); nobody else is written for."""

from __future__ import annotations

import pytest
from ledgerkit import link_wallet, settled_earnings

from marketplace.ledger.epochs import epoch_close, epoch_publish
from marketplace.webhooks import catalog
from marketplace.webhooks.models import Delivery, Event
from marketplace.webhooks.services import endpoint_create

DEPOSITOR = "0x" + "22" * 20


@pytest.fixture(autouse=True)
def loopback(settings):
    settings.IDLEGRID_WEBHOOKS_ALLOW_PRIVATE = True
    settings.IDLEGRID_WEBHOOKS_ALLOW_HTTP = True


def test_each_paid_person_with_an_endpoint_is_told_once(chain, django_user_model):
    alice, bob, carol = (django_user_model.objects.create_user(name) for name in ("alice", "bob", "carol"))
    keys = {user.pk: link_wallet(user) for user in (alice, bob)}
    settled_earnings(alice, 5 * 10**20, key="earn:alice")
    settled_earnings(bob, 7, key="earn:bob")
    endpoint = endpoint_create(owner_id=alice.pk, url="http://127.0.0.1:9/hooks")
    endpoint_create(owner_id=carol.pk, url="http://127.0.0.1:9/hooks")  # listens, but was paid nothing
    chain.deposit(DEPOSITOR, 10**21)
    epoch = epoch_close()

    epoch_publish(epoch_id=epoch.pk, client=chain)
    epoch_publish(epoch_id=epoch.pk, client=chain)  # already published: told once

    (event,) = Event.objects.filter(type=catalog.PAYOUT_EPOCH_PUBLISHED)
    assert event.owner_id == alice.pk and Delivery.objects.get(event=event).endpoint_id == endpoint.pk
    assert event.data["payouts"] == [{"address": keys[alice.pk].address, "cumulative": str(5 * 10**20)}]
    epoch.refresh_from_db()
    assert {k: event.data["epoch"][k] for k in ("number", "root", "state", "tx_hash")} == {
        "number": 1, "root": epoch.root, "state": "published", "tx_hash": epoch.tx_hash}
