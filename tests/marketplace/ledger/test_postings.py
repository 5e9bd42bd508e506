"""The ledger's engine: balanced postings only, exact amounts beyond 64 bits, once per key, append-only."""

import pytest
from django.db import connection, transaction

from marketplace.ledger.grants import balance_grant
from marketplace.ledger.models import Account, AppendOnlyError, AuditEntry, Line, Posting
from marketplace.ledger.postings import Unbalanced, account_get, balance, posting_write
from marketplace.ledger.selectors import ledger_check

K = Account.Kind
BIG = 3 * 2**64 + 12345  # 55 tokens of 18 decimals: more than a BIGINT holds


def post(key, *entries):
    with transaction.atomic(durable=True):
        return posting_write(kind=Posting.Kind.GRANT, key=key, entries=entries, actor="tests", reason="a test")


@pytest.fixture
def accounts(db):
    return account_get(K.PLATFORM_GRANTS), account_get(K.PLATFORM_FEE)


def test_a_posting_whose_lines_do_not_sum_to_zero_is_refused(accounts):
    source, target = accounts

    with pytest.raises(Unbalanced):
        post("k", (source, -5), (target, 4))

    assert Posting.objects.count() == 0 and Line.objects.count() == 0


def test_amounts_beyond_64_bits_are_stored_and_summed_exactly(accounts):
    source, target = accounts

    post("a", (source, -BIG), (target, BIG))
    post("b", (source, -BIG), (target, BIG))

    assert balance(target) == 2 * BIG
    assert balance(source) == -2 * BIG
    assert Line.objects.get(account=target, posting__idempotency_key="a").amount == BIG


def test_the_same_key_posts_once(accounts):
    source, target = accounts

    assert post("once", (source, -1), (target, 1)) is not None
    assert post("once", (source, -1), (target, 1)) is None

    assert balance(target) == 1


def test_every_posting_has_an_audit_row_saying_who_and_why(submitter):
    posting = balance_grant(user=submitter, amount=5, actor="admin:alice", reason="pilot customer",
                            idempotency_key="pilot")

    audit = AuditEntry.objects.get(posting=posting)
    assert (audit.actor, audit.action, audit.reason) == ("admin:alice", "posting.grant", "pilot customer")
    assert audit.data["idempotency_key"] == "grant:pilot"


def test_a_posting_is_written_only_inside_a_durable_transaction_of_its_caller(accounts):
    source, target = accounts

    with pytest.raises(RuntimeError):
        posting_write(kind=Posting.Kind.GRANT, key="k", entries=[(source, -1), (target, 1)], actor="t", reason="t")


def test_postings_and_lines_cannot_be_changed_or_removed(accounts):
    source, target = accounts
    posting = post("x", (source, -1), (target, 1))
    line = posting.lines.first()

    for attempt in (lambda: line.save(), lambda: line.delete(), lambda: Line.objects.update(amount=7),
                    lambda: Line.objects.all().delete(), lambda: posting.delete(), lambda: Posting.objects.update(memo="")):
        with pytest.raises(AppendOnlyError):
            attempt()
    with pytest.raises(Exception, match="append-only"), transaction.atomic():  # the database refuses it too
        with connection.cursor() as cursor:
            cursor.execute("UPDATE ledger_line SET amount = '7'")

    assert balance(target) == 1


def test_the_whole_ledger_sums_to_zero(submitter, other_submitter):
    assert ledger_check() == []
    total = sum(balance(account) for account in Account.objects.all())
    assert total == 0


def test_the_check_command_prints_totals_per_kind(submitter, capsys):
    from django.core.management import call_command

    call_command("ledger_check")

    out = capsys.readouterr().out
    assert '"submitter_balance": "1000000000000000000000000"' in out and '"problems": []' in out


def test_the_grant_command_grants_once_per_key(contributor, capsys):
    from django.core.management import call_command

    for _ in range(2):
        call_command("ledger_grant", "contributor", amount=str(BIG), reason="pilot", key="pilot-1")

    assert balance(account_get(K.SUBMITTER_BALANCE, user_id=contributor.pk)) == BIG
    assert '"granted": false' in capsys.readouterr().out.splitlines()[-1]
