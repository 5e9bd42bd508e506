"""Payout addresses: a contributor proves they hold one by signing a one-time challenge (EIP-191
personal_sign), and the marketplace recovers the signer. One active address per user; an address
belongs to one user for good (its cumulative earnings on chain can only grow)."""

from __future__ import annotations

import secrets
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone
from eth_account import Account as EthAccount
from eth_account.messages import encode_defunct

from marketplace.chain.merkle import account_normalize
from marketplace.ledger.exceptions import WalletLinkRefused
from marketplace.ledger.models import AuditEntry, WalletChallenge, WalletLink


def challenge_seconds() -> int:
    return int(getattr(settings, "IDLEGRID_WALLET_CHALLENGE_SECONDS", 600))


def wallet_challenge_create(*, user: AbstractBaseUser) -> WalletChallenge:
    nonce = secrets.token_hex(16)
    expires = timezone.now() + timedelta(seconds=challenge_seconds())
    message = (
        "Idlegrid: link this address to receive payouts.\n"
        f"Account: {user.get_username()} (#{user.pk})\n"
        f"Nonce: {nonce}\n"
        f"Expires: {expires.isoformat(timespec='seconds')}"
    )
    return WalletChallenge.objects.create(user=user, nonce=nonce, message=message, expires_at=expires)


def _recover(message: str, signature: str) -> str:
    if not isinstance(signature, str) or not signature.startswith("0x") or len(signature) != 132:
        raise WalletLinkRefused("the signature must be 0x and 130 hex digits (65 bytes)", fields={"signature": "malformed"})
    try:
        return EthAccount.recover_message(encode_defunct(text=message), signature=signature)
    except Exception:  # noqa: BLE001 - any undecodable signature is simply not a proof
        raise WalletLinkRefused("the signature could not be verified", fields={"signature": "invalid"}) from None


def wallet_link(*, user: AbstractBaseUser, nonce: str, address: str, signature: str) -> WalletLink:
    """Link `address` as the user's payout address if `signature` is its EIP-191 signature of the challenge."""
    try:
        address = account_normalize(address)
    except ValueError as exc:
        raise WalletLinkRefused(str(exc), fields={"address": "invalid"}) from None
    challenge = WalletChallenge.objects.filter(user=user, nonce=str(nonce)).first()
    if challenge is None:
        raise WalletLinkRefused("no such challenge for this account; ask for a new one", fields={"nonce": "unknown"})
    if challenge.used_at is not None:
        raise WalletLinkRefused("this challenge was used already; ask for a new one", fields={"nonce": "used"})
    if challenge.expires_at <= timezone.now():
        raise WalletLinkRefused("this challenge expired; ask for a new one", fields={"nonce": "expired"})
    signer = _recover(challenge.message, signature)
    if signer != address:
        raise WalletLinkRefused(f"the signature was made by {signer}, not by {address}", fields={"signature": "wrong signer"})
    if WalletLink.objects.filter(address=address).exclude(user=user).exists():
        raise WalletLinkRefused("this address is linked to another account", fields={"address": "taken"})
    with transaction.atomic(durable=True):
        if not WalletChallenge.objects.filter(pk=challenge.pk, used_at__isnull=True).update(used_at=timezone.now()):
            raise WalletLinkRefused("this challenge was used already; ask for a new one", fields={"nonce": "used"})
        now = timezone.now()
        WalletLink.objects.filter(user=user, active=True).update(active=False, unlinked_at=now)
        link = WalletLink.objects.create(user=user, address=address, signature=signature.lower(), challenge=challenge)
        AuditEntry.objects.create(actor=f"user:{user.pk}", action="wallet.linked", reason="EIP-191 challenge signed",
                                  data={"address": address, "challenge": challenge.nonce})
    from marketplace.ledger.chain import suspense_claim

    suspense_claim(user_id=user.pk, address=address)
    return link


def wallet_active(*, user: AbstractBaseUser) -> WalletLink | None:
    return WalletLink.objects.filter(user=user, active=True).first()
