import json

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from rest_framework.authtoken.models import Token


class Command(BaseCommand):
    help = "Create an account (submitter or contributor) and print its API token as JSON."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--email", default="")
        parser.add_argument("--password", help="lets the person log in to the admin/portal; omit for API-only")
        parser.add_argument("--staff", action="store_true", help="may use the admin")
        parser.add_argument("--exists-ok", action="store_true", help="print the token of an existing account")

    @transaction.atomic
    def handle(self, *args, username, email, password, staff, exists_ok, **options):
        users = get_user_model()
        user = users.objects.filter(username=username).first()
        if user is not None and not exists_ok:
            raise CommandError(f"an account named {username!r} already exists (use --exists-ok to print its token)")
        if user is None:
            user = users.objects.create_user(username=username, email=email, password=password)
            user.is_staff = user.is_superuser = staff
            user.save(update_fields=["is_staff", "is_superuser"])
        token, _ = Token.objects.get_or_create(user=user)
        self.stdout.write(json.dumps({"username": user.username, "id": user.pk, "token": token.key}))
