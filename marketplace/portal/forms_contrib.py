"""The contributor's forms (enrol a device, link a payout address) and the API tokens page's. Each checks
what the page can say next to its field; the services check the rest, and their refusals come back as
field errors (`errors_from`)."""

from __future__ import annotations

import re

from django import forms

from marketplace.accounts.services import TOKEN_NAME_MAX
from marketplace.core.exceptions import ApplicationError

ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
SIGNATURE = re.compile(r"0x[0-9a-fA-F]{130}")


def _printable(value: str, what: str) -> str:
    value = value.strip()
    if not value.isprintable():
        raise forms.ValidationError(f"{what} may hold printable characters only.")
    return value


class DeviceEnrolForm(forms.Form):
    name = forms.CharField(
        label="Device name", max_length=100,
        help_text="How this device appears on your devices page, e.g. \u201cstudy-pc\u201d or \u201claptop\u201d.",
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}),
    )

    def clean_name(self) -> str:
        return _printable(self.cleaned_data["name"], "A device name")


class WalletLinkForm(forms.Form):
    nonce = forms.CharField(widget=forms.HiddenInput, max_length=64)
    address = forms.CharField(
        label="Payout address", max_length=42, help_text="0x and 40 hex digits: the address that signed.",
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false", "placeholder": "0x…"}),
    )
    signature = forms.CharField(
        label="Signature", max_length=200,
        help_text="0x and 130 hex digits: the personal_sign (EIP-191) signature of the message above.",
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false", "placeholder": "0x…"}),
    )
    password = forms.CharField(
        label="Your account password", strip=False, max_length=1024,
        help_text="A payout address needs your password: a stolen session alone cannot redirect payouts.",
        widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}),
    )

    def clean_address(self) -> str:
        address = self.cleaned_data["address"].strip()
        if not ADDRESS.fullmatch(address):
            raise forms.ValidationError("An address is 0x followed by 40 hex digits.")
        return address

    def clean_signature(self) -> str:
        signature = self.cleaned_data["signature"].strip()
        if not SIGNATURE.fullmatch(signature):
            raise forms.ValidationError("A signature is 0x followed by 130 hex digits (65 bytes).")
        return signature


class TokenCreateForm(forms.Form):
    name = forms.CharField(
        label="Token name", max_length=TOKEN_NAME_MAX,
        help_text="What will use it, e.g. \u201cnightly script\u201d: the list shows this name and its last use.",
        widget=forms.TextInput(attrs={"autocomplete": "off"}),
    )

    def clean_name(self) -> str:
        return _printable(self.cleaned_data["name"], "A token name")


class TokenRevokeForm(forms.Form):
    token_key = forms.RegexField(regex=r"^[A-Za-z0-9]{1,64}$", widget=forms.HiddenInput)


def as_sentence(text: str) -> str:
    """A service's message ("no such token") as a sentence on a page ("No such token.")."""
    return f"{text[:1].upper()}{text[1:]}."


def errors_from(form: forms.Form, exc: ApplicationError) -> None:
    """A service's refusal on the form: each field it names gets the refusal's words next to it (the
    service's field notes are terse codes), anything else goes on top of the form."""
    named = [name for name in exc.fields if name in form.fields and not form.fields[name].widget.is_hidden]
    for name in named:
        form.add_error(name, as_sentence(exc.message))
    if not named:
        form.add_error(None, as_sentence(exc.message))
