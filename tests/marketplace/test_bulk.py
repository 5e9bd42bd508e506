"""core/bulk.rows_insert: rows go in as given, defaults filled, keys returned in the rows' order, on
PostgreSQL (one array per column, unnest) and SQLite (multi-row VALUES) alike."""

import pytest

from marketplace.core.bulk import BATCH, rows_insert
from marketplace.ledger.models import AuditEntry, Posting


def test_rows_go_in_with_their_values_and_the_model_defaults_and_keys_come_back_in_order(db):
    count = 2 * BATCH + 7  # three statements
    rows = [{"actor": f"system:test{i}", "action": "test", "data": {"i": i, "nested": [i, None, "x"]}}
            for i in range(count)]

    keys = rows_insert(AuditEntry, rows, returning=True)

    assert len(keys) == count
    stored = {e.pk: e for e in AuditEntry.objects.filter(pk__in=keys)}
    for i, key in enumerate(keys):
        entry = stored[key]
        assert (entry.actor, entry.data) == (f"system:test{i}", {"i": i, "nested": [i, None, "x"]})
        assert entry.reason == "" and entry.posting_id is None and entry.created_at is not None


def test_a_column_of_nothing_but_nulls_and_one_of_mixed_nulls(db):
    posting = Posting.objects.create(kind=Posting.Kind.CREDIT, idempotency_key="bulk-test")
    rows = [{"actor": "a", "action": "b", "posting_id": None, "reason": "r"},
            {"actor": "c", "action": "d", "posting_id": posting.pk, "reason": "s"}]
    keys = rows_insert(AuditEntry, rows, returning=True)
    assert list(AuditEntry.objects.filter(pk__in=keys).order_by("pk").values_list("posting_id", flat=True)) == [
        None, posting.pk]
    only_nulls = rows_insert(AuditEntry, [{"actor": "e", "action": "f", "posting_id": None}] * 3, returning=True)
    assert AuditEntry.objects.filter(pk__in=only_nulls, posting__isnull=True).count() == 3


def test_conflicts_are_skipped_when_asked_and_refused_otherwise(db):
    from django.db import IntegrityError, transaction

    rows_insert(Posting, [{"kind": Posting.Kind.CREDIT, "idempotency_key": "k1"}])
    rows_insert(Posting, [{"kind": Posting.Kind.CREDIT, "idempotency_key": key} for key in ("k1", "k2")],
                ignore_conflicts=True)
    assert sorted(Posting.objects.values_list("idempotency_key", flat=True)) == ["k1", "k2"]
    with pytest.raises(IntegrityError), transaction.atomic():
        rows_insert(Posting, [{"kind": Posting.Kind.CREDIT, "idempotency_key": "k2"}])


def test_rows_must_name_the_same_known_fields(db):
    with pytest.raises(ValueError, match="no fields"):
        rows_insert(Posting, [{"kind": "credit", "nonsense": 1}])
    with pytest.raises(ValueError, match="same fields"):
        rows_insert(Posting, [{"kind": "credit", "idempotency_key": "a"}, {"kind": "credit"}])
    assert rows_insert(Posting, []) == []
