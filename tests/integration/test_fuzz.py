"""Fuzz: thousands of malformed messages interleaved with valid ones.

The daemon must not crash, every malformed message must land in the dead-letter topic with
the right reason, every valid one must get its assignment, and the centroids stay finite.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from streamkm.checkpoint import read as read_checkpoint
from tests.daemon import Daemon
from tests.kafka_util import drain, produce_values

pytestmark = pytest.mark.integration

DIM = 6
MAX_BYTES = 8192
N_BAD = int(os.environ.get("FUZZ_BAD", 5000))  # per format: 10k malformed messages in all
N_GOOD = 3000


def raw_bad(rng: random.Random) -> tuple[bytes, str]:
    kind = rng.randrange(6)
    if kind == 0:  # random bytes whose length is no whole number of floats
        n = rng.choice([1, 2, 3]) + 4 * rng.randrange(0, 20)
        return rng.randbytes(n), "undecodable"
    if kind == 1:  # a float cut short
        return np.ones(DIM, "<f4").tobytes()[: rng.randrange(1, 4 * DIM) | 1], "undecodable"
    if kind == 2:  # whole floats, wrong count
        n = rng.choice([d for d in range(1, 3 * DIM) if d != DIM])
        return np.ones(n, "<f4").tobytes(), "wrong_dim"
    if kind == 3:  # NaN or Inf somewhere
        v = np.ones(DIM, "<f4")
        v[rng.randrange(DIM)] = rng.choice([np.nan, np.inf, -np.inf])
        return v.tobytes(), "non_finite"
    if kind == 4:
        return rng.randbytes(MAX_BYTES + rng.randrange(1, 50_000)), "oversized"
    return b"", "empty"


def json_bad(rng: random.Random) -> tuple[bytes, str]:
    kind = rng.randrange(9)
    good = [round(rng.uniform(-5, 5), 3) for _ in range(DIM)]
    if kind == 0:  # random bytes that are not UTF-8
        return b"\xff" + rng.randbytes(rng.randrange(0, 64)), "undecodable"
    if kind == 1:  # truncated JSON
        text = json.dumps(good)
        return text[: rng.randrange(1, len(text) - 1)].encode(), "undecodable"
    if kind == 2:  # wrong dimension
        n = rng.choice([d for d in range(0 + 1, 3 * DIM) if d != DIM])
        return json.dumps(good[:1] * n).encode(), "wrong_dim"
    if kind == 3:  # NaN / Infinity literals, or a number too large for a float
        bad = list(map(str, good))
        bad[rng.randrange(DIM)] = rng.choice(["NaN", "Infinity", "-Infinity", "1e999"])
        return ("[" + ",".join(bad) + "]").encode(), "non_finite"
    if kind == 4:  # wrong element types
        bad_elem = rng.choice(['"x"', "true", "null", "[1]", '{"a": 1}'])
        parts = list(map(str, good))
        parts[rng.randrange(DIM)] = bad_elem
        return ("[" + ",".join(parts) + "]").encode(), "bad_shape"
    if kind == 5:  # the wrong top-level shape
        return rng.choice(
            [b'"text"', b"42", b"null", b"{}", b'{"features": 1}', b"[]"]
        ), "bad_shape"
    if kind == 6:
        return b"[" + b"1," * (MAX_BYTES // 2 + rng.randrange(1, 1000)) + b"1]", "oversized"
    if kind == 7:
        return b"", "empty"
    return json.dumps({"other": good}).encode(), "bad_shape"  # the field is missing


@pytest.mark.parametrize("fmt", ["float32", "json"])
def test_fuzzed_input_never_crashes_and_is_sorted_out(
    tmp_path: Path, kafka_bootstrap: str, make_topic, fmt: str
) -> None:
    rng = random.Random(20 if fmt == "json" else 21)
    gen = np.random.default_rng(3)
    centers = gen.normal(0, 10, size=(4, DIM))
    values: list[bytes] = []
    expected: dict[int, str] = {}  # index -> reason, for the malformed ones
    n_good = 0
    while n_good < N_GOOD or len(expected) < N_BAD:
        if len(expected) < N_BAD and (n_good >= N_GOOD or rng.random() < N_BAD / (N_BAD + N_GOOD)):
            value, reason = (json_bad if fmt == "json" else raw_bad)(rng)
            expected[len(values)] = reason
        else:
            v = (centers[rng.randrange(4)] + gen.normal(0, 1, DIM)).astype("<f4")
            value = (
                v.tobytes() if fmt == "float32" else json.dumps({"features": v.tolist()}).encode()
            )
            n_good += 1
        values.append(value)

    src, out, dlq = make_topic(), make_topic(), make_topic()
    placed = produce_values(kafka_bootstrap, src, values)
    offset_of = {i: o for i, (_, o) in enumerate(placed)}
    index_of = {o: i for i, o in offset_of.items()}
    with Daemon(
        tmp_path / "d", kafka_bootstrap, src, out,
        kafka={"dead_letter_topic": dlq},
        input={"format": fmt, "dim": DIM, "max_message_bytes": MAX_BYTES}
        | ({"json_field": "features"} if fmt == "json" else {}),
        model={"n_clusters": 4, "batch_size": 512},
    ) as d:  # fmt: skip
        d.start()
        got = drain(kafka_bootstrap, out, expected=N_GOOD, timeout_s=180)
        dead = drain(kafka_bootstrap, dlq, expected=N_BAD, timeout_s=180)
        assert d.stop() == 0  # it never crashed: one process, clean exit

    assert d.starts == 1
    # Every valid input has exactly one assignment.
    assigned = Counter(json.loads(m.value())["offset"] for m in got)
    valid_offsets = {offset_of[i] for i in range(len(values)) if i not in expected}
    assert set(assigned) == valid_offsets and max(assigned.values()) == 1
    # Every malformed one is dead-lettered once, unchanged, with the right reason.
    reasons: dict[int, str] = {}
    for m in dead:
        headers = {k: v.decode() for k, v in m.headers()}
        offset = int(headers["streamkm.source.offset"])
        assert offset not in reasons
        reasons[offset] = headers["streamkm.error.reason"]
        assert (m.value() or b"") == values[index_of[offset]]
    assert {index_of[o]: r for o, r in reasons.items()} == expected
    ckpt = read_checkpoint(d.checkpoint_dir)
    assert ckpt.model.n_samples_seen_ == N_GOOD
    assert np.isfinite(ckpt.model.cluster_centers_).all()
