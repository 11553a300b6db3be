"""A few metadata values from a GGUF file's header, read without parsing the rest of it.

`gguf.GGUFReader` maps and indexes the whole file (its tensor table, the tokenizer's arrays of ~50k strings): about
5 s for SmolLM2's 93 MB file. Checking a ``--layer`` option before any heavy work only needs the architecture and two
integers, which sit at the start of the key-value section, so this reads keys in order and stops once it has them.
Layout (GGUF v2/v3, little-endian): magic ``GGUF``, uint32 version, uint64 tensor count, uint64 key-value count,
then per key a string (uint64 length + UTF-8 bytes), a uint32 value type and the value.
"""
from __future__ import annotations

import os
import struct
from typing import BinaryIO, Iterable

# value type -> struct format of one element (strings and arrays are read separately)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFHeaderError(ValueError):
    """The file is not a GGUF file this reader understands, or ends early."""


def _read(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise GGUFHeaderError("the file ends inside its header")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO, skip: bool = False):
    length = _read(f, "<Q")
    if skip:
        f.seek(length, os.SEEK_CUR)
        return None
    data = f.read(length)
    if len(data) != length:
        raise GGUFHeaderError("the file ends inside its header")
    return data.decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int, skip: bool):
    if kind in _SCALARS:
        return _read(f, "<" + _SCALARS[kind])
    if kind == _STRING:
        return _string(f, skip)
    if kind == _ARRAY:
        item, count = _read(f, "<I"), _read(f, "<Q")
        if item in _SCALARS:
            f.seek(count * struct.calcsize(_SCALARS[item]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _value(f, item, skip=True)
        return None
    raise GGUFHeaderError(f"unknown metadata value type {kind}")


def read_values(path: str | os.PathLike, keys: Iterable[str]) -> dict:
    """``{key: value}`` for those of ``keys`` the header holds (array values are skipped, never returned). A key
    may contain ``{arch}``, standing for the file's ``general.architecture`` (which comes before the keys that use
    it); the result is keyed by the names as given."""
    pending, found, arch = set(keys), {}, None
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFHeaderError(f"{os.fspath(path)}: not a GGUF file (no GGUF magic)")
        version = _read(f, "<I")
        if version not in (2, 3):
            raise GGUFHeaderError(f"{os.fspath(path)}: GGUF version {version} is not supported (2 or 3)")
        _read(f, "<Q")  # tensor count
        for _ in range(_read(f, "<Q")):
            key = _string(f)
            value = _value(f, _read(f, "<I"), skip=False)
            if key == "general.architecture":
                arch = value
            for wanted in list(pending):
                if (wanted.replace("{arch}", arch) if arch is not None else wanted) == key:
                    found[wanted] = value
                    pending.discard(wanted)
            if not pending:
                break
    return found
