"""JSON from untrusted bytes, bounded: size, nesting depth, item count and number length are checked
before `json.loads` sees the text, and what JSON does not define (NaN, Infinity, floats beyond the
float range, invalid UTF-8) is refused.

Why before: CPython's C decoder recurses once per nesting level. Where something raised the recursion
limit (py_ecc sets 100000 at import, through eth_account), a 200 KB body nested 100,000 deep
overflows the C stack and kills the process instead of raising RecursionError. Counting brackets
first makes the answer a clear refusal, whatever the recursion limit.

Shared by both ends (docs/protocol.md, "Errors"): the marketplace parses request bodies and
safetensors headers with it, the agent the server's answers. Standard library only: the agent
process imports no numpy (worker_agent/README.md, "Torch only in the child"; test_agent_cli.py checks).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

MAX_DEPTH = 32
MAX_ITEMS = 100_000
# uint256 amounts have 78 digits; nothing the protocol carries needs more.
MAX_NUMBER_DIGITS = 100
# The C decoder uses about one C frame per level: far below any thread's stack at this depth.
DEPTH_CEILING = 512

# The text is scanned in chunks of this size (cut so that a run of backslashes and the character it
# escapes stay in one chunk): memory stays O(chunk) however large the text.
_CHUNK = 1 << 20
_BACKSLASHES = re.compile(rb"\\*")
# Outside strings only brackets and commas count; quotes delimit strings.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{},')
# Openers become +1 and closers -1 (as signed bytes); everything else is deleted.
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_NUMBER_PUNCTUATION = "+-.eE"


class JSONRefused(ValueError):
    """The bytes are not JSON, or are JSON past a limit; the message says which, for the sender.
    `limit` names the bound ("bytes", "depth", "items", "digits", "number", "encoding") or is
    "syntax" for text that is not JSON at all."""

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


def loads(
    data: bytes | bytearray | memoryview | str,
    *,
    max_bytes: int,
    max_depth: int = MAX_DEPTH,
    max_items: int = MAX_ITEMS,
    max_number_digits: int = MAX_NUMBER_DIGITS,
) -> Any:
    """Parse one JSON document, or raise JSONRefused. Within the limits the value is exactly what
    `json.loads` gives. Items are array elements and object members (containers count too)."""
    if not 1 <= max_depth <= DEPTH_CEILING:
        raise ValueError(f"max_depth must be 1..{DEPTH_CEILING}: deeper parses recurse on the C stack")
    raw, text = _utf8(data, max_bytes)
    _check_structure(raw, max_depth=max_depth, max_items=max_items)
    try:
        return json.loads(
            text,
            parse_int=lambda literal: _integer(literal, max_number_digits),
            parse_float=lambda literal: _float(literal, max_number_digits),
            parse_constant=_constant,
        )
    except json.JSONDecodeError as exc:
        raise JSONRefused(f"not JSON: {exc}", limit="syntax") from None


def _utf8(data: bytes | bytearray | memoryview | str, max_bytes: int) -> tuple[bytes, str]:
    """The document as UTF-8 bytes (for counting) and as text (for the decoder)."""
    if isinstance(data, str):
        # surrogatepass: json.loads accepts lone surrogates in a str; they never encode an ASCII byte.
        raw = data.encode("utf-8", "surrogatepass")
        _check_size(raw, max_bytes)
        return raw, data
    raw = bytes(data)
    _check_size(raw, max_bytes)
    try:
        return raw, raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JSONRefused(f"not UTF-8: invalid byte at position {exc.start} (JSON is UTF-8)", limit="encoding") from None


def _check_size(raw: bytes, max_bytes: int) -> None:
    if len(raw) > max_bytes:
        raise JSONRefused(f"larger than {max_bytes} bytes", limit="bytes")


def _check_structure(raw: bytes, *, max_depth: int, max_items: int) -> None:
    openers = raw.count(b"[") + raw.count(b"{")
    if openers <= max_depth and openers + raw.count(b",") <= max_items:
        return  # counted with string contents included: an upper bound, enough for most bodies
    depth = items = 0
    for piece in _outside_strings(raw):
        openers = piece.count(b"[") + piece.count(b"{")
        # The deepest prefix (unclosed openers count: the decoder recurses into them before it finds the
        # text truncated). A piece that cannot pass the limit is not walked.
        if depth + openers > max_depth:
            steps = memoryview(piece.translate(_STEPS, _NOT_BRACKETS)).cast("b")
            if max(accumulate(steps, initial=depth)) > max_depth:
                raise JSONRefused(f"nested deeper than {max_depth}", limit="depth")
        depth += openers - piece.count(b"]") - piece.count(b"}")
        items += openers + piece.count(b",")
        if items > max_items:
            raise JSONRefused(f"more than {max_items} items", limit="items")


def _outside_strings(raw: bytes) -> Iterator[bytes]:
    """The brackets and commas outside string literals, as the decoder delimits strings.

    All C-speed bytes operations, no per-token Python: escapes are resolved left to right first (an
    escaped backslash, then an escaped quote), then everything but quotes, brackets and commas is
    dropped, and adjacent quotes go too (two quotes fewer change no other quote's parity); what is left
    splits on quotes, every other piece being outside a string. (A regex skipping string literals, the
    obvious way, costs ~200 ns a literal here: 1.5-2 s for 10 MB of quotes, where this takes 35 ms.)
    Outside strings a backslash is invalid JSON: the decoder stops at it, and what comes before it was
    scanned exactly.
    UTF-8 never encodes a quote, backslash, bracket or comma inside a multi-byte character, so
    working on bytes is exact.
    """
    inside = 0
    for chunk in _chunks(raw):
        chunk = chunk.replace(b"\\\\", b"").replace(b'\\"', b"")
        chunk = chunk.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
        pieces = chunk.split(b'"')
        yield b"".join(pieces[inside::2])
        inside ^= (len(pieces) - 1) & 1


def _run_end(raw: bytes, start: int) -> int:
    """Where the run of backslashes at `start` ends (`start` itself if there is none)."""
    run = _BACKSLASHES.match(raw, start)  # `\\*` matches the empty string too: never None
    return run.end() if run is not None else start


def _chunks(raw: bytes) -> Iterator[bytes]:
    start = 0
    while start < len(raw):
        end = min(len(raw), start + _CHUNK)
        if raw[end - 1] == 0x5C:  # a backslash: take the rest of its run and the character it escapes
            end = min(len(raw), _run_end(raw, end) + 1)
        yield raw[start:end]
        start = end


def _integer(literal: str, max_digits: int) -> int:
    # int() of a long literal is quadratic, and past 4,300 digits a ValueError that can surface as a 500.
    if len(literal) - literal.startswith("-") > max_digits:
        raise JSONRefused(f"a number of more than {max_digits} digits", limit="digits")
    return int(literal)


def _float(literal: str, max_digits: int) -> float:
    if len(literal) - sum(map(literal.count, _NUMBER_PUNCTUATION)) > max_digits:
        raise JSONRefused(f"a number of more than {max_digits} digits", limit="digits")
    value = float(literal)
    if not math.isfinite(value):
        # 1e999 is valid JSON text but becomes inf, which json.dumps writes back as Infinity (not JSON)
        # and strict renderers refuse with a 500.
        raise JSONRefused(f"a number out of range: {literal} is beyond a 64-bit float", limit="number")
    return value


def _constant(name: str) -> Any:
    raise JSONRefused(f"NaN/Infinity are not JSON (found {name})", limit="number")
