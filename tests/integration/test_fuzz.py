"""Fuzz: thousands of malformed messages interleaved with valid ones.

The daemon must not crash, every malformed message must land in the dead-letter topic with
the right reason, every valid one must get its assignment, and the centroids stay finite.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Consumer, TopicPartition
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from streamkm.checkpoint import CheckpointStore
from streamkm.checkpoint import read as read_checkpoint
from streamkm.codec import VectorDecoder
from streamkm.errors import CheckpointError
from tests.daemon import Daemon
from tests.kafka_util import create_topic, drain, produce_values, produce_with_raw_header_names

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


# -- property-based: Hypothesis streams through one long-lived daemon per mode ----------------
#
# Each example is a stream of messages (values from byte-level mutations of valid encodings,
# random bytes, sizes around the limit, extreme finite vectors; headers with forged streamkm.
# names, arbitrary names, or names that are not UTF-8). It is appended to the input topic of a
# daemon that lives for the whole module, and the daemon must, for every example: stay up, give
# every good message one assignment (at least one in at-least-once mode), every bad one exactly
# one dead letter with the codec's reason, and keep every checkpoint readable and finite.
# FUZZ_EXAMPLES sets the number of streams per mode (`make fuzz-long` runs many).

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 8))
FUZZ_MAX_BYTES = 2048
FUZZ_DIM = 4

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
extreme32 = st.sampled_from([0.0, -0.0, 1e-45, -1e-38, 1.0, 3.4e38, -3.4e38, 1e19, 4e18, 1.3e38])
vectors = st.lists(st.one_of(finite32, extreme32), min_size=FUZZ_DIM, max_size=FUZZ_DIM)


def _encode(fmt: str, v: list[float]) -> bytes:
    if fmt == "float32":
        return np.asarray(v, dtype="<f4").tobytes()
    return json.dumps([float(np.float32(x)) for x in v]).encode()


@st.composite
def fuzz_value(draw: st.DrawFn, fmt: str) -> bytes | None:
    kind = draw(st.integers(0, 9))
    if kind <= 3:  # a valid encoding, possibly of extreme (or out-of-range) values
        return _encode(fmt, draw(vectors))
    if kind <= 6:  # a byte-level mutation of one
        raw = bytearray(_encode(fmt, draw(vectors)))
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.integers(0, 3))
            at = draw(st.integers(0, max(0, len(raw) - 1)))
            if op == 0 and raw:
                raw[at] ^= 1 << draw(st.integers(0, 7))
            elif op == 1:
                raw[at:at] = draw(st.binary(min_size=1, max_size=8))
            elif op == 2 and raw:
                del raw[at : at + draw(st.integers(1, 8))]
            else:
                raw[at : at + 1] = draw(st.sampled_from([b"\xff", b"\x00", b"NaN", b"1e999", b"["]))
        return bytes(raw)
    if kind == 7:
        return draw(st.binary(max_size=64))
    if kind == 8:  # sizes around the limit
        n = draw(st.integers(FUZZ_MAX_BYTES - 8, FUZZ_MAX_BYTES + 8))
        return draw(st.sampled_from([b"\x07", b"1", b" "])) * n
    return draw(st.sampled_from([b"", None, b"[]", b"{}", b"null", b'[1,2,3,"4"]']))


header_names = st.one_of(
    st.sampled_from(["streamkm.error.reason", "streamkm.source.offset", "STREAMKM.x", "trace"]),
    st.text(max_size=12),
)
fuzz_headers = st.one_of(
    st.none(),
    st.lists(st.tuples(header_names, st.binary(max_size=40)), max_size=4),
    # Raw names that need not be UTF-8 (sent around confluent-kafka, as a C producer would).
    st.lists(st.tuples(st.binary(min_size=1, max_size=8), st.binary(max_size=8)), min_size=1,
             max_size=2).map(lambda hs: ("raw", hs)),
)  # fmt: skip


@dataclass
class Live:
    """A daemon that outlives the examples, and what it has been sent so far."""

    fmt: str
    guarantee: str
    bootstrap: str
    daemon: Daemon
    src: str
    out: Consumer
    dlq: Consumer
    next_offset: int = 0
    good: set[int] = field(default_factory=set)
    bad: dict[int, str] = field(default_factory=dict)
    assigned: Counter = field(default_factory=Counter)
    dead: dict[int, str] = field(default_factory=dict)
    dead_twice: list[int] = field(default_factory=list)
    raw_header_offsets: set[int] = field(default_factory=set)


def _tail(bootstrap: str, topic: str) -> Consumer:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"fz-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "isolation.level": "read_committed"})  # fmt: skip
    c.assign([TopicPartition(topic, 0, 0)])
    return c


@pytest.fixture(
    scope="module",
    params=[("float32", "exactly-once"), ("json", "at-least-once")],
    ids=["float32-eos", "json-alo"],
)
def live(
    request: pytest.FixtureRequest, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    fmt, guarantee = request.param
    tag = uuid.uuid4().hex[:8]
    src, out, dlq = f"fz-in-{tag}", f"fz-out-{tag}", f"fz-dlq-{tag}"
    for t in (src, out, dlq):
        create_topic(kafka_bootstrap, t)
    d = Daemon(
        tmp_path_factory.mktemp(f"fz-{fmt}"), kafka_bootstrap, src, out,
        kafka={"dead_letter_topic": dlq},
        input={"format": fmt, "dim": FUZZ_DIM, "max_message_bytes": FUZZ_MAX_BYTES},
        model={"n_clusters": 3, "batch_size": 32, "max_batch_wait_ms": 50},
        checkpoint={"interval_s": 0.5, "keep": 2},
        delivery={"guarantee": guarantee},
    )  # fmt: skip
    state = Live(fmt, guarantee, kafka_bootstrap, d, src, _tail(kafka_bootstrap, out),
                 _tail(kafka_bootstrap, dlq))  # fmt: skip
    with d:
        d.start()
        try:
            # Seed the model first: until it has its first rows, nothing is assigned.
            rng = np.random.default_rng(11)
            seed = [_encode(fmt, list(v)) for v in rng.normal(0, 5, (200, FUZZ_DIM))]
            offsets = _send(state, [(v, None) for v in seed])
            state.good |= set(offsets)
            _collect(state, set(offsets), set(), timeout_s=90)
            yield state
            d.assert_running()
            assert d.stop() == 0 and d.starts == 1
        finally:
            state.out.close()
            state.dlq.close()


def _send(live: Live, messages: list[tuple[bytes | None, Any]]) -> list[int]:
    """Produce in order (raw-named headers through librdkafka directly); return offsets."""
    offsets = []
    plain: list[tuple[bytes | None, Any]] = []

    def flush_plain() -> None:
        if plain:
            placed = produce_values(live.bootstrap, live.src, [v for v, _ in plain],
                                    headers=[h for _, h in plain])  # fmt: skip
            offsets.extend(o for _, o in placed)
            plain.clear()

    for value, headers in messages:
        if isinstance(headers, tuple):  # ("raw", [(bytes, bytes), ...])
            flush_plain()
            produce_with_raw_header_names(live.bootstrap, live.src, value or b"", headers[1])
            offsets.append(offsets[-1] + 1 if offsets else live.next_offset)
            live.raw_header_offsets.add(offsets[-1])
        else:
            plain.append((value, headers))
    flush_plain()
    assert offsets == list(range(live.next_offset, live.next_offset + len(messages)))
    live.next_offset += len(messages)
    return offsets


def _collect(live: Live, want_good: set[int], want_bad: set[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        live.daemon.assert_running()
        for m in live.out.consume(1000, 0.1):
            if m.error() is None:
                live.assigned[json.loads(m.value() or b"")["offset"]] += 1
                a = json.loads(m.value() or b"")
                assert a["distance"] is not None and a["score"] is not None, a
        for m in live.dlq.consume(1000, 0.1):
            if m.error() is None:
                h = dict(m.headers() or [])
                offset = int(h["streamkm.source.offset"])
                if offset in live.dead:
                    live.dead_twice.append(offset)
                live.dead[offset] = h["streamkm.error.reason"].decode()
                names = [k for k, _ in m.headers() or []]
                assert names.count("streamkm.error.reason") == 1
        if want_good <= set(live.assigned) and want_bad <= set(live.dead):
            return
    missing_good = sorted(want_good - set(live.assigned))[:10]
    missing_bad = sorted(want_bad - set(live.dead))[:10]
    raise AssertionError(
        f"after {timeout_s}s: unassigned {missing_good}, not dead-lettered {missing_bad}\n"
        + live.daemon.tail()
    )


def _checkpoints_readable_and_finite(live: Live) -> None:
    for path in CheckpointStore(live.daemon.checkpoint_dir).paths():
        try:
            ckpt = read_checkpoint(path)
        except (CheckpointError, FileNotFoundError):
            if path.exists():
                raise
            continue  # pruned between listing and reading
        assert np.isfinite(ckpt.model.cluster_centers_).all(), path
        assert np.isfinite(ckpt.model.counts_).all(), path


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    phases=(Phase.explicit, Phase.generate),  # each example costs a broker round trip
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
def test_hypothesis_streams_keep_the_daemon_up_and_sorted(live: Live, data: st.DataObject) -> None:
    messages = data.draw(
        st.lists(st.tuples(fuzz_value(live.fmt), fuzz_headers), min_size=1, max_size=60),
        label="messages",
    )
    oracle = VectorDecoder(
        live.fmt, dim=FUZZ_DIM, max_bytes=FUZZ_MAX_BYTES, dtype=np.float32
    )  # the codec's rules are pinned by its unit tests; here the daemon must follow them
    offsets = _send(live, messages)
    good, bad = set(), {}
    for offset, (value, _) in zip(offsets, messages, strict=True):
        _, _, errors = oracle.decode_many([value])
        if errors:
            bad[offset] = errors[0][1].reason
        else:
            good.add(offset)
    live.good |= good
    live.bad.update(bad)
    _collect(live, good, set(bad), timeout_s=90)
    assert {o: live.dead[o] for o in bad} == bad
    assert not live.dead_twice
    assert not (set(live.assigned) & set(live.bad))
    if live.guarantee == "exactly-once":
        assert all(live.assigned[o] == 1 for o in good)
    _checkpoints_readable_and_finite(live)


def test_degenerate_streams_keep_scores_finite(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    """Identical vectors, then points 1 and 2e5 away: finite, bounded scores."""
    src, out = make_topic(), make_topic()
    same = np.full(FUZZ_DIM, 3.0, dtype="<f4")
    values = [same.tobytes()] * 300
    values += [(same + np.float32(1.0)).tobytes(), (same + np.float32(2e5)).tobytes()]
    values += [same.tobytes()] * 40
    produce_values(kafka_bootstrap, src, values)
    with Daemon(
        tmp_path / "d", kafka_bootstrap, src, out, input={"dim": FUZZ_DIM},
        model={"n_clusters": 3, "batch_size": 32, "max_batch_wait_ms": 50},
    ) as d:  # fmt: skip
        d.start()
        got = drain(kafka_bootstrap, out, expected=len(values), timeout_s=90)
        assert d.stop() == 0
    by_offset = {json.loads(m.value() or b"")["offset"]: json.loads(m.value() or b"") for m in got}
    assert set(by_offset) == set(range(len(values)))
    scores = [a["score"] for a in by_offset.values()]
    assert all(s is not None and np.isfinite(s) and abs(s) < 1e12 for s in scores), max(
        (s for s in scores if s is not None), default=None
    )
    _ = read_checkpoint(d.checkpoint_dir)
