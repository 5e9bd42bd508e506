"""A payout-address change waits IDLEGRID_WALLET_CHANGE_DELAY_SECONDS as a pending link (active false, not
unlinked) before it replaces the active one; at most one is pending per user. Links made before this took
effect when they were made: their effective_at is their linked_at. Rows before this are all either active
or unlinked (wallet_link unlinked every link it replaced), so none reads as pending."""

from django.conf import settings
from django.db import migrations, models
from django.db.models import F


def effective_when_linked(apps, schema_editor):
    apps.get_model("ledger", "WalletLink").objects.filter(effective_at__isnull=True).update(effective_at=F("linked_at"))


class Migration(migrations.Migration):

    dependencies = [
        ("ledger", "0002_append_only_triggers"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name="walletlink",
            name="cancelled_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="walletlink",
            name="effective_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RunPython(effective_when_linked, migrations.RunPython.noop),
        migrations.AddIndex(
            model_name="walletlink",
            index=models.Index(condition=models.Q(("active", False), ("unlinked_at__isnull", True)),
                               fields=["effective_at"], name="wallet_pending_due"),
        ),
        migrations.AddConstraint(
            model_name="walletlink",
            constraint=models.UniqueConstraint(condition=models.Q(("active", False), ("unlinked_at__isnull", True)),
                                               fields=("user",), name="wallet_one_pending_per_user"),
        ),
    ]
