"""Amounts and times as people read them: tokens with the base units on hover; times as <time> elements
that portal.js shows in the viewer's own zone (UTC without JavaScript)."""

from __future__ import annotations

from datetime import UTC, datetime

from django import template
from django.conf import settings
from django.utils.html import format_html
from django.utils.safestring import SafeString

register = template.Library()

SHOWN_DECIMALS = 6


def tokens_text(base_units: int, *, decimals: int | None = None) -> str:
    """`base_units` as a token amount: thousands separated, at most SHOWN_DECIMALS decimals, trailing zeros
    dropped; "~" when digits were cut (the exact figure is in the hover text)."""
    decimals = settings.IDLEGRID_TOKEN_DECIMALS if decimals is None else decimals
    sign, base = ("-" if base_units < 0 else ""), abs(base_units)
    whole, fraction = divmod(base, 10**decimals) if decimals else (base, 0)
    digits = str(fraction).rjust(decimals, "0") if decimals else ""
    shown = digits[:SHOWN_DECIMALS].rstrip("0")
    cut = "~" if digits[SHOWN_DECIMALS:].strip("0") else ""
    return f"{cut}{sign}{whole:,}" + (f".{shown}" if shown else "")


@register.filter
def tokens(value: object) -> SafeString:
    """`{{ amount|tokens }}`: a base-unit amount (int or decimal string) as `<span title="N base units">`."""
    try:
        base = int(str(value))
    except (TypeError, ValueError):
        return format_html('<span class="amount">{}</span>', "—")
    return format_html('<span class="amount" title="{} base units">{} {}</span>', f"{base:,}", tokens_text(base),
                       settings.IDLEGRID_TOKEN_SYMBOL)


@register.filter
def when(value: datetime | None) -> SafeString:
    """`{{ moment|when }}`: a <time> element, UTC text that portal.js turns into the viewer's zone."""
    if value is None:
        return format_html('<span class="muted">{}</span>', "never")
    utc = value.astimezone(UTC)
    return format_html('<time datetime="{}" data-local>{}</time>', utc.isoformat().replace("+00:00", "Z"),
                       utc.strftime("%Y-%m-%d %H:%M UTC"))


@register.filter
def seconds(value: float | int | None) -> str:
    """A duration in seconds as "1 h 5 min", "3 min 20 s" or "12 s"."""
    if value is None:
        return "—"
    total = max(0, int(round(float(value))))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


@register.filter
def percent(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{100 * float(value):.{int(digits)}f} %"
