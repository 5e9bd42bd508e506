"""Helpers shared by the ledger tests (imported by path: the test folders are not packages)."""

from __future__ import annotations

from django.db import transaction
from eth_account import Account as EthAccount
from eth_account.messages import encode_defunct

from marketplace.ledger.models import Account, Posting
from marketplace.ledger.postings import account_get, posting_write
from marketplace.ledger.wallets import wallet_challenge_create, wallet_link


def link_wallet(user, key=None):
    """Link a payout address to `user` the way a contributor does (password and signed challenge); returns
    the key. Linking needs the account's password: the user gets the personas' one (tests/conftest.py),
    which accounts made here with create_user(name) alone lack."""
    password = f"{user.username}-password"
    if not user.check_password(password):
        user.set_password(password)
        user.save(update_fields=["password"])
    key = key or EthAccount.create()
    challenge = wallet_challenge_create(user=user)
    signature = key.sign_message(encode_defunct(text=challenge.message)).signature.to_0x_hex()
    wallet_link(user=user, password=password, nonce=challenge.nonce, address=key.address, signature=signature)
    return key


def settled_earnings(user, amount: int, key: str) -> None:
    """Earnings past their audit window for `user`, as the settlement leaves them (granted here by the platform)."""
    with transaction.atomic(durable=True):
        posting_write(kind=Posting.Kind.SETTLEMENT, key=key, actor="tests", reason="earnings for a test",
                      entries=[(account_get(Account.Kind.PLATFORM_GRANTS), -amount),
                               (account_get(Account.Kind.CONTRIBUTOR_SETTLED, user_id=user.pk), amount)])
