"""Money in the API: a person's balances and ledger entries, payout-address linking (EIP-191), and the
Merkle proof a contributor sends to the PayoutLedger contract to claim."""

from __future__ import annotations

import re

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.generics import ListAPIView
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.api.authentication import DeviceAuthentication, IsPerson
from marketplace.api.filters import EntryFilter
from marketplace.api.idempotency import idempotent
from marketplace.api.schema import ErrorOut
from marketplace.core.exceptions import NotFound, ValidationFailed
from marketplace.ledger.models import Line, WalletLink
from marketplace.ledger.selectors import balances_for, entries_for, proof_for
from marketplace.ledger.wallets import (
    WalletLinked,
    wallet_active,
    wallet_challenge_create,
    wallet_change_cancel,
    wallet_link,
    wallet_pending,
)

ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
AMOUNT_HELP = "integer base units of the payout token, as a decimal string (amounts exceed 2**53)"


class BalancesOut(serializers.Serializer):
    available = serializers.CharField(help_text=f"spendable on jobs; {AMOUNT_HELP}")
    escrowed = serializers.CharField(help_text="reserved by your jobs that have not ended")
    earnings_held = serializers.CharField(help_text="earned by your devices, inside the audit window")
    earnings_settled = serializers.CharField(help_text="past the audit window, waiting for a payout address")
    payout_addresses = serializers.DictField(child=serializers.CharField(),
                                             help_text="cumulative amount per payout address (claimable on chain)")
    deposits_unlinked = serializers.CharField(help_text="deposits from your addresses before you linked them")


class BalancesApi(APIView):
    permission_classes = [IsPerson]

    @extend_schema(operation_id="ledger_balances", responses=BalancesOut,
                   description="Your balances: spendable, escrowed, earned (held, settled) and paid per address.")
    def get(self, request):
        return Response(BalancesOut(balances_for(user=request.user)).data)


class EntryOut(serializers.Serializer):
    id = serializers.IntegerField(help_text="the ledger line's id (page with before)")
    posting = serializers.IntegerField(source="posting_id", help_text="the posting the line belongs to")
    kind = serializers.CharField(source="posting.kind", help_text="the posting's kind: grant, escrow, credit, ...")
    account = serializers.CharField(source="account.key", help_text="the account the line moves")
    amount = serializers.SerializerMethodField(help_text=f"signed; {AMOUNT_HELP}")
    memo = serializers.CharField(source="posting.memo", help_text="what the posting was for")
    created_at = serializers.DateTimeField(source="posting.created_at", help_text="when it was posted")

    def get_amount(self, line: Line) -> str:
        return str(line.amount)


class EntriesApi(ListAPIView):
    permission_classes = [IsPerson]
    serializer_class = EntryOut
    filterset_class = EntryFilter

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema generator: no person, and no database
            return Line.objects.none()
        return entries_for(user=self.request.user)

    @extend_schema(
        operation_id="ledger_entries",
        responses={200: EntryOut(many=True), 400: ErrorOut, 401: ErrorOut, 404: ErrorOut},
        description="Your ledger lines, newest first, a page at a time (docs/api/lists.md): follow `next`.",
    )
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)


class ChallengeOut(serializers.Serializer):
    nonce = serializers.CharField(help_text="send it back with the signature")
    message = serializers.CharField(help_text="sign exactly this text with personal_sign (EIP-191)")
    expires_at = serializers.DateTimeField(help_text="the challenge is refused after this")


class PendingOut(serializers.Serializer):
    address = serializers.CharField(help_text="the address that will be paid")
    requested_at = serializers.DateTimeField(source="linked_at", help_text="when the change was asked for")
    effective_at = serializers.DateTimeField(help_text="payouts go to this address from then on; cancel before")


class WalletOut(serializers.Serializer):
    address = serializers.CharField(allow_null=True, help_text="the active payout address: epochs pay it")
    linked_at = serializers.DateTimeField(allow_null=True, help_text="when the active address was linked")
    pending = PendingOut(allow_null=True, help_text="a change waiting for its time, if any")


class LinkedOut(WalletOut):
    notice = serializers.CharField(help_text="what took effect when, and who was told")


def wallet_out(active: WalletLink | None, pending: WalletLink | None) -> dict:
    return WalletOut({"address": active and active.address, "linked_at": active and active.linked_at,
                      "pending": pending}).data


def _notice(linked: WalletLinked) -> str:
    new, when = linked.link.address, linked.link.effective_at.isoformat(timespec="seconds")
    if linked.previous is None:
        return f"{new} is your payout address from now on."
    told = ("A notice naming both addresses went to the account's email address." if linked.notified
            else "The account has no email address: nobody was told.")
    if linked.link.active:
        return f"{new} replaced {linked.previous.address} at once (no change delay is configured). {told}"
    return (f"{new} becomes your payout address at {when}; until then payouts keep going to "
            f"{linked.previous.address}. {told} Cancel with DELETE /api/v1/wallet/pending/.")


