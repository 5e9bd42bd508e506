"""A double-entry, append-only ledger in integer base units.

Sign convention: a line's amount is what it adds to its account; the lines of one posting sum to zero.
Accounts the marketplace owes someone (a submitter's balance, a job's escrow, a contributor's earnings,
a payout address) therefore run positive, and the accounts money comes from (grants, tokens deposited
into the contract, verification paid by the platform) run negative: all balances together are zero.

Postings and their lines are never updated or deleted (the model, the queryset and, on PostgreSQL, a
trigger refuse it); a mistake is corrected by another posting. Which earnings are held, settled or taken
back is kept beside the ledger in `Earning` rows, whose state changes in the same transaction as the
posting that moves the money.
"""

from __future__ import annotations

from typing import Any, NoReturn, TypeVar

from django.conf import settings
from django.db import models
from django.db.models import Q

from marketplace.ledger.fields import AmountField


class AppendOnlyError(Exception):
    """Postings are append-only: correct one with another posting."""


_M = TypeVar("_M", bound=models.Model)


class AppendOnlyQuerySet(models.QuerySet[_M]):
    def update(self, **kwargs: Any) -> NoReturn:
        raise AppendOnlyError(f"{self.model.__name__} rows are append-only")

    def delete(self) -> NoReturn:
        raise AppendOnlyError(f"{self.model.__name__} rows are append-only")


class AppendOnly(models.Model):
    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        abstract = True

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise AppendOnlyError(f"{type(self).__name__} {self.pk} is append-only")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise AppendOnlyError(f"{type(self).__name__} {self.pk} is append-only")


class Account(models.Model):
    """One account per (kind, owner): `key` spells it ("submitter_balance:user=7") and is unique."""

    class Kind(models.TextChoices):
        SUBMITTER_BALANCE = "submitter_balance"  # user: spendable on jobs
        JOB_ESCROW = "job_escrow"  # job: reserved at submission, pays its valid results
        CONTRIBUTOR_HELD = "contributor_held"  # device: earned, inside the audit window
        CONTRIBUTOR_SETTLED = "contributor_settled"  # user: past the audit window, no payout address yet
        PAYOUT_ADDRESS = "payout_address"  # address: cumulative amount claimable on chain (the Merkle leaf)
        CHAIN_SUSPENSE = "chain_suspense"  # address: deposits from an address no account has linked
        CHAIN_CUSTODY = "chain_custody"  # tokens deposited into the payout contract (runs negative)
        PLATFORM_FEE = "platform_fee"
        PLATFORM_FORFEIT = "platform_forfeit"  # held earnings of banned devices
        # The verification budget: funded from grants (`verification_budget_fund`), spent on work the platform
        # orders (known-answer copies, re-verification past a job's escrow). Never negative (ledger_check).
        PLATFORM_VERIFICATION = "platform_verification"
        PLATFORM_GRANTS = "platform_grants"  # admin/dev grants (runs negative)

    key = models.CharField(max_length=120, unique=True)
    kind = models.CharField(max_length=32, choices=Kind.choices)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    job = models.ForeignKey("jobs.Job", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    device = models.ForeignKey("workers.Device", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    address = models.CharField(max_length=42, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["kind", "user"]), models.Index(fields=["address"])]

    def __str__(self) -> str:
        return self.key


class Posting(AppendOnly):
    """One balanced movement of money (a journal transaction): its lines sum to zero."""

    class Kind(models.TextChoices):
        GRANT = "grant"
        ESCROW = "escrow"
        CREDIT = "credit"
        REVERSAL = "reversal"
        FORFEIT = "forfeit"
        SETTLEMENT = "settlement"
        EPOCH = "epoch"
        RELEASE = "release"
        DEPOSIT = "deposit"
        SUSPENSE_CLAIM = "suspense_claim"
        BUDGET = "budget"  # the platform funds its verification budget

    kind = models.CharField(max_length=16, choices=Kind.choices)
    # Whatever would post the same money twice (a task run twice, two racing workers) names the same key.
    idempotency_key = models.CharField(max_length=200, unique=True)
    memo = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"posting {self.pk} ({self.kind}, {self.idempotency_key})"


class Line(AppendOnly):
    posting = models.ForeignKey(Posting, on_delete=models.PROTECT, related_name="lines")
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="lines")
    amount = AmountField()

    class Meta:
        indexes = [models.Index(fields=["account", "posting"])]

    def __str__(self) -> str:
        return f"{self.account.key} {self.amount:+d}"


class AuditEntry(AppendOnly):
    """Who did what and why: one per posting, and one per other money-relevant act (a wallet link, a
    root sent to the chain)."""

    actor = models.CharField(max_length=120)  # "user:7", "system:verification", "admin:alice"
    action = models.CharField(max_length=64)
    reason = models.TextField(blank=True)
    posting = models.OneToOneField(Posting, null=True, blank=True, on_delete=models.PROTECT, related_name="audit")
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.action} by {self.actor}"


