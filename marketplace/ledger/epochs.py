"""Epochs: what has settled moves to the payout addresses, their cumulative amounts become the leaves
of a Merkle tree, and its root goes to the PayoutLedger contract in one transaction.

Pure: the leaves of epoch n are the balances of the payout-address accounts over the postings of epochs
1..n (nothing else ever writes to those accounts), so `epoch_leaves(number=n)` recomputed at any time
gives the same root (`epoch_verify`).

Crash-safe publishing: a nonce is reserved on the Epoch row before anything is sent and every
transaction hash is recorded as soon as the node returns it; a re-run first asks the chain whether the
epoch is there already, then looks up recorded receipts, and sends again only with the same nonce
(so at most one of its transactions can be mined). The contract also refuses a second root for an epoch.

Solvent publishing: a root may commit at most what the contract can pay, its token balance plus what claims
already took out (PayoutLedger refuses more with RootExceedsFunds). `epoch_publish` checks that first and
refuses an underfunded epoch before a nonce is reserved, so earnings the chain does not hold (a grant, a
known answer paid by the platform, a deposit not made yet) never become claims against other people's
deposits; `epoch_settle` tries again on its next run.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from marketplace.chain.merkle import tree_build
from marketplace.ledger.earnings import earnings_settle
from marketplace.ledger.exceptions import EpochOutOfOrder, EpochUnderfunded
from marketplace.ledger.fields import AmountSum
from marketplace.ledger.models import Account, AuditEntry, Epoch, EpochLeaf, Line, Posting, WalletLink
from marketplace.ledger.postings import account_get, posting_write
from marketplace.ledger.wallets import wallet_changes_activate
from marketplace.webhooks import catalog
from marketplace.webhooks.services import event_emit, owners_listening

if TYPE_CHECKING:
    from marketplace.chain.client import ChainClient

log = logging.getLogger(__name__)
K = Account.Kind


def epoch_leaves(*, number: int) -> list[tuple[str, int]]:
    """(address, cumulative amount) of every payout address after epoch `number`, from the ledger alone."""
    rows = (Line.objects.filter(account__kind=K.PAYOUT_ADDRESS, posting__epoch__number__lte=number)
            .values("account__address").annotate(total=AmountSum("amount")).values_list("account__address", "total"))
    return sorted((address, int(total)) for address, total in rows if total and int(total) > 0)


def epoch_close(*, now: datetime | None = None) -> Epoch | None:
    """Settle what is due, then move every linked contributor's settled earnings to their payout address
    and build the tree of all addresses' cumulative amounts. None if no address's amount changed."""
    # Payout-address changes due by now first: the epoch pays the address in effect at its close, and
    # never a pending one (_epoch_post reads active links only).
    wallet_changes_activate(now=now)
    earnings_settle(now=now)
    try:
        return _epoch_post()
    except IntegrityError:  # another closer took this epoch number first
        log.info("epoch close raced another; nothing new here")
        return None


def _epoch_post() -> Epoch | None:
    with transaction.atomic(durable=True):
        latest = Epoch.objects.order_by("-number").first()
        number = (latest.number if latest else 0) + 1
        addresses = dict(WalletLink.objects.filter(active=True).values_list("user_id", "address"))
        settled = (Account.objects.filter(kind=K.CONTRIBUTOR_SETTLED, user_id__in=list(addresses))
                   .annotate(left=AmountSum("lines__amount")).values_list("pk", "user_id", "left"))
        entries = []
        for account_id, user_id, left in settled:
            if left and int(left) > 0:
                entries += [(Account.objects.get(pk=account_id), -int(left)),
                            (account_get(K.PAYOUT_ADDRESS, address=addresses[user_id]), int(left))]
        if not entries:
            return None
        posting = posting_write(kind=Posting.Kind.EPOCH, key=f"epoch:{number}", actor="system:settlement",
                                reason=f"epoch {number}: settled earnings to payout addresses", entries=entries)
        if posting is None:
            return None
        epoch = Epoch.objects.create(number=number, posting=posting, root="", total=0, leaf_count=0)
        tree = tree_build(leaves=epoch_leaves(number=number))
        epoch.root, epoch.total, epoch.leaf_count = "0x" + tree.root.hex(), tree.total, len(tree)
        epoch.save(update_fields=["root", "total", "leaf_count"])
        EpochLeaf.objects.bulk_create(
            [EpochLeaf(epoch=epoch, address=address, cumulative=amount,
                       proof=["0x" + node.hex() for node in tree.proof(address)]) for address, amount in tree.leaves],
            batch_size=2000,
        )
    log.info("epoch %s closed: root %s, total %s over %s addresses", number, epoch.root, epoch.total, epoch.leaf_count)
    return epoch


def epoch_verify(*, epoch_id: int) -> bool:
    """Whether the stored root is still what the ledger gives (it always should be)."""
    epoch = Epoch.objects.get(pk=epoch_id)
    tree = tree_build(leaves=epoch_leaves(number=epoch.number))
    return "0x" + tree.root.hex() == epoch.root and tree.total == epoch.total


# --- publishing -----------------------------------------------------------------------------------

def _mark_published(epoch: Epoch, *, client: ChainClient, block_number: int | None, how: str) -> None:
    onchain_root = client.published_root() if client.published_epoch() == epoch.number else None
    if onchain_root is not None and "0x" + onchain_root.hex() != epoch.root:
        log.error("epoch %s: the chain holds root 0x%s, the ledger %s", epoch.number, onchain_root.hex(), epoch.root)
    # Without a receipt, the head now is a block at or after the one that mined it: counting depth from
    # it only waits longer, never less.
    block = block_number if block_number is not None else client.block_number()
    with transaction.atomic(durable=True):
        moved = Epoch.objects.filter(pk=epoch.pk, state__in=(Epoch.State.CLOSED, Epoch.State.SENDING)).update(
            state=Epoch.State.PUBLISHED, block_number=block, published_at=timezone.now(), chain_id=client.chain_id)
        if moved:
            AuditEntry.objects.create(actor="system:settlement", action="epoch.published", reason=how,
                                      data={"epoch": epoch.number, "tx_hash": epoch.tx_hash, "block": block})
            epoch.refresh_from_db()
            _published_tell(epoch)
    epoch.refresh_from_db()


def _published_tell(epoch: Epoch) -> None:
    """payout.epoch_published to each person with a payout address in the epoch who has an endpoint that
    listens (their cumulative amounts are claimable now), in the transaction that marks it published."""
    listening = owners_listening(type=catalog.PAYOUT_EPOCH_PUBLISHED)
    if not listening:
        return
    owner_of = dict(WalletLink.objects.filter(user_id__in=listening).values_list("address", "user_id"))
    payouts: dict[int, list[dict[str, str]]] = {}
    for address, cumulative in EpochLeaf.objects.filter(epoch=epoch, address__in=list(owner_of)).values_list(
            "address", "cumulative"):
        payouts.setdefault(owner_of[address], []).append({"address": address, "cumulative": str(cumulative)})
    about = {"number": epoch.number, "root": epoch.root, "state": epoch.state, "tx_hash": epoch.tx_hash,
             "block_number": epoch.block_number, "chain_id": epoch.chain_id,
             "contract": settings.IDLEGRID_CHAIN_CONTRACT, "published_at": epoch.published_at}
    for user_id, rows in sorted(payouts.items()):
        event_emit(owner_id=user_id, type=catalog.PAYOUT_EPOCH_PUBLISHED, data={"epoch": about, "payouts": rows})


def _nonce_reserve(epoch: Epoch, *, client: ChainClient) -> int:
    nonce = client.operator_nonce(pending=True)
    with transaction.atomic(durable=True):
        Epoch.objects.filter(pk=epoch.pk, nonce__isnull=True).update(nonce=nonce, state=Epoch.State.SENDING,
                                                                      chain_id=client.chain_id)
        AuditEntry.objects.create(actor="system:settlement", action="epoch.nonce_reserved",
                                  data={"epoch": epoch.number, "nonce": nonce})
    epoch.refresh_from_db()
    assert epoch.nonce is not None, f"epoch {epoch.number}: no nonce after reserving one"
    return epoch.nonce


def _record_sent(epoch: Epoch, tx_hash: str) -> None:
    with transaction.atomic(durable=True):
        row = Epoch.objects.select_for_update().get(pk=epoch.pk)
        row.attempts = [*row.attempts, {"nonce": row.nonce, "tx_hash": tx_hash, "at": timezone.now().isoformat()}]
        row.tx_hash = tx_hash
        row.save(update_fields=["attempts", "tx_hash"])
        AuditEntry.objects.create(actor="system:settlement", action="epoch.sent",
                                  data={"epoch": epoch.number, "nonce": row.nonce, "tx_hash": tx_hash})
    epoch.refresh_from_db()


def _nonce_release(epoch: Epoch, why: str) -> None:
    """The reserved nonce was used by a transaction that did not publish this epoch (it reverted): a new
    one is reserved on the next send. Safe: the contract takes at most one root per epoch."""
    log.error("epoch %s: nonce %s was used without publishing it (%s); a new nonce will be reserved",
              epoch.number, epoch.nonce, why)
    with transaction.atomic(durable=True):
        Epoch.objects.filter(pk=epoch.pk, nonce=epoch.nonce).update(nonce=None, tx_hash="")
        AuditEntry.objects.create(actor="system:settlement", action="epoch.nonce_released", reason=why,
                                  data={"epoch": epoch.number, "nonce": epoch.nonce})
    epoch.refresh_from_db()


def _funds_check(epoch: Epoch, *, client: ChainClient) -> None:
    """EpochUnderfunded unless the contract can pay the epoch's total (its rule for publishRoot), so an
    underfunded root is never sent: sending it would only spend a nonce and gas on a revert."""
    # totalClaimed first: a claim landing between the two reads then lowers the sum (the balance is read
    # after the tokens left) instead of counting the claimed amount twice. The sum never falls otherwise
    # (deposits add to the balance, claims move tokens from the balance to totalClaimed).
    claimed = client.total_claimed()
    held = client.token_balance(client.contract_address)
    funds = held + claimed
    if epoch.total <= funds:
        return
    shortfall = epoch.total - funds
    why = (f"epoch {epoch.number} commits {epoch.total} but the contract can pay {funds} "
           f"(holds {held}, claims paid {claimed}): short by {shortfall}")
    log.error("%s; not sent, published once deposits cover it", why)
    with transaction.atomic(durable=True):
        AuditEntry.objects.create(actor="system:settlement", action="epoch.underfunded", reason=why,
                                  data={"epoch": epoch.number, "total": str(epoch.total), "held": str(held),
                                        "claimed": str(claimed), "shortfall": str(shortfall)})
    raise EpochUnderfunded(why)


def epoch_publish(*, epoch_id: int, client: ChainClient) -> str:
    """Publish the epoch's root on chain, exactly once, whatever crashed before. Returns the transaction
    hash ("" if the chain had the epoch and no hash was ever recorded here). EpochUnderfunded, with nothing
    reserved or sent, while the contract cannot pay the epoch's total."""
    epoch = Epoch.objects.get(pk=epoch_id)
    if epoch.state in (Epoch.State.PUBLISHED, Epoch.State.FINAL):
        return epoch.tx_hash
    onchain = client.published_epoch()
    if onchain >= epoch.number:
        _mark_published(epoch, client=client, block_number=None, how="the chain already holds this epoch")
        return epoch.tx_hash
    if onchain < epoch.number - 1:
        raise EpochOutOfOrder(f"epoch {epoch.number} waits for epoch {onchain + 1} to be published first")
    if epoch.nonce is not None:
        settled = _resolve_reserved_nonce(epoch, client=client)
        if settled is not None:
            return settled
    _funds_check(epoch, client=client)
    nonce = epoch.nonce if epoch.nonce is not None else _nonce_reserve(epoch, client=client)
    gas_price = settings.IDLEGRID_CHAIN_GAS_PRICE_WEI
    tx_hash = client.publish_root_send(epoch=epoch.number, root=bytes.fromhex(epoch.root[2:]), total=epoch.total,
                                       nonce=nonce, gas_price_wei=gas_price)
    _record_sent(epoch, tx_hash)
    log.info("epoch %s sent: nonce %s, transaction %s", epoch.number, nonce, tx_hash)
    receipt = client.tx_receipt(tx_hash)
    if receipt is not None and receipt.status == 1:
        _mark_published(epoch, client=client, block_number=receipt.block_number, how="receipt")
    return tx_hash


