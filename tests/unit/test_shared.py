"""Shared-model mode without a broker: the fold, its wire format, the deltas, the replica's state."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from streamkm.errors import StateError
from streamkm.model import scoring
from streamkm.shared import wire
from streamkm.shared.replica import Delta, Replica, seed_centroids
from streamkm.shared.sync import DeltaBuilder

pytestmark = pytest.mark.unit

K, D = 4, 3


def data(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.arange(K * D, dtype=np.float64).reshape(K, D) * 10
    return (centres[rng.integers(0, K, n)] + rng.normal(size=(n, D))).astype(np.float32)


def replica() -> Replica:
    return Replica.from_centroids(np.arange(K * D, dtype=np.float64).reshape(K, D) * 10)


def deltas(r: Replica, partition: int, start: int, batches: int, seed: int) -> list[Delta]:
    """Deltas of consecutive batches of one partition, labelled by ``r`` as it is."""
    out = []
    for b in range(batches):
        X = data(64, seed + b)
        labels, d2, _ = r.assign(X)
        first = start + 64 * b
        out.append(r.delta("a", "in", partition, first, first + 64, X, labels, d2))
    return out


def test_two_replicas_folding_the_same_log_are_bit_identical() -> None:
    builder = replica()
    log = [wire.encode_init("a", builder.centroids)]
    for p in range(3):
        log += [wire.encode_delta(d) for d in deltas(builder, p, 0, 4, seed=10 * p)]
    folded = []
    for _ in range(2):
        r: Replica | None = None
        for value in log:
            kind, body = wire.decode(value)
            if kind == "init":
                r = r or Replica.from_centroids(body)
            else:
                assert r is not None and r.apply(body)
        folded.append(r)
    a, b = folded
    assert a is not None and b is not None
    assert a.centroids.tobytes() == b.centroids.tobytes()
    assert a.counts_.tobytes() == b.counts_.tobytes() and a.sse.tobytes() == b.sse.tobytes()
    assert a.n_samples_seen_ == 3 * 4 * 64 and float(a.counts_.sum()) == 3 * 4 * 64
    assert a.absorbed == {("in", 0): 256, ("in", 1): 256, ("in", 2): 256}


def test_the_fold_is_the_streaming_average_of_the_rows() -> None:
    r = replica()
    X = data(500, seed=1)
    labels, d2, _ = r.assign(X)
    assert r.apply(r.delta("a", "in", 0, 0, 500, X, labels, d2))
    for j in range(K):
        rows = X[labels == j].astype(np.float64)
        # The seed centroids carry no weight: each moves onto the mean of its rows.
        np.testing.assert_allclose(r.centroids[j], rows.mean(axis=0), rtol=1e-12)
        assert r.counts_[j] == len(rows)


def test_scores_follow_the_single_instance_formula_rare_groups_included() -> None:
    """The replica publishes the single-instance score from its own statistics (counts,
    squared-error sums and their second moments), so a rare group is flagged in shared-model
    mode as it is by one instance."""
    r = replica()
    rng = np.random.default_rng(3)
    centres = r.centroids.copy()
    sizes = [400, 400, 400, 12]  # the last group holds 1% of the rows
    X = np.concatenate([centres[j] + rng.normal(size=(n, D)) for j, n in enumerate(sizes)]).astype(
        np.float32
    )
    labels, d2, _ = r.assign(X)
    assert r.apply(r.delta("a", "in", 0, 0, len(X), X, labels, d2))
    labels, d2, scores = r.assign(X)

    w, sse = r.counts_, r.sse
    assert (r.sse2 > 0).all()
    overall = float(sse.sum()) / float(w.sum())
    sigma = scoring.deviation(w, sse, r.sse2, D)
    coef = scoring.score_coef(
        w, scoring.inv_spread(w, sse, overall, r.centroids), r.centroids, sigma
    )
    diff = X.astype(np.float64)[:, None, :] - r.centroids[None, :, :]
    expected = np.maximum((coef[0] * (diff**2).sum(axis=2) + coef[1]).min(axis=1), 0.0)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-3)  # float32 distances
    rare = np.arange(len(X)) >= sum(sizes[:3])
    assert np.median(scores[rare]) > np.quantile(scores[~rare], 0.9)


def test_a_range_is_absorbed_once_whoever_sends_it_again() -> None:
    r = replica()
    first, second = deltas(r, 0, 100, 2, seed=3)
    assert r.apply(first) and r.apply(second)
    counts = r.counts_.copy()
    again = Delta("b", "in", 0, 100, 164, 64, first.index, first.sums, first.weights, first.sse)
    overlapping = Delta("b", "in", 0, 150, 300, 64, first.index, first.sums, first.weights,
                        first.sse)  # fmt: skip
    gap = Delta("b", "in", 0, 400, 464, 64, first.index, first.sums, first.weights, first.sse)
    assert not r.apply(again) and not r.apply(overlapping) and not r.apply(gap)
    np.testing.assert_array_equal(r.counts_, counts)
    assert r.absorbed == {("in", 0): 228} and r.rejected == 3
    # A partition new to the log starts wherever its first delta says.
    late = deltas(r, 5, 9_000, 1, seed=4)[0]
    assert r.apply(late) and r.absorbed[("in", 5)] == 9_064


def test_malformed_deltas_are_refused_not_folded() -> None:
    r = replica()
    good = deltas(r, 0, 0, 1, seed=5)[0]
    bad_index = Delta("x", "in", 0, 0, 64, 64, np.array([0, K]), np.zeros((2, D)),
                      np.ones(2), np.zeros(2))  # fmt: skip
    nan_sums = Delta("x", "in", 0, 0, 64, 64, good.index, good.sums * np.nan, good.weights,
                     good.sse)  # fmt: skip
    negative = Delta("x", "in", 0, 0, 64, 64, good.index, good.sums, -good.weights, good.sse)
    before = r.centroids.copy()
    assert not any(r.apply(d) for d in (bad_index, nan_sums, negative))
    np.testing.assert_array_equal(r.centroids, before)
    assert r.apply(good)


def test_half_life_follows_the_samples_in_the_log() -> None:
    one, two = replica(), replica()
    one.half_life = two.half_life = 128.0
    big = deltas(one, 0, 0, 1, seed=6)[0]  # 64 rows
    for r in (one, two):
        r.apply(big)
    empty = Delta("a", "in", 0, 64, 64, 0, np.empty(0, np.int64), np.empty((0, D)), np.empty(0),
                  np.empty(0))  # fmt: skip
    two.apply(empty)  # no samples: no forgetting
    np.testing.assert_array_equal(one.counts_, two.counts_)
    nxt = deltas(one, 0, 64, 1, seed=7)[0]
    before = one.counts_.copy()
    one.apply(nxt)
    np.testing.assert_allclose(one.counts_, before * 0.5 ** (64 / 128) + _dense(nxt))


def _dense(d: Delta) -> np.ndarray:
    w = np.zeros(K)
    w[d.index] = d.weights
    return w


def test_wire_round_trip_is_exact_and_garbage_is_refused() -> None:
    r = replica()
    d = deltas(r, 2, 77, 1, seed=8)[0]
    kind, back = wire.decode(wire.encode_delta(d))
    assert kind == "delta"
    for field in ("index", "sums", "weights", "sse", "sse2"):
        assert getattr(back, field).tobytes() == getattr(d, field).tobytes()
    assert (back.topic, back.partition, back.first, back.after, back.n) == ("in", 2, 77, 141, 64)
    # a record written before the second moments travelled still folds, as Gaussian clusters'
    old = wire.encode_delta(dataclasses.replace(d, sse2=None))
    kind, back = wire.decode(old)
    assert back.sse2 is None
    fresh = replica()
    assert fresh.apply(back)
    want = scoring.gaussian_sse2(d.weights, d.sse, D)
    np.testing.assert_allclose(fresh.sse2[d.index], want, rtol=1e-12)
    for junk in (b"", b"{}\n", b'{"type":"delta"}\n', wire.encode_delta(d) + b"x", b"\xff\n"):
        with pytest.raises(StateError):
            wire.decode(junk)


def test_sparse_deltas_carry_only_the_centroids_they_touch() -> None:
    r = Replica.from_centroids(np.arange(64 * D, dtype=np.float64).reshape(64, D) * 100)
    X = np.repeat(r.centroids[:2], 32, axis=0).astype(np.float32)
    labels, d2, _ = r.assign(X)
    d = r.delta("a", "in", 0, 0, 64, X, labels, d2)
    assert d.index.tolist() == [0, 1]
    assert len(wire.encode_delta(d)) < 400  # not 64 centroids' worth


def test_state_round_trip_is_bit_exact() -> None:
    r = replica()
    for d in deltas(r, 0, 0, 3, seed=9):
        r.apply(d)
    r.sync_offset = 42
    meta, arrays = r.to_state()
    back = Replica.from_state(meta, arrays)
    assert back.centroids.tobytes() == r.centroids.tobytes()
    assert (back.absorbed, back.sync_offset, back.n_steps_) == (r.absorbed, 42, r.n_steps_)
    assert back.inertia_ewma_ == r.inertia_ewma_
    with pytest.raises(StateError):
        Replica.from_state({**meta, "kind": "model"}, arrays)


def test_delta_builder_leaves_out_rows_the_log_already_absorbed() -> None:
    r = replica()
    r.absorbed[("in", 0)] = 110  # the log holds partition 0 up to 109 (a previous owner)
    builder = DeltaBuilder("b")
    X = data(40, seed=11)
    partitions = np.array([0] * 20 + [1] * 20, dtype=np.int32)
    offsets = np.concatenate([np.arange(100, 120), np.arange(0, 20)])
    labels, d2, _ = r.assign(X)
    out = builder.build(r, "in", X, partitions, offsets, labels, d2,
                        {("in", 0): 100, ("in", 1): 0}, {("in", 0): 120, ("in", 1): 20})  # fmt: skip
    by_part = {d.partition: d for d in out}
    assert (by_part[0].first, by_part[0].after, by_part[0].n) == (110, 120, 10)
    assert (by_part[1].first, by_part[1].after, by_part[1].n) == (0, 20, 20)
    assert all(r.apply(d) for d in out) and r.n_samples_seen_ == 30
    # The next batch continues where this instance's deltas end, before the log has them.
    nxt = builder.build(r, "in", X[:0], partitions[:0], offsets[:0], None, None,
                        {("in", 0): 120}, {("in", 0): 125})  # fmt: skip
    assert [(d.first, d.after, d.n) for d in nxt] == [(120, 125, 0)]


def test_seeding_picks_distinct_rows() -> None:
    X = data(300, seed=12)
    C = seed_centroids(X, K, seed=0)
    assert C.shape == (K, D) and len({tuple(c) for c in C}) == K
    np.testing.assert_array_equal(C, seed_centroids(X, K, seed=0))


class MemoryLog:
    """A one-partition sync topic in memory, with a movable start (retention)."""

    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.low = 0
        self.pos = 0
        self.reset_error = False

    def produce(self, topic: str, value: bytes, key: object = None, partition: int = 0) -> None:
        self.records.append(value)

    def flush(self, timeout: float = 0) -> int:
        return 0

    def poll(self, timeout: float = 0) -> int:
        return 0


class Reader:
    def __init__(self, log: MemoryLog) -> None:
        self.log = log
        self.pos = 0

    def assign(self, tps: list) -> None:  # type: ignore[type-arg]
        off = tps[0].offset
        self.pos = self.log.low if off < 0 else off

    def seek(self, tp: object) -> None:
        self.pos = tp.offset  # type: ignore[attr-defined]

    def consume(self, num_messages: int, timeout: float) -> list:  # type: ignore[type-arg]
        from confluent_kafka import Message

        self.pos = max(self.pos, self.log.low)
        out = []
        while self.pos < len(self.log.records) and len(out) < num_messages:
            out.append(Message(topic="sync", partition=0, offset=self.pos,
                               value=self.log.records[self.pos], timestamp=(1, 0)))  # fmt: skip
            self.pos += 1
        return out

    def get_watermark_offsets(self, tp: object, timeout: float, cached: bool) -> tuple[int, int]:
        return self.log.low, len(self.log.records)

    def position(self, tps: list) -> list:  # type: ignore[type-arg]
        from confluent_kafka import TopicPartition

        return [TopicPartition("sync", 0, self.pos)]

    def close(self) -> None:
        pass


def shared_learner():  # type: ignore[no-untyped-def]
    from streamkm.config import ModelSettings
    from streamkm.shared.sync import SharedLearner

    return SharedLearner(ModelSettings(n_clusters=K, batch_size=64, init_size=64, seed=0))


def test_a_reader_of_a_truncated_log_starts_from_a_snapshot_bit_identical() -> None:
    from streamkm.errors import StreamkmError
    from streamkm.shared.sync import SyncLog

    log = MemoryLog()
    writer, learner = SyncLog(Reader(log), log, "sync", "a", snapshot_every=3), shared_learner()
    writer.start(learner)
    learner.step(data(64, seed=0))  # proposes the init and adopts it
    for b in range(10):
        X = data(64, seed=100 + b)
        labels, d2, _ = learner.replica.assign(X)
        writer.send([learner.replica.delta("a", "in", 0, 64 * b, 64 * (b + 1), X, labels, d2)])
        writer.refresh()
    kinds = [wire.decode(v)[0] for v in log.records]
    assert kinds.count("snapshot") == 3 and kinds[0] == "init"

    # Retention removed the init and the first deltas: a new reader starts at a snapshot
    # whose offsets are still there, and ends bit-identical to the writer.
    first_snap = kinds.index("snapshot")
    log.low = first_snap - 1
    fresh = shared_learner()
    reader = SyncLog(Reader(log), log, "sync", "b")
    reader.start(fresh)
    reader.catch_up(timeout_s=5)
    assert fresh.replica is not None and reader.truncated
    assert fresh.replica.centroids.tobytes() == learner.replica.centroids.tobytes()
    assert fresh.replica.absorbed == learner.replica.absorbed
    assert fresh.replica.n_samples_seen_ == learner.replica.n_samples_seen_ == 640

    # With no usable snapshot left in what the log holds, a new instance refuses to seed itself.
    log.low = len(log.records) - 1
    lost = shared_learner()
    orphan = SyncLog(Reader(log), log, "sync", "c")
    orphan.start(lost)
    with pytest.raises(StreamkmError, match="no longer holds its beginning"):
        lost.step(data(64, seed=1))


def test_held_deltas_merge_into_one_record_that_folds_like_the_two() -> None:
    r = replica()
    a, b = deltas(r, 0, 0, 2, seed=20)
    builder = DeltaBuilder("a")
    builder.hold([a])
    builder.hold([b])
    (merged,) = builder.take()
    assert (merged.first, merged.after, merged.n) == (0, 128, 128) and not builder.holding
    one, two = replica(), replica()
    assert one.apply(merged) and two.apply(a) and two.apply(b)
    np.testing.assert_array_equal(one.counts_, two.counts_)
    np.testing.assert_allclose(one.centroids, two.centroids, rtol=1e-12)
    assert one.absorbed == two.absorbed == {("in", 0): 128}
    # A delta that does not continue the held one is sent apart; a rewind drops what is held.
    c = deltas(r, 0, 500, 1, seed=21)[0]
    builder.hold([a, c])
    assert [(d.first, d.after) for d in builder.take()] == [(0, 64), (500, 564)]
    builder.hold([a])
    builder.rewind(("in", 0), 0)
    assert builder.take() == []


def test_far_rows_are_clipped_in_deltas_and_the_inertia_stays_unclipped() -> None:
    """A replica clips each squared distance at CLIP spreads, as one instance does, so 1% of
    far rows neither widen its clusters nor pin the score's dispersion at its floor; the
    inertia it reports stays the rows' plain mean squared distance."""
    rng = np.random.default_rng(0)
    d = 8
    C = np.zeros((2, d))
    C[1, 0] = 50.0
    r = Replica.from_centroids(C)
    for b in range(20):
        X = rng.normal(size=(1000, d)) + C[np.arange(1000) % 2]
        out = rng.random(1000) < 0.01
        X[out] += rng.normal(size=(int(out.sum()), d)) * 30.0
        X = X.astype(np.float32)
        labels, d2, _ = r.assign(X)
        delta = r.delta("a", "in", 0, b * 1000, (b + 1) * 1000, X, labels, d2)
        assert delta.err == pytest.approx(float(d2.sum())) and delta.sse.sum() < delta.err
        assert r.apply(delta)
    assert r.inertia_ == pytest.approx(float(d2.mean()))
    spread = r.sse / r.counts_
    np.testing.assert_allclose(spread, d, rtol=0.3)
    sigma = scoring.deviation(r.counts_, r.sse, r.sse2, d)
    assert (sigma > 0.3).all() and (sigma < 1.5).all()
    _, _, scores = r.assign(X)
    assert np.quantile(scores[out], 0.1) > 10 * np.quantile(scores[~out], 0.99)
    # a record without err (older streamkm) reports its sse as the error
    old = dataclasses.replace(delta, err=None, first=20000, after=21000)
    _, back = wire.decode(wire.encode_delta(old))
    assert back.err is None and back.error == pytest.approx(float(delta.sse.sum()))
    _, back = wire.decode(wire.encode_delta(delta))
    assert back.err == delta.err


