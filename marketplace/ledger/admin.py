"""Read-only admin: the ledger is changed by its services only, never by hand."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.db.models import Model
from django.http import HttpRequest

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

if TYPE_CHECKING:
    # Generic in django-stubs only; the admin needs nothing from the model type.
    _ModelAdmin = admin.ModelAdmin[Any]
    _LineInline = admin.TabularInline[Line, Posting]
    _EpochLeafInline = admin.TabularInline[EpochLeaf, Epoch]
else:
    _ModelAdmin = admin.ModelAdmin
    _LineInline = _EpochLeafInline = admin.TabularInline


class ReadOnly(_ModelAdmin):
    def has_add_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False


class LineInline(_LineInline):
    model = Line
    fields = readonly_fields = ("account", "amount")
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Posting | None = None) -> bool:
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
    # result_id, not result: the result may be in the archive (workunits/archive.py), and a joined column
    # would drop its earning from the list.
    list_display = ["result_id", "device", "user", "job", "source", "net", "state", "settle_after"]
    list_filter = ["state", "source"]


class EpochLeafInline(_EpochLeafInline):
    model = EpochLeaf
    fields = readonly_fields = ("address", "cumulative")
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
