"""Payout addresses: a contributor proves they hold one by signing a one-time challenge (EIP-191
personal_sign), and the marketplace recovers the signer. One active address per user; an address
belongs to one user for good (its cumulative earnings on chain can only grow).

Linking needs the account's password too, so a stolen API token alone cannot redirect payouts. The first
address takes effect at once; one replacing an active address is pending for
IDLEGRID_WALLET_CHANGE_DELAY_SECONDS while payouts keep going to the old one, and the person is told by
email, naming both addresses and the time: a thief who has the password as well is seen, and cancelled,
before any money moves. Pending changes whose time has come are activated by `wallet_changes_activate`,
at the start of every epoch close and in the ledger sweep."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.models import User
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.utils import timezone
from eth_account import Account as EthAccount
from eth_account.messages import encode_defunct

from marketplace.chain.merkle import account_normalize
from marketplace.core.exceptions import Conflict, NotFound
from marketplace.ledger.deposits import suspense_claim
from marketplace.ledger.exceptions import WalletLinkRefused
from marketplace.ledger.models import AuditEntry, WalletChallenge, WalletLink

log = logging.getLogger(__name__)
# effective_at is nullable in the schema only: migration 0003 filled it in for older links, and every link
# is made with one.
_EFFECTIVE_AT_SET = "every payout-address link has an effective_at"


def wallet_challenge_create(*, user: User) -> WalletChallenge:
    nonce = secrets.token_hex(16)
    expires = timezone.now() + timedelta(seconds=settings.IDLEGRID_WALLET_CHALLENGE_SECONDS)
    message = (
        "Idlegrid: link this address to receive payouts.\n"
        f"Account: {user.get_username()} (#{user.pk})\n"
        f"Nonce: {nonce}\n"
        f"Expires: {expires.isoformat(timespec='seconds')}"
    )
    return WalletChallenge.objects.create(user=user, nonce=nonce, message=message, expires_at=expires)


def wallet_challenge_open(*, user: User, nonce: str | None, valid_for: timedelta = timedelta(minutes=2)) -> WalletChallenge | None:
    """The user's challenge `nonce` if it is unused and still valid for `valid_for`: a page shown again
    keeps its challenge instead of making a row per view."""
    if not nonce:
        return None
    return WalletChallenge.objects.filter(user=user, nonce=str(nonce)[:64], used_at__isnull=True,
                                          expires_at__gt=timezone.now() + valid_for).first()


def _recover(message: str, signature: str) -> str:
    if not isinstance(signature, str) or not signature.startswith("0x") or len(signature) != 132:
        raise WalletLinkRefused("the signature must be 0x and 130 hex digits (65 bytes)", fields={"signature": "malformed"})
    try:
        signer: str = EthAccount.recover_message(encode_defunct(text=message), signature=signature)
    except Exception:  # noqa: BLE001 - any undecodable signature is simply not a proof
        raise WalletLinkRefused("the signature could not be verified", fields={"signature": "invalid"}) from None
    return signer


@dataclass(frozen=True)
class WalletLinked:
    link: WalletLink  # the new link: active, or pending until link.effective_at
    previous: WalletLink | None  # the address it replaces (still active while the new one is pending)
    notified: str | None  # the email address the notice went to; None when the account has none


def wallet_link(*, user: User, password: str, nonce: str, address: str, signature: str) -> WalletLinked:
    """Link `address` as the user's payout address if `password` is the account's and `signature` is the
    address's EIP-191 signature of the challenge: at once when no address is active, else as a pending
    change (see the module's docstring). Nothing changes, and the challenge stays unused, on a refusal."""
    # check_password is False for an account without a usable password (account_create without --password).
    if not isinstance(password, str) or not user.check_password(password):
        raise WalletLinkRefused("the password is wrong (a payout address needs the account's password)",
                                fields={"password": "wrong"})
    try:
        address = account_normalize(address)
    except ValueError as exc:
        raise WalletLinkRefused(str(exc), fields={"address": "invalid"}) from None
    challenge = _challenge_usable(user, nonce)
    signer = _recover(challenge.message, signature)
    if signer != address:
        raise WalletLinkRefused(f"the signature was made by {signer}, not by {address}", fields={"signature": "wrong signer"})
    _address_free(user, address)
    try:
        linked = _link(user=user, challenge=challenge, address=address, signature=signature)
    except IntegrityError:  # a concurrent link or change of this account won the unique constraints
        raise Conflict("another payout-address change of this account happened at the same time; try again") from None
    if linked.link.active:
        suspense_claim(user_id=user.pk, address=address)
    if linked.previous is not None:
        _notice_send(user, linked.link, subject="your payout address is changing" if not linked.link.active
                     else "your payout address was changed", body=_change_notice(user, linked.link, linked.previous))
    return linked


def _challenge_usable(user: User, nonce: str) -> WalletChallenge:
    challenge = WalletChallenge.objects.filter(user=user, nonce=str(nonce)).first()
    if challenge is None:
        raise WalletLinkRefused("no such challenge for this account; ask for a new one", fields={"nonce": "unknown"})
    if challenge.used_at is not None:
        raise WalletLinkRefused("this challenge was used already; ask for a new one", fields={"nonce": "used"})
    if challenge.expires_at <= timezone.now():
        raise WalletLinkRefused("this challenge expired; ask for a new one", fields={"nonce": "expired"})
    return challenge


def _address_free(user: User, address: str) -> None:
    if WalletLink.objects.filter(address=address).exclude(user=user).exists():
        raise WalletLinkRefused("this address is linked to another account", fields={"address": "taken"})
    if WalletLink.objects.filter(user=user, active=True, address=address).exists():
        raise WalletLinkRefused("this address is your payout address already", fields={"address": "already active"})


def _link(*, user: User, challenge: WalletChallenge, address: str, signature: str) -> WalletLinked:
    with transaction.atomic(durable=True):
        if not WalletChallenge.objects.filter(pk=challenge.pk, used_at__isnull=True).update(used_at=timezone.now()):
            raise WalletLinkRefused("this challenge was used already; ask for a new one", fields={"nonce": "used"})
        now = timezone.now()
        previous = WalletLink.objects.select_for_update().filter(user=user, active=True).first()
        for pending in WalletLink.objects.select_for_update().filter(user=user, active=False, unlinked_at__isnull=True):
            _cancel(pending, actor=f"user:{user.pk}", reason=f"replaced by a newer change, to {address}", now=now)
        delay = settings.IDLEGRID_WALLET_CHANGE_DELAY_SECONDS
        immediate = previous is None or delay == 0
        if immediate and previous is not None:
            WalletLink.objects.filter(pk=previous.pk).update(active=False, unlinked_at=now)
        effective_at = now if immediate else now + timedelta(seconds=delay)
        link = WalletLink.objects.create(user=user, address=address, signature=signature.lower(), challenge=challenge,
                                         active=immediate, effective_at=effective_at)
        notified = (user.email or None) if previous is not None else None
        AuditEntry.objects.create(
            actor=f"user:{user.pk}", action="wallet.linked" if immediate else "wallet.change_requested",
            reason="password and EIP-191 challenge" + ("" if previous is None else f"; replaces {previous.address}"),
            data={"address": address, "challenge": challenge.nonce, "previous": previous and previous.address,
                  "effective_at": effective_at.isoformat(), "notice_to": notified})
    return WalletLinked(link=link, previous=previous, notified=notified)


def wallet_change_cancel(*, user: User) -> WalletLink:
    """Cancel the user's pending change; the active address stays. Needs no password: cancelling keeps the
    address the account already proved, so any of the person's tokens may do it (the owner who reads the
    notice may hold nothing else), and a thief's cancel of the owner's change moves no money either."""
    with transaction.atomic(durable=True):
        pending = WalletLink.objects.select_for_update().filter(user=user, active=False, unlinked_at__isnull=True).first()
        if pending is None:
            raise NotFound("no payout-address change is pending")
        _cancel(pending, actor=f"user:{user.pk}", reason="cancelled by the account", now=timezone.now())
    active = wallet_active(user=user)
    _notice_send(user, pending, subject="a payout-address change was cancelled", body=(
        f"The change of the payout address of your Idlegrid account {user.get_username()} (#{user.pk}) "
        f"to {pending.address} was cancelled.\n"
        f"Payouts keep going to {active.address if active else 'no address'}.\n"))
    return pending


def _cancel(link: WalletLink, *, actor: str, reason: str, now: datetime) -> None:
    assert link.effective_at is not None, _EFFECTIVE_AT_SET
    WalletLink.objects.filter(pk=link.pk).update(unlinked_at=now, cancelled_at=now)
    AuditEntry.objects.create(actor=actor, action="wallet.change_cancelled", reason=reason,
                              data={"address": link.address, "effective_at": link.effective_at.isoformat()})


def wallet_changes_activate(*, now: datetime | None = None, limit: int = 1000) -> int:
    """Activate the pending changes whose time has come; the replaced addresses stop receiving payouts.
    Safe to run twice and beside itself: each change moves only from pending, under its row lock."""
    now = now or timezone.now()
    due = list(WalletLink.objects.filter(active=False, unlinked_at__isnull=True, effective_at__lte=now)
               .order_by("effective_at").values_list("pk", flat=True)[:limit])
    return sum(_activate(link_id, now=now) for link_id in due)


def _activate(link_id: int, *, now: datetime) -> bool:
    try:
        with transaction.atomic(durable=True):
            link = (WalletLink.objects.select_for_update()
                    .filter(pk=link_id, active=False, unlinked_at__isnull=True, effective_at__lte=now).first())
            if link is None:  # activated or cancelled since it was read
                return False
            assert link.effective_at is not None, _EFFECTIVE_AT_SET
            previous = WalletLink.objects.select_for_update().filter(user_id=link.user_id, active=True).first()
            if previous is not None:
                WalletLink.objects.filter(pk=previous.pk).update(active=False, unlinked_at=now)
            WalletLink.objects.filter(pk=link.pk).update(active=True)
            AuditEntry.objects.create(actor="system:wallets", action="wallet.change_effective",
                                      reason=f"pending since {link.linked_at.isoformat()}",
                                      data={"address": link.address, "previous": previous and previous.address,
                                            "effective_at": link.effective_at.isoformat()})
    except IntegrityError:
        # The address became active for someone else meanwhile (linking refuses that, so a race): left pending.
        log.error("payout-address change %s could not take effect: its address is active elsewhere", link_id)
        return False

    suspense_claim(user_id=link.user_id, address=link.address)
    return True


def _change_notice(user: User, link: WalletLink, previous: WalletLink) -> str:
    assert link.effective_at is not None, _EFFECTIVE_AT_SET
    old, new = previous.address, link.address
    when = link.effective_at.isoformat(timespec="seconds")
    if link.active:
        return (f"The payout address of your Idlegrid account {user.get_username()} (#{user.pk}) was changed "
                f"from {old} to {new} at {when}, by someone with your password.\n")
    return (
        f"Someone with your password asked to change the payout address of your Idlegrid account "
        f"{user.get_username()} (#{user.pk}).\n\n"
        f"Old address: {old} (keeps receiving payouts until the change takes effect)\n"
        f"New address: {new}\n"
        f"Takes effect: {when}\n\n"
        "If this was not you, cancel it before then with any of your API tokens (DELETE /api/v1/wallet/pending/), "
        "have your password changed and revoke your tokens (POST /api/v1/auth/logout-all/).\n"
    )


def _notice_send(user: User, link: WalletLink, *, subject: str, body: str) -> None:
    """Email the person after the change committed (slow I/O outside the transaction). A notice that
    cannot be sent is logged and audited: the delay still holds, and the API answer says what happened."""
    if not user.email:
        return
    try:
        send_mail(f"Idlegrid: {subject}", body, None, [user.email])
    except Exception as exc:  # noqa: BLE001 - any mail failure (SMTP down, refused) is only reported
        log.exception("the notice of wallet link %s to user %s could not be sent", link.pk, user.pk)
        with transaction.atomic(durable=True):
            AuditEntry.objects.create(actor="system:wallets", action="wallet.notice_failed", reason=str(exc)[:500],
                                      data={"address": link.address, "notice_to": user.email})


def wallet_active(*, user: User) -> WalletLink | None:
    return WalletLink.objects.filter(user=user, active=True).first()


def wallet_pending(*, user: User) -> WalletLink | None:
    return WalletLink.objects.filter(user=user, active=False, unlinked_at__isnull=True).first()
