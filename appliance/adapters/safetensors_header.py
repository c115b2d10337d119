"""Read a safetensors header without loading tensors, and prove the file is complete.

A safetensors file is `u64 header length | JSON header | data`; the header states every
tensor's byte range, so a file cut short by a copy in progress is detectable from its size.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError

MAX_HEADER_BYTES = 100 << 20
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name → info. Raises AdapterError if the file is truncated or malformed."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise AdapterError(f"{path.name}: incomplete safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise AdapterError(f"{path.name}: safetensors header too large ({header_len} bytes)")
        raw = fh.read(header_len)
    if len(raw) < header_len:
        raise AdapterError(f"{path.name}: incomplete safetensors file (header cut short)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path.name}: not a safetensors file ({exc})") from exc
    if not isinstance(header, dict):
        raise AdapterError(f"{path.name}: not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)

    tensors: dict[str, TensorInfo] = {}
    ranges = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if not all(type(v) is int for v in (begin, end, *shape)):
                raise TypeError("offsets and dimensions must be integers")
            elements = 1
            for dim in shape:
                elements *= dim
            expected = elements * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterError(f"{path.name}: malformed entry for tensor {name!r}") from exc
        if end - begin != expected or begin < 0 or min(shape, default=0) < 0:
            raise AdapterError(f"{path.name}: tensor {name!r} has inconsistent offsets")
        tensors[name] = TensorInfo(dtype, shape, expected)
        ranges.append((begin, end))
    # The tensors must tile the data area exactly, as safetensors itself requires.
    data_end = 0
    for begin, end in sorted(ranges):
        if begin != data_end:
            raise AdapterError(f"{path.name}: tensor byte ranges overlap or leave gaps")
        data_end = end
    actual = size - 8 - header_len
    if actual < data_end:
        raise AdapterError(
            f"{path.name}: incomplete safetensors file ({actual} of {data_end} data bytes present)"
        )
    if actual > data_end:
        raise AdapterError(f"{path.name}: {actual - data_end} unexpected trailing bytes")
    return tensors
