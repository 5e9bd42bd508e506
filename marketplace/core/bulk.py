"""Many rows inserted at the database's pace, for the few places that make tens of thousands at once (a
job's split).

Django's bulk_create builds a model instance per row and prepares every field of every row, defaults
included: a 100,000-unit split spent most of its time there (bench/pipeline.py, its profile). Here the
caller names the fields it sets; every other concrete field gets its model default (auto_now and
auto_now_add: now), prepared once for all rows; the rows go in multi-row INSERTs. The same SQL on
PostgreSQL and SQLite (RETURNING since 3.35, ON CONFLICT since 3.24), and a column added to the model
later with a default needs nothing here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db import connection, models
from django.utils import timezone

BATCH = 500  # rows per INSERT: at ~12 parameters a row, far inside SQLite's 32,766


def rows_insert(model: type[models.Model], rows: Sequence[dict[str, Any]], *, returning: bool = False,
                ignore_conflicts: bool = False) -> list[Any]:
    """INSERT `rows` (each {field attname: value}, all with the same names) into the model's table.
    Returns the new primary keys in the rows' order when `returning`, else []."""
    if not rows:
        return []
    names = list(rows[0])
    fields = {f.attname: f for f in model._meta.concrete_fields}
    unknown = [name for name in names if name not in fields]
    if unknown:
        raise ValueError(f"{model.__name__} has no fields {unknown}")
    now = timezone.now()
    defaults = {
        f.attname: f.get_db_prep_save(now if getattr(f, "auto_now", False) or getattr(f, "auto_now_add", False)
                                      else f.get_default(), connection)
        for f in model._meta.concrete_fields
        if f.attname not in names and not (f.primary_key and isinstance(f, models.AutoField | models.BigAutoField))
    }
    columns = [fields[name].column for name in names] + [fields[name].column for name in defaults]
    quote = connection.ops.quote_name
    head = f"INSERT INTO {quote(model._meta.db_table)} ({', '.join(map(quote, columns))}) VALUES "
    tail = (" ON CONFLICT DO NOTHING" if ignore_conflicts else "") + (
        f" RETURNING {quote(model._meta.pk.column)}" if returning else "")
    fixed = list(defaults.values())
    prepare = [fields[name].get_db_prep_save for name in names]
    unnest = connection.vendor == "postgresql"
    if unnest:
        # One array per column: the statement's text is the same for every batch, so psycopg converts its
        # placeholders once (a 500-row VALUES list, ~40 KB of text, was converted at every execute: a third
        # of a split's time), and PostgreSQL parses a short statement. Django 5.2's bulk_create does the same.
        arrays = ", ".join(f"%s::{fields[name].db_type(connection)}[]" for name in names)
        scalars = "".join(", %s" for _ in fixed)
        sql = f"{head.removesuffix(' VALUES ')} SELECT *{scalars} FROM unnest({arrays}){tail}"
    else:
        row_sql = "(" + ", ".join(["%s"] * len(columns)) + ")"
    keys: list[Any] = []
    with connection.cursor() as cursor:
        for start in range(0, len(rows), BATCH):
            batch = rows[start:start + BATCH]
            if any(len(row) != len(names) for row in batch):
                raise ValueError("every row must name the same fields")
            if unnest:
                arrays_of = [[prep(row[name], connection) for row in batch] for prep, name in zip(prepare, names)]
                cursor.execute(sql, [*fixed, *arrays_of])  # the defaults come first in the statement's text
            else:
                params: list[Any] = []
                for row in batch:
                    params += [prep(row[name], connection) for prep, name in zip(prepare, names)]
                    params += fixed
                cursor.execute(head + ", ".join([row_sql] * len(batch)) + tail, params)
            if returning:
                keys += [row[0] for row in cursor.fetchall()]
    return keys
