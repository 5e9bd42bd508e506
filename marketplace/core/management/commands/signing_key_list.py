from django.core.management.base import BaseCommand

from marketplace.core.signing import keyring


class Command(BaseCommand):
    help = "List the unit-signing keys, oldest first: id, state, created, endorsed by."

    def handle(self, *args, **options):
        ring = keyring()
        for key in ring.keys:
            state = "active" if key.key_id == ring.active.key_id else "retired" if key.retired else "published"
            self.stdout.write(f"{key.key_id}  {state:<9}  {key.created_at}  endorsed by {key.endorsed_by or '-'}")
