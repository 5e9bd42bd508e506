"""Read-only admin: the ledger is changed by its services only, never by hand."""

from django.contrib import admin

from marketplace.ledger.models import (
    Account,
    AuditEntry,
    ChainCursor,
    Deposit,
    Earning,
    Epoch,
    EpochLeaf,
    Line,
    Posting,
    WalletLink,
)
from marketplace.ledger.postings import balance


class ReadOnly(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class LineInline(admin.TabularInline):
    model = Line
    fields = ["account", "amount"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Account)
class AccountAdmin(ReadOnly):
    list_display = ["key", "kind", "current_balance", "created_at"]
    list_filter = ["kind"]
    search_fields = ["key", "address"]

    @admin.display(description="balance (base units)")
    def current_balance(self, account: Account) -> str:
        return str(balance(account))


@admin.register(Posting)
class PostingAdmin(ReadOnly):
    list_display = ["pk", "kind", "idempotency_key", "created_at"]
    list_filter = ["kind"]
    search_fields = ["idempotency_key"]
    inlines = [LineInline]


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnly):
    list_display = ["pk", "action", "actor", "reason", "created_at"]
    list_filter = ["action"]


@admin.register(Earning)
class EarningAdmin(ReadOnly):
    list_display = ["result", "device", "user", "job", "source", "net", "state", "settle_after"]
    list_filter = ["state", "source"]


class EpochLeafInline(admin.TabularInline):
    model = EpochLeaf
    fields = ["address", "cumulative"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    max_num = 0


@admin.register(Epoch)
class EpochAdmin(ReadOnly):
    list_display = ["number", "state", "root", "total", "leaf_count", "nonce", "tx_hash", "block_number", "created_at"]
    list_filter = ["state"]
    inlines = [EpochLeafInline]


@admin.register(Deposit)
class DepositAdmin(ReadOnly):
    list_display = ["chain_id", "tx_hash", "log_index", "block_number", "depositor", "amount", "created_at"]


@admin.register(WalletLink)
class WalletLinkAdmin(ReadOnly):
    list_display = ["user", "address", "active", "linked_at", "unlinked_at"]


@admin.register(ChainCursor)
class ChainCursorAdmin(ReadOnly):
    list_display = ["chain_id", "block_number", "block_hash", "updated_at"]
