"""Changing the payout address needs the password, waits IDLEGRID_WALLET_CHANGE_DELAY_SECONDS while the old
address keeps being paid, tells the person by email, and can be cancelled (marketplace/ledger/wallets.py)."""

from datetime import timedelta

import pytest
from django.utils import timezone
from eth_account import Account as EthAccount
from eth_account.messages import encode_defunct
from ledgerkit import settled_earnings

from marketplace.ledger import tasks
from marketplace.ledger.epochs import epoch_close
from marketplace.ledger.models import AuditEntry, EpochLeaf, WalletChallenge, WalletLink
from marketplace.ledger.wallets import wallet_changes_activate

DELAY = 48 * 3600  # IDLEGRID_WALLET_CHANGE_DELAY_SECONDS' default


def link(api, user, key, *, password=None):
    """POST /api/v1/wallet/ as `user`, with a fresh challenge signed by `key`."""
    challenge = api(user).get("/api/v1/wallet/challenge/").json()
    signature = key.sign_message(encode_defunct(text=challenge["message"])).signature.to_0x_hex()
    body = {"nonce": challenge["nonce"], "address": key.address, "signature": signature,
            "password": f"{user.username}-password" if password is None else password}
    return api(user).post("/api/v1/wallet/", body, format="json")


def paid(address: str) -> int:
    """The address's cumulative amount in the latest epoch that has a leaf for it (0 when none)."""
    leaf = EpochLeaf.objects.filter(address=address).order_by("-epoch__number").first()
    return leaf.cumulative if leaf else 0


@pytest.fixture
def linked(api, contributor):
    """The contributor's first payout address, linked."""
    key = EthAccount.create()
    assert link(api, contributor, key).status_code == 201
    return key


def test_the_first_address_takes_effect_at_once(api, contributor, mailoutbox):
    key = EthAccount.create()

    response = link(api, contributor, key)

    assert response.status_code == 201, response.json()
    assert response.json()["address"] == key.address
    assert response.json()["pending"] is None
    assert api(contributor).get("/api/v1/wallet/").json()["address"] == key.address
    assert WalletLink.objects.get(user=contributor).active
    assert mailoutbox == []  # nothing replaced, no one to warn


def test_a_wrong_password_is_refused_and_nothing_changes(api, contributor, linked):
    key = EthAccount.create()

    response = link(api, contributor, key, password="contributor-guess")

    assert response.status_code == 400
    assert response.json()["error"]["fields"] == {"password": "wrong"}
    assert list(WalletLink.objects.values_list("address", "active")) == [(linked.address, True)]
    assert not AuditEntry.objects.filter(action="wallet.change_requested").exists()
    assert WalletChallenge.objects.filter(user=contributor, used_at__isnull=True).count() == 1  # not spent


def test_a_stolen_token_alone_cannot_link_the_first_address_either(api, contributor):
    response = link(api, contributor, EthAccount.create(), password="")

    assert response.status_code == 400
    assert not WalletLink.objects.exists()


def test_an_account_without_a_password_cannot_link_an_address(api, contributor):
    contributor.set_unusable_password()
    contributor.save()

    response = link(api, contributor, EthAccount.create(), password="!")

    assert response.status_code == 400
    assert response.json()["error"]["fields"] == {"password": "wrong"}


def test_a_replacement_is_pending_and_the_old_address_is_paid_until_it_takes_effect(api, contributor, linked):
    settled_earnings(contributor, 100, key="before")
    assert epoch_close() is not None
    new = EthAccount.create()

    response = link(api, contributor, new)

    assert response.status_code == 202, response.json()
    body = response.json()
    effective = WalletLink.objects.get(address=new.address).effective_at
    assert body["address"] == linked.address
    assert body["pending"]["address"] == new.address
    assert abs((effective - timezone.now()) - timedelta(seconds=DELAY)) < timedelta(seconds=60)
    shown = api(contributor).get("/api/v1/wallet/").json()
    assert (shown["address"], shown["pending"]["address"]) == (linked.address, new.address)
    assert shown["pending"]["effective_at"] == body["pending"]["effective_at"]

    settled_earnings(contributor, 20, key="during")
    assert epoch_close(now=effective - timedelta(seconds=1)) is not None
    assert (paid(linked.address), paid(new.address)) == (120, 0)

    settled_earnings(contributor, 3, key="after")
    assert epoch_close(now=effective + timedelta(seconds=1)) is not None
    assert (paid(linked.address), paid(new.address)) == (120, 3)
    assert api(contributor).get("/api/v1/wallet/").json() == {
        "address": new.address, "linked_at": body["pending"]["requested_at"], "pending": None}
    assert AuditEntry.objects.get(action="wallet.change_effective").data["previous"] == linked.address


