"""Money in the API: a person's balances and ledger entries, payout-address linking (EIP-191), and the
Merkle proof a contributor sends to the PayoutLedger contract to claim."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.api.authentication import DeviceAuthentication, IsPerson
from marketplace.core.exceptions import NotFound, ValidationFailed
from marketplace.ledger.models import Line
from marketplace.ledger.selectors import balances_for, entries_for, proof_for
from marketplace.ledger.wallets import wallet_active, wallet_challenge_create, wallet_link

AMOUNT_HELP = "integer base units of the payout token, as a decimal string (amounts exceed 2**53)"
MAX_ENTRIES = 200


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

    @extend_schema(operation_id="ledger_balances", responses=BalancesOut)
    def get(self, request):
        return Response(BalancesOut(balances_for(user=request.user)).data)


class EntryOut(serializers.Serializer):
    id = serializers.IntegerField()
    posting = serializers.IntegerField(source="posting_id")
    kind = serializers.CharField(source="posting.kind")
    account = serializers.CharField(source="account.key")
    amount = serializers.SerializerMethodField(help_text=f"signed; {AMOUNT_HELP}")
    memo = serializers.CharField(source="posting.memo")
    created_at = serializers.DateTimeField(source="posting.created_at")

    def get_amount(self, line: Line) -> str:
        return str(line.amount)


class EntriesApi(APIView):
    permission_classes = [IsPerson]

    @extend_schema(
        operation_id="ledger_entries",
        parameters=[OpenApiParameter("before", int, description="only entries with a smaller id (the next page)"),
                    OpenApiParameter("limit", int, description=f"at most this many (1..{MAX_ENTRIES}, default 50)")],
        responses=EntryOut(many=True),
    )
    def get(self, request):
        lines = entries_for(user=request.user)
        before, limit = request.query_params.get("before"), request.query_params.get("limit", "50")
        if before is not None:
            if not before.isdigit():
                raise ValidationFailed("before must be an entry id", fields={"before": "not an integer"})
            lines = lines.filter(pk__lt=int(before))
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_ENTRIES:
            raise ValidationFailed(f"limit must be 1..{MAX_ENTRIES}", fields={"limit": "out of range"})
        return Response(EntryOut(lines[: int(limit)], many=True).data)


class ChallengeOut(serializers.Serializer):
    nonce = serializers.CharField()
    message = serializers.CharField(help_text="sign exactly this text with personal_sign (EIP-191)")
    expires_at = serializers.DateTimeField()


class WalletOut(serializers.Serializer):
    address = serializers.CharField()
    linked_at = serializers.DateTimeField()


class WalletChallengeApi(APIView):
    permission_classes = [IsPerson]

    @extend_schema(operation_id="wallet_challenge", responses=ChallengeOut,
                   description="A one-time message to sign with the payout address's key. Expires.")
    def get(self, request):
        challenge = wallet_challenge_create(user=request.user)
        return Response(ChallengeOut(challenge).data)


class WalletApi(APIView):
    permission_classes = [IsPerson]

    class LinkIn(serializers.Serializer):
        nonce = serializers.CharField(max_length=64)
        address = serializers.CharField(max_length=42)
        signature = serializers.CharField(max_length=132, help_text="0x + 65 bytes hex (personal_sign)")

    @extend_schema(operation_id="wallet_retrieve", responses={200: WalletOut, 404: OpenApiTypes.OBJECT})
    def get(self, request):
        link = wallet_active(user=request.user)
        if link is None:
            raise NotFound("no payout address linked")
        return Response(WalletOut(link).data)

    @extend_schema(operation_id="wallet_link", request=LinkIn, responses={201: WalletOut})
    def post(self, request):
        body = self.LinkIn(data=request.data)
        body.is_valid(raise_exception=True)
        link = wallet_link(user=request.user, **body.validated_data)
        return Response(WalletOut(link).data, status=status.HTTP_201_CREATED)


class ProofOut(serializers.Serializer):
    epoch = serializers.IntegerField()
    account = serializers.CharField()
    cumulative = serializers.CharField(help_text=AMOUNT_HELP)
    proof = serializers.ListField(child=serializers.CharField())
    root = serializers.CharField()
    state = serializers.CharField(help_text="published, or final once deep enough")
    contract = serializers.CharField()
    chain_id = serializers.IntegerField(allow_null=True)


class PayoutProofApi(APIView):
    # A person, or one of their enrolled devices (`idlegrid-agent claim` uses its device credentials): the
    # proof is the owner's either way, and reading it moves nothing (a claim always pays the account itself).
    authentication_classes = [DeviceAuthentication, *APIView.authentication_classes]
    permission_classes = [IsAuthenticated]

    @extend_schema(
        operation_id="payout_proof",
        parameters=[OpenApiParameter("address", str, description="one of your payout addresses (default: the active one)")],
        responses={200: ProofOut, 404: OpenApiTypes.OBJECT},
        description="claim(account, cumulative, proof) on the PayoutLedger contract pays cumulative minus what was claimed.",
    )
    def get(self, request):
        return Response(ProofOut(proof_for(user=request.user, address=request.query_params.get("address"))).data)
