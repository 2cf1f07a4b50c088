"""The daemon against the real broker: N in, N out, checkpoints, restarts, dead letters, metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from streamkm.checkpoint import read as read_checkpoint
from tests.daemon import Daemon
from tests.kafka_util import drain, produce_values

pytestmark = pytest.mark.integration

DIM = 4


def blobs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.array([[0, 0, 0, 0], [20, 20, 0, 0], [0, 20, 20, 20]], dtype=np.float32)
    labels = rng.integers(0, 3, size=n)
    X = centers[labels] + rng.normal(0, 1.0, size=(n, DIM)).astype(np.float32)
    return X.astype(np.float32), labels


def raw(X: np.ndarray) -> list[bytes | None]:
    return [row.astype("<f4").tobytes() for row in X]


def assignments(bootstrap: str, topic: str, expected: int) -> list[dict]:
    return [
        json.loads(m.value()) for m in drain(bootstrap, topic, expected=expected, timeout_s=120)
    ]


def samples_in_checkpoint(d: Daemon) -> tuple[float, dict]:
    ckpt = read_checkpoint(d.checkpoint_dir)
    return float(ckpt.model.n_samples_seen_), ckpt.offsets


def test_n_in_n_out_with_sources_and_clusters(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    src, out = make_topic(partitions=3), make_topic()
    X, truth = blobs(3000)
    placed = produce_values(
        kafka_bootstrap, src, raw(X), keys=[f"k{i}".encode() for i in range(len(X))]
    )
    with Daemon(tmp_path / "d", kafka_bootstrap, src, out) as d:
        d.start()
        got = assignments(kafka_bootstrap, out, expected=len(X))
        assert d.stop() == 0
    # Exactly one record per input, pointing back at it.
    sources = Counter((a["topic"], a["partition"], a["offset"]) for a in got)
    assert len(got) == len(X) and max(sources.values()) == 1
    assert set(sources) == {(src, p, o) for p, o in placed}
    for a in got:
        assert set(a) == {
            "cluster",
            "distance",
            "score",
            "model_version",
            "topic",
            "partition",
            "offset",
        }
        assert 0 <= a["cluster"] < 3 and a["distance"] >= 0 and a["model_version"] >= 1
    # Clusters recovered: every true blob maps to one output cluster (the first batch seeds).
    index = {(p, o): i for i, (p, o) in enumerate(placed)}
    pairs = Counter((truth[index[(a["partition"], a["offset"])]], a["cluster"]) for a in got)
    purity = sum(max(c for (t, _), c in pairs.items() if t == label) for label in range(3)) / len(
        got
    )
    assert purity > 0.99
    # The model counted every input once.
    seen, offsets = samples_in_checkpoint(d)
    assert seen == len(X)
    assert sum(offsets.values()) == len(X)


def test_keys_are_kept_and_checkpoint_show(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    src, out = make_topic(), make_topic()
    X, _ = blobs(600, seed=3)
    produce_values(kafka_bootstrap, src, raw(X), keys=[f"key-{i}".encode() for i in range(len(X))])
    with Daemon(tmp_path / "d", kafka_bootstrap, src, out, log={"format": "json"}) as d:
        d.start()
        msgs = drain(kafka_bootstrap, out, expected=len(X), timeout_s=120)
        assert d.stop() == 0
    # JSON logs: every line one object; a checkpoint line tells rate, lag and inertia.
    lines = [ln for ln in d.log_path.read_text().splitlines() if ln and not ln.startswith("====")]
    records = [json.loads(ln) for ln in lines]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    ckpt_lines = [r["message"] for r in records if r["message"].startswith("checkpoint ")]
    assert ckpt_lines and all(
        "vectors/s" in m and "lag" in m and "inertia" in m for m in ckpt_lines
    )
    assert {m.key() for m in msgs} == {f"key-{i}".encode() for i in range(len(X))}
    for m in msgs:
        assert m.key() == f"key-{json.loads(m.value())['offset']}".encode()
    shown = subprocess.run(
        [sys.executable, "-m", "streamkm.cli", "checkpoint", "show", str(d.checkpoint_dir), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    summary = json.loads(shown.stdout)
    assert set(summary) == {
        "file",
        "created_at",
        "model_version",
        "n_samples_seen",
        "n_clusters",
        "dim",
        "counts",
        "centroids",
        "sync_offset",
        "offsets",
    }
    assert len(summary["centroids"]) == 3 and all(len(c) == DIM for c in summary["centroids"])
    assert summary["sync_offset"] is None and summary["file"].endswith(".npz")
    assert (
        summary["n_samples_seen"] == len(X) and summary["dim"] == DIM and summary["n_clusters"] == 3
    )
    assert summary["offsets"] == {src: {"0": len(X)}}
    assert abs(sum(summary["counts"]) - len(X)) < 1e-6

    # The live model in hand: exported as a file StreamingKMeans.load() opens, and as .npy.
    from streamkm.model import StreamingKMeans

    cli = [sys.executable, "-m", "streamkm.cli"]
    model_file, centroids_file = tmp_path / "model.npz", tmp_path / "centroids.npy"
    subprocess.run(
        [*cli, "checkpoint", "export", str(d.checkpoint_dir), "--out", str(model_file),
         "--centroids", str(centroids_file)], check=True, capture_output=True,
    )  # fmt: skip
    model = StreamingKMeans.load(model_file)
    assert model.n_samples_seen_ == len(X)
    np.testing.assert_array_equal(np.load(centroids_file), summary["centroids"])

    # `streamkm tail` prints the newest assignments, one JSON line each.
    tailed = subprocess.run(
        [*cli, "tail", "--config", str(d.config_path), "-n", "3"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    lines = [json.loads(ln) for ln in tailed.stdout.splitlines()]
    assert [ln["offset"] for ln in lines] == [len(X) - 3, len(X) - 2, len(X) - 1]
    assert all(set(ln["value"]) >= {"cluster", "distance", "score"} for ln in lines)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_restart_continues_from_checkpoint(
    tmp_path: Path, kafka_bootstrap: str, make_topic, sig
) -> None:
    src, out = make_topic(partitions=2), make_topic()
    X, _ = blobs(4000, seed=1)
    first, second = X[:2000], X[2000:]
    produce_values(kafka_bootstrap, src, raw(first))
    with Daemon(tmp_path / "d", kafka_bootstrap, src, out, checkpoint={"interval_s": 0.5}) as d:
        d.start()
        d.wait_metric("streamkm_samples_seen", 1000)
        d.wait_metric("streamkm_checkpoints_total", 1)
        code = d.stop(sig)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        produce_values(kafka_bootstrap, src, raw(second))
        d.start()
        got = assignments(kafka_bootstrap, out, expected=len(X))
        d.wait_metric("streamkm_samples_seen", len(X))
        assert d.stop() == 0
    seen, _ = samples_in_checkpoint(d)
    assert seen == len(X)  # nothing counted twice, nothing missed
    sources = Counter((a["partition"], a["offset"]) for a in got)
    assert len(sources) == len(X)  # every input has its assignment
    if sig == signal.SIGTERM:
        assert max(sources.values()) == 1  # a clean stop repeats nothing


BAD_INPUTS = {
    "empty": b"",
    "oversized": b"\0" * 5000,
    "undecodable": b"\x01\x02\x03",  # not a multiple of 4 bytes
    "wrong_dim": np.zeros(DIM + 1, "<f4").tobytes(),
    "non_finite": np.array([1, np.nan, 0, 0], "<f4").tobytes(),
}


def test_bad_input_goes_to_dead_letters_with_headers(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    src, out, dlq = make_topic(), make_topic(), make_topic()
    X, _ = blobs(300, seed=2)
    values = raw(X[:150]) + list(BAD_INPUTS.values()) + raw(X[150:])
    placed = produce_values(kafka_bootstrap, src, values)
    with Daemon(
        tmp_path / "d", kafka_bootstrap, src, out,
        kafka={"dead_letter_topic": dlq}, input={"max_message_bytes": 4096},
    ) as d:  # fmt: skip
        d.start()
        got = assignments(kafka_bootstrap, out, expected=len(X))
        dead = drain(kafka_bootstrap, dlq, expected=len(BAD_INPUTS), timeout_s=60)
        for reason in BAD_INPUTS:
            assert (
                d.wait_metric("streamkm_messages_dead_lettered_total", 1, labels={"reason": reason})
                == 1
            )
        assert d.stop() == 0
    assert len(got) == len(X)
    assert len(dead) == len(BAD_INPUTS)
    by_reason = {}
    for m in dead:
        headers = {k: v.decode() for k, v in m.headers()}
        by_reason[headers["streamkm.error.reason"]] = (m, headers)
    assert set(by_reason) == set(BAD_INPUTS)
    for reason, (m, headers) in by_reason.items():
        assert m.value() == BAD_INPUTS[reason] or (m.value() is None and BAD_INPUTS[reason] == b"")
        offset = int(headers["streamkm.source.offset"])
        assert (
            headers["streamkm.source.topic"] == src and headers["streamkm.source.partition"] == "0"
        )
        assert placed[offset][1] == offset and values[offset] == BAD_INPUTS[reason]
        assert headers["streamkm.error.message"]
    seen, offsets = samples_in_checkpoint(d)
    assert seen == len(X)
    assert offsets[(src, 0)] == len(values)  # dead letters advance the offsets too


def test_metrics_health_and_low_traffic_flush(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    src, out = make_topic(), make_topic()
    X, _ = blobs(400, seed=4)
    produce_values(kafka_bootstrap, src, raw(X[:256]))  # seeds the model (init_size = 256)
    with Daemon(tmp_path / "d", kafka_bootstrap, src, out, model={"max_batch_wait_ms": 300}) as d:
        d.start()
        d.wait_http("/readyz", 200)
        d.wait_metric("streamkm_messages_assigned_total", 256)
        # Low traffic: 5 vectors, far fewer than a batch; the max-wait flush must emit them.
        sent = time.monotonic()
        produce_values(kafka_bootstrap, src, raw(X[256:261]))
        d.wait_metric("streamkm_messages_assigned_total", 261, timeout_s=10)
        assert time.monotonic() - sent < 5.0
        _, body = d.get("/metrics")
        for name in (
            "streamkm_messages_consumed_total", "streamkm_messages_assigned_total",
            "streamkm_messages_dead_lettered_total", "streamkm_batches_total",
            "streamkm_batch_duration_seconds_bucket", "streamkm_inertia", "streamkm_inertia_ewma",
            "streamkm_samples_seen", "streamkm_model_version", "streamkm_cluster_size",
            "streamkm_centroid_shift", "streamkm_checkpoint_age_seconds",
        ):  # fmt: skip
            assert f"\n{name}" in body, name
        assert d.metric("streamkm_samples_seen") == 261
        assert d.metric("streamkm_batch_duration_seconds_count", {"stage": "model"}) >= 2
        assert d.get("/healthz")[0] == 200
        d.wait_metric(
            "streamkm_consumer_lag", 0, timeout_s=20, labels={"topic": src, "partition": "0"}
        )
        assert d.stop() == 0


def test_unwritable_checkpoint_dir_exits_non_zero(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with Daemon(
        tmp_path / "d",
        kafka_bootstrap,
        make_topic(),
        make_topic(),
        checkpoint={"dir": str(blocker / "ckpt")},
    ) as d:
        d.start()
        assert d.wait_exit(60) == 1
    assert "checkpoint directory" in d.tail() and "Traceback" not in d.tail()


def test_init_from_a_npy_file_of_centroids(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    src, out = make_topic(), make_topic()
    X, truth = blobs(600, seed=14)
    centers = np.stack([X[truth == j].mean(axis=0) for j in range(3)]).astype(np.float32)
    init = tmp_path / "centroids.npy"
    np.save(init, centers)
    produce_values(kafka_bootstrap, src, raw(X))
    with Daemon(tmp_path / "d", kafka_bootstrap, src, out, model={"init": str(init)}) as d:
        d.start()
        got = assignments(kafka_bootstrap, out, expected=len(X))
        assert d.stop() == 0
    # Given centroids keep their order: cluster j is the blob whose centre was row j.
    labels = {a["offset"]: a["cluster"] for a in got}
    assert all(labels[i] == truth[i] for i in range(len(X)))
