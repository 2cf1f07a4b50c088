"""Hostile input against the real daemon: one stream per delivery mode, many checks on it.

Each stream mixes good vectors with the inputs that used to take the daemon down or poison its
model: a value far over ``input.max_message_bytes``, a malformed one just under it, a header
name that is not UTF-8, a forged ``streamkm.error.reason`` header and one finite vector near
the float32 limit. The daemon must stay up, assign every good vector, dead-letter every bad
one once (truncated to what the dead-letter topic takes, with a header saying so), keep its
scores finite and its checkpoints readable, and keep its metrics port from holding a thread
per idle connection.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Message

from streamkm.checkpoint import CheckpointStore
from streamkm.checkpoint import read as read_checkpoint
from streamkm.metrics import MAX_CONNECTIONS
from streamkm.records import HEADER_HEADERS_DROPPED, HEADER_REASON, HEADER_TRUNCATED
from tests.daemon import Daemon
from tests.kafka_util import create_topic, drain, produce_values, produce_with_raw_header_names

pytestmark = pytest.mark.integration

DIM = 4
BIG = 2_500_000  # bytes: far over input.max_message_bytes (1 MiB) and the topic default
NEAR = 1_048_001  # bytes: malformed, just under the 1 MiB input limit
N_GOOD = 600
# Sent as raw bytes (as a C or Go producer can): the first name is not UTF-8.
RAW_HEADERS = [(b"bad-\xff\xfe-name", b"v"), (b"ok", b"1")]


@dataclass
class Run:
    fmt: str
    guarantee: str
    values: list[bytes] = field(default_factory=list)
    bad: dict[int, str] = field(default_factory=dict)  # offset -> expected reason
    big_vector_offset: int = -1
    assignments: list[Message] = field(default_factory=list)
    dead: list[Message] = field(default_factory=list)
    starts: int = 0
    exit_code: int | None = None
    threads_before: int = 0
    threads_idle: int = 0
    checkpoint_dir: Path = Path()


def _good(fmt: str, v: np.ndarray) -> bytes:
    if fmt == "float32":
        return v.astype("<f4").tobytes()
    return json.dumps([float(x) for x in v]).encode()


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def _stream(fmt: str, rng: np.random.Generator) -> tuple[list[bytes], list[Any], dict[int, str]]:
    """Values, per-value headers and index -> expected reason of the bad ones."""
    centers = rng.normal(0, 10, size=(3, DIM))
    values: list[bytes] = []
    headers: list[Any] = []
    bad: dict[int, str] = {}
    hostile: list[tuple[bytes, Any, str]] = [
        (b"\x07" * BIG, None, "oversized"),
        (b"\x07" * NEAR, None, "undecodable"),  # no whole number of floats / not JSON
        (b"\x07junk", RAW_HEADERS, "undecodable"),
        (b"\x07junk", [("streamkm.error.reason", b"forged"), ("trace", b"t")], "undecodable"),
        (_good(fmt, np.full(DIM, 1.3e38)), None, "out_of_range"),
    ]
    slots = {100 + 90 * i: h for i, h in enumerate(hostile)}
    n_good = 0
    while n_good < N_GOOD:
        if len(values) in slots:
            value, hdrs, reason = slots[len(values)]
            bad[len(values)] = reason
            values.append(value)
            headers.append(hdrs)
            continue
        values.append(_good(fmt, centers[n_good % 3] + rng.normal(0, 1, DIM)))
        headers.append(None)
        n_good += 1
    return values, headers, bad


def _run(tmp: Path, bootstrap: str, fmt: str, guarantee: str) -> Run:
    rng = np.random.default_rng(7)
    run = Run(fmt, guarantee)
    values, headers, bad = _stream(fmt, rng)
    run.values = values
    tag = os.urandom(4).hex()
    src, out, dlq = f"hostile-in-{tag}", f"hostile-out-{tag}", f"hostile-dlq-{tag}"
    # The input topic takes records of several MB; the dead-letter topic keeps the default.
    create_topic(bootstrap, src, config={"max.message.bytes": str(4 * BIG)})
    create_topic(bootstrap, out)
    create_topic(bootstrap, dlq)
    start = 0
    for i in [*(i for i, h in enumerate(headers) if h is RAW_HEADERS), len(values)]:
        if i > start:
            placed = produce_values(
                bootstrap, src, values[start:i], headers=headers[start:i],
                config={"message.max.bytes": 4 * BIG},
            )  # fmt: skip
            assert [o for _, o in placed] == list(range(start, i))
        if i < len(values):
            produce_with_raw_header_names(bootstrap, src, values[i], RAW_HEADERS)
        start = i + 1
    # One partition, produced in order: offsets are indices.
    run.bad = dict(bad)
    run.big_vector_offset = next(i for i, r in bad.items() if r == "out_of_range")
    with Daemon(
        tmp, bootstrap, src, out,
        kafka={"dead_letter_topic": dlq},
        input={"format": fmt, "dim": DIM},
        model={"n_clusters": 3, "batch_size": 64, "max_batch_wait_ms": 100},
        checkpoint={"interval_s": 1.0},
        delivery={"guarantee": guarantee},
    ) as d:  # fmt: skip
        d.start()
        run.assignments = drain(bootstrap, out, expected=N_GOOD, timeout_s=120)
        run.dead = drain(bootstrap, dlq, expected=len(bad), timeout_s=60)
        d.wait_metric("streamkm_checkpoints_total", 1)
        assert d.proc is not None
        run.threads_before = _threads(d.proc.pid)
        idle = [socket.create_connection(("127.0.0.1", d.port)) for _ in range(400)]
        try:
            peak = run.threads_before
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                peak = max(peak, _threads(d.proc.pid))
                time.sleep(0.1)
            run.threads_idle = peak
        finally:
            for s in idle:
                s.close()
        d.assert_running()
        run.exit_code = d.stop()
        run.starts = d.starts
    run.checkpoint_dir = d.checkpoint_dir
    return run


@pytest.fixture(
    scope="module",
    params=[("float32", "at-least-once"), ("json", "exactly-once")],
    ids=["float32-alo", "json-eos"],
)
def run(
    request: pytest.FixtureRequest, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Run:
    fmt, guarantee = request.param
    return _run(tmp_path_factory.mktemp(f"hostile-{fmt}"), kafka_bootstrap, fmt, guarantee)


def _headers(m: Message) -> list[tuple[str, bytes]]:
    return [(k, v or b"") for k, v in (m.headers() or [])]


def _dead_by_offset(run: Run) -> dict[int, Message]:
    out: dict[int, Message] = {}
    for m in run.dead:
        offset = int(dict(_headers(m))["streamkm.source.offset"])
        assert offset not in out, f"offset {offset} dead-lettered twice"
        out[offset] = m
    return out


def test_the_daemon_stays_up_and_assigns_every_good_vector(run: Run) -> None:
    assert run.starts == 1 and run.exit_code == 0
    counts = Counter(json.loads(m.value() or b"")["offset"] for m in run.assignments)
    good = set(range(len(run.values))) - set(run.bad)
    assert set(counts) == good
    if run.guarantee == "exactly-once":
        assert max(counts.values()) == 1


def test_every_bad_input_has_one_dead_letter_with_its_reason(run: Run) -> None:
    dead = _dead_by_offset(run)
    assert {o: dict(_headers(m))[HEADER_REASON].decode() for o, m in dead.items()} == run.bad


def test_oversized_and_near_limit_dead_letters_are_truncated_to_fit(run: Run) -> None:
    dead = _dead_by_offset(run)
    for offset, reason in run.bad.items():
        m = dead[offset]
        original = run.values[offset]
        value = m.value() or b""
        if len(original) >= NEAR:
            # The dead-letter topic takes 1 MiB records: the value is its prefix, and says so.
            assert dict(_headers(m))[HEADER_TRUNCATED] == str(len(original)).encode()
            assert 0 < len(value) < 1_048_588 and value == original[: len(value)]
        else:
            assert value == original and HEADER_TRUNCATED not in dict(_headers(m)), reason


def test_a_header_name_that_is_not_utf8_is_dropped_and_said_so(run: Run) -> None:
    dead = _dead_by_offset(run)
    flagged = [o for o, m in dead.items() if HEADER_HEADERS_DROPPED in dict(_headers(m))]
    assert len(flagged) == 1
    headers = dict(_headers(dead[flagged[0]]))
    assert b"UTF-8" in headers[HEADER_HEADERS_DROPPED] and "ok" not in headers


def test_forged_streamkm_headers_are_replaced_not_duplicated(run: Run) -> None:
    for m in run.dead:
        names = [k for k, _ in _headers(m)]
        assert names.count(HEADER_REASON) == 1
        assert dict(_headers(m))[HEADER_REASON] != b"forged"
    forged = [m for m in run.dead if ("trace", b"t") in _headers(m)]
    assert len(forged) == 1  # the input's other headers are kept


def test_a_vector_near_the_float32_limit_leaves_scores_and_checkpoints_finite(run: Run) -> None:
    later = [
        json.loads(m.value() or b"")
        for m in run.assignments
        if json.loads(m.value() or b"")["offset"] > run.big_vector_offset
    ]
    assert len(later) > 100
    assert all(a["score"] is not None and a["distance"] is not None for a in later)
    store = CheckpointStore(run.checkpoint_dir)
    paths = store.paths()
    assert paths
    for path in paths:  # every file kept reads back, finite
        ckpt = read_checkpoint(path)
        assert np.isfinite(ckpt.model.cluster_centers_).all()
        assert np.isfinite(ckpt.model.counts_).all()
    assert read_checkpoint(run.checkpoint_dir).model.n_samples_seen_ >= N_GOOD


def test_idle_metrics_connections_do_not_hold_a_thread_each(run: Run) -> None:
    assert run.threads_idle <= run.threads_before + MAX_CONNECTIONS
