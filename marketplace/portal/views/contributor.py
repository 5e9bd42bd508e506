"""The contributor's pages: devices (and why one gets no work), enrolment, earnings, the payout address.

Thin: each view reads through selectors or calls one service. A secret shown once (an enrolment token) is
kept in the session only until the page after the POST reads it (POST-redirect-GET, popped on read), and
that page is never cached: reloading it shows nothing."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import path
from django.utils.cache import add_never_cache_headers, patch_cache_control
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from web3 import Web3

from marketplace.chain.client import contract_artifact
from marketplace.core.exceptions import ApplicationError, RateLimited
from marketplace.ledger.earnings_report import earnings_report
from marketplace.ledger.exceptions import NoProof
from marketplace.ledger.selectors import Proof, proof_for
from marketplace.ledger.wallets import (
    wallet_active,
    wallet_challenge_create,
    wallet_challenge_open,
    wallet_change_cancel,
    wallet_link,
    wallet_pending,
)
from marketplace.portal.forms_contrib import DeviceEnrolForm, WalletLinkForm, as_sentence, errors_from
from marketplace.portal.limits import within_rate
from marketplace.workers.models import Device
from marketplace.workers.selectors import devices_for_owner
from marketplace.workers.services import enrollment_token_create
from marketplace.workunits.availability import Outlook, device_outlook, work_waiting_for

ENROL_SHOWN = "portal.enrolment_shown"  # session key: the token made by the POST, popped by the next GET
DEVICES_POLL_SECONDS = 5
CHALLENGE = "portal.wallet_challenge"  # session key: the nonce of the challenge the payout page shows


def server_url(request: HttpRequest) -> str:
    """This marketplace's URL as the person's browser reached it: what their agent talks to."""
    return request.build_absolute_uri("/").rstrip("/")


@dataclass(frozen=True)
class DeviceView:
    device: Device
    outlook: Outlook
    trust: list[Any]  # DeviceTrust rows of its current hardware class


def _device_views(request: HttpRequest) -> list[DeviceView]:
    views = []
    waiting = work_waiting_for(owner_id=request.user.pk)  # the same for every device of this owner
    for device in devices_for_owner(owner=request.user).select_related("owner").order_by("-created_at", "-pk"):
        trust = sorted((t for t in device.trust.all() if t.hardware_class == device.hardware_class),
                       key=lambda t: t.kind)
        views.append(DeviceView(device=device, outlook=device_outlook(device=device, waiting=waiting),
                                trust=trust))
    return views


@login_required
@require_GET
def devices(request: HttpRequest) -> HttpResponse:
    # Polled more slowly than a job's page: each poll asks why each device gets no work.
    poll = max(settings.IDLEGRID_PORTAL_POLL_SECONDS, DEVICES_POLL_SECONDS)
    return render(request, "portal/contributor/devices.html", {"devices": _device_views(request), "devices_poll": poll})


@login_required
@require_GET
def devices_list(request: HttpRequest) -> HttpResponse:
    """The devices alone, for the page's poll (htmx)."""
    return render(request, "portal/contributor/partials/devices_list.html", {"devices": _device_views(request)})