def test_the_person_is_told_by_email_naming_both_addresses_and_when(api, contributor, linked, mailoutbox):
    contributor.email = "contributor@example.org"
    contributor.save()
    new = EthAccount.create()

    response = link(api, contributor, new)

    effective = WalletLink.objects.get(address=new.address).effective_at.isoformat(timespec="seconds")
    assert len(mailoutbox) == 1
    notice = mailoutbox[0]
    assert notice.to == ["contributor@example.org"]
    assert linked.address in notice.body and new.address in notice.body and effective in notice.body
    assert "DELETE /api/v1/wallet/pending/" in notice.body
    audit = AuditEntry.objects.get(action="wallet.change_requested")
    assert audit.data["notice_to"] == "contributor@example.org"
    assert (audit.data["previous"], audit.data["address"]) == (linked.address, new.address)
    assert "went to the account's email address" in response.json()["notice"]


def test_the_answer_says_when_nobody_could_be_told(api, contributor, linked, mailoutbox):
    response = link(api, contributor, EthAccount.create())

    assert response.status_code == 202
    assert "nobody was told" in response.json()["notice"]
    assert AuditEntry.objects.get(action="wallet.change_requested").data["notice_to"] is None
    assert mailoutbox == []


def test_a_notice_that_cannot_be_sent_is_audited_and_the_change_still_waits(api, contributor, linked, monkeypatch):
    contributor.email = "contributor@example.org"
    contributor.save()

    def refuse(*args, **kwargs):
        raise ConnectionRefusedError("smtp down")

    monkeypatch.setattr("marketplace.ledger.wallets.send_mail", refuse)

    response = link(api, contributor, EthAccount.create())

    assert response.status_code == 202
    assert AuditEntry.objects.get(action="wallet.notice_failed").data["notice_to"] == "contributor@example.org"
    assert WalletLink.objects.get(user=contributor, active=True).address == linked.address


def test_the_person_cancels_a_pending_change_with_a_token_alone(api, contributor, linked, mailoutbox):
    contributor.email = "contributor@example.org"
    contributor.save()
    new = EthAccount.create()
    assert link(api, contributor, new).status_code == 202

    response = api(contributor).delete("/api/v1/wallet/pending/")

    assert response.status_code == 200
    assert response.json() == {"address": linked.address, "linked_at": response.json()["linked_at"], "pending": None}
    assert wallet_changes_activate(now=timezone.now() + timedelta(seconds=DELAY + 1)) == 0
    assert WalletLink.objects.get(user=contributor, active=True).address == linked.address
    assert WalletLink.objects.get(address=new.address).cancelled_at is not None
    assert AuditEntry.objects.filter(action="wallet.change_cancelled").count() == 1
    assert "was cancelled" in mailoutbox[-1].body
    assert api(contributor).delete("/api/v1/wallet/pending/").status_code == 404


def test_a_newer_change_replaces_the_pending_one(api, contributor, linked):
    second, third = EthAccount.create(), EthAccount.create()
    assert link(api, contributor, second).status_code == 202

    assert link(api, contributor, third).status_code == 202

    pending = WalletLink.objects.filter(user=contributor, active=False, unlinked_at__isnull=True)
    assert list(pending.values_list("address", flat=True)) == [third.address]
    assert WalletLink.objects.get(address=second.address).cancelled_at is not None


def test_activation_is_idempotent_and_audited_once(api, contributor, linked):
    new = EthAccount.create()
    assert link(api, contributor, new).status_code == 202
    later = timezone.now() + timedelta(seconds=DELAY + 1)

    assert wallet_changes_activate(now=later) == 1
    assert wallet_changes_activate(now=later) == 0

    assert list(WalletLink.objects.filter(active=True).values_list("address", flat=True)) == [new.address]
    assert WalletLink.objects.get(address=linked.address).unlinked_at == later
    assert AuditEntry.objects.filter(action="wallet.change_effective").count() == 1


def test_the_ledger_sweep_activates_changes_that_are_due(api, contributor, linked):
    new = EthAccount.create()
    assert link(api, contributor, new).status_code == 202
    assert tasks.earnings_sync_task()["wallet_changes_activated"] == 0  # not due yet
    WalletLink.objects.filter(address=new.address).update(effective_at=timezone.now() - timedelta(seconds=1))

    assert tasks.earnings_sync_task()["wallet_changes_activated"] == 1

    assert api(contributor).get("/api/v1/wallet/").json()["address"] == new.address
