"""The bounded JSON reader: refuses what would crash or bloat a process, and otherwise parses exactly
what json.loads parses."""

from __future__ import annotations

import json
import math
import time
from unittest import mock

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from worker_agent import safejson
from worker_agent.safejson import JSONRefused

MB = 1024 * 1024


def refused(data, **limits) -> JSONRefused:
    limits.setdefault("max_bytes", 64 * MB)
    with pytest.raises(JSONRefused) as caught:
        safejson.loads(data, **limits)
    return caught.value


# --- the limits -----------------------------------------------------------------------------------

def test_a_body_nested_100000_deep_is_refused_before_the_decoder_recurses() -> None:
    bomb = b"[" * 100_000 + b"]" * 100_000

    problem = refused(bomb)

    assert problem.limit == "depth"
    assert str(problem) == "nested deeper than 32"


def test_an_unclosed_nest_counts_as_deep_as_it_opens() -> None:
    # The decoder recurses into every opener before it finds the text truncated.
    assert refused(b'{"a":' * 100_000).limit == "depth"


def test_depth_32_parses_and_33_does_not() -> None:
    assert safejson.loads("[" * 32 + "]" * 32, max_bytes=1000) == json.loads("[" * 32 + "]" * 32)

    assert str(refused("[" * 33 + "]" * 33)) == "nested deeper than 32"


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps(["[" * 1000, "{" * 1000, 'a"[\\'])

    assert safejson.loads(text, max_bytes=10_000) == json.loads(text)


def test_a_quote_after_an_even_run_of_backslashes_ends_the_string() -> None:
    # ["\\"] then 40 real brackets: the quote after \\ closes the string, so the brackets are structure.
    text = '["\\\\", ' + "[" * 40 + "]" * 40 + "]"
    assert json.loads(text)  # valid JSON

    assert refused(text).limit == "depth"


def test_a_quote_after_an_odd_run_of_backslashes_stays_inside_the_string() -> None:
    text = '["\\\\\\"' + "[" * 40 + '"]'

    assert safejson.loads(text, max_bytes=1000) == ['\\"' + "[" * 40]


def test_more_items_than_the_limit_are_refused() -> None:
    assert str(refused("[" + "0," * 100_000 + "0]")) == "more than 100000 items"
    assert safejson.loads("[" + "0," * 99_998 + "0]", max_bytes=MB) == [0] * 99_999


def test_a_body_over_max_bytes_is_refused() -> None:
    problem = refused(b'"' + b"a" * 100 + b'"', max_bytes=100)

    assert problem.limit == "bytes"
    assert str(problem) == "larger than 100 bytes"


def test_an_integer_of_4301_digits_is_refused_by_its_length_not_by_int() -> None:
    problem = refused("[" + "9" * 4301 + "]")

    assert problem.limit == "digits"
    assert str(problem) == "a number of more than 100 digits"


def test_a_uint256_amount_parses_exactly() -> None:
    amount = 2**256 - 1  # 78 digits

    assert safejson.loads(json.dumps({"amount": amount}), max_bytes=1000) == {"amount": amount}
    assert safejson.loads("-" + "9" * 100, max_bytes=1000) == -int("9" * 100)


def test_a_float_with_a_long_mantissa_is_refused() -> None:
    assert refused("0." + "1" * 200).limit == "digits"


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(constant: str) -> None:
    problem = refused(f'{{"loss": {constant}}}')

    assert str(problem) == f"NaN/Infinity are not JSON (found {constant})"


def test_a_float_beyond_the_float_range_is_refused_rather_than_becoming_infinity() -> None:
    assert "out of range" in str(refused("[1e999]"))
    assert safejson.loads("[1e308, -2.5e-300]", max_bytes=100) == [1e308, -2.5e-300]


def test_invalid_utf8_is_refused_with_its_position() -> None:
    problem = refused(b'{"name": "\xff"}')

    assert problem.limit == "encoding"
    assert str(problem) == "not UTF-8: invalid byte at position 10 (JSON is UTF-8)"


def test_text_that_is_not_json_says_where() -> None:
    problem = refused(b'{"kind": ')

    assert problem.limit == "syntax"
    assert str(problem).startswith("not JSON: Expecting value")


def test_every_refusal_is_a_value_error() -> None:
    assert issubclass(JSONRefused, ValueError)


def test_a_depth_the_c_stack_might_not_hold_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="max_depth"):
        safejson.loads("[]", max_bytes=10, max_depth=100_000)


# --- linear time on pathological text ---------------------------------------------------------------

