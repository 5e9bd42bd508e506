"""Ledger fixtures: validated results made through the real lease/report/validate services, and a fake
ChainClient (a test double of the Protocol in marketplace/chain/client.py) whose blocks can be reorganised."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from marketplace.chain.client import DepositEvent, Receipt
from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.verification import unit_validate


@pytest.fixture(autouse=True)
def ledger_sound(request):
    """After every money test, the ledger's invariants hold (`manage.py ledger_check`): balanced postings,
    nothing owed or held below zero, platform spending within its budget, every credit traced to a valid
    result and a funded source. Runs before the test's database is rolled back."""
    marker = request.node.get_closest_marker("django_db")
    transactional = "transactional_db" in request.fixturenames or bool(marker and marker.kwargs.get("transaction"))
    request.getfixturevalue("transactional_db" if transactional else "db")
    yield
    from marketplace.ledger.selectors import ledger_check

    assert ledger_check() == []


@pytest.fixture(autouse=True)
def no_known_answers(settings):
    """Known-answer units are random by design; the tests that pay for them make them on purpose."""
    settings.IDLEGRID_KNOWN_ANSWER_RATE = 0


@pytest.fixture
def validate(django_capture_on_commit_callbacks) -> Callable[[WorkUnit], str]:
    """validate(unit): unit_validate with its after-commit work (the ledger's credits) run, as in production."""

    def run(unit: WorkUnit) -> str:
        with django_capture_on_commit_callbacks(execute=True):
            return unit_validate(unit_id=unit.pk)

    return run


@pytest.fixture
def compute_unit(make_device, report, validate, contributor, other_contributor):
    """compute_unit(unit): devices of two contributors lease the unit, report honestly, and it is validated.
    Returns the two (device, result) pairs."""

    def run(unit: WorkUnit, owners=None, devices=None):
        devices = devices or [make_device(owner) for owner in (owners or (contributor, other_contributor))]
        results = []
        for device in devices:
            workunit_lease(device=device.device, max_units=10)
            leased = Result.objects.filter(unit=unit, device=device.device, state=Result.State.IN_PROGRESS).first()
            assert leased is not None, f"{device.device} holds no replica of unit {unit.pk}"
            results.append(report(device, leased))
        assert validate(unit) == "done"
        return [(device, Result.objects.get(pk=result.pk)) for device, result in zip(devices, results)]

    return run


# --- a fake chain ---------------------------------------------------------------------------------

def _hash(*parts: object) -> str:
    return "0x" + hashlib.sha256(repr(parts).encode()).hexdigest()


@dataclass
class FakeChain:
    """Blocks with hashes and Deposited events, a PayoutLedger's published state and an operator nonce.
    `mine()` adds a block; `reorg(depth)` replaces the last `depth` blocks (their events are dropped unless
    `keep_events`). publishRoot follows the contract's rules, else it reverts: epoch == published + 1, the
    total never decreases and never exceeds the token balance plus the claims paid. `tokens` is every token
    that came in (`deposit`); a test sets `claims[address]` to what that address has claimed."""

    chain_id: int = 31337
    hashes: list[str] = field(default_factory=lambda: [_hash("genesis")])
    events: dict[int, list[DepositEvent]] = field(default_factory=dict)
    published: tuple[int, bytes, int] = (0, bytes(32), 0)
    nonce_mined: int = 0
    pending: dict[str, tuple[int, int, bytes, int]] = field(default_factory=dict)  # hash -> (nonce, epoch, root, total)
    receipts: dict[str, Receipt] = field(default_factory=dict)
    roots_accepted: list[tuple[int, bytes]] = field(default_factory=list)
    automine: bool = True
    fork: int = 0
    claims: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    contract_address: str = "0x" + "11" * 20

    def mine(self, count: int = 1) -> None:
        for _ in range(count):
            number = len(self.hashes)
            self.hashes.append(_hash("block", number, self.fork))
            for tx_hash, (nonce, epoch, root, total) in sorted(self.pending.items(), key=lambda kv: kv[1][0]):
                if nonce != self.nonce_mined:
                    continue
                funds = self.token_balance(self.contract_address) + self.total_claimed()
                ok = epoch == self.published[0] + 1 and self.published[2] <= total <= funds
                if ok:
                    self.published = (epoch, root, total)
                    self.roots_accepted.append((epoch, root))
                self.receipts[tx_hash] = Receipt(status=1 if ok else 0, block_number=number, gas_used=40_000)
                self.nonce_mined += 1
                # Any other transaction of this nonce can never be mined now.
                self.pending = {h: p for h, p in self.pending.items() if p[0] >= self.nonce_mined}
                break

    def deposit(self, depositor: str, amount: int) -> DepositEvent:
        self.mine()
        number = len(self.hashes) - 1
        index = len(self.events.get(number, []))
        event = DepositEvent(tx_hash=_hash("tx", number, index, depositor, amount), log_index=index,
                             block_number=number, block_hash=self.hashes[number], depositor=depositor, amount=amount)
        self.events.setdefault(number, []).append(event)
        self.tokens += amount
        return event

    def reorg(self, depth: int, *, keep_events: bool = False) -> None:
        self.fork += 1
        for number in range(len(self.hashes) - depth, len(self.hashes)):
            self.hashes[number] = _hash("block", number, self.fork)
            moved = self.events.pop(number, [])
            if keep_events:
                self.events[number] = [DepositEvent(e.tx_hash, e.log_index, number, self.hashes[number], e.depositor,
                                                    e.amount) for e in moved]

    # --- the ChainClient protocol ---
    def block_number(self) -> int:
        return len(self.hashes) - 1

    def block_hash(self, number: int) -> str:
        return self.hashes[number]

    def deposits(self, *, from_block: int, to_block: int) -> list[DepositEvent]:
        return [e for n in range(from_block, to_block + 1) for e in self.events.get(n, [])]

    def publish_root_send(self, *, epoch: int, root: bytes, total: int, nonce: int, gas_price_wei: int | None = None) -> str:
        if nonce < self.nonce_mined:
            from marketplace.chain.client import ChainError

            raise ChainError("nonce too low")
        tx_hash = _hash("publish", epoch, root, total, nonce, gas_price_wei)
        self.pending[tx_hash] = (nonce, epoch, root, total)
        if self.automine:
            self.mine()
        return tx_hash

    def operator_nonce(self, *, pending: bool) -> int:
        if pending:
            return max([self.nonce_mined, *[p[0] + 1 for p in self.pending.values()]])
        return self.nonce_mined

    def tx_receipt(self, tx_hash: str) -> Receipt | None:
        return self.receipts.get(tx_hash)

    def published_epoch(self) -> int:
        return self.published[0]

    def published_root(self) -> bytes:
        return self.published[1]

    def published_total(self) -> int:
        return self.published[2]

    def claimed(self, account: str) -> int:
        return self.claims.get(account, 0)

    def total_claimed(self) -> int:
        return sum(self.claims.values())

    def token_balance(self, account: str) -> int:
        return self.tokens - sum(self.claims.values()) if account == self.contract_address else 0


@pytest.fixture
def chain() -> FakeChain:
    return FakeChain()
