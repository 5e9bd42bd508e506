"""Integers from client text (query strings, headers), refused before int() sees anything odd.

int() raises ValueError on "²" although "²".isdigit() is true, and on any string of more than 4,300
digits (sys.get_int_max_str_digits); either, unguarded, answered 500.
"""

from __future__ import annotations

# Row ids are BigAutoField: at most 2**63 - 1, 19 digits. A larger 19-digit number finds no row
# (Django 5.2 turns an out-of-range integer lookup into an empty result on SQLite and PostgreSQL).
ID_DIGITS = 19


def decimal_parse(text: str | None, *, max_digits: int = ID_DIGITS) -> int | None:
    """The non-negative integer `text` writes in 1..max_digits ASCII digits, else None."""
    if text is None or not (0 < len(text) <= max_digits and text.isascii() and text.isdigit()):
        return None
    return int(text)
