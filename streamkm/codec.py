"""Bytes to feature vectors and back, the input side of the wire format.

Three input formats:

``"float32"`` / ``"float64"``
    The raw little-endian bytes of one vector, ``dim * itemsize`` bytes long.
``"json"``
    A JSON array of numbers, or an object whose ``json_field`` holds that array.

:class:`VectorDecoder` turns a whole bulk of message values into one matrix and a list of
per-message errors; nothing a message contains makes it raise. Raw formats are decoded with one
:func:`numpy.frombuffer` per distinct message length, never a NumPy call per message.

Examples
--------
>>> import numpy as np
>>> dec = VectorDecoder("float32")
>>> X, ok, errors = dec.decode_many([np.ones(3, "<f4").tobytes(), b"", b"abc"])
>>> X.shape, ok.tolist(), [(i, e.reason) for i, e in errors]
((1, 3), [0], [(1, 'empty'), (2, 'undecodable')])

What the daemon writes (assignments, dead letters, the model record) is in :mod:`streamkm.records`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from streamkm.errors import DecodeError
from streamkm.limits import max_sq_norm, out_of_range

logger = logging.getLogger(__name__)

Format = Literal["float32", "float64", "json"]
FORMATS: tuple[str, ...] = ("float32", "float64", "json")
REASONS: tuple[str, ...] = (
    "empty",
    "oversized",
    "undecodable",
    "bad_shape",
    "wrong_dim",
    "non_finite",
    "out_of_range",
)

# Explicit little-endian dtypes so big-endian hosts read the wire format correctly.
_RAW_DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}
_NUMBER_TYPES = (int, float)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown vector format {fmt!r}; expected one of {', '.join(FORMATS)}")


class DecodeResult(NamedTuple):
    """What :meth:`VectorDecoder.decode_many` returns.

    Attributes
    ----------
    X : ndarray of shape (n_ok, dim)
        The valid vectors, in input order, in the decoder's dtype.
    ok_index : ndarray of int64, shape (n_ok,)
        For each row of ``X``, the index of its message in the input list.
    errors : list of (int, DecodeError)
        The index and error of every rejected message, in input order.
    """

    X: np.ndarray
    ok_index: np.ndarray
    errors: list[tuple[int, DecodeError]]


class VectorDecoder:
    """Decode message values into feature vectors, a bulk at a time.

    Parameters
    ----------
    fmt : {"float32", "float64", "json"}
        Wire format of the message values.
    dim : int, optional
        Expected number of features. When None, the first valid message fixes it; it is then
        available (and settable, e.g. from a checkpoint) as :attr:`dim`.
    json_field : str, optional
        For ``"json"``: the object field holding the array. A bare array is always accepted.
    max_bytes : int, default 1 MiB
        Values longer than this are rejected as ``"oversized"`` without being parsed.
    dtype : numpy dtype, default float64
        Dtype of the returned matrix (the model's dtype). Finiteness is checked after the
        conversion, so a float64 value that overflows float32 is rejected as ``"non_finite"``;
        a finite row whose squared norm the dtype cannot hold with room to spare
        (:func:`streamkm.limits.out_of_range`) is rejected as ``"out_of_range"``.

    Examples
    --------
    >>> dec = VectorDecoder("json", json_field="x")
    >>> X, ok, errors = dec.decode_many([b'{"x": [1, 2]}', b"[3, 4]", b"[1, 2, 3]", None])
    >>> X.tolist(), dec.dim, [e.reason for _, e in errors]
    ([[1.0, 2.0], [3.0, 4.0]], 2, ['wrong_dim', 'empty'])
    """

    def __init__(
        self,
        fmt: str,
        dim: int | None = None,
        json_field: str | None = None,
        max_bytes: int = 1_048_576,
        dtype: Any = np.float64,
    ) -> None:
        _check_format(fmt)
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.fmt = fmt
        self.json_field = json_field
        self.max_bytes = int(max_bytes)
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise ValueError(f"dtype must be a floating-point type, got {self.dtype}")
        self._dim: int | None = None
        self.dim = dim

    @property
    def dim(self) -> int | None:
        """Number of features, or None until the first valid message has been seen."""
        return self._dim

    @dim.setter
    def dim(self, value: int | None) -> None:
        if value is not None:
            value = int(value)
            if value <= 0:
                raise ValueError(f"dim must be positive, got {value}")
        self._dim = value

    def width(self, value: bytes | None) -> int | None:
        """How many values ``value`` holds if it is a valid vector of any dimension, else None
        (what the daemon counts to infer the dimension; ``dim`` is left alone)."""
        probe = VectorDecoder(self.fmt, None, self.json_field, self.max_bytes, self.dtype)
        X, ok, _ = probe.decode_many([value])
        return int(X.shape[1]) if len(ok) else None

    def decode(self, value: bytes | None) -> np.ndarray:
        """Decode one value into a vector of shape ``(dim,)``.

        Raises
        ------
        DecodeError
            If the value is rejected; ``reason`` says why.
        """
        X, _, errors = self.decode_many([value])
        if errors:
            raise errors[0][1]
        return X[0]

    def decode_many(self, values: Sequence[bytes | None]) -> DecodeResult:
        """Decode a bulk of message values.

        Parameters
        ----------
        values : sequence of bytes or None
            Message values as consumed (None for a tombstone).

        Returns
        -------
        DecodeResult
            ``(X, ok_index, errors)``; ``len(ok_index) + len(errors) == len(values)``.
        """
        if self.fmt == "json":
            return self._decode_json(values)
        return self._decode_raw(values)

    # -- raw formats -------------------------------------------------------------------------

    def _decode_raw(self, values: Sequence[bytes | None]) -> DecodeResult:
        raw = _RAW_DTYPES[self.fmt]
        itemsize = raw.itemsize
        n = len(values)
        dim = self._dim
        if dim is not None and dim * itemsize <= self.max_bytes and n:
            # Fast path: every value has the expected length (the steady state).
            expected = dim * itemsize
            if all(v is not None and len(v) == expected for v in values):
                joined = b"".join(values)  # type: ignore[arg-type]
                X = _cast(np.frombuffer(joined, dtype=raw), self.dtype).reshape(n, dim)
                if _usable(X, self.dtype).all():
                    return DecodeResult(X, np.arange(n, dtype=np.int64), [])

        errors: list[tuple[int, DecodeError]] = []
        groups: dict[int, tuple[list[int], list[bytes]]] = {}
        for i, v in enumerate(values):
            if not v:
                errors.append((i, DecodeError("empty", "empty value")))
                continue
            size = len(v)
            if size > self.max_bytes:
                errors.append((i, _oversized(size, self.max_bytes)))
            elif size % itemsize:
                errors.append(
                    (
                        i,
                        DecodeError(
                            "undecodable",
                            f"{size} bytes is not a whole number of {self.fmt} values",
                        ),
                    )
                )
            else:
                idx, chunks = groups.setdefault(size // itemsize, ([], []))
                idx.append(i)
                chunks.append(v)

        def matrix(width: int) -> np.ndarray:
            idx, chunks = groups[width]
            flat = _cast(np.frombuffer(b"".join(chunks), dtype=raw), self.dtype)
            return flat.reshape(len(idx), width)

        return self._finish(n, groups, matrix, errors)

    # -- json --------------------------------------------------------------------------------

    def _decode_json(self, values: Sequence[bytes | None]) -> DecodeResult:
        errors: list[tuple[int, DecodeError]] = []
        groups: dict[int, tuple[list[int], list[list[float]]]] = {}
        field = self.json_field
        for i, v in enumerate(values):
            if not v:
                errors.append((i, DecodeError("empty", "empty value")))
                continue
            if len(v) > self.max_bytes:
                errors.append((i, _oversized(len(v), self.max_bytes)))
                continue
            try:
                obj = json.loads(v.decode("utf-8"))
            except UnicodeDecodeError:
                errors.append((i, DecodeError("undecodable", "value is not valid UTF-8")))
                continue
            except (ValueError, RecursionError) as exc:
                errors.append((i, DecodeError("undecodable", f"invalid JSON: {_short(exc)}")))
                continue
            if isinstance(obj, dict):
                if field is None:
                    errors.append(
                        (i, DecodeError("bad_shape", "JSON object given but no json_field is set"))
                    )
                    continue
                if field not in obj:
                    errors.append((i, DecodeError("bad_shape", f"field {field!r} is missing")))
                    continue
                obj = obj[field]
            if not isinstance(obj, list):
                errors.append(
                    (i, DecodeError("bad_shape", f"expected an array, got {_json_type(obj)}"))
                )
                continue
            if not obj:
                errors.append((i, DecodeError("bad_shape", "empty array")))
                continue
            # type() rather than isinstance(): bool is an int subclass and must be refused.
            if not all(type(x) in _NUMBER_TYPES for x in obj):
                bad = next(x for x in obj if type(x) not in _NUMBER_TYPES)
                errors.append(
                    (
                        i,
                        DecodeError(
                            "bad_shape", f"expected an array of numbers, found {_json_type(bad)}"
                        ),
                    )
                )
                continue
            idx, rows = groups.setdefault(len(obj), ([], []))
            idx.append(i)
            rows.append(obj)

        def matrix(width: int) -> np.ndarray:
            rows = groups[width][1]
            try:
                return _cast(rows, self.dtype)
            except OverflowError:
                # An integer too large for a float; only such rows become inf (then non_finite).
                return _cast([_row_or_inf(r, self.dtype) for r in rows], self.dtype)

        return self._finish(len(values), groups, matrix, errors)

    # -- shared ------------------------------------------------------------------------------

    def _finish(
        self,
        n: int,
        groups: dict[int, Any],
        matrix: Any,
        errors: list[tuple[int, DecodeError]],
    ) -> DecodeResult:
        """Pick the dimension, split rows by width and finiteness, and assemble the result."""
        dim = self._dim
        decoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if dim is None:
            # The first valid (right shape, finite, in range) message fixes the dimension.
            first: tuple[int, int] | None = None
            for width in groups:
                M = matrix(width)
                finite = _usable(M, self.dtype)
                decoded[width] = (M, finite)
                if finite.any():
                    i = groups[width][0][int(np.argmax(finite))]
                    if first is None or i < first[0]:
                        first = (i, width)
            if first is not None:
                dim = self._dim = first[1]
                logger.debug("vector dimension fixed to %d by the first valid message", dim)

        X = np.empty((0, dim or 0), dtype=self.dtype)
        ok_index = np.empty(0, dtype=np.int64)
        for width, (idx, _) in groups.items():
            if dim is not None and width != dim:
                err = DecodeError("wrong_dim", f"expected {dim} values, got {width}")
                errors.extend((i, err) for i in idx)
                continue
            if width in decoded:
                M, finite = decoded[width]
            else:
                M = matrix(width)
                finite = _usable(M, self.dtype)
            idx_arr = np.asarray(idx, dtype=np.int64)
            if finite.all():
                X, ok_index = M, idx_arr
            else:
                nan_or_inf = ~np.isfinite(M).all(axis=1)
                err = DecodeError("non_finite", "vector contains NaN or infinity")
                errors.extend((int(i), err) for i in idx_arr[nan_or_inf])
                big = ~finite & ~nan_or_inf
                if big.any():
                    err = DecodeError(
                        "out_of_range",
                        f"squared norm exceeds {max_sq_norm(self.dtype):.3g}, "
                        f"the largest the {self.dtype} model takes",
                    )
                    errors.extend((int(i), err) for i in idx_arr[big])
                X, ok_index = M[finite], idx_arr[finite]
        errors.sort(key=lambda e: e[0])
        return DecodeResult(X, ok_index, errors)


def _usable(M: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Rows of ``M`` (n, d) that are finite and within the range rule: bool of shape (n,)."""
    ok = np.isfinite(M).all(axis=1)
    if not ok.any() or not M.size:
        return ok
    # ‖x‖² ≤ d · max|x|²: when that bound is within range, no row needs the exact rule.
    peak = float(np.abs(M[ok]).max())
    if peak * peak * M.shape[1] <= max_sq_norm(dtype):
        return ok
    ok[ok] = ~out_of_range(M[ok], dtype)
    return ok


def _oversized(size: int, limit: int) -> DecodeError:
    return DecodeError("oversized", f"value of {size} bytes exceeds the limit of {limit}")


def _short(exc: BaseException, limit: int = 80) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json_type(x: object) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "a boolean"
    if isinstance(x, str):
        return "a string"
    if isinstance(x, list):
        return "a nested array"
    if isinstance(x, dict):
        return "an object"
    return "a number"


def _cast(data: Any, dtype: np.dtype) -> np.ndarray:
    # Overflow to inf is expected here and reported per message as non_finite.
    with np.errstate(over="ignore", invalid="ignore"):
        return np.array(data, dtype=dtype)


def _row_or_inf(row: list[float], dtype: np.dtype) -> list[float]:
    try:
        _cast(row, dtype)
    except OverflowError:
        return [np.inf] * len(row)
    return row


# -- encoding ----------------------------------------------------------------------------------


def encode_vectors(X: Any, fmt: str, json_field: str | None = None) -> list[bytes]:
    """Encode the rows of ``X`` as message values in ``fmt``.

    Parameters
    ----------
    X : array-like of shape (n, dim)
        The vectors.
    fmt : {"float32", "float64", "json"}
        Wire format.
    json_field : str, optional
        For ``"json"``: wrap each array in an object under this field.

    Returns
    -------
    list of bytes
        One value per row, decodable by ``VectorDecoder(fmt, json_field=json_field)``.
    """
    _check_format(fmt)
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(f"X must be 2-dimensional, got shape {arr.shape}")
    n, dim = arr.shape
    if fmt == "json":
        rows = arr.astype(np.float64).tolist()
        sep = (",", ":")
        if json_field is None:
            return [json.dumps(r, separators=sep).encode() for r in rows]
        return [json.dumps({json_field: r}, separators=sep).encode() for r in rows]
    raw = _RAW_DTYPES[fmt]
    buf = np.ascontiguousarray(arr, dtype=raw).tobytes()
    step = dim * raw.itemsize
    return [buf[i * step : (i + 1) * step] for i in range(n)]
