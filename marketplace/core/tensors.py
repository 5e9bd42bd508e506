"""Safetensors without torch: read a header without loading data, read one tensor, write one by streaming.

The header is parsed here (8-byte little-endian length, then JSON) so that a file that is not
safetensors (a pickle, say) is refused before anything interprets its bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from worker_agent import safejson

MAX_HEADER_BYTES = 16 * 1024 * 1024
# A header is {name: {"dtype", "shape": [...], "data_offsets": [a, b]}, "__metadata__": {str: str}}:
# 3 levels deep. Bounded before json.loads runs: a header nested 100,000 deep (it fits in 200 KB)
# overflows the C stack of a process whose recursion limit py_ecc raised (worker_agent/safejson.py).
HEADER_DEPTH = 4
MAX_TENSORS = 100_000
MAX_DIMS = 16
# Per tensor: its member, its object and 3 members, the shape list and its dims, the offsets list and 2.
HEADER_ITEMS = MAX_TENSORS * (MAX_DIMS + 10)
HEADER_NUMBER_DIGITS = 20  # shapes and offsets are u64 in the format
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
NUMPY_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32, "U8": np.uint8}


class TensorFileError(ValueError):
    """The file is not a well-formed safetensors file."""


class Readable(Protocol):
    """A file, or an HTTP body from object storage (marketplace/artifacts/storage.py)."""

    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offsets in the file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header; raise TensorFileError saying what is wrong."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        return read_header_from(handle, size=size)


def read_header_from(stream: Readable, *, size: int) -> dict[str, TensorInfo]:
    """The same from a stream at the file's first byte, the file's size known: it reads no further than the
    header, so a spec check reads a few kilobytes of an artifact in object storage, not all of it."""
    prefix = _read_exactly(stream, 8)
    if len(prefix) < 8:
        raise TensorFileError("not a safetensors file: shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len == 0 or header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise TensorFileError("not a safetensors file: its header length is impossible (is it a pickle?)")
    raw = _read_exactly(stream, header_len)
    try:
        header = safejson.loads(raw, max_bytes=MAX_HEADER_BYTES, max_depth=HEADER_DEPTH, max_items=HEADER_ITEMS,
                                max_number_digits=HEADER_NUMBER_DIGITS)
    except safejson.JSONRefused as exc:
        raise TensorFileError(f"not a safetensors file: its header is refused: {exc}") from None
    if not isinstance(header, dict):
        raise TensorFileError("not a safetensors file: its header is not an object")
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSORS:
        raise TensorFileError(f"the header lists more than {MAX_TENSORS} tensors")
    base = 8 + header_len
    tensors = {name: _tensor_info(name, entry, base, size) for name, entry in header.items()}
    return tensors


def _read_exactly(stream: Readable, count: int) -> bytes:
    """Up to count bytes, fewer only at the end: an HTTP body, unlike a file, may return less per read."""
    parts, remaining = [], count
    while remaining and (part := stream.read(remaining)):
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def _label(name: str) -> str:
    """A tensor's name for a message: names are the sender's and may be megabytes long."""
    return repr(name) if len(name) <= 100 else f"{name[:100]!r}..."


def _tensor_info(name: str, entry: object, base: int, size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise TensorFileError(f"tensor {_label(name)}: malformed header entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:  # a list is unhashable: TypeError, a 500
        raise TensorFileError(f"tensor {_label(name)}: unknown dtype {repr(dtype)[:50]}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise TensorFileError(f"tensor {_label(name)}: malformed shape {str(shape)[:100]}")
    if len(shape) > MAX_DIMS:
        raise TensorFileError(f"tensor {_label(name)}: more than {MAX_DIMS} dimensions")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise TensorFileError(f"tensor {_label(name)}: malformed data_offsets")
    count = 1
    for dim in shape:
        count *= dim
    start, end = base + offsets[0], base + offsets[1]
    if not (base <= start <= end <= size) or end - start != count * DTYPE_SIZES[dtype]:
        raise TensorFileError(f"tensor {_label(name)}: data_offsets do not match its shape and the file size")
    return TensorInfo(dtype=dtype, shape=tuple(shape), start=start, end=end)


def read_array(path: Path, info: TensorInfo, *, rows: slice | None = None) -> np.ndarray:
    """Read one tensor (or a slice of its first axis) into numpy, reading only those bytes."""
    dtype = NUMPY_DTYPES.get(info.dtype)
    if dtype is None:
        raise TensorFileError(f"dtype {info.dtype} cannot be read here")
    row_shape = info.shape[1:]
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * DTYPE_SIZES[info.dtype]
    first, last = (0, info.shape[0]) if rows is None else (rows.start, rows.stop)
    with path.open("rb") as handle:
        handle.seek(info.start + first * row_bytes)
        data = handle.read((last - first) * row_bytes)
    return np.frombuffer(data, dtype=dtype).reshape((last - first, *row_shape))


def _header_bytes(*tensors: tuple[str, str, tuple[int, ...]]) -> bytes:
    """The header of a file holding (name, dtype, shape) tensors, their data laid out in this order."""
    header, offset = {}, 0
    for name, dtype, shape in tensors:
        count = 1
        for dim in shape:
            count *= dim
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + count * DTYPE_SIZES[dtype]]}
        offset += count * DTYPE_SIZES[dtype]
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw


def write_single(chunks: Iterable[bytes], *, name: str, dtype: str, shape: tuple[int, ...]) -> Iterable[bytes]:
    """Yield a one-tensor safetensors file from the tensor's raw bytes, streamed in order."""
    yield _header_bytes((name, dtype, shape))
    yield from chunks


