"""Payout addresses are linked by signing a one-time challenge with the address's key (EIP-191), with the
account's password (test_wallet_changes.py: what the password and the change delay protect)."""

from datetime import timedelta

import pytest
from django.utils import timezone
from eth_account import Account as EthAccount
from eth_account.messages import encode_defunct

from marketplace.ledger.models import AuditEntry, WalletChallenge, WalletLink


def sign(key, message: str) -> str:
    return key.sign_message(encode_defunct(text=message)).signature.to_0x_hex()


@pytest.fixture
def challenge(api, contributor):
    response = api(contributor).get("/api/v1/wallet/challenge/")
    assert response.status_code == 200
    return response.json()


def link(api, user, **body):
    body.setdefault("password", f"{user.username}-password")  # the personas' (tests/conftest.py)
    return api(user).post("/api/v1/wallet/", body, format="json")


def test_a_contributor_links_the_address_whose_key_signed_the_challenge(api, contributor, challenge):
    key = EthAccount.create()

    response = link(api, contributor, nonce=challenge["nonce"], address=key.address.lower(),
                    signature=sign(key, challenge["message"]))

    assert response.status_code == 201, response.json()
    assert response.json()["address"] == key.address
    assert api(contributor).get("/api/v1/wallet/").json()["address"] == key.address
    assert AuditEntry.objects.filter(action="wallet.linked", actor=f"user:{contributor.pk}").exists()


def test_a_signature_by_another_key_is_refused(api, contributor, challenge):
    key, other = EthAccount.create(), EthAccount.create()

    response = link(api, contributor, nonce=challenge["nonce"], address=key.address,
                    signature=sign(other, challenge["message"]))

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "wallet_link_refused"
    assert response.json()["error"]["fields"] == {"signature": "wrong signer"}
    assert not WalletLink.objects.exists()


def test_a_garbled_signature_is_refused(api, contributor, challenge):
    key = EthAccount.create()

    response = link(api, contributor, nonce=challenge["nonce"], address=key.address, signature="0x" + "ab" * 65)

    assert response.status_code == 400
    assert not WalletLink.objects.exists()


def test_an_expired_challenge_is_refused(api, contributor, challenge):
    key = EthAccount.create()
    WalletChallenge.objects.filter(nonce=challenge["nonce"]).update(expires_at=timezone.now() - timedelta(seconds=1))

    response = link(api, contributor, nonce=challenge["nonce"], address=key.address,
                    signature=sign(key, challenge["message"]))

    assert response.status_code == 400
    assert response.json()["error"]["fields"] == {"nonce": "expired"}


def test_a_challenge_is_good_once(api, contributor, challenge):
    key = EthAccount.create()
    body = dict(nonce=challenge["nonce"], address=key.address, signature=sign(key, challenge["message"]))

    assert link(api, contributor, **body).status_code == 201
    assert link(api, contributor, **body).json()["error"]["fields"] == {"nonce": "used"}


def test_another_persons_challenge_cannot_be_used(api, contributor, other_contributor, challenge):
    key = EthAccount.create()

    response = link(api, other_contributor, nonce=challenge["nonce"], address=key.address,
                    signature=sign(key, challenge["message"]))

    assert response.json()["error"]["fields"] == {"nonce": "unknown"}


def test_without_a_change_delay_a_new_link_replaces_the_active_one_and_an_address_belongs_to_one_person(
        api, contributor, other_contributor, settings):
    settings.IDLEGRID_WALLET_CHANGE_DELAY_SECONDS = 0
    first, second = EthAccount.create(), EthAccount.create()
    for key in (first, second):
        c = api(contributor).get("/api/v1/wallet/challenge/").json()
        assert link(api, contributor, nonce=c["nonce"], address=key.address, signature=sign(key, c["message"])).status_code == 201
    c = api(other_contributor).get("/api/v1/wallet/challenge/").json()

    taken = link(api, other_contributor, nonce=c["nonce"], address=first.address, signature=sign(first, c["message"]))

    assert list(WalletLink.objects.filter(active=True).values_list("address", flat=True)) == [second.address]
    assert taken.json()["error"]["fields"] == {"address": "taken"}