PATHOLOGICAL = {
    "a 10 MB string literal": b'["' + b"a" * 10_000_000 + b'"' + b"]" + b"[" * 40,
    "10 MB of escaped backslashes": b'["' + b"\\\\" * 5_000_000 + b'"]' + b"[" * 40,
    # Without the end-of-text branch of the string pattern, each escaped quote restarts a scan to the end.
    "an unterminated string of escaped quotes": b"[" * 40 + b'"' + b'\\"' * 5_000_000,
    "an unterminated string ending in a lone backslash": b"[" * 40 + b'"' + b'\\"' * 5_000_000 + b"\\",
    "10 MB of quotes": b"[" * 40 + b'"' * 10_000_000,
    "10 MB of backslashes": b"[" * 40 + b"\\" * 10_000_000,
    "10 MB of brackets": b"[]" * 5_000_000,
}


@pytest.mark.parametrize("name", PATHOLOGICAL)
def test_pathological_text_is_answered_in_linear_time(name: str) -> None:
    data = PATHOLOGICAL[name]
    started = time.perf_counter()

    with pytest.raises(JSONRefused):
        safejson.loads(data, max_bytes=16 * MB, max_items=10_000_000)

    # Measured here at 15-80 ms per case (2 shared cores); a quadratic scan of these takes hours.
    assert time.perf_counter() - started < 5


def test_a_10mb_string_literal_parses_whole() -> None:
    text = b'{"blob": "' + b"x" * 10_000_000 + b'", "nested": ' + b"[" * 33 + b"]" * 33 + b"}"

    assert refused(text).limit == "depth"  # the brackets after the literal are seen
    assert len(safejson.loads(text.replace(b"[" * 33 + b"]" * 33, b"[]"), max_bytes=16 * MB)["blob"]) == 10_000_000


# --- the same value as json.loads within the limits ------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**100) + 1, max_value=10**100 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
# Lone surrogates are valid in a str json.loads accepts; keys and values both get them.
documents = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=60,
)


def depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(documents, st.booleans(), st.sampled_from([None, 1]), st.booleans())
def test_valid_json_within_the_limits_parses_to_exactly_what_json_loads_gives(value, ascii_only, indent, many) -> None:
    # Forty copies put more openers in the text than the depth limit: the full scan runs, not the shortcut.
    document = [value] * 40 if many else value
    assume(depth(document) <= safejson.MAX_DEPTH)
    text = json.dumps(document, ensure_ascii=ascii_only, indent=indent)

    parsed = safejson.loads(text, max_bytes=len(text.encode("utf-8", "surrogatepass")))

    assert parsed == json.loads(text)
    assert json.dumps(parsed) == json.dumps(json.loads(text))  # same types too: 1 stays int, 1.0 float


def reference_structure(text: str) -> str:
    """The brackets and commas outside strings, one character at a time, as the C decoder reads strings."""
    kept, inside, escaped = [], False, False
    for char in text:
        if inside:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                inside = False
        elif char == '"':
            inside = True
        elif char in "[]{},":
            kept.append(char)
    return "".join(kept)


# String contents as they travel: quotes, backslashes and brackets escaped or not, as JSON writes them,
# plus escapes JSON allows but json.dumps does not write.
string_contents = st.text(alphabet='ab[]{},"\\é', max_size=10).map(lambda text: json.dumps(text)[1:-1]) | st.sampled_from(
    ["\\/", "\\u0022", "\\u005c", "\\\\\\\\", "\\\\\\\""]
)
tokens = st.sampled_from(list("[]{},: 1")) | string_contents.map(lambda content: f'"{content}"')
texts = st.tuples(
    st.lists(tokens, max_size=40),
    # an unterminated string at the end, perhaps ending in a lone backslash
    st.none() | st.tuples(string_contents, st.booleans()),
).map(lambda parts: "".join(parts[0]) + ("" if parts[1] is None else '"' + parts[1][0] + "\\" * parts[1][1]))


@settings(max_examples=500, deadline=None)
@given(texts, st.sampled_from([1, 2, 3, 5, 8, 1 << 20]))
def test_the_scan_sees_the_structure_the_decoder_sees_whatever_the_chunk_boundaries(text: str, chunk: int) -> None:
    with mock.patch.object(safejson, "_CHUNK", chunk):
        scanned = b"".join(safejson._outside_strings(text.encode()))

    assert scanned.decode() == reference_structure(text)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=40), st.integers(min_value=1, max_value=40))
def test_depth_is_refused_exactly_past_the_limit(levels: int, limit: int) -> None:
    text = '{"a": ' * levels + "0" + "}" * levels

    if levels <= limit:
        assert safejson.loads(text, max_bytes=1000, max_depth=limit) == json.loads(text)
    else:
        assert str(refused(text, max_depth=limit)) == f"nested deeper than {limit}"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=20))
def test_floats_round_trip_bit_for_bit(values: list[float]) -> None:
    parsed = safejson.loads(json.dumps(values), max_bytes=10_000)

    assert [math.copysign(1, v) for v in parsed] == [math.copysign(1, v) for v in values]
    assert parsed == values
