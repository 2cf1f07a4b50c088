"""One on-disk format for models and checkpoints: a versioned, checksummed ``.npz``.

The file is an uncompressed NumPy ``.npz`` archive holding the arrays plus one extra member,
``__header__``, a UTF-8 JSON object. The header carries the format version, free metadata
and a SHA-256 digest of every array (dtype, shape and bytes), so a file that unzips but was
altered is still refused. Writes are atomic: temporary file, fsync, rename, fsync of the
directory; a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from streamkm.errors import CorruptFileError

FORMAT_NAME = "streamkm"
FORMAT_VERSION = 1
_HEADER_KEY = "__header__"


def _digest(array: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(array.dtype.str.encode())
    h.update(repr(array.shape).encode())
    # The buffer itself, not a tobytes() copy: a checkpoint's sample is tens of megabytes.
    if array.size:
        h.update(memoryview(np.ascontiguousarray(array)).cast("B"))  # type: ignore[arg-type]
    return h.hexdigest()


def dumps(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """Serialise ``meta`` (JSON-able) and ``arrays`` into the bytes of one file."""
    if _HEADER_KEY in arrays:
        raise ValueError(f"array name {_HEADER_KEY!r} is reserved")
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "meta": meta,
        "sha256": {name: _digest(a) for name, a in arrays.items()},
    }
    raw = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    members: dict[str, Any] = {_HEADER_KEY: raw, **arrays}
    np.savez(buf, **members)
    return buf.getvalue()


def loads(data: bytes, source: str = "<bytes>") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse bytes written by :func:`dumps`; raise :class:`CorruptFileError` if anything is off."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            members = {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise CorruptFileError(f"{source}: not a readable streamkm file ({exc})") from exc
    raw = members.pop(_HEADER_KEY, None)
    if raw is None:
        raise CorruptFileError(f"{source}: no streamkm header")
    try:
        header = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{source}: unreadable header ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise CorruptFileError(f"{source}: not a streamkm file")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise CorruptFileError(
            f"{source}: format version {version} is not supported (expected {FORMAT_VERSION})"
        )
    digests = header.get("sha256", {})
    if set(digests) != set(members):
        raise CorruptFileError(f"{source}: arrays do not match the header")
    for name, array in members.items():
        if _digest(array) != digests[name]:
            raise CorruptFileError(f"{source}: checksum mismatch in array {name!r}")
    return header.get("meta", {}), members


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(path: str | os.PathLike[str], meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Atomically write ``meta`` and ``arrays`` to ``path``."""
    write_atomic(path, dumps(meta, arrays))


def load(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a file written by :func:`save`; raise :class:`CorruptFileError` if it is damaged."""
    return loads(Path(path).read_bytes(), source=str(path))
