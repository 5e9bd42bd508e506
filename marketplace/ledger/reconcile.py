"""Reconciliation: what the contract holds and has paid, compared with the ledger; every difference is
logged as an error and returned."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from django.conf import settings

from marketplace.ledger.fields import AmountSum
from marketplace.ledger.models import Account, Epoch, Line
from marketplace.ledger.postings import account_get, balance

if TYPE_CHECKING:
    from marketplace.chain.client import ChainClient

log = logging.getLogger(__name__)
K = Account.Kind


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
    deposited = -balance(account_get(K.CHAIN_CUSTODY))
    # The contract's own sum of every claim paid, the figure its publishRoot rule uses.
    claimed = client.total_claimed()
    if published is not None:
        if report.chain_epoch == published.number:
            diff += _root_compare(published, client)
        diff += _claims_compare(published, client, claimed)
    contract = getattr(client, "contract_address", None) or settings.IDLEGRID_CHAIN_CONTRACT
    held = client.token_balance(contract) if contract else None
    diff += _custody_compare(held, deposited=deposited, claimed=claimed, owed=published.total - claimed if published else 0)
    payout = Line.objects.filter(account__kind=K.PAYOUT_ADDRESS).aggregate(t=AmountSum("amount"))["t"] or 0
    if published is not None and payout != published.total and not Epoch.objects.filter(number__gt=published.number).exists():
        diff.append(f"payout addresses hold {payout} in the ledger, epoch {published.number} published {published.total}")
    report.figures = {"deposited": str(deposited), "claimed": str(claimed), "contract_tokens": str(held),
                      "published_total": str(published.total if published else 0), "payout_total": str(payout)}
    for difference in diff:
        log.error("chain reconciliation: %s", difference)
    return report


def _root_compare(published: Epoch, client: ChainClient) -> list[str]:
    diff = []
    root = "0x" + client.published_root().hex()
    if root != published.root:
        diff.append(f"epoch {published.number}: contract root {root} != ledger root {published.root}")
    total = client.published_total()
    if total != published.total:
        diff.append(f"epoch {published.number}: contract total {total} != ledger total {published.total}")
    return diff


def _claims_compare(published: Epoch, client: ChainClient, claimed: int) -> list[str]:
    diff, to_leaves = [], 0
    for address, cumulative in published.leaves.values_list("address", "cumulative"):
        paid = client.claimed(address)
        to_leaves += paid
        if paid > cumulative:
            diff.append(f"{address} claimed {paid}, more than its cumulative {cumulative}")
    # Amounts are cumulative, so every address ever paid is a leaf of the latest epoch: anything more
    # went to addresses the ledger never paid (a root that did not come from this ledger).
    if to_leaves != claimed:
        diff.append(f"claims paid {claimed} in all but {to_leaves} to the ledger's payout addresses")
    return diff


def _custody_compare(held: int | None, *, deposited: int, claimed: int, owed: int) -> list[str]:
    if held is None:
        return []
    diff = []
    if held != deposited - claimed:
        diff.append(f"the contract holds {held} tokens; deposits credited {deposited} - claimed {claimed} = {deposited - claimed}")
    if held < owed:
        diff.append(f"the contract holds {held} tokens but {owed} are claimable: underfunded by {owed - held}")
    return diff
