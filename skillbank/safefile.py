"""Reading safetensors that someone else wrote, without trusting them.

The header is checked against the file's real size before any tensor is
allocated; pickle files are recognised and refused, never opened.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load as _load

from .errors import CorruptFile, InvalidName, UnsafeFile

MAX_HEADER_BYTES = 64 * 1024 * 1024
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def _refuse_pickle(data: bytes, what: str) -> None:
    # A safetensors header length can itself start with 0x80 0x02..0x05 (e.g. 896 bytes),
    # so a file whose JSON header opens at byte 8 is never taken for a pickle.
    if data[8:9] == b"{":
        return
    if data[:4] == b"PK\x03\x04" or (
        data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    ):
        raise UnsafeFile(
            f"{what} is a pickle (torch.save / .bin / .pt) file; skillbank never unpickles files. "
            "Convert it with safetensors.torch.save_file where you trust it."
        )


def read_safetensors(
    source: bytes | str | Path, what: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file or bytes, checked before loading.

    Args:
        source: The file's path or its bytes.
        what: How errors name the source (default: the path, or "the data").
    """
    if isinstance(source, (str, Path)):
        what = what or str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise CorruptFile(f"cannot read {what}: {e.strerror}") from None
    else:
        data, what = bytes(source), what or "the data"
    _refuse_pickle(data, what)
    if len(data) < 8:
        raise CorruptFile(f"{what} is truncated ({len(data)} bytes): not a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > MAX_HEADER_BYTES:
        raise UnsafeFile(
            f"{what} declares a {n}-byte header but holds {len(data) - 8} bytes after the length field"
        )
    header = json_object(data[8 : 8 + n])
    if header is None:
        raise CorruptFile(f"{what} has a header that is not a JSON object: not a safetensors file")
    body = len(data) - 8 - n
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptFile(f"{what} has malformed __metadata__")
    for key, info in header.items():
        try:
            size = _DTYPE_BYTES[info["dtype"]]
            start, end = (int(o) for o in info["data_offsets"])
            numel = math.prod(int(d) for d in info["shape"])
            ok = (
                0 <= start <= end <= body
                and min(info["shape"], default=0) >= 0
                and numel * size == end - start
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CorruptFile(
                f"{what}: tensor {key!r} has an invalid or out-of-range entry {info!r}"
            )
    try:
        tensors = _load(data)
    except Exception as e:
        raise CorruptFile(f"{what} is not a readable safetensors file: {e}") from None
    return tensors, metadata


def json_object(text: str | bytes) -> dict | None:
    """``text`` parsed as a JSON object, or None for anything else, whatever the input.

    Args:
        text: JSON as text or UTF-8 bytes (possibly hostile: bad UTF-8, deep nesting).
    """
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # bad JSON or UTF-8; absurdly deep nesting
        return None
    return value if isinstance(value, dict) else None


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse (``CorruptFile``) a floating tensor holding NaN or Inf.

    Args:
        tensors: Name -> tensor.
        what: How the error names their source.
    """
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CorruptFile(f"{what}: tensor {key!r} contains NaN or Inf")


def check_path(path: str | os.PathLike[str], what: str = "path") -> Path:
    """A user-given file path as a ``Path``; a NUL byte (which the OS would truncate
    at, or Python reject with a bare ValueError) is refused with a clear error.

    Args:
        path: The path as given.
        what: How the error names it.
    """
    text = os.fspath(path)
    if "\x00" in (text if isinstance(text, str) else text.decode(errors="replace")):
        raise InvalidName(f"{what} {text!r} contains a NUL byte")
    return Path(text)


def real_number(value: object, what: str, *, positive_int: bool = False) -> float | int:
    """A finite JSON number (an int > 0 if asked); strings and bools are not numbers here.

    Args:
        value: The value read from JSON.
        what: How the error names it.
        positive_int: Require an int greater than zero.
    """
    if positive_int:
        if type(value) is not int or value <= 0:
            raise CorruptFile(f"{what} must be a positive integer, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CorruptFile(f"{what} must be a finite number, got {value!r}")
    return value
