"""Read a safetensors header without loading tensors, and prove the file is complete.

A safetensors file is `u64 header length | JSON header | data`; the header states every
tensor's byte range, so a file cut short by a copy in progress is detectable from its size.

Parsing is bounded before it starts: the declared length is checked against a cap and against the
file's size before anything is read, and a header may describe at most MAX_DIMS dimensions per
tensor. `json.loads` holds the interpreter for the whole parse, on whatever thread runs it, so the
cap bounds how long a hostile header can keep the event loop from running too.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import AdapterError

MAX_HEADER_BYTES = 100 << 20
"""The safetensors format's own limit; used for the base model, which the operator chose."""
MAX_ADAPTER_HEADER_BYTES = 1 << 20
"""Headers of dropped adapters. A LoRA header lists two tensors per adapted layer at about 150
bytes each: all seven projections of an 80-layer model are 1,120 tensors, about 170 KB. 1 MiB
leaves room for about 7,000, and parsing the worst JSON that fits (a million tiny values) holds
the interpreter for about 30 ms; at the format's 100 MB it would be seconds and gigabytes."""
MAX_DIMS = 8
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, TensorInfo]:
    """Tensor name → info. Raises AdapterError if the file is truncated or malformed."""
    with path.open("rb") as fh:
        return parse_header(fh, os.fstat(fh.fileno()).st_size, path.name, max_header_bytes)


def parse_header(fh: BinaryIO, size: int, name: str, max_header_bytes: int) -> dict[str, TensorInfo]:
    """The header of the open file `fh` (positioned at its start) of `size` bytes."""
    prefix = fh.read(8)
    if len(prefix) < 8:
        raise AdapterError(f"{name}: incomplete safetensors file ({size} bytes)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > max_header_bytes:
        raise AdapterError(
            f"{name}: safetensors header too large ({header_len} bytes; the limit is {max_header_bytes})"
        )
    if 8 + header_len > size:
        raise AdapterError(f"{name}: incomplete safetensors file (header cut short)")
    raw = fh.read(header_len)
    if len(raw) < header_len:
        raise AdapterError(f"{name}: incomplete safetensors file (header cut short)")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, an int of 5,000 digits, nesting
        raise AdapterError(f"{name}: not a safetensors file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(header, dict):
        raise AdapterError(f"{name}: not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)

    tensors: dict[str, TensorInfo] = {}
    ranges = []
    for tensor, entry in header.items():
        label = repr(tensor[:100])
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if not all(type(v) is int for v in (begin, end, *shape)):
                raise TypeError("offsets and dimensions must be integers")
            if len(shape) > MAX_DIMS:
                raise ValueError(f"more than {MAX_DIMS} dimensions")
            elements = 1
            for dim in shape:
                elements *= dim
            expected = elements * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterError(f"{name}: malformed entry for tensor {label}") from exc
        if end - begin != expected or begin < 0 or min(shape, default=0) < 0:
            raise AdapterError(f"{name}: tensor {label} has inconsistent offsets")
        tensors[tensor] = TensorInfo(dtype, shape, expected)
        ranges.append((begin, end))
    # The tensors must tile the data area exactly, as safetensors itself requires.
    data_end = 0
    for begin, end in sorted(ranges):
        if begin != data_end:
            raise AdapterError(f"{name}: tensor byte ranges overlap or leave gaps")
        data_end = end
    actual = size - 8 - header_len
    if actual < data_end:
        raise AdapterError(f"{name}: incomplete safetensors file ({actual} of {data_end} data bytes present)")
    if actual > data_end:
        raise AdapterError(f"{name}: {actual - data_end} unexpected trailing bytes")
    return tensors
