"""A contributor's earnings as their earnings page shows them: what is held and when it settles, what
settled, what each epoch put on chain for their payout addresses, what they claimed, and a series over
time for a chart. Read-only, every query bounded.

Claims are not in the ledger: a claim is the contributor's own transaction to the PayoutLedger contract.
They are read from the chain (`claimed(address)`, one call per address, for a few addresses, with a short
timeout) when the chain is configured; otherwise, or when the node does not answer, the report says so and
the page points at the chain."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db.models import Count, Max, Min, Q
from django.db.models.functions import TruncDay, TruncHour, TruncMinute
from django.utils import timezone
from web3 import Web3

from marketplace.chain.client import chain_errors, contract_artifact, web3_connect
from marketplace.ledger.fields import AmountSum
from marketplace.ledger.models import Earning, EpochLeaf, WalletLink
from marketplace.ledger.selectors import balances_for
from marketplace.workers.models import Device

log = logging.getLogger(__name__)

HELD_GROUPS = 50  # held earnings shown, grouped per device and job
EPOCHS_SHOWN = 50
CLAIM_ADDRESSES = 5  # payout addresses whose claims are read from the chain, newest first
CLAIM_TIMEOUT_SECONDS = 3.0
SERIES_POINTS = 400


@dataclass(frozen=True)
class HeldGroup:
    device: str
    job_id: int
    results: int
    amount: int
    first_settles: datetime
    last_settles: datetime


@dataclass(frozen=True)
class EpochRow:
    number: int
    state: str
    address: str
    cumulative: int  # what the address may claim in total after this epoch
    added: int  # what this epoch added for the address
    closed_at: datetime
    published_at: datetime | None


@dataclass(frozen=True)
class Claims:
    known: bool  # read from the chain; False: not configured or not answering (`why`)
    per_address: dict[str, int] = field(default_factory=dict)
    why: str = ""

    @property
    def total(self) -> int:
        return sum(self.per_address.values())


@dataclass(frozen=True)
class EarningsReport:
    held: int
    settled: int  # every earning past its audit window, all time
    settled_unpaid: int  # settled, waiting for an epoch (or for a payout address)
    in_epochs: int  # cumulative over the payout addresses in the latest epochs: claimable on chain in total
    forfeited: int
    reversed: int
    held_groups: list[HeldGroup]
    next_settles: datetime | None
    epochs: list[EpochRow]
    claims: Claims
    series: dict[str, Any]  # the chart's data (portal.js): {"x": [...], "series": [...], ...}


def earnings_report(*, user: User, now: datetime | None = None, read_claims: bool = True) -> EarningsReport:
    now = now or timezone.now()
    mine = Earning.objects.filter(user=user)
    totals = dict(mine.values("state").annotate(total=AmountSum("net")).values_list("state", "total"))
    balances = balances_for(user=user)
    addresses = list(WalletLink.objects.filter(user=user).order_by("-linked_at").values_list("address", flat=True))
    epochs = _epochs(addresses)
    latest: dict[str, int] = {}
    for row in sorted(epochs, key=lambda r: r.number):
        latest[row.address] = row.cumulative
    held = mine.filter(state=Earning.State.HELD)
    return EarningsReport(
        held=int(totals.get(Earning.State.HELD) or 0),
        settled=int(totals.get(Earning.State.SETTLED) or 0),
        settled_unpaid=int(balances["earnings_settled"]),
        in_epochs=sum(latest.values()),
        forfeited=int(totals.get(Earning.State.FORFEITED) or 0),
        reversed=int(totals.get(Earning.State.REVERSED) or 0),
        held_groups=_held_groups(user),
        next_settles=held.aggregate(first=Min("settle_after"))["first"],
        epochs=epochs,
        claims=claims_read(addresses[:CLAIM_ADDRESSES]) if read_claims else Claims(known=False, why="not read"),
        series=earnings_series(user=user, now=now),
    )


def _held_groups(user: User) -> list[HeldGroup]:
    rows = (Earning.objects.filter(user=user, state=Earning.State.HELD)
            .values("device__name", "job_id")
            .annotate(amount=AmountSum("net"), results=Count("pk"), first=Min("settle_after"), last=Max("settle_after"))
            .order_by("first")[:HELD_GROUPS])
    return [HeldGroup(device=r["device__name"], job_id=r["job_id"], results=r["results"], amount=int(r["amount"] or 0),
                      first_settles=r["first"], last_settles=r["last"]) for r in rows]


def _epochs(addresses: list[str]) -> list[EpochRow]:
    """The epochs that have a leaf for one of the addresses, newest first; `added` against the address's
    previous leaf (its cumulative only grows)."""
    if not addresses:
        return []
    leaves = list(EpochLeaf.objects.filter(address__in=addresses).select_related("epoch")
                  .order_by("-epoch__number")[:EPOCHS_SHOWN + len(addresses)])
    rows: list[EpochRow] = []
    previous: dict[str, int] = {}
    for leaf in reversed(leaves):  # oldest first, to compute what each added
        cumulative = int(leaf.cumulative)
        rows.append(EpochRow(number=leaf.epoch.number, state=leaf.epoch.state, address=leaf.address,
                             cumulative=cumulative, added=cumulative - previous.get(leaf.address, 0),
                             closed_at=leaf.epoch.created_at, published_at=leaf.epoch.published_at))
        previous[leaf.address] = cumulative
    return list(reversed(rows))[:EPOCHS_SHOWN]


def claims_read(addresses: list[str]) -> Claims:
    """What each address claimed on the PayoutLedger contract, from the chain node (short timeout)."""
    if not addresses:
        return Claims(known=True)
    if not (settings.IDLEGRID_CHAIN_RPC_URL and settings.IDLEGRID_CHAIN_CONTRACT):
        return Claims(known=False, why="this marketplace has no chain configured")
    try:
        w3 = web3_connect(settings.IDLEGRID_CHAIN_RPC_URL, timeout=CLAIM_TIMEOUT_SECONDS)
        ledger = w3.eth.contract(address=Web3.to_checksum_address(settings.IDLEGRID_CHAIN_CONTRACT),
                                 abi=contract_artifact("PayoutLedger")["abi"])
        with chain_errors("claimed()"):
            return Claims(known=True, per_address={a: int(ledger.functions.claimed(a).call()) for a in addresses})
    except Exception as exc:  # noqa: BLE001 - the page says the chain did not answer, whatever it raised
        log.warning("claims of %d payout address(es) could not be read from the chain: %s", len(addresses), exc)
        return Claims(known=False, why="the chain node did not answer")


def _bucket(span: timedelta) -> tuple[Any, int]:
    if span <= timedelta(hours=3):
        return TruncMinute, 60
    if span <= timedelta(days=10):
        return TruncHour, 3600
    return TruncDay, 86400


def earnings_series(*, user: User, now: datetime | None = None) -> dict[str, Any]:
    """Cumulative earned (held or settled, by when it was credited) and cumulative settled (by when it
    settled) over time, in tokens (floats: a chart's precision), bucketed by minute, hour or day as the
    span needs, at most SERIES_POINTS points (the oldest buckets folded into the first)."""
    now = now or timezone.now()
    paid = Q(state__in=(Earning.State.HELD, Earning.State.SETTLED))
    mine = Earning.objects.filter(paid, user=user)
    first = mine.aggregate(first=Min("created_at"))["first"]
    data: dict[str, Any] = {"x": [], "x_time": True, "y": settings.IDLEGRID_TOKEN_SYMBOL,
                            "series": [{"label": "earned", "values": []}, {"label": "settled", "values": []}]}
    if first is None:
        return data
    trunc, step = _bucket(now - first)
    earned = _buckets(mine.annotate(at=trunc("created_at")))
    settled = _buckets(mine.filter(state=Earning.State.SETTLED, closed_by__isnull=False)
                       .annotate(at=trunc("closed_by__created_at")))
    moments = sorted(set(earned) | set(settled))[-SERIES_POINTS:]
    start = moments[0] if moments else 0
    scale = 10 ** settings.IDLEGRID_TOKEN_DECIMALS
    running = [sum(v for t, v in earned.items() if t < start), sum(v for t, v in settled.items() if t < start)]
    # where the line starts: what had been earned before the first bucket shown (a single bucket is a line too)
    data["x"].append(start)
    data["series"][0]["values"].append(running[0] / scale)
    data["series"][1]["values"].append(running[1] / scale)
    for moment in moments:
        running[0] += earned.get(moment, 0)
        running[1] += settled.get(moment, 0)
        data["x"].append(moment + step)  # the end of the bucket: what had been earned by then
        data["series"][0]["values"].append(running[0] / scale)
        data["series"][1]["values"].append(running[1] / scale)
    return data


def _buckets(rows: Any) -> dict[int, int]:
    return {int(r["at"].timestamp()): int(r["total"] or 0)
            for r in rows.values("at").annotate(total=AmountSum("net")).order_by("at")}


@dataclass(frozen=True)
class DeviceEarnings:
    """What `idlegrid-agent status` shows of the money: its owner's held and settled totals (all their
    devices: the earnings are the person's) and this device's units validated since local midnight."""

    held: int
    settled: int
    units_validated_today: int
    day_started: datetime


def device_earnings(*, device: Device, now: datetime | None = None) -> DeviceEarnings:
    """Two queries: the owner's totals per state, and a count of this device's earnings made today (one per
    valid result, credited or not; reversed and forfeited ones no longer count)."""
    day_started = timezone.localtime(now or timezone.now()).replace(hour=0, minute=0, second=0, microsecond=0)
    totals = dict(Earning.objects.filter(user_id=device.owner_id, state__in=(Earning.State.HELD, Earning.State.SETTLED))
                  .values("state").annotate(total=AmountSum("net")).values_list("state", "total"))
    today = (Earning.objects.filter(device=device, created_at__gte=day_started)
             .exclude(state__in=(Earning.State.REVERSED, Earning.State.FORFEITED)).count())
    return DeviceEarnings(held=int(totals.get(Earning.State.HELD) or 0), settled=int(totals.get(Earning.State.SETTLED) or 0),
                          units_validated_today=today, day_started=day_started)
