"""Output records: the compiled assignment encoder against the per-row reference, byte for byte."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamkm.errors import DecodeError
from streamkm.records import (
    HEADER_REASON,
    DeadLetter,
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


def test_batch_encoder_matches_the_previous_template_encoder() -> None:
    from streamkm.codec import encode_assignments as template_encoder

    rng = np.random.default_rng(1)
    n = 1024
    args = (
        rng.integers(0, 8, n), rng.random(n) * 3, rng.random(n), 12, "vectors",
        np.zeros(n, np.int32), np.arange(10**6, 10**6 + n),
    )  # fmt: skip
    assert encode_assignments(*args) == template_encoder(*args)


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