@login_required
@require_http_methods(["GET", "POST"])
def device_enrol(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        form = DeviceEnrolForm(request.POST)
        if form.is_valid():
            try:
                token, row = enrollment_token_create(owner=request.user)
            except RateLimited as exc:
                form.add_error(None, f"{exc.message}.")
            else:
                request.session[ENROL_SHOWN] = {"token": token, "name": form.cleaned_data["name"],
                                                "expires_at": row.expires_at.isoformat()}
                return redirect("portal:device-enrol")
        return render(request, "portal/contributor/enrol.html", {"form": form}, status=400)
    shown = request.session.pop(ENROL_SHOWN, None)
    context: dict[str, Any] = {"form": DeviceEnrolForm()}
    if shown:
        server = server_url(request)
        context.update(shown=shown, server=server, expires_at=datetime.fromisoformat(shown["expires_at"]),
                       commands=enrol_commands(server, shown["token"], shown["name"]))
    response = render(request, "portal/contributor/enrol.html", context)
    add_never_cache_headers(response)
    patch_cache_control(response, no_store=True, private=True)
    return response


def enrol_commands(server: str, token: str, name: str) -> str:
    enroll = shlex.join(["idlegrid-agent", "enroll", "--server", server, "--token", token, "--name", name])
    return f"{enroll}\nidlegrid-agent run"


@login_required
@require_GET
def earnings(request: HttpRequest) -> HttpResponse:
    return render(request, "portal/contributor/earnings.html", {"report": earnings_report(user=request.user)})


def _challenge(request: HttpRequest) -> Any:
    challenge = wallet_challenge_open(user=request.user, nonce=request.session.get(CHALLENGE))
    if challenge is None:
        challenge = wallet_challenge_create(user=request.user)
        request.session[CHALLENGE] = challenge.nonce
    return challenge


@login_required
@require_http_methods(["GET", "POST"])
def payout(request: HttpRequest) -> HttpResponse:
    form = WalletLinkForm(request.POST) if request.method == "POST" else None
    status = 200 if form is None else 400
    if form is not None and form.is_valid() and not within_rate("wallet", user_id=request.user.pk):
        form.add_error(None, "Too many attempts to link an address: wait a minute and try again.")
        status = 429
    elif form is not None and form.is_valid():
        try:
            linked = wallet_link(user=request.user, **form.cleaned_data)
        except ApplicationError as exc:
            errors_from(form, exc)
        else:
            request.session.pop(CHALLENGE, None)
            if linked.link.active:
                messages.success(request, f"{linked.link.address} is your payout address from now on.")
            else:
                messages.warning(request, f"{linked.link.address} becomes your payout address at "
                                          f"{linked.link.effective_at:%Y-%m-%d %H:%M} UTC; until then payouts keep "
                                          "going to the active address. You can cancel the change below.")
            return redirect("portal:payout")
    challenge = _challenge(request)
    if form is None:
        form = WalletLinkForm(initial={"nonce": challenge.nonce})
    else:  # a refused attempt: the fresh challenge (a used or expired one would be refused again)
        form.data = form.data.copy()
        form.data["nonce"] = challenge.nonce
    context = {"form": form, "challenge": challenge, "message_hex": "0x" + challenge.message.encode().hex(),
               **_payout_context(request)}
    response = render(request, "portal/contributor/payout.html", context, status=status)
    add_never_cache_headers(response)
    return response


def _payout_context(request: HttpRequest) -> dict[str, Any]:
    active, pending = wallet_active(user=request.user), wallet_pending(user=request.user)
    try:
        proof: Proof | None = proof_for(user=request.user)
        no_proof = ""
    except NoProof as exc:
        proof, no_proof = None, exc.message
    context: dict[str, Any] = {"active": active, "pending": pending, "proof": proof, "no_proof": no_proof,
                               "rpc_url": settings.IDLEGRID_CHAIN_RPC_URL}
    if proof is not None and proof["contract"]:
        context["claim_command"] = claim_command(server_url(request), settings.IDLEGRID_CHAIN_RPC_URL)
        context["claim_tx"] = {"to": proof["contract"], "data": claim_calldata(proof),
                               "chainId": hex(proof["chain_id"]) if proof["chain_id"] else None}
    return context


def claim_command(server: str, rpc_url: str | None) -> str:
    return shlex.join(["idlegrid-agent", "claim", "--rpc-url", rpc_url or "RPC_URL", "--key-file",
                       "KEY_FILE", "--server", server])


def claim_calldata(proof: Proof) -> str:
    """claim(account, cumulative, proof) ABI-encoded with the contract's own ABI, for a browser wallet's
    eth_sendTransaction: the page computes nothing itself."""
    contract = Web3().eth.contract(abi=contract_artifact("PayoutLedger")["abi"])
    return str(contract.encode_abi("claim", args=[Web3.to_checksum_address(proof["account"]),
                                                  int(proof["cumulative"]), [bytes.fromhex(p[2:]) for p in proof["proof"]]]))


@login_required
@require_POST
def payout_cancel(request: HttpRequest) -> HttpResponse:
    try:
        cancelled = wallet_change_cancel(user=request.user)
    except ApplicationError as exc:
        messages.error(request, as_sentence(exc.message))
    else:
        messages.success(request, f"The change to {cancelled.address} was cancelled.")
    return redirect("portal:payout")


urlpatterns = [
    path("devices/", devices, name="devices"),
    path("devices/list/", devices_list, name="devices-list"),
    path("devices/enrol/", device_enrol, name="device-enrol"),
    path("earnings/", earnings, name="earnings"),
    path("payout/", payout, name="payout"),
    path("payout/cancel/", payout_cancel, name="payout-cancel"),
]
