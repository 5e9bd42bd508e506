"""Idempotency keys stored as an HMAC and answers sealed under the raw key (marketplace/api/idempotency.py);
anonymous operations (log in, enrol) may carry keys too (user null).

Rows written before this (24 hours' worth at most) held the raw key and the answer in clear: each is
rewritten to its HMAC name and a sealed answer. Their fingerprint (a plain sha256) can no longer match a
request, so a retry of one of those answers 422 idempotency_key_reused: it never runs twice, it only
loses the replay.
"""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


def seal_existing(apps, schema_editor):
    from marketplace.api.idempotency import Sealed

    IdempotencyKey = apps.get_model("api", "IdempotencyKey")
    for row in IdempotencyKey.objects.all().iterator():
        sealed = Sealed(row.key, row.user)
        row.key = sealed.digest
        if row.body is not None:
            row.body = sealed.seal(bytes(row.body))
        row.save(update_fields=["key", "body"])


class Migration(migrations.Migration):

    dependencies = [
        ("api", "0001_idempotency_keys"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.RemoveConstraint(model_name="idempotencykey", name="idempotency_key_unique_per_user"),
        migrations.AlterField(
            model_name="idempotencykey", name="user",
            field=models.ForeignKey(null=True, on_delete=django.db.models.deletion.CASCADE, related_name="+",
                                    to=settings.AUTH_USER_MODEL),
        ),
        migrations.RunPython(seal_existing, migrations.RunPython.noop),
        migrations.AlterField(model_name="idempotencykey", name="key",
                              field=models.CharField(max_length=64, unique=True)),
    ]
