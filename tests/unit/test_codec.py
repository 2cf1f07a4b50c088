"""Tests of streamkm.codec: decoding bulks of message values and encoding payloads."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from streamkm.codec import (
    REASONS,
    VectorDecoder,
    encode_vectors,
)
from streamkm.errors import DecodeError
from streamkm.limits import max_sq_norm

pytestmark = pytest.mark.unit


def reasons(errors: list[tuple[int, DecodeError]]) -> list[tuple[int, str]]:
    return [(i, e.reason) for i, e in errors]


# -- raw formats ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["float32", "float64"])
def test_raw_bulk_decodes_rows_in_order(fmt: str) -> None:
    X = np.arange(12, dtype=np.float64).reshape(4, 3)
    dec = VectorDecoder(fmt, dim=3)
    out, ok, errors = dec.decode_many(encode_vectors(X, fmt))
    np.testing.assert_array_equal(out, X)
    assert out.dtype == np.float64
    assert ok.tolist() == [0, 1, 2, 3]
    assert errors == []


def test_raw_is_little_endian() -> None:
    value = np.array([1.5, -2.0], dtype="<f4").tobytes()
    out, _, _ = VectorDecoder("float32").decode_many([value])
    assert out.tolist() == [[1.5, -2.0]]
    # The same bytes read big-endian would be garbage; make sure we did not.
    assert np.frombuffer(value, ">f4").tolist() != [1.5, -2.0]


def test_raw_every_reason_in_one_bulk() -> None:
    good = np.array([1.0, 2.0], "<f4").tobytes()
    values = [
        good,
        None,
        b"",
        b"\x00" * 5,  # not a multiple of 4
        np.array([1.0, 2.0, 3.0], "<f4").tobytes(),
        np.array([np.nan, 1.0], "<f4").tobytes(),
        np.array([np.inf, 1.0], "<f4").tobytes(),
        b"\x00" * 4000,
        good,
    ]
    dec = VectorDecoder("float32", max_bytes=1000)
    X, ok, errors = dec.decode_many(values)
    assert dec.dim == 2
    assert ok.tolist() == [0, 8]
    assert X.shape == (2, 2)
    assert reasons(errors) == [
        (1, "empty"),
        (2, "empty"),
        (3, "undecodable"),
        (4, "wrong_dim"),
        (5, "non_finite"),
        (6, "non_finite"),
        (7, "oversized"),
    ]
    assert all(e.message and len(e.message) < 100 for _, e in errors)


def test_dim_is_fixed_by_first_valid_message_not_first_message() -> None:
    # The first message is 3-wide but NaN, so it is not valid; the 2-wide one fixes dim.
    values = [
        np.array([np.nan, 1.0, 2.0], "<f8").tobytes(),
        np.array([1.0, 2.0], "<f8").tobytes(),
        np.array([1.0, 2.0, 3.0], "<f8").tobytes(),
    ]
    dec = VectorDecoder("float64")
    X, ok, errors = dec.decode_many(values)
    assert dec.dim == 2
    assert X.tolist() == [[1.0, 2.0]]
    assert ok.tolist() == [1]
    assert reasons(errors) == [(0, "wrong_dim"), (2, "wrong_dim")]


def test_dim_persists_across_bulks_and_is_settable() -> None:
    dec = VectorDecoder("float32")
    dec.decode_many([np.zeros(4, "<f4").tobytes()])
    assert dec.dim == 4
    _, _, errors = dec.decode_many([np.zeros(3, "<f4").tobytes()])
    assert reasons(errors) == [(0, "wrong_dim")]
    assert "expected 4" in errors[0][1].message
    dec.dim = 3  # restored from a checkpoint
    X, _, errors = dec.decode_many([np.zeros(3, "<f4").tobytes()])
    assert X.shape == (1, 3) and errors == []
    with pytest.raises(ValueError):
        dec.dim = 0


def test_no_valid_message_leaves_dim_unset() -> None:
    dec = VectorDecoder("float64")
    X, ok, errors = dec.decode_many([np.array([np.nan], "<f8").tobytes(), None])
    assert dec.dim is None
    assert X.shape[0] == 0 and ok.size == 0
    assert reasons(errors) == [(0, "non_finite"), (1, "empty")]


def test_float64_overflowing_float32_model_dtype_is_non_finite() -> None:
    dec = VectorDecoder("float64", dim=2, dtype=np.float32)
    X, ok, errors = dec.decode_many(
        [np.array([1e300, 0.0], "<f8").tobytes(), np.array([1.0, 2.0], "<f8").tobytes()]
    )
    assert X.dtype == np.float32
    assert ok.tolist() == [1]
    assert reasons(errors) == [(0, "non_finite")]


def test_fast_path_result_is_writable_and_owned() -> None:
    dec = VectorDecoder("float32", dim=2, dtype=np.float32)
    X, _, _ = dec.decode_many(encode_vectors(np.ones((3, 2)), "float32"))
    X[0, 0] = 5.0  # frombuffer alone would be read-only
    assert X[0, 0] == 5.0


def test_decode_single_raises_decode_error() -> None:
    dec = VectorDecoder("float32", dim=2)
    assert dec.decode(np.array([1, 2], "<f4").tobytes()).tolist() == [1.0, 2.0]
    with pytest.raises(DecodeError) as info:
        dec.decode(b"")
    assert info.value.reason == "empty"


def test_unknown_format_rejected() -> None:
    with pytest.raises(ValueError, match="unknown vector format"):
        VectorDecoder("int8")


# -- json -------------------------------------------------------------------------------------


def test_json_bare_array_and_field() -> None:
    dec = VectorDecoder("json", json_field="features")
    X, ok, errors = dec.decode_many(
        [b"[1, 2.5]", b'{"features": [3, 4], "id": "a"}', b'{"id": "b"}']
    )
    assert X.tolist() == [[1.0, 2.5], [3.0, 4.0]]
    assert ok.tolist() == [0, 1]
    assert reasons(errors) == [(2, "bad_shape")]
    assert "features" in errors[0][1].message


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"[1, 2", "undecodable"),
        (b"\xff\xfe[1, 2]", "undecodable"),
        (b"not json", "undecodable"),
        (b"[" * 100_000 + b"]" * 100_000, "undecodable"),
        (b'{"x": [1, 2]}', "bad_shape"),  # object without json_field configured
        (b'"hello"', "bad_shape"),
        (b"3", "bad_shape"),
        (b"null", "bad_shape"),
        (b"[]", "bad_shape"),
        (b"[[1, 2]]", "bad_shape"),
        (b"[1, true]", "bad_shape"),
        (b'[1, "2"]', "bad_shape"),
        (b"[1, null]", "bad_shape"),
        (b"[1, 2, 3]", "wrong_dim"),
        (b"[1, NaN]", "non_finite"),
        (b"[1, Infinity]", "non_finite"),
        (b"[1, 1e400]", "non_finite"),
        (b"[1, " + b"9" * 400 + b"]", "non_finite"),  # an int beyond float range
        (b" ", "undecodable"),
    ],
)
def test_json_rejections(value: bytes, reason: str) -> None:
    dec = VectorDecoder("json", dim=2)
    X, ok, errors = dec.decode_many([value, b"[5, 6]"])
    assert reasons(errors) == [(0, reason)]
    assert ok.tolist() == [1] and X.tolist() == [[5.0, 6.0]]


def test_json_oversized_is_not_parsed() -> None:
    dec = VectorDecoder("json", max_bytes=10)
    _, _, errors = dec.decode_many([b"[1, 2, 3, 4, 5, 6]"])
    assert reasons(errors) == [(0, "oversized")]


# -- encoding vectors ------------------------------------------------------------------------


def test_encode_vectors_json_field() -> None:
    values = encode_vectors(np.array([[1.0, 2.0]]), "json", json_field="v")
    assert values == [b'{"v":[1.0,2.0]}']
    X, _, _ = VectorDecoder("json", json_field="v").decode_many(values)
    assert X.tolist() == [[1.0, 2.0]]


# -- properties -------------------------------------------------------------------------------

# Within the range rule for rows of up to 16 values: |x| ≤ sqrt(bound / 16) per value.
_lim64 = float(np.sqrt(max_sq_norm(np.float64) / 16))
_lim32 = float(np.float32(np.sqrt(max_sq_norm(np.float32) / 16)))
finite64 = st.floats(-_lim64, _lim64)
finite32 = st.floats(-_lim32, _lim32, width=32)


@st.composite
def matrices(draw: st.DrawFn, elements: st.SearchStrategy[float]) -> np.ndarray:
    shape = draw(st.tuples(st.integers(1, 20), st.integers(1, 16)))
    return draw(hnp.arrays(np.float64, shape, elements=elements))


@given(matrices(finite64))
def test_roundtrip_float64(X: np.ndarray) -> None:
    out, ok, errors = VectorDecoder("float64").decode_many(encode_vectors(X, "float64"))
    assert errors == []
    np.testing.assert_array_equal(out, X)
    assert ok.tolist() == list(range(len(X)))


@given(matrices(finite32))
def test_roundtrip_float32(X: np.ndarray) -> None:
    out, _, errors = VectorDecoder("float32", dtype=np.float32).decode_many(
        encode_vectors(X, "float32")
    )
    assert errors == []
    np.testing.assert_array_equal(out, X.astype(np.float32))


@given(matrices(finite64), st.sampled_from([None, "x"]))
def test_roundtrip_json(X: np.ndarray, field: str | None) -> None:
    values = encode_vectors(X, "json", json_field=field)
    out, _, errors = VectorDecoder("json", json_field=field).decode_many(values)
    assert errors == []
    np.testing.assert_array_equal(out, X)  # repr of a float round-trips exactly


@settings(max_examples=300)
@given(
    st.sampled_from(["float32", "float64", "json"]),
    st.one_of(st.none(), st.integers(1, 8)),
    st.lists(st.one_of(st.none(), st.binary(max_size=80)), max_size=20),
)
def test_arbitrary_bytes_only_yield_clean_per_message_errors(
    fmt: str, dim: int | None, values: list[bytes | None]
) -> None:
    dec = VectorDecoder(fmt, dim=dim, json_field="v", max_bytes=64)
    X, ok, errors = dec.decode_many(values)
    idx = sorted(ok.tolist() + [i for i, _ in errors])
    assert idx == list(range(len(values)))
    assert X.shape[0] == ok.size
    assert np.isfinite(X).all()
    if ok.size:
        assert X.shape[1] == dec.dim
    for _, err in errors:
        assert isinstance(err, DecodeError)
        assert err.reason in REASONS
        assert err.message


@given(
    st.sampled_from(["float32", "json"]),
    st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=4, max_size=4),
)
def test_every_finite_row_is_kept_or_out_of_range_never_breaking_the_model(
    fmt: str, row: list[float]
) -> None:
    value = encode_vectors(np.array([row], dtype=np.float32), fmt)[0]
    X, ok, errors = VectorDecoder(fmt, dim=4, dtype=np.float32).decode_many([value])
    sq = float(np.sum(np.square(np.array(row, dtype=np.float64))))
    if sq > max_sq_norm(np.float32) * 1.0001:
        assert reasons(errors) == [(0, "out_of_range")]
    elif sq < max_sq_norm(np.float32) * 0.9999:
        assert ok.tolist() == [0]
        # What the model computes from the row stays finite in float32 with room to spare.
        with np.errstate(over="raise"):
            assert np.isfinite(4 * np.dot(X[0], X[0]))


def test_the_vector_of_the_issue_is_out_of_range_and_its_neighbours_are_kept() -> None:
    big = np.full((1, 4), 1.3e38, dtype="<f4")
    values = [np.ones(4, "<f4").tobytes(), big.tobytes(), np.ones(4, "<f4").tobytes()]
    dec = VectorDecoder("float32", dtype=np.float32)
    _, ok, errors = dec.decode_many(values)
    assert ok.tolist() == [0, 2] and reasons(errors) == [(1, "out_of_range")]
    assert "squared norm" in errors[0][1].message
    # An out-of-range first message does not fix the dimension.
    dec = VectorDecoder("float32", dtype=np.float32)
    _, ok, errors = dec.decode_many([np.full(8, 1e38, "<f4").tobytes(), values[0]])
    assert dec.dim == 4 and ok.tolist() == [1] and reasons(errors) == [(0, "wrong_dim")]


@given(st.lists(st.binary(max_size=40).map(lambda b: b"[" + b + b"]"), max_size=10))
def test_arbitrary_json_arrays_never_raise(values: list[bytes]) -> None:
    X, ok, errors = VectorDecoder("json").decode_many(values)
    assert ok.size + len(errors) == len(values) and X.shape[0] == ok.size
    assert all(e.reason in REASONS for _, e in errors)
