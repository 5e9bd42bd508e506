"""The ledger's side of the chain: crediting deposits, following Deposited events, reconciling.

The follower reads only blocks at least IDLEGRID_CHAIN_CONFIRMATIONS deep, so a reorganisation within
that depth never reaches the ledger. It keeps a cursor (the last block read and its hash) and recent
checkpoints; if the cursor's block hash is no longer the chain's, the chain was reorganised deeper than
the depth: it logs an error and rewinds to the newest checkpoint still on the chain, and reading again
credits nothing twice (a deposit is credited once per (chain, transaction, log index)).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import IntegrityError, transaction

from marketplace.chain.merkle import account_normalize
from marketplace.ledger.epochs import confirmations
from marketplace.ledger.fields import AmountSum
from marketplace.ledger.models import Account, ChainCheckpoint, ChainCursor, Deposit, Epoch, Line, Posting, WalletLink
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
    start = int(getattr(settings, "IDLEGRID_CHAIN_START_BLOCK", 0))
    cursor, _ = ChainCursor.objects.get_or_create(chain_id=client.chain_id,
                                                  defaults={"block_number": start - 1, "block_hash": ""})
    return cursor


def _rewind(cursor: ChainCursor, client: ChainClient) -> None:
    """The cursor's block is no longer on the chain: back to the newest checkpoint that still is."""
    log.error("chain %s reorganised below block %s, deeper than %s confirmations: rewinding the deposit follower",
              client.chain_id, cursor.block_number, confirmations())
    for point in ChainCheckpoint.objects.filter(chain_id=cursor.chain_id, block_number__lt=cursor.block_number).order_by("-block_number"):
        if client.block_hash(point.block_number) == point.block_hash:
            cursor.block_number, cursor.block_hash = point.block_number, point.block_hash
            break
    else:
        cursor.block_number, cursor.block_hash = int(getattr(settings, "IDLEGRID_CHAIN_START_BLOCK", 0)) - 1, ""
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
        safe = client.block_number() - confirmations()
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


# --- reconciliation -------------------------------------------------------------------------------

@dataclass
class Reconciliation:
    chain_epoch: int
    ledger_epoch: int
    differences: list[str] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.differences


def chain_reconcile(*, client: ChainClient) -> Reconciliation:
    """Compare what the contract holds with the ledger; every difference is logged as an error."""
    published = Epoch.objects.filter(state__in=(Epoch.State.PUBLISHED, Epoch.State.FINAL)).order_by("-number").first()
    report = Reconciliation(chain_epoch=client.published_epoch(), ledger_epoch=published.number if published else 0)
    diff = report.differences
    if report.chain_epoch != report.ledger_epoch:
        diff.append(f"the contract is at epoch {report.chain_epoch}, the ledger's latest published is {report.ledger_epoch}")
    if published is not None and report.chain_epoch == published.number:
        root = "0x" + client.published_root().hex()
        if root != published.root:
            diff.append(f"epoch {published.number}: contract root {root} != ledger root {published.root}")
        total = client.published_total()
        if total != published.total:
            diff.append(f"epoch {published.number}: contract total {total} != ledger total {published.total}")
    deposited = -balance(account_get(K.CHAIN_CUSTODY))
    # The contract's own sum of every claim paid, the figure its publishRoot rule uses.
    claimed = client.total_claimed()
    if published is not None:
        to_leaves = 0
        for address, cumulative in published.leaves.values_list("address", "cumulative"):
            paid = client.claimed(address)
            to_leaves += paid
            if paid > cumulative:
                diff.append(f"{address} claimed {paid}, more than its cumulative {cumulative}")
        # Amounts are cumulative, so every address ever paid is a leaf of the latest epoch: anything more
        # went to addresses the ledger never paid (a root that did not come from this ledger).
        if to_leaves != claimed:
            diff.append(f"claims paid {claimed} in all but {to_leaves} to the ledger's payout addresses")
    contract = getattr(client, "contract_address", None) or getattr(settings, "IDLEGRID_CHAIN_CONTRACT", "")
    held = client.token_balance(contract) if contract else None
    if held is not None and held != deposited - claimed:
        diff.append(f"the contract holds {held} tokens; deposits credited {deposited} - claimed {claimed} = {deposited - claimed}")
    owed = published.total - claimed if published else 0
    if held is not None and held < owed:
        diff.append(f"the contract holds {held} tokens but {owed} are claimable: underfunded by {owed - held}")
    payout = Line.objects.filter(account__kind=K.PAYOUT_ADDRESS).aggregate(t=AmountSum("amount"))["t"] or 0
    if published is not None and payout != published.total and not Epoch.objects.filter(number__gt=published.number).exists():
        diff.append(f"payout addresses hold {payout} in the ledger, epoch {published.number} published {published.total}")
    report.figures = {"deposited": str(deposited), "claimed": str(claimed), "contract_tokens": str(held),
                      "published_total": str(published.total if published else 0), "payout_total": str(payout)}
    for difference in diff:
        log.error("chain reconciliation: %s", difference)
    return report