class WalletChallengeApi(APIView):
    permission_classes = [IsPerson]
    throttle_scope = "wallet"

    @extend_schema(operation_id="wallet_challenge_create", responses={200: ChallengeOut, 429: ErrorOut},
                   description="A one-time message to sign with the payout address's key. Expires.")
    def get(self, request):
        challenge = wallet_challenge_create(user=request.user)
        return Response(ChallengeOut(challenge).data)


class WalletApi(APIView):
    permission_classes = [IsPerson]
    throttle_scope = "wallet"

    class LinkIn(serializers.Serializer):
        password = serializers.CharField(max_length=1024, trim_whitespace=False,
                                         help_text="the account's password: a token alone cannot change payouts")
        nonce = serializers.CharField(max_length=64, help_text="the challenge's nonce")
        address = serializers.CharField(max_length=42, help_text="0x and 40 hex digits: the address that signed")
        signature = serializers.CharField(max_length=132, help_text="0x + 65 bytes hex (personal_sign)")

    @extend_schema(operation_id="wallet_retrieve", responses={200: WalletOut, 404: ErrorOut, 429: ErrorOut},
                   description="The active payout address, and a pending change with the time it takes effect.")
    def get(self, request):
        active, pending = wallet_active(user=request.user), wallet_pending(user=request.user)
        if active is None and pending is None:
            raise NotFound("no payout address linked")
        return Response(wallet_out(active, pending))

    @extend_schema(
        operation_id="wallet_link", request=LinkIn,
        responses={201: LinkedOut, 202: LinkedOut, 400: ErrorOut, 409: ErrorOut, 429: ErrorOut},
        description="Link the address whose key signed the challenge. 201: it is the payout address now (none was "
                    "active). 202: it replaces the active one after IDLEGRID_WALLET_CHANGE_DELAY_SECONDS, and "
                    "the account's email address is told; a newer change replaces a pending one.",
    )
    @idempotent
    def post(self, request):
        body = self.LinkIn(data=request.data)
        body.is_valid(raise_exception=True)
        linked = wallet_link(user=request.user, **body.validated_data)
        active = linked.link if linked.link.active else linked.previous
        data = {**wallet_out(active, None if linked.link.active else linked.link), "notice": _notice(linked)}
        return Response(data, status=status.HTTP_201_CREATED if linked.link.active else status.HTTP_202_ACCEPTED)


class WalletPendingApi(APIView):
    permission_classes = [IsPerson]
    throttle_scope = "wallet"

    @extend_schema(operation_id="wallet_change_cancel", responses={200: WalletOut, 404: ErrorOut, 429: ErrorOut},
                   description="Cancel the pending payout-address change; the active address stays. No password "
                               "needed: cancelling only keeps what the account already proved.")
    def delete(self, request):
        wallet_change_cancel(user=request.user)
        return Response(wallet_out(wallet_active(user=request.user), None))


class ProofOut(serializers.Serializer):
    epoch = serializers.IntegerField(help_text="the latest published epoch with a leaf for the address")
    account = serializers.CharField(help_text="the payout address (claim's first argument)")
    cumulative = serializers.CharField(help_text=AMOUNT_HELP)
    proof = serializers.ListField(child=serializers.CharField(), help_text="the Merkle proof, 0x hex hashes")
    root = serializers.CharField(help_text="the epoch's Merkle root, as published")
    state = serializers.CharField(help_text="published, or final once deep enough")
    contract = serializers.CharField(help_text="the PayoutLedger contract's address")
    chain_id = serializers.IntegerField(allow_null=True, help_text="the chain it lives on")


class PayoutProofApi(APIView):
    # A person, or one of their enrolled devices (`idlegrid-agent claim` uses its device credentials): the
    # proof is the owner's either way, and reading it moves nothing (a claim always pays the account itself).
    authentication_classes = [DeviceAuthentication, *APIView.authentication_classes]
    permission_classes = [IsAuthenticated]

    @extend_schema(
        operation_id="payout_proof_retrieve",
        parameters=[OpenApiParameter("address", str, description="one of your payout addresses (default: the active one)")],
        responses={200: ProofOut, 404: OpenApiTypes.OBJECT},
        description="claim(account, cumulative, proof) on the PayoutLedger contract pays cumulative minus what was claimed.",
    )
    def get(self, request):
        address = request.query_params.get("address")
        # Refused before the query: PostgreSQL cannot compare text holding U+0000 ("?address=%00" was a 500).
        if address is not None and not ADDRESS.fullmatch(address):
            raise ValidationFailed("address must be 0x and 40 hex digits", fields={"address": "not an address"})
        return Response(ProofOut(proof_for(user=request.user, address=address)).data)
