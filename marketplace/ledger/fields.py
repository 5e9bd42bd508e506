"""Amounts in integer base units (wei-like), exact on both databases.

An amount of an 18-decimal token passes 2**63 at about 9.2 tokens, so a BIGINT is too small. PostgreSQL
stores NUMERIC(78, 0) (every uint256 fits) and sums it exactly. SQLite has no such type: a DECIMAL column
has NUMERIC affinity and silently turns an integer beyond 2**63 into a REAL (measured: 10**20 + 1 comes
back as 1e+20). So on SQLite an amount is stored as TEXT and summed by `ledger_sum`, an aggregate made of
Python integers registered on every SQLite connection; `AmountSum` picks the right one per database.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ValidationError
from django.db import models

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.models.expressions import Combinable
    from django.db.models.sql.compiler import SQLCompiler, _AsSqlType

MAX_AMOUNT = 10**78 - 1


def amount_parse(value: Any) -> int:
    """An integer from an int, an integral Decimal or a string of digits; ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"an amount is an integer in base units, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, Decimal):
        if value != value.to_integral_value():
            raise ValueError(f"an amount is an integer in base units, got {value!r}")
        number = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        number = int(value.strip())
    else:
        raise ValueError(f"an amount is an integer in base units, got {value!r}")
    if abs(number) > MAX_AMOUNT:
        raise ValueError(f"an amount has at most 78 digits, got {number}")
    return number


if TYPE_CHECKING:
    # Field is generic in django-stubs only (what a model attribute accepts, what it reads back).
    _AmountFieldBase = models.Field[int | str | Decimal | Combinable, int]
else:
    _AmountFieldBase = models.Field


class AmountField(_AmountFieldBase):
    description = "A signed integer amount in base units, up to 78 digits"
    if TYPE_CHECKING:
        # What django-stubs' plugin types model attributes and lookups with (its IntegerField does the same).
        _pyi_private_set_type: int | str | Decimal | Combinable
        _pyi_private_get_type: int
        _pyi_lookup_exact_type: int | str | Decimal

    def db_type(self, connection: BaseDatabaseWrapper) -> str:
        return "numeric(78, 0)" if connection.vendor == "postgresql" else "text"

    def get_internal_type(self) -> str:
        return "AmountField"

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> int | None:
        return None if value is None else int(value)

    def to_python(self, value: Any) -> int | None:
        if value is None:
            return None
        try:
            return amount_parse(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from exc

    def get_prep_value(self, value: Any) -> Any:
        return None if value is None else amount_parse(value)

    def get_db_prep_value(self, value: Any, connection: Any, prepared: bool = False) -> Any:
        value = value if prepared else self.get_prep_value(value)
        if value is None:
            return None
        return Decimal(value) if connection.vendor == "postgresql" else str(value)


class _ExactSum:
    """SQLite aggregate: the exact sum of TEXT (or INTEGER) amounts, as TEXT; NULL over no rows."""

    def __init__(self) -> None:
        self.total: int | None = None

    def step(self, value: Any) -> None:
        if value is not None:
            self.total = (self.total or 0) + int(value)

    def finalize(self) -> str | None:
        return None if self.total is None else str(self.total)


def sqlite_register(sender: Any, connection: Any, **kwargs: Any) -> None:
    if connection.vendor == "sqlite":
        connection.connection.create_aggregate("ledger_sum", 1, _ExactSum)


class AmountSum(models.Aggregate):
    """SUM over an AmountField, exact on PostgreSQL (NUMERIC) and SQLite (`ledger_sum`)."""

    function = "SUM"
    name = "AmountSum"

    def __init__(self, expression: Any, **extra: Any) -> None:
        super().__init__(expression, output_field=AmountField(), **extra)

    def as_sqlite(self, compiler: SQLCompiler, connection: BaseDatabaseWrapper, **extra_context: Any) -> _AsSqlType:
        return super().as_sql(compiler, connection, function="ledger_sum", **extra_context)
