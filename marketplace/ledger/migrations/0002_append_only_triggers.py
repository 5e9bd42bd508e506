"""The database itself refuses to change or remove postings, lines and audit rows.

PostgreSQL: UPDATE and DELETE raise (TRUNCATE, which test databases use to reset, is not a row event).
SQLite: UPDATE raises; DELETE is left to the models and querysets, because Django's test flush of an
SQLite database deletes rows one table at a time and there is no way to tell that apart in a trigger.
"""

from django.db import migrations

TABLES = ["ledger_posting", "ledger_line", "ledger_auditentry"]

PG_FUNCTION = """
CREATE OR REPLACE FUNCTION ledger_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'ledger rows are append-only (% on %)', TG_OP, TG_TABLE_NAME;
END;
$$ LANGUAGE plpgsql;
"""


def forwards(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(PG_FUNCTION, params=None)  # no placeholders: the % are plpgsql's
        for table in TABLES:
            schema_editor.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION ledger_append_only()"
            )
    elif vendor == "sqlite":
        for table in TABLES:
            schema_editor.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE ON {table} "
                "BEGIN SELECT RAISE(ABORT, 'ledger rows are append-only'); END"
            )


def backwards(apps, schema_editor):
    for table in TABLES:
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
        else:
            schema_editor.execute(f"DROP TRIGGER IF EXISTS {table}_append_only")


class Migration(migrations.Migration):
    dependencies = [("ledger", "0001_initial")]
    operations = [migrations.RunPython(forwards, backwards)]