class Earning(models.Model):
    """What one valid result earned its device's owner, and where that money is now."""

    class State(models.TextChoices):
        HELD = "held"
        SETTLED = "settled"
        REVERSED = "reversed"  # the result was withdrawn: the money went back where it came from
        FORFEITED = "forfeited"  # the device was banned: the money went to the platform
        UNPAID = "unpaid"  # valid, but nothing could pay it (a free job, a spent verification budget)

    class Source(models.TextChoices):
        ESCROW = "escrow"
        PLATFORM = "platform"  # the verification budget: known-answer copies, re-verification past the escrow
        UNPAID = "unpaid"

    # No database constraint: the result moves to workunits.ResultArchive under the same id once this
    # earning is settled and its job long finished (workunits/archive.py); ledger_check proves every
    # earning's result exists in one table or the other (selectors._credits_traced).
    result = models.OneToOneField("workunits.Result", on_delete=models.PROTECT, related_name="earning",
                                  db_constraint=False)
    device = models.ForeignKey("workers.Device", on_delete=models.PROTECT, related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    job = models.ForeignKey("jobs.Job", on_delete=models.PROTECT, related_name="+")
    source = models.CharField(max_length=16, choices=Source.choices)
    gross = AmountField()  # taken from the source
    net = AmountField()  # credited to the contributor (gross minus the platform fee)
    state = models.CharField(max_length=16, choices=State.choices, default=State.HELD)
    settle_after = models.DateTimeField()
    credit = models.OneToOneField(Posting, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    closed_by = models.ForeignKey(Posting, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [
            models.Index(fields=["settle_after"], condition=Q(state="held"), name="earning_held"),
            models.Index(fields=["device", "state"]),
        ]

    def __str__(self) -> str:
        return f"earning of result {self.result_id} ({self.state})"


class WalletChallenge(models.Model):
    """A message the contributor signs (EIP-191) to prove they hold a payout address. Single use."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    nonce = models.CharField(max_length=64, unique=True)
    message = models.TextField()
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)


class WalletLink(models.Model):
    """A payout address a user proved to hold. One active per user; an address belongs to one user.

    Pending: asked for to replace the active address, taking effect at `effective_at` (active false, not
    unlinked). Epochs pay active links only, so a pending one is paid nothing until it is activated; at most
    one is pending per user. A cancelled or replaced link is unlinked (`unlinked_at`); `cancelled_at` tells
    a cancelled change from an address that was once active."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    address = models.CharField(max_length=42)  # EIP-55 checksum form
    active = models.BooleanField(default=True)
    signature = models.CharField(max_length=132)
    challenge = models.OneToOneField(WalletChallenge, on_delete=models.PROTECT, related_name="+")
    linked_at = models.DateTimeField(auto_now_add=True)  # when it was asked for
    effective_at = models.DateTimeField(null=True, blank=True)  # when it took (or, pending, takes) effect
    unlinked_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user"], condition=Q(active=True), name="wallet_one_active_per_user"),
            models.UniqueConstraint(fields=["address"], condition=Q(active=True), name="wallet_address_active_once"),
            models.UniqueConstraint(fields=["user"], condition=Q(active=False, unlinked_at__isnull=True),
                                    name="wallet_one_pending_per_user"),
        ]
        indexes = [models.Index(fields=["effective_at"], condition=Q(active=False, unlinked_at__isnull=True),
                                name="wallet_pending_due")]

    @property
    def pending(self) -> bool:
        return not self.active and self.unlinked_at is None


class Epoch(models.Model):
    """One settlement: the Merkle root of every payout address's cumulative earnings, and its trip to the chain.

    closed -> sending (a nonce is reserved) -> published (the contract holds the root) -> final (deep enough)."""

    class State(models.TextChoices):
        CLOSED = "closed"
        SENDING = "sending"
        PUBLISHED = "published"
        FINAL = "final"

    number = models.PositiveBigIntegerField(unique=True)
    root = models.CharField(max_length=66)
    total = AmountField()
    leaf_count = models.PositiveIntegerField()
    posting = models.OneToOneField(Posting, on_delete=models.PROTECT, related_name="epoch")
    state = models.CharField(max_length=16, choices=State.choices, default=State.CLOSED)
    chain_id = models.PositiveBigIntegerField(null=True, blank=True)
    # Reserved before anything is sent, so a re-run after a crash re-sends with the same nonce: the node
    # can mine at most one transaction per nonce, and the contract accepts one root per epoch anyway.
    nonce = models.PositiveBigIntegerField(null=True, blank=True)
    tx_hash = models.CharField(max_length=66, blank=True)
    attempts = models.JSONField(default=list, blank=True)  # every (nonce, tx_hash, at) sent, for the audit
    block_number = models.PositiveBigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    published_at = models.DateTimeField(null=True, blank=True)
    final_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"epoch {self.number} ({self.state})"


class EpochLeaf(models.Model):
    epoch = models.ForeignKey(Epoch, on_delete=models.PROTECT, related_name="leaves")
    address = models.CharField(max_length=42)
    cumulative = AmountField()
    proof = models.JSONField()  # ["0x<64 hex>", ...]

    class Meta:
        constraints = [models.UniqueConstraint(fields=["epoch", "address"], name="leaf_unique_per_epoch")]


class Deposit(models.Model):
    """A Deposited event credited once, whatever number of times the follower sees it."""

    chain_id = models.PositiveBigIntegerField()
    tx_hash = models.CharField(max_length=66)
    log_index = models.PositiveIntegerField()
    block_number = models.PositiveBigIntegerField()
    block_hash = models.CharField(max_length=66)
    depositor = models.CharField(max_length=42)
    amount = AmountField()
    posting = models.OneToOneField(Posting, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["chain_id", "tx_hash", "log_index"], name="deposit_once_per_event")
        ]


class ChainCursor(models.Model):
    """How far the deposit follower has read, and the hash of that block (a reorg changes it)."""

    chain_id = models.PositiveBigIntegerField(unique=True)
    block_number = models.BigIntegerField()  # the last block read; -1 before the first
    block_hash = models.CharField(max_length=66, blank=True)
    updated_at = models.DateTimeField(auto_now=True)


class ChainCheckpoint(models.Model):
    """Recent (block, hash) pairs the cursor passed: a reorg rewinds to the newest one still on the chain."""

    chain_id = models.PositiveBigIntegerField()
    block_number = models.BigIntegerField()
    block_hash = models.CharField(max_length=66)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["chain_id", "block_number"], name="checkpoint_unique")]
