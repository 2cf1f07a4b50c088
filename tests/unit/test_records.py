"""Output records: the compiled assignment encoder against the per-row reference, byte for byte."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamkm.errors import DecodeError
from streamkm.records import (
    HEADER_HEADERS_DROPPED,
    HEADER_REASON,
    HEADER_TRUNCATED,
    DeadLetter,
    dead_letter_record,
    encode_assignment,
    encode_assignments,
    model_record,
)

pytestmark = pytest.mark.unit


def _reference(labels, distances, scores, version, topic, partitions, offsets) -> list[bytes]:
    return [
        encode_assignment(c, d, s, version, topic, p, o)
        for c, d, s, p, o in zip(labels, distances, scores, partitions, offsets, strict=True)
    ]


# Values around every place where %.9g changes form or rounding is delicate.
_EDGES = np.array(
    [
        0.0, -0.0, 1.0, -1.0, 10.0, 0.5, 1e-5, 1e-4, 0.0001234567891, 123456789.0, 1234567895.0,
        999999999.5, 9999999995.0, 99999999.95, 1e8, 1e9, 1e15, 1.5e-15, 1e-14, 1e29, 1e30,
        9.9999999995e29, 3.0e-300, 1.7976931348623157e308, 5e-324, np.inf, -np.inf, np.nan,
    ]
)  # fmt: skip


def test_batch_encoder_is_byte_identical_to_the_reference_on_many_values() -> None:
    rng = np.random.default_rng(0)
    m = 60_000
    powers = 10.0 ** np.arange(-16, 32, dtype=np.float64)
    values = np.concatenate(
        [
            rng.random(m) * 10.0 ** rng.integers(-16, 32, m),
            -rng.random(m // 10),
            rng.standard_normal(m) * 1e3,
            rng.random(m).astype(np.float32).astype(np.float64),
            powers, np.nextafter(powers, 0), np.nextafter(powers, np.inf), _EDGES,
        ]
    )  # fmt: skip
    n = len(values)
    labels = rng.integers(0, 1000, n)
    partitions = rng.integers(0, 100, n)
    offsets = rng.integers(0, 2**62, n)
    scores = values[::-1].copy()
    got = encode_assignments(labels, values, scores, 7, 'in"put', partitions, offsets)
    want = _reference(labels, values, scores, 7, 'in"put', partitions, offsets)
    assert len(got) == n
    mismatched = [i for i in range(n) if got[i] != want[i]]
    assert mismatched == [], [(values[i], got[i], want[i]) for i in mismatched[:3]]


def test_batch_encoder_writes_every_integer_as_the_reference_does() -> None:
    # Every digit count, both signs, the int64 limits: the digit writers count digits by
    # comparisons and divide unsigned values, so the edges of each digit count matter.
    powers = np.array([10**i for i in range(19)], dtype=np.int64)
    ints = np.concatenate(
        [
            powers, powers - 1, powers + 1, -powers, -powers + 1, -powers - 1,
            np.array([0, -1, 2**63 - 1, -(2**63), -(2**63) + 1, 2**32, 2**53 + 1]),
        ]
    )  # fmt: skip
    n = len(ints)
    floats = np.resize(_EDGES, n)
    for labels, partitions, offsets in (
        (ints, ints[::-1].copy(), np.roll(ints, 7)),
        (np.zeros(n, np.int64), ints, ints),
    ):
        got = encode_assignments(labels, floats, floats[::-1].copy(), -3, "t", partitions, offsets)
        want = _reference(labels, floats, floats[::-1], -3, "t", partitions, offsets)
        mismatched = [(got[i], want[i]) for i in range(n) if got[i] != want[i]]
        assert mismatched == [], mismatched[:3]


def test_records_parse_as_json_with_null_for_non_finite_values() -> None:
    out = encode_assignments(
        np.array([1, 2]), np.array([np.nan, 2.5]), np.array([0.25, np.inf]), 3, "v",
        np.array([4, 5]), np.array([6, 7]),
    )  # fmt: skip
    assert [json.loads(r) for r in out] == [
        {"cluster": 1, "distance": None, "score": 0.25, "model_version": 3, "topic": "v",
         "partition": 4, "offset": 6},
        {"cluster": 2, "distance": 2.5, "score": None, "model_version": 3, "topic": "v",
         "partition": 5, "offset": 7},
    ]  # fmt: skip


def test_a_scalar_partition_is_shared_and_an_empty_batch_gives_nothing() -> None:
    out = encode_assignments([0, 1], [1.0, 2.0], [0.0, 0.0], 1, "v", 3, [10, 11])
    assert [json.loads(r)["partition"] for r in out] == [3, 3]
    assert encode_assignments([], [], [], 1, "v", [], []) == []
    with pytest.raises(ValueError, match="same length"):
        encode_assignments([0, 1], [1.0], [0.0, 0.0], 1, "v", 0, [1, 2])


def test_dead_letter_record_names_its_source_and_drops_forged_headers() -> None:
    dead = DeadLetter(
        "in", 2, 9, b"k", b"x" * 10, [("streamkm.error.reason", b"forged"), ("trace", b"1")],
        DecodeError("wrong_dim", "expected 3 values, got 1"),
    )  # fmt: skip
    value, headers = dead.record(max_record_bytes=1_000_000)
    assert value == b"x" * 10
    assert [v for name, v in headers if name == HEADER_REASON] == [b"wrong_dim"]
    assert ("trace", b"1") in headers
    assert dict(headers)["streamkm.source.offset"] == b"9"


def test_model_record_holds_the_version_and_the_state() -> None:
    body = json.loads(model_record(5, {"dim": 2, "centroids": [[0.0, 1.0]]}, created_at=12.5))
    assert body == {"model_version": 5, "dim": 2, "centroids": [[0.0, 1.0]], "created_at": 12.5}


# -- encoding ---------------------------------------------------------------------------------


def test_encode_assignment_is_compact_json_with_exact_keys() -> None:
    payload = encode_assignment(np.int64(3), np.float32(0.25), 1.5, 9, 'in"put', 2, 1234)
    assert b" " not in payload
    obj = json.loads(payload)
    assert obj == {
        "cluster": 3,
        "distance": 0.25,
        "score": 1.5,
        "model_version": 9,
        "topic": 'in"put',
        "partition": 2,
        "offset": 1234,
    }
    assert list(obj) == [
        "cluster",
        "distance",
        "score",
        "model_version",
        "topic",
        "partition",
        "offset",
    ]


def test_encode_assignments_matches_single_encoder() -> None:
    rng = np.random.default_rng(0)
    n = 50
    labels = rng.integers(0, 8, n)
    distances = rng.random(n).astype(np.float32)
    scores = rng.random(n)
    partitions = rng.integers(0, 4, n).astype(np.int32)
    offsets = np.arange(n, dtype=np.int64) + 10**12
    bulk = encode_assignments(labels, distances, scores, 5, 'in"put', partitions, offsets)
    single = [
        encode_assignment(
            labels[i], distances[i], scores[i], 5, 'in"put', partitions[i], offsets[i]
        )
        for i in range(n)
    ]
    assert bulk == single
    # 9 significant digits: every float32 distance comes back exactly.
    assert all(
        np.float32(json.loads(b)["distance"]) == d for b, d in zip(bulk, distances, strict=True)
    )


def test_encode_assignments_non_finite_becomes_null() -> None:
    out = encode_assignments(
        np.array([0, 1]),
        np.array([np.inf, 1.0]),
        np.array([np.nan, 2.0]),
        1,
        "t",
        np.array([0, 0]),
        np.array([0, 1]),
    )
    assert json.loads(out[0])["distance"] is None
    assert json.loads(out[0])["score"] is None
    assert json.loads(out[1])["score"] == 2.0


def test_encode_assignments_length_mismatch() -> None:
    with pytest.raises(ValueError):
        encode_assignments(
            np.array([0, 1]),
            np.array([0.0]),
            np.array([0.0, 0.0]),
            1,
            "t",
            np.array([0, 0]),
            np.array([0, 1]),
        )


# -- dead letters -----------------------------------------------------------------------------


def test_dead_letter_headers_replace_input_headers_in_the_streamkm_namespace() -> None:
    value, headers = dead_letter_record(
        b"x", b"k", [("streamkm.error.reason", b"forged"), ("STREAMKM.source.offset", b"0"),
                     ("trace-id", b"t1")],
        ("in", 2, 9), "undecodable", "bad", max_record_bytes=1_000_000,
    )  # fmt: skip
    names = [n for n, _ in headers]
    assert value == b"x"
    assert names.count(HEADER_REASON) == 1 and dict(headers)[HEADER_REASON] == b"undecodable"
    assert "STREAMKM.source.offset" not in names and ("trace-id", b"t1") in headers
    assert dict(headers)["streamkm.source.offset"] == b"9"
    assert HEADER_TRUNCATED not in names and HEADER_HEADERS_DROPPED not in names


@given(
    st.integers(0, 3_000_000),
    st.integers(2_000, 2_000_000),
    st.lists(st.tuples(st.text(max_size=30), st.binary(max_size=3000)), max_size=5),
)
def test_a_dead_letter_always_fits_its_limit(size: int, limit: int, extra: list) -> None:
    value, headers = dead_letter_record(
        b"v" * size, b"key", extra, ("in", 0, 1), "oversized", "too long", limit
    )
    total = 512 + len(b"key") + len(value or b"")
    total += sum(len(n.encode(errors="surrogateescape")) + len(v or b"") + 16 for n, v in headers)
    assert total <= limit
    if len(value or b"") < size:
        assert dict(headers)[HEADER_TRUNCATED] == str(size).encode()
        assert value == b"v" * len(value or b"")


def test_unreadable_input_headers_are_dropped_and_said_so() -> None:
    _, headers = dead_letter_record(
        b"x", None, None, ("in", 0, 1), "undecodable", "bad", 1_000_000, headers_unreadable=True
    )
    assert b"UTF-8" in dict(headers)[HEADER_HEADERS_DROPPED]