class StubTransactions:
    """Exactly-once's transactional calls, recording them; ``open`` as the batches leave it."""

    def __init__(self) -> None:
        self.open = False
        self.calls: list[str] = []

    def begin(self) -> None:
        assert not self.open, "a transaction is already open"
        self.open = True
        self.calls.append("begin")

    def commit(self, offsets: object = None, metadata: object = None, doing: str = "") -> None:
        self.open = False
        self.calls.append("commit")


def test_a_snapshot_waits_for_the_batches_transaction_to_close() -> None:
    """Exactly-once: the batches' transaction may stay open across turns; a snapshot due
    meanwhile goes in a transaction of its own once it has closed, not inside it."""
    from streamkm.shared.sync import SyncLog

    log, txn = MemoryLog(), StubTransactions()
    sync, learner = SyncLog(Reader(log), log, "sync", "a", txn, snapshot_every=2), shared_learner()
    sync.start(learner)
    learner.step(data(64, seed=0))  # proposes the init (a transaction of its own)
    txn.begin()  # the batches' transaction, open over the next turns
    for b in range(2):
        X = data(64, seed=200 + b)
        labels, d2, _ = learner.replica.assign(X)
        sync.send([learner.replica.delta("a", "in", 0, 64 * b, 64 * (b + 1), X, labels, d2)])
    sync.refresh()  # folds both deltas: a snapshot is due, but the transaction is open
    kinds = [wire.decode(v)[0] for v in log.records]
    assert "snapshot" not in kinds and txn.open
    txn.commit()
    sync.refresh()
    assert [wire.decode(v)[0] for v in log.records].count("snapshot") == 1
    assert txn.calls == ["begin", "commit", "begin", "commit", "begin", "commit"]
