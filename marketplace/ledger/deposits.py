"""Deposits: crediting them, following the contract's Deposited events, and a user's suspense claimed.

The follower reads only blocks at least IDLEGRID_CHAIN_CONFIRMATIONS deep, so a reorganisation within
that depth never reaches the ledger. It keeps a cursor (the last block read and its hash) and recent
checkpoints; if the cursor's block hash is no longer the chain's, the chain was reorganised deeper than
the depth: it logs an error and rewinds to the newest checkpoint still on the chain, and reading again
credits nothing twice (a deposit is credited once per (chain, transaction, log index)).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import IntegrityError, transaction

from marketplace.chain.merkle import account_normalize
from marketplace.ledger.models import Account, ChainCheckpoint, ChainCursor, Deposit, Posting, WalletLink
from marketplace.ledger.postings import account_get, balance, posting_write

if TYPE_CHECKING:
    from marketplace.chain.client import ChainClient

log = logging.getLogger(__name__)
K = Account.Kind
BLOCKS_PER_READ = 2000
CHECKPOINTS_KEPT = 64


def _tx_hash_check(value: str) -> str:
    if not isinstance(value, str) or len(value) != 66 or not value.startswith("0x"):
        raise ValueError(f"a hash is 0x and 64 hex digits, got {value!r}")
    int(value[2:], 16)
    return value.lower()


def deposit_credit(*, chain_id: int, tx_hash: str, log_index: int, block_number: int, block_hash: str,
                   depositor: str, amount: int) -> bool:
    """Credit one Deposited event: to the balance of the account that linked the depositor's address, or
    to that address's suspense account until someone links it. True if newly credited; once per event."""
    tx_hash, block_hash, depositor = _tx_hash_check(tx_hash), _tx_hash_check(block_hash), account_normalize(depositor)
    for name, value in (("chain_id", chain_id), ("log_index", log_index), ("block_number", block_number), ("amount", amount)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if amount == 0 or Deposit.objects.filter(chain_id=chain_id, tx_hash=tx_hash, log_index=log_index).exists():
        return False
    try:
        with transaction.atomic(durable=True):
            link = WalletLink.objects.filter(address=depositor, active=True).first()
            target = (account_get(K.SUBMITTER_BALANCE, user_id=link.user_id) if link
                      else account_get(K.CHAIN_SUSPENSE, address=depositor))
            posting = posting_write(
                kind=Posting.Kind.DEPOSIT, key=f"deposit:{chain_id}:{tx_hash}:{log_index}", actor="system:chain",
                reason=f"Deposited by {depositor} in block {block_number}",
                entries=[(account_get(K.CHAIN_CUSTODY), -amount), (target, amount)],
                data={"tx_hash": tx_hash, "log_index": log_index, "block": block_number, "depositor": depositor},
            )
            if posting is None:
                return False
            Deposit.objects.create(chain_id=chain_id, tx_hash=tx_hash, log_index=log_index, block_number=block_number,
                                   block_hash=block_hash, depositor=depositor, amount=amount, posting=posting)
    except IntegrityError:  # the same event credited by a racing follower
        return False
    return True


def suspense_claim(*, user_id: int, address: str) -> Posting | None:
    """Deposits that arrived from an address before its holder linked it move to their balance."""
    address = account_normalize(address)
    with transaction.atomic(durable=True):
        suspense = account_get(K.CHAIN_SUSPENSE, address=address)
        waiting = balance(suspense)
        if waiting <= 0:
            return None
        sequence = Posting.objects.filter(idempotency_key__startswith=f"suspense:{address}:").count()
        return posting_write(
            kind=Posting.Kind.SUSPENSE_CLAIM, key=f"suspense:{address}:{sequence}", actor=f"user:{user_id}",
            reason="deposits from an address its holder has now linked",
            entries=[(suspense, -waiting), (account_get(K.SUBMITTER_BALANCE, user_id=user_id), waiting)],
        )


# --- the follower ---------------------------------------------------------------------------------

def _cursor(client: ChainClient) -> ChainCursor:
    start = settings.IDLEGRID_CHAIN_START_BLOCK
    cursor, _ = ChainCursor.objects.get_or_create(chain_id=client.chain_id,
                                                  defaults={"block_number": start - 1, "block_hash": ""})
    return cursor


def _rewind(cursor: ChainCursor, client: ChainClient) -> None:
    """The cursor's block is no longer on the chain: back to the newest checkpoint that still is."""
    log.error("chain %s reorganised below block %s, deeper than %s confirmations: rewinding the deposit follower",
              client.chain_id, cursor.block_number, settings.IDLEGRID_CHAIN_CONFIRMATIONS)
    for point in ChainCheckpoint.objects.filter(chain_id=cursor.chain_id, block_number__lt=cursor.block_number).order_by("-block_number"):
        if client.block_hash(point.block_number) == point.block_hash:
            cursor.block_number, cursor.block_hash = point.block_number, point.block_hash
            break
    else:
        cursor.block_number, cursor.block_hash = settings.IDLEGRID_CHAIN_START_BLOCK - 1, ""
    cursor.save(update_fields=["block_number", "block_hash", "updated_at"])
    orphaned = [d.tx_hash for d in Deposit.objects.filter(chain_id=cursor.chain_id, block_number__gt=cursor.block_number)
                if client.block_hash(d.block_number) != d.block_hash]
    if orphaned:
        log.error("deposits credited from blocks no longer on the chain (check them by hand): %s", orphaned)


def deposits_follow(*, client: ChainClient, max_reads: int = 50) -> int:
    """Read Deposited events up to the confirmed head from where the cursor stopped; credit each once.
    Returns the number of deposits newly credited."""
    cursor = _cursor(client)
    if cursor.block_hash and client.block_hash(cursor.block_number) != cursor.block_hash:
        _rewind(cursor, client)
    credited = 0
    for _ in range(max_reads):
        safe = client.block_number() - settings.IDLEGRID_CHAIN_CONFIRMATIONS
        start = cursor.block_number + 1
        if start > safe:
            break
        end = min(safe, start + BLOCKS_PER_READ - 1)
        end_hash = client.block_hash(end)  # before reading: the events must come from this very chain
        events = client.deposits(from_block=start, to_block=end)
        if client.block_hash(end) != end_hash:
            log.warning("chain %s changed while reading blocks %s..%s; reading again next time", client.chain_id, start, end)
            break
        for event in events:
            credited += deposit_credit(chain_id=client.chain_id, tx_hash=event.tx_hash, log_index=event.log_index,
                                       block_number=event.block_number, block_hash=event.block_hash,
                                       depositor=event.depositor, amount=event.amount)
        with transaction.atomic():
            cursor.block_number, cursor.block_hash = end, end_hash
            cursor.save(update_fields=["block_number", "block_hash", "updated_at"])
            ChainCheckpoint.objects.update_or_create(chain_id=cursor.chain_id, block_number=end,
                                                     defaults={"block_hash": end_hash})
            stale = ChainCheckpoint.objects.filter(chain_id=cursor.chain_id).order_by("-block_number")[CHECKPOINTS_KEPT:]
            ChainCheckpoint.objects.filter(pk__in=list(stale.values_list("pk", flat=True))).delete()
    return credited