def write_many(tensors: list[tuple[str, str, tuple[int, ...], Iterable[bytes]]]) -> Iterable[bytes]:
    """Yield a safetensors file of several tensors, (name, dtype, shape, raw byte chunks) each, streamed in
    order: each tensor's chunks must add up to exactly its size."""
    yield _header_bytes(*((name, dtype, shape) for name, dtype, shape, _ in tensors))
    for *_, chunks in tensors:
        yield from chunks


def array_file_bytes(array: np.ndarray, *, name: str) -> bytes:
    """A one-tensor safetensors file for a small array (a unit's input slice)."""
    dtype = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.int64): "I64"}[array.dtype]
    contiguous = np.ascontiguousarray(array)
    return _header_bytes((name, dtype, contiguous.shape)) + contiguous.tobytes()


# --- what a report needs to know of an output, read once ------------------------------------------

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
INTEGER_DTYPES = ("I64", "I32", "I16", "I8", "U8")
# A summary is kept (marketplace/artifacts/models.py TensorHeader) only up to this size of JSON: a unit's
# output names a handful of tensors (inference one, fedavg a model's parameters and two metrics). A larger
# header is not summarized, and a report of it reads the file as before.
MAX_SUMMARY_JSON = 64 * 1024
_FINITE_CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorSummary:
    """An output file as a report checks it, without the file: each tensor's dtype and shape, whether every
    floating-point value is finite, and the value of each one-element integer tensor (fedavg's sample
    count). `error` is what read_header refused (the file is not well-formed safetensors), else ""."""

    error: str = ""
    tensors: dict[str, tuple[str, tuple[int, ...]]] | None = None
    finite: bool = True
    integers: dict[str, int] | None = None

    def to_json(self) -> dict[str, object]:
        if self.error:
            return {"error": self.error}
        return {"tensors": {name: [dtype, list(shape)] for name, (dtype, shape) in (self.tensors or {}).items()},
                "finite": self.finite, "integers": dict(self.integers or {})}

    @classmethod
    def from_json(cls, value: dict[str, object]) -> TensorSummary:
        """From to_json's output, as the marketplace stored it (never from a client)."""
        if value.get("error"):
            return cls(error=str(value["error"]))
        tensors = value["tensors"]
        integers = value["integers"]
        assert isinstance(tensors, dict) and isinstance(integers, dict)
        return cls(tensors={name: (dtype, tuple(shape)) for name, (dtype, shape) in tensors.items()},
                   finite=bool(value["finite"]), integers={name: int(number) for name, number in integers.items()})

    def check(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The tensors, or TensorFileError with what read_header said."""
        if self.error or self.tensors is None:
            raise TensorFileError(self.error or "not a safetensors file")
        return self.tensors


class Seekable(Readable, Protocol):
    def seek(self, offset: int, whence: int = 0, /) -> int: ...


def summarize(stream: Seekable, *, size: int) -> TensorSummary:
    """Read a safetensors file once for what the reports of it check: its header, every floating tensor's
    values (in bounded chunks) and its one-element integer tensors. A file that is not well formed gives a
    summary holding the refusal, so a report of it is refused with the same words."""
    try:
        header = read_header_from(stream, size=size)
    except TensorFileError as exc:
        return TensorSummary(error=str(exc))
    finite, integers = True, {}
    for name, info in header.items():
        if info.dtype in FLOAT_DTYPES and finite:
            finite = _finite(stream, info)
        elif info.dtype in INTEGER_DTYPES and info.end - info.start == DTYPE_SIZES[info.dtype]:
            stream.seek(info.start)
            integers[name] = int.from_bytes(_read_exactly(stream, info.end - info.start), "little",
                                            signed=info.dtype != "U8")
    return TensorSummary(tensors={name: (info.dtype, info.shape) for name, info in header.items()},
                         finite=finite, integers=integers)


def summarize_file(path: Path) -> TensorSummary:
    with path.open("rb") as handle:
        return summarize(handle, size=path.stat().st_size)


def summary_storable(summary: TensorSummary) -> bool:
    """Whether the summary is small enough to keep (MAX_SUMMARY_JSON)."""
    return len(json.dumps(summary.to_json(), separators=(",", ":"))) <= MAX_SUMMARY_JSON


def _finite(stream: Seekable, info: TensorInfo) -> bool:
    item = DTYPE_SIZES[info.dtype]
    stream.seek(info.start)
    remaining = info.end - info.start
    step = _FINITE_CHUNK - _FINITE_CHUNK % item
    while remaining:
        data = _read_exactly(stream, min(step, remaining))
        if len(data) < min(step, remaining):
            return False  # shorter than the header said: cannot be (read_header checked the size)
        remaining -= len(data)
        if info.dtype == "BF16":
            # bfloat16 is float32's top half: exponent bits all set is infinity or NaN.
            if (np.frombuffer(data, dtype="<u2") & 0x7F80 == 0x7F80).any():
                return False
        elif not np.isfinite(np.frombuffer(data, dtype={"F64": "<f8", "F32": "<f4", "F16": "<f2"}[info.dtype])).all():
            return False
    return True