def _resolve_reserved_nonce(epoch: Epoch, *, client: ChainClient) -> str | None:
    """A nonce is reserved, so something may have been sent. The hash if the epoch is now known to be
    published; None to (re-)send with the reserved nonce, or with a new one if it was spent in vain."""
    if epoch.tx_hash:
        receipt = client.tx_receipt(epoch.tx_hash)
        if receipt is not None and receipt.status == 1:
            _mark_published(epoch, client=client, block_number=receipt.block_number, how="receipt")
            return epoch.tx_hash
        if receipt is not None:
            _nonce_release(epoch, f"transaction {epoch.tx_hash} reverted")
            return None
    assert epoch.nonce is not None, f"epoch {epoch.number}: no reserved nonce"  # epoch_publish's condition
    if client.operator_nonce(pending=False) > epoch.nonce:
        # The nonce is spent. Read the contract again: the transaction may have been mined since we asked.
        if client.published_epoch() >= epoch.number:
            _mark_published(epoch, client=client, block_number=None, how="nonce spent and the chain holds the epoch")
            return epoch.tx_hash
        _nonce_release(epoch, "nonce spent but the epoch is not on chain")
    return None


def epoch_confirm(*, epoch_id: int, client: ChainClient) -> bool:
    """Mark a published epoch final once its block is IDLEGRID_CHAIN_CONFIRMATIONS deep and the contract
    still holds it; a reorg that dropped it sends it back to be published again (same nonce)."""
    epoch = Epoch.objects.get(pk=epoch_id)
    if epoch.state == Epoch.State.FINAL:
        return True
    if epoch.state != Epoch.State.PUBLISHED:
        return False
    if client.published_epoch() < epoch.number:
        log.error("epoch %s was published but the contract no longer holds it (a reorg); sending it again", epoch.number)
        Epoch.objects.filter(pk=epoch.pk, state=Epoch.State.PUBLISHED).update(state=Epoch.State.SENDING)
        return False
    if client.block_number() - (epoch.block_number or 0) < settings.IDLEGRID_CHAIN_CONFIRMATIONS:
        return False
    with transaction.atomic(durable=True):
        moved = Epoch.objects.filter(pk=epoch.pk, state=Epoch.State.PUBLISHED).update(
            state=Epoch.State.FINAL, final_at=timezone.now())
        if moved:
            AuditEntry.objects.create(actor="system:settlement", action="epoch.final", data={"epoch": epoch.number})
    return True


def epoch_settle(*, client: ChainClient, now: datetime | None = None) -> Epoch | None:
    """The periodic settlement: confirm what was published, finish publishing an epoch still on its way
    (epochs reach the contract in order), else close a new epoch and publish it. An underfunded epoch
    waits (logged and audited by epoch_publish) and is tried again on the next run."""
    for epoch_id in Epoch.objects.filter(state=Epoch.State.PUBLISHED).values_list("pk", flat=True):
        epoch_confirm(epoch_id=epoch_id, client=client)
    waiting = Epoch.objects.filter(state__in=(Epoch.State.CLOSED, Epoch.State.SENDING)).order_by("number").first()
    if waiting is not None:
        _publish_when_funded(epoch_id=waiting.pk, client=client)
        return waiting
    epoch = epoch_close(now=now)
    if epoch is not None:
        _publish_when_funded(epoch_id=epoch.pk, client=client)
    return epoch


def _publish_when_funded(*, epoch_id: int, client: ChainClient) -> None:
    try:
        epoch_publish(epoch_id=epoch_id, client=client)
    except EpochUnderfunded:
        # Not a failure of the run: raising would make the periodic task fail every time until a deposit
        # arrives, and a later run publishes the same epoch (nothing was reserved or sent).
        return
