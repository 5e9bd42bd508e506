import json

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from marketplace.accounts.services import api_token_create


class Command(BaseCommand):
    help = "Create an account (submitter or contributor) and print a new API token for it as JSON."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--email", default="", help="where notices go (a payout-address change, for one)")
        parser.add_argument("--password", help="for the admin, logins (POST /api/v1/auth/token/) and payout-address "
                                               "changes; omit for an API-only account")
        parser.add_argument("--staff", action="store_true", help="may use the admin")
        parser.add_argument("--exists-ok", action="store_true",
                            help="for an existing account, print a new token (a token is stored hashed: an old one "
                                 "cannot be shown again)")

    @transaction.atomic
    def handle(self, *args, username, email, password, staff, exists_ok, **options):
        users = get_user_model()
        user = users.objects.filter(username=username).first()
        if user is not None and not exists_ok:
            raise CommandError(f"an account named {username!r} already exists (use --exists-ok for a new token)")
        if user is None:
            if password is not None:
                try:
                    validate_password(password, user=users(username=username, email=email))
                except ValidationError as exc:
                    raise CommandError("the password is too weak: " + " ".join(exc.messages)) from None
            user = users.objects.create_user(username=username, email=email, password=password)
            user.is_staff = user.is_superuser = staff
            user.save(update_fields=["is_staff", "is_superuser"])
        _, token = api_token_create(user=user)
        self.stdout.write(json.dumps({"username": user.username, "id": user.pk, "token": token}))
