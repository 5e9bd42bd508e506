"""What a person's money page and statement show: the deposits credited to them, those seen on chain and
not yet deep enough to be credited, a job's cost against its escrow, and the statement's rows (the CSV).

Credited deposits are the follower's records (Deposit rows, once per event). Pending ones are recorded
nowhere (the follower reads only blocks IDLEGRID_CHAIN_CONFIRMATIONS deep), so `deposits_pending` reads
them from the chain: one bounded `eth_getLogs` over the blocks after the follower's cursor, at most
PENDING_BLOCKS of them, filtered to the person's linked addresses. Without a chain, or if the node does
not answer, it says so instead of guessing."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ImproperlyConfigured
from django.db.models import QuerySet

from marketplace.ledger.fields import AmountSum
from marketplace.ledger.models import Account, ChainCursor, Deposit, Line, Posting, WalletLink
from marketplace.ledger.selectors import entries_for

PENDING_BLOCKS = 2000  # the follower's own read size: one log query, however far behind it is
PENDING_TIMEOUT = 3.0  # seconds per JSON-RPC call: a page waits this long at worst per call, not the follower's 10
CSV_HEADER = ["line", "posting", "kind", "account", "amount_base_units", "memo", "created_at"]


@dataclass(frozen=True)
class PendingDeposits:
    deposits: list[dict[str, Any]]  # tx_hash, block, amount (int), depositor, confirmations
    checked: bool  # False: the chain could not be read; `reason` says why
    reason: str | None = None


def linked_addresses(*, user: User) -> list[str]:
    """Every address the person linked (active, pending or replaced), in the EIP-55 form deposits record."""
    return list(WalletLink.objects.filter(user=user).values_list("address", flat=True))


def deposits_credited(*, user: User) -> QuerySet[Deposit]:
    """Deposits from the person's addresses the follower credited, newest first (to their balance, or to
    the address's suspense until they linked it, then moved to their balance)."""
    return Deposit.objects.filter(depositor__in=linked_addresses(user=user)).order_by("-block_number", "-log_index")


def deposits_pending(*, user: User, client: Any = None) -> PendingDeposits:
    """Deposited events from the person's addresses that the follower has not credited yet (module doc)."""
    addresses = set(linked_addresses(user=user))
    if not addresses:
        return PendingDeposits([], checked=True)
    try:
        client = client or _chain_reader()
        head = client.block_number()
        cursor = ChainCursor.objects.filter(chain_id=client.chain_id).values_list("block_number", flat=True).first()
        start = max(settings.IDLEGRID_CHAIN_START_BLOCK if cursor is None else cursor + 1, head - PENDING_BLOCKS + 1, 0)
        events = client.deposits(from_block=start, to_block=head) if start <= head else []
    except ImproperlyConfigured:
        return PendingDeposits([], checked=False, reason="no chain is configured on this marketplace")
    except Exception as exc:  # noqa: BLE001 - a page must render when the node is down; say why
        return PendingDeposits([], checked=False, reason=f"the chain node did not answer ({type(exc).__name__})")
    credited = set(Deposit.objects.filter(tx_hash__in=[e.tx_hash.lower() for e in events])
                   .values_list("tx_hash", "log_index"))
    pending = [
        {"tx_hash": e.tx_hash.lower(), "block": e.block_number, "amount": e.amount, "depositor": e.depositor,
         "confirmations": head - e.block_number}
        for e in events
        if e.depositor in addresses and (e.tx_hash.lower(), e.log_index) not in credited
    ]
    return PendingDeposits(pending, checked=True)


def _chain_reader() -> Any:
    """The settings' chain client with a short timeout (a page is waiting); chain_client's checks first."""
    from marketplace.chain.client import Web3ChainClient, chain_client, web3_connect

    chain_client()  # refuses missing settings with ImproperlyConfigured, as the follower would
    url, contract, key = (str(settings.IDLEGRID_CHAIN_RPC_URL), str(settings.IDLEGRID_CHAIN_CONTRACT),
                          str(settings.IDLEGRID_CHAIN_OPERATOR_KEY))
    return Web3ChainClient(web3_connect(url, timeout=PENDING_TIMEOUT), contract, key)


def job_costs(*, job_id: int) -> dict[str, int]:
    """A job's escrow: funded at submission, spent so far on valid results (and their fee), returned when
    it ended, and what it holds now. Base units."""
    lines = Line.objects.filter(account__kind=Account.Kind.JOB_ESCROW, account__job_id=job_id)
    by_kind = {kind: int(total or 0) for kind, total in
               lines.values("posting__kind").annotate(total=AmountSum("amount")).values_list("posting__kind", "total")}
    held = sum(by_kind.values())
    funded = by_kind.get(Posting.Kind.ESCROW, 0)
    returned = -by_kind.get(Posting.Kind.RELEASE, 0)
    return {"funded": funded, "spent": max(0, funded - returned - held), "returned": returned, "held": held}


def statement_rows(*, user: User) -> Iterator[list[str]]:
    """Every ledger line of the person, newest first, as CSV rows (header first), read in chunks."""
    yield CSV_HEADER
    for line in entries_for(user=user).iterator(chunk_size=500):
        yield [str(line.pk), str(line.posting_id), line.posting.kind, line.account.key, str(line.amount),
               line.posting.memo, _iso(line.posting.created_at)]


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
