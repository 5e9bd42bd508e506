from django.core.management.base import BaseCommand

from marketplace.core.signing import key_rotate


class Command(BaseCommand):
    help = (
        "Make a new unit-signing key, endorsed by the active one, and make it active; prints its id. "
        "Agents pin it on the old key's endorsement, so none needs to enrol again."
    )

    def handle(self, *args, **options):
        self.stdout.write(key_rotate().key_id)
