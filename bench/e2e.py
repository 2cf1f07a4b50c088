"""End-to-end benchmark: Kafka in → assignments out, streamkm against two hand-written loops.

On one local Apache Kafka, with the same pre-produced float32 vectors, four contestants run
one after the other, each as its own process (so that their RSS compares), each in its own
consumer group on the shared input topic and writing to its own output topic:

  (a) echo          consume(1024) → produce every record unchanged: the Python ceiling;
  (b) sklearn       consume(1024) → np.frombuffer → MiniBatchKMeans.partial_fit + predict →
                    one JSON record per input (bench/_e2e_loops.py);
  (c) streamkm      ``streamkm run`` with its default settings (batch_size, max_batch_wait_ms
                    and the client properties of streamkm/config.py and streamkm/kafka.py);
  (d) streamkm-eos  the same with ``delivery.guarantee = "exactly-once"``.

Measures, for d=16/k=8 and d=128/k=100, with the input spread evenly (round-robin) over 1 and
over 3 partitions (each output topic has as many partitions as the input):

* throughput: the input topic is filled before the contestant starts, and the rate is
  (N − 1) / (N-th output's timestamp − first output's timestamp), over all partitions of the
  output topic (read back with a read_committed consumer, so aborted records and transaction
  markers do not count). Output topics use LogAppendTime, so the timestamps are the broker's
  append times; start-up (imports, JIT, group join) is outside the span, the whole consume →
  process → produce path inside it. The topic holds 10% more than N so that the span ends inside
  the backlog: how a contestant treats the end of its input (a partial batch waiting for more)
  is a latency matter, measured below. Every contestant does this ``--rounds`` times (a fresh
  process and group each time, the four interleaved so that they share the machine's noise); the
  median is reported.
* latency: in the last round, once the contestant has caught up, a producer paced at 20% of the
  contestant's median rate (streamkm's for echo and sklearn) writes for a fixed time, then one at
  1,000 msgs/s (low traffic, where the max-wait flush matters); latency = broker append time of
  the output − CreateTime of its input. Each output is matched to its input by the input's
  (partition, offset): the JSON record's ``partition`` and ``offset`` for sklearn and streamkm;
  for echo, whose output is the raw input, by its position: echo writes each record to the
  output partition of its input's number, so output partition p, offset o answers input
  partition p, offset o (and the bytes are compared). Every input of a phase must be answered
  exactly once, and at the end the output holds exactly one record per input.
  For exactly-once the append time is that of the record, not of its transaction's commit
  marker: a read_committed reader sees it up to one EndTxn round trip later.
* RSS: peak resident set (VmHWM from /proc) of the contestant's process, highest over the
  rounds. In a separate long run streamkm's VmRSS is sampled after 1M and after 5M messages.

    python bench/e2e.py [--messages N] [--rounds R] [--quick] [--keep]
        [--partitions 1,3] [--configs 16:8,128:100] [--contestants streamkm,echo,...]

Targets (issue 11, ratios of medians in the same run): streamkm at-least-once ≥ 0.8× echo at
d=16, k=8, at 1 and 3 partitions; exactly-once ≥ 0.6× echo; ≥ 2× sklearn at d=128, k=100;
p99 ≤ max_batch_wait_ms + 100 ms at 20% load and at 1,000 msgs/s; RSS flat (±10%).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import confluent_kafka
import numpy as np
from confluent_kafka import (
    TIMESTAMP_LOG_APPEND_TIME,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _streams import blobs  # noqa: E402

from streamkm.config import ModelSettings  # noqa: E402
from streamkm.tools.broker import LocalBroker, free_port  # noqa: E402
from tests.daemon import write_config  # noqa: E402
from tests.kafka_util import create_topic  # noqa: E402

# streamkm runs with its defaults; these are what they are (and what the loops' bulk is).
BATCH = ModelSettings().batch_size
WAIT_MS = ModelSettings().max_batch_wait_ms
CONFIGS = [(16, 8), (128, 100)]
PARTITIONS = (1, 3)
PACED_FRACTION = 0.2
LOW_RATE = 1_000.0  # msgs/s of the low-traffic latency phase
PACE_TAIL_S = 1.0  # a paced phase goes on this long past the inputs it measures
UNIQUE_ROWS = 100_000  # distinct vectors per topic; longer streams cycle through them
OUT_TOPIC_CONF = {"message.timestamp.type": "LogAppendTime"}
# Given to the two hand-written loops' consumers; streamkm has the same by default. librdkafka
# stops fetching a partition once queued.min.messages (100,000) are queued and then waits
# fetch.queue.backoff.ms (1 s by default) before fetching again, although a Python loop drains
# the queue in well under a second: with the default a loop is capped near 100k msgs/s per
# partition and the benchmark would measure that timer.
CONSUMER_TUNING: dict[str, str | int] = {"fetch.queue.backoff.ms": 10}
# streamkm first: it sets the paced rate of echo and sklearn.
CONTESTANTS = ("streamkm", "streamkm-eos", "echo", "sklearn")
_EOF = KafkaError._PARTITION_EOF


@dataclass
class Scale:
    messages: int  # N per throughput run
    rounds: int  # throughput runs per contestant (median reported)
    paced_s: float  # length of the paced phase at 20% of the maximum rate
    low_s: float  # length of the paced phase at LOW_RATE
    rss_at: tuple[int, int]  # streamkm RSS samples in the long run


FULL = Scale(1_000_000, 3, 15.0, 6.0, (1_000_000, 5_000_000))
QUICK = Scale(300_000, 2, 4.0, 3.0, (200_000, 1_000_000))


@dataclass
class Phase:
    """A paced phase: the [first, end) input offsets per partition, all and those measured."""

    rate: float
    inputs: dict[int, tuple[int, int]]
    measured: dict[int, tuple[int, int]]
    out_first: list[int] = field(default_factory=list)  # output watermarks before and after
    out_end: list[int] = field(default_factory=list)


@dataclass
class Latency:
    rate: float = 0.0  # msgs/s offered
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")

    @classmethod
    def of(cls, rate: float, lat_ms: np.ndarray) -> Latency:
        p50, p99 = np.percentile(lat_ms, [50, 99])
        return cls(rate, float(p50), float(p99), float(lat_ms.max()))


@dataclass
class Result:
    kind: str
    d: int
    k: int
    parts: int
    rates: list[float] = field(default_factory=list)  # one per round
    paced: Latency = field(default_factory=Latency)
    low: Latency = field(default_factory=Latency)
    peak_rss_mb: float = 0.0

    @property
    def rate(self) -> float:
        return float(np.median(self.rates)) if self.rates else float("nan")


@dataclass
class RssRun:
    samples: dict[int, float] = field(default_factory=dict)  # messages out → VmRSS MB
    peak_mb: float = 0.0
    rate: float = 0.0


# -- process and topic helpers ---------------------------------------------------------------


def proc_mem_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a live process, in MiB."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) / 1024.0
    return out


def vector_rows(n: int, d: int, k: int, seed: int) -> list[bytes]:
    """Up to UNIQUE_ROWS encoded float32 vectors from well-separated blobs."""
    X, _ = blobs(min(n, UNIQUE_ROWS), d, k, seed=seed)
    buf = X.astype("<f4").tobytes()
    step = d * 4
    return [buf[i : i + step] for i in range(0, len(buf), step)]


class Bench:
    def __init__(
        self, bootstrap: str, workdir: Path, scale: Scale, wrapper: str | None = None
    ) -> None:
        self.bootstrap = bootstrap
        self.workdir = workdir
        self.scale = scale
        # A script that streamkm runs through (it gets "-m streamkm.cli run ..." as its
        # arguments): to size a change by patching streamkm in memory, its files untouched.
        self.wrapper = wrapper
        self.n_parts: dict[str, int] = {}  # partitions of every topic created
        # One consumer, never subscribed, only asks for high watermarks.
        self.watch = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-watch"})
        # Reads the committed offsets of exactly-once contestants' groups (an admin request:
        # no consumer of their group.id, which would disturb the group).
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        # One paced producer for all latency phases, its producer id obtained up front so
        # that the first paced records do not wait for it.
        self.pace_failures: list[str] = []
        self.pacer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "linger.ms": 5,
                "on_delivery": lambda err, _m: (
                    err is not None and self.pace_failures.append(err.str())
                ),
            }
        )
        create_topic(bootstrap, "bench-warmup", 1)
        self.pacer.produce("bench-warmup", b"")
        self.pacer.flush(60)

    def close(self) -> None:
        self.watch.close()
        self.pacer.flush(10)

    def topic(self, name: str, partitions: int, config: dict[str, str] | None = None) -> str:
        create_topic(self.bootstrap, name, partitions, config)
        self.n_parts[name] = partitions
        return name

    def highs(self, topic: str) -> list[int]:
        """High watermark of every partition."""
        return [self._high(topic, q) for q in range(self.n_parts[topic])]

    def _high(self, topic: str, partition: int) -> int:
        # A topic just created may not have its leader known everywhere yet: retry a little.
        for attempt in range(50):
            try:
                tp = TopicPartition(topic, partition)
                return int(self.watch.get_watermark_offsets(tp, 10, cached=False)[1])
            except KafkaException:
                if attempt == 49:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")

    def fill(self, topic: str, rows: list[bytes], n: int) -> None:
        """Produce ``n`` records round-robin over the partitions, cycling through ``rows``."""
        failures: list[str] = []
        p = Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "enable.idempotence": True,
                "linger.ms": 20,
                "batch.size": 1_000_000,
                "queue.buffering.max.messages": 1_000_000,
                "on_delivery": lambda err, _m: err is not None and failures.append(err.str()),
            }
        )
        m, parts = len(rows), self.n_parts[topic]
        for i in range(n):
            while True:
                try:
                    p.produce(topic, rows[i % m], partition=i % parts)
                    break
                except BufferError:
                    p.poll(0.05)
            if i % 10_000 == 0:
                p.poll(0)
        if p.flush(120) or failures:
            raise RuntimeError(f"prefill of {topic} failed: {failures[:1]}")

    def pace(self, topic: str, rows: list[bytes], rate: float, seconds: float) -> Phase:
        """Produce at ``rate`` msgs/s for ``seconds`` (then PACE_TAIL_S more), round-robin
        over the partitions; the inputs written in the first ``seconds`` are measured.

        The tail keeps the stream going past the measured inputs, as a stream does: without
        it the last partial batch of the phase would wait for its timed flush, which a stream
        at this rate never does. The producer's own batching delay (linger 5 ms) is part of
        the latency measured, as it would be in real use.
        """
        p = self.pacer
        first = self.highs(topic)
        parts = len(first)
        measured = max(1, int(rate * seconds))
        total = measured + int(rate * PACE_TAIL_S)
        m = len(rows)
        sent = 0
        start = time.monotonic()
        while sent < total:
            due = min(total, int(rate * (time.monotonic() - start)) + 1)
            while sent < due:
                p.produce(topic, rows[sent % m], partition=sent % parts)
                sent += 1
            p.poll(0)
            time.sleep(0.002)
        if p.flush(60) or self.pace_failures:
            raise RuntimeError(f"paced producer failed: {self.pace_failures[:1]}")
        end = self.highs(topic)
        assert sum(end) - sum(first) == total, (first, end, total)
        # One idempotent producer, round-robin: record i is offset first[i % P] + i // P.
        return Phase(
            rate,
            {q: (first[q], end[q]) for q in range(parts)},
            {q: (first[q], first[q] + (measured - q + parts - 1) // parts) for q in range(parts)},
        )

    def read(self, topic: str, ranges: dict[int, tuple[int, int]]) -> Iterator[Message]:
        """The records of offsets [start, end) of each partition (read_committed: aborted
        records and transaction markers are skipped), each partition in offset order."""
        todo = {q: se for q, se in ranges.items() if se[1] > se[0]}
        if not todo:
            return
        c = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": "bench-read",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "isolation.level": "read_committed",
            }
        )
        c.assign([TopicPartition(topic, q, s) for q, (s, _) in todo.items()])
        deadline = time.monotonic() + 120
        try:
            while todo:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reading {topic}: partitions {sorted(todo)} unfinished")
                for msg in c.consume(10_000, 0.5):
                    q = msg.partition()
                    if q not in todo:
                        continue
                    end = todo[q][1]
                    err = msg.error()
                    if err is not None:
                        if err.code() != _EOF:
                            raise RuntimeError(err.str())
                        # The end of the partition (its last stable offset): done if past end.
                        if msg.offset() >= end:
                            del todo[q]
                        continue
                    o = msg.offset()
                    if o < end:
                        yield msg
                    if o >= end - 1:  # a marker may hold end − 1: a later record also ends it
                        del todo[q]
        finally:
            c.close()

    def answered(self, dst: str, txn_group: str | None) -> int:
        """Inputs answered so far: the output's record count or, for a transactional
        contestant (its consumer group ``txn_group`` given; transaction markers take offsets
        too), the sum of the group's committed input offsets. Those are committed by the
        transaction that holds the outputs, so they count only what a read_committed reader
        sees. (Not ``streamkm_messages_assigned_total``: it counts records when produced, and a
        transaction stays open for up to ``delivery.transaction_ms`` after that.)"""
        if txn_group is None:
            return sum(self.highs(dst))
        request = [ConsumerGroupTopicPartitions(txn_group)]
        try:
            got = self.admin.list_consumer_group_offsets(request)[txn_group].result(10)
        except KafkaException:
            return 0  # the group's coordinator not known yet
        return sum(tp.offset for tp in got.topic_partitions or () if tp.offset > 0)

    def output_times(self, dst: str, n: int) -> tuple[int, int]:
        """Append times (ms) of the first and the n-th output, over all partitions."""
        # commit_transaction returns before the commit markers are written: a read_committed
        # reader may see the last committed transaction a moment later. Read again then.
        for attempt in range(20):
            ends = self.highs(dst)
            msgs = self.read(dst, {q: (0, e) for q, e in enumerate(ends)})
            ts = np.fromiter((t for _, t in map(Message.timestamp, msgs)), dtype=np.int64)
            if ts.size >= n:
                break
            if attempt == 19:
                raise AssertionError(f"{dst} holds {ts.size} records, {n} expected")
            time.sleep(0.25)
        ts.sort()
        return int(ts[0]), int(ts[n - 1])

    def count_records(self, dst: str) -> int:
        """Records of ``dst`` (read_committed), transaction markers not counted."""
        return sum(1 for _ in self.read(dst, {q: (0, e) for q, e in enumerate(self.highs(dst))}))

    def wait_answered(
        self,
        proc: subprocess.Popen[bytes],
        log: Path,
        dst: str,
        txn_group: str | None,
        n: int,
        on_poll=None,
    ) -> None:
        """Wait until ``n`` inputs are answered; fail if the contestant dies or stalls."""
        last, last_change = -1, time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{log.name} exited with {proc.returncode}:\n{tail(log)}")
            have = self.answered(dst, txn_group)
            if on_poll is not None:
                on_poll(have)
            if have >= n:
                return
            if have != last:
                last, last_change = have, time.monotonic()
            elif time.monotonic() - last_change > 120:
                raise TimeoutError(f"{dst} stuck at {have} of {n} answers:\n{tail(log)}")
            time.sleep(0.1)

    # -- contestants ------------------------------------------------------------------------

    def launch(
        self,
        kind: str,
        d: int,
        k: int,
        src: str,
        dst: str,
        python_args: tuple[str, ...] = (),
        extra_env: dict[str, str] | None = None,
    ) -> tuple[subprocess.Popen[bytes], Path, str]:
        """Start a contestant; ``python_args`` go before the module (e.g. ``-m cProfile``).

        Returns the process, its log and its consumer group.
        """
        name = f"{kind}-d{d}-{dst}"
        group = f"g-{name}"
        wd = self.workdir / name
        wd.mkdir(parents=True, exist_ok=True)
        log = wd / f"{name}.log"
        env = {key: v for key, v in os.environ.items() if not key.startswith("STREAMKM_")}
        env.update(extra_env or {})
        if kind.startswith("streamkm"):
            # Defaults everywhere but where it must differ: addresses, topics, group, files.
            guarantee = "exactly-once" if kind == "streamkm-eos" else "at-least-once"
            port = free_port()
            cfg = write_config(
                wd / "config.toml",
                {
                    "kafka": {"bootstrap_servers": self.bootstrap, "input_topic": src,
                              "output_topic": dst, "group_id": group},
                    "input": {"format": "float32", "dim": d},
                    "model": {"n_clusters": k, "seed": 0},
                    "delivery": {"guarantee": guarantee},
                    "checkpoint": {"dir": str(wd / "ckpt")},
                    "metrics": {"host": "127.0.0.1", "port": port},
                },
            )  # fmt: skip
            if self.wrapper is not None and not python_args:
                python_args = (self.wrapper,)
            cmd = [sys.executable, *python_args, "-m", "streamkm.cli", "run", "--config", str(cfg)]
        else:
            cmd = [sys.executable, *python_args, str(ROOT / "bench" / "_e2e_loops.py"), kind,
                   "--bootstrap", self.bootstrap, "--input", src, "--output", dst,
                   "--group", group, "--dim", str(d), "--k", str(k),
                   "--consumer-conf", json.dumps(CONSUMER_TUNING)]  # fmt: skip
            if kind == "echo" and self.n_parts[src] > 1:
                cmd.append("--keep-partition")
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        return proc, log, group

    def contest(
        self,
        res: Result,
        src: str,
        rows: list[bytes],
        rnd: int,
        latency: bool,
        paced_rate: float | None = None,
    ) -> None:
        """One run of a contestant: throughput over the first N inputs (into ``res.rates``).

        With ``latency``, then the two paced phases: at ``paced_rate``, or at 20% of the
        contestant's own median rate when None, and at LOW_RATE.
        """
        n = self.scale.messages
        kind, d, k = res.kind, res.d, res.k
        dst = self.topic(f"out-{kind}-p{res.parts}-d{d}-r{rnd}", res.parts, OUT_TOPIC_CONF)
        proc, log, group = self.launch(kind, d, k, src, dst)
        txn_group = group if kind == "streamkm-eos" else None

        def sample(_: int) -> None:
            res.peak_rss_mb = max(res.peak_rss_mb, proc_mem_mb(proc.pid).get("VmHWM", 0.0))

        def wait(count: int) -> None:
            self.wait_answered(proc, log, dst, txn_group, count, sample)

        phases: list[Phase] = []
        try:
            wait(n)
            t_first, t_last = self.output_times(dst, n)
            res.rates.append((n - 1) / max((t_last - t_first) / 1000.0, 1e-3))
            if latency:
                # Catch up with what earlier contestants' paced phases appended.
                wait(sum(self.highs(src)))
                rate = PACED_FRACTION * res.rate if paced_rate is None else paced_rate
                for r, secs in ((rate, self.scale.paced_s), (LOW_RATE, self.scale.low_s)):
                    out_first = self.highs(dst)
                    phase = self.pace(src, rows, r, secs)
                    wait(sum(self.highs(src)))
                    if txn_group is not None:
                        time.sleep(0.5)  # the last commit's markers (see output_times)
                    phase.out_first, phase.out_end = out_first, self.highs(dst)
                    phases.append(phase)
            sample(0)
        finally:
            stop(proc)
        if phases:
            paced, low = phases
            res.paced = Latency.of(paced.rate, self.latencies(kind, src, dst, paced))
            res.low = Latency.of(low.rate, self.latencies(kind, src, dst, low))
            # Exactly one output per input over the whole run.
            n_in = sum(self.highs(src))
            n_out = self.count_records(dst) if txn_group else sum(self.highs(dst))
            assert n_out == n_in, (kind, dst, n_out, n_in)

    def latencies(self, kind: str, src: str, dst: str, phase: Phase) -> np.ndarray:
        """Output append time − input create time (ms) of the phase's measured inputs; every
        input of the phase is matched to its output by (partition, offset), and checked to be
        answered exactly once."""
        sent: dict[tuple[int, int], tuple[int, bytes]] = {}
        for m in self.read(src, phase.inputs):
            sent[(m.partition(), m.offset())] = (m.timestamp()[1], m.value())
        expected = sum(e - s for s, e in phase.inputs.values())
        assert len(sent) == expected, (src, len(sent), expected)
        out_first, out_end = phase.out_first, phase.out_end
        lat: dict[tuple[int, int], int] = {}
        outs = self.read(dst, {q: (out_first[q], out_end[q]) for q in range(len(out_end))})
        for o in outs:
            if o.timestamp()[0] != TIMESTAMP_LOG_APPEND_TIME:
                raise AssertionError(f"{dst} does not use LogAppendTime")
            if kind == "echo":
                key = (o.partition(), o.offset())  # echo keeps partition and offset
                ok = key in sent and sent[key][1] == o.value()
            else:
                rec = json.loads(o.value())
                key = (rec["partition"], rec["offset"])
                ok = rec["topic"] == src and key in sent
            if not ok or key in lat:
                what = "answers no input of the phase" if not ok else "answers an input twice"
                raise AssertionError(f"{dst}[{o.partition()}]@{o.offset()} {what}: {key}")
            lat[key] = o.timestamp()[1] - sent[key][0]
        missing = sent.keys() - lat.keys()
        if missing:
            raise AssertionError(f"{dst}: {len(missing)} inputs unanswered, e.g. {min(missing)}")
        measured = [lat[(q, o)] for q, (s, e) in phase.measured.items() for o in range(s, e)]
        return np.asarray(measured, dtype=np.float64)

    def rss_run(self) -> RssRun:
        """streamkm alone on a long stream (d=16, k=8): VmRSS after 1M and after 5M outputs."""
        d, k = CONFIGS[0]
        small, big = self.scale.rss_at
        src = self.topic("in-rss", 1)
        dst = self.topic("out-rss", 1, OUT_TOPIC_CONF)
        rows = vector_rows(big, d, k, seed=7)
        # Fill in a thread while streamkm consumes: the RSS, not the rate, is measured here.
        filler = threading.Thread(target=self.fill, args=(src, rows, big), daemon=True)
        filler.start()
        run = RssRun()
        proc, log, _ = self.launch("streamkm", d, k, src, dst)

        def sample(have: int) -> None:
            mem = proc_mem_mb(proc.pid)
            run.peak_mb = max(run.peak_mb, mem.get("VmHWM", 0.0))
            for mark in (small, big):
                if have >= mark and mark not in run.samples:
                    run.samples[mark] = mem["VmRSS"]

        try:
            self.wait_answered(proc, log, dst, None, big, sample)
        finally:
            stop(proc)
            filler.join(600)
        t_first, t_last = self.output_times(dst, big)
        run.rate = (big - 1) / max((t_last - t_first) / 1000.0, 1e-3)
        return run


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


# -- report ----------------------------------------------------------------------------------


def machine() -> str:
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
            model,
        )
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            mem = f", {int(fh.readline().split()[1]) / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        mem = ""
    load = ", load average {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg())
    libs = (
        f"NumPy {np.__version__}, confluent-kafka {confluent_kafka.__version__} "
        f"(librdkafka {confluent_kafka.libversion()[0]})"
    )
    return f"{os.cpu_count()} CPUs ({model}){mem}{load}; Python {platform.python_version()}, {libs}"


def report(
    results: list[Result], rss: RssRun | None, scale: Scale, elapsed: float, command: str
) -> tuple[str, bool]:
    by = {(r.kind, r.d, r.parts): r for r in results}
    configs = sorted({(r.d, r.k) for r in results})
    parts_run = sorted({r.parts for r in results})
    kinds = [c for c in ("echo", "sklearn", "streamkm", "streamkm-eos") if any(
        r.kind == c for r in results)]  # fmt: skip
    lines = [
        f"Command: `{command}`. Machine: {machine()}.",
        "",
        f"N = {scale.messages:,} per throughput run, median of {scale.rounds} rounds; paced "
        f"phases {scale.paced_s:.0f} s at 20% of the contestant's rate (streamkm's for echo and "
        f"sklearn) and {scale.low_s:.0f} s at {LOW_RATE:,.0f} msgs/s. streamkm: its defaults "
        f"(batch_size {BATCH}, max_batch_wait_ms {WAIT_MS}); the loops: consume({BATCH}, "
        f"0.1 s). Total time {elapsed / 60:.1f} min.",
        "",
        "| partitions | d | k | contestant | msgs/s | rounds | vs echo | vs sklearn "
        "| p50 / p99 / max ms at 20% | p50 / p99 / max ms at 1k/s | peak RSS MiB |",
        "|---:|---:|---:|---|---:|---|---:|---:|---|---|---:|",
    ]

    def ratio(r: Result, ref: str) -> str:
        other = by.get((ref, r.d, r.parts))
        return f"{r.rate / other.rate:.2f}" if other is not None else "–"

    for parts in parts_run:
        for d, k in configs:
            for kind in kinds:
                r = by.get((kind, d, parts))
                if r is None:
                    continue
                rounds = " ".join(f"{x / 1000:.0f}k" for x in r.rates)
                lines.append(
                    f"| {parts} | {d} | {k} | {kind} | {r.rate:,.0f} | {rounds} "
                    f"| {ratio(r, 'echo')} | {ratio(r, 'sklearn')} | {_lat(r.paced)} "
                    f"| {_lat(r.low)} | {r.peak_rss_mb:.0f} |"
                )
    checks: list[tuple[str, str, bool]] = []
    limit = WAIT_MS + 100
    for parts in parts_run:
        for kind, ref, d, need in (
            ("streamkm", "echo", 16, 0.8),
            ("streamkm-eos", "echo", 16, 0.6),
            ("streamkm", "sklearn", 128, 2.0),
        ):
            a, b = by.get((kind, d, parts)), by.get((ref, d, parts))
            if a is None or b is None:
                continue
            k = a.k
            checks.append(
                (f"{kind} ≥ {need:g}× {ref} at d={d}, k={k}, {parts} partition(s)",
                 f"{a.rate / b.rate:.2f}×", a.rate >= need * b.rate)
            )  # fmt: skip
        for kind in ("streamkm", "streamkm-eos"):
            for d, _ in configs:
                r = by.get((kind, d, parts))
                if r is None or r.paced.rate == 0.0:
                    continue
                worst = max(r.paced.p99_ms, r.low.p99_ms)
                checks.append(
                    (f"{kind} p99 ≤ {limit} ms at 20% and at 1k/s (d={d}, {parts} partition(s))",
                     f"{r.paced.p99_ms:.0f} ms at {r.paced.rate:,.0f}/s; {r.low.p99_ms:.0f} ms "
                     f"at 1k/s", worst <= limit)
                )  # fmt: skip
    if rss is not None:
        small, big = scale.rss_at
        rss_small, rss_big = rss.samples[small], rss.samples[big]
        growth = rss_big / rss_small - 1.0
        lines += [
            "",
            f"Long run (streamkm, d=16, k=8, 1 partition, input produced while it runs): VmRSS "
            f"{rss_small:.0f} MiB after {small:,} messages, {rss_big:.0f} MiB after {big:,} "
            f"({growth:+.1%}); peak {rss.peak_mb:.0f} MiB; {rss.rate:,.0f} msgs/s over the run.",
        ]
        checks.append(
            (f"streamkm RSS flat (±10%) from {small:,} to {big:,}", f"{growth:+.1%}",
             abs(growth) <= 0.10)
        )  # fmt: skip
    lines += ["", "| target | measured | result |", "|---|---|---|"]
    for name, value, ok in checks:
        lines.append(f"| {name} | {value} | {'met' if ok else '**not met**'} |")
    return "\n".join(lines), all(ok for *_, ok in checks)


def _lat(x: Latency) -> str:
    if x.rate == 0.0:
        return "–"
    return f"{x.p50_ms:.0f} / {x.p99_ms:.0f} / {x.max_ms:.0f}"


def main() -> int:
    p = argparse.ArgumentParser(description="End-to-end benchmark: streamkm vs echo vs sklearn.")
    p.add_argument(
        "--messages", type=int, help="N per throughput run (default 1M, 300k with --quick)"
    )
    p.add_argument("--rounds", type=int, help="throughput runs per contestant (default 3, 2)")
    p.add_argument("--quick", action="store_true", help="smaller runs (about 10 minutes)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    p.add_argument("--partitions", default="1,3", help="input partition counts (default 1,3)")
    p.add_argument("--configs", default="16:8,128:100", help="d:k pairs (default 16:8,128:100)")
    p.add_argument("--contestants", default=",".join(CONTESTANTS), help="subset to run")
    p.add_argument("--no-rss", action="store_true", help="skip the long RSS run")
    p.add_argument(
        "--streamkm-wrapper",
        metavar="SCRIPT",
        help="run streamkm as `python SCRIPT -m streamkm.cli run ...` (experiments)",
    )
    args = p.parse_args()
    command = "python bench/e2e.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    scale = QUICK if args.quick else FULL
    scale = replace(
        scale, messages=args.messages or scale.messages, rounds=args.rounds or scale.rounds
    )
    partitions = [int(x) for x in args.partitions.split(",")]
    configs = [(int(a), int(b)) for a, b in (x.split(":") for x in args.configs.split(","))]
    kinds = [c for c in CONTESTANTS if c in args.contestants.split(",")]
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="streamkm-e2e-"))
    broker = LocalBroker(dir=workdir / "broker", port=free_port())
    results: list[Result] = []
    rss: RssRun | None = None
    try:
        bench = Bench(broker.start(), workdir, scale, args.streamkm_wrapper)
        try:
            for parts in partitions:
                for d, k in configs:
                    src = bench.topic(f"in-p{parts}-d{d}", parts)
                    rows = vector_rows(scale.messages, d, k, seed=d + k)
                    t0 = time.monotonic()
                    filled = scale.messages + scale.messages // 10
                    bench.fill(src, rows, filled)
                    print(
                        f"p={parts} d={d}: {filled:,} vectors in {time.monotonic() - t0:.0f} s",
                        flush=True,
                    )
                    res = {kind: Result(kind, d, k, parts) for kind in kinds}
                    for rnd in range(1, scale.rounds + 1):
                        last = rnd == scale.rounds
                        for kind in kinds:
                            ref = res.get("streamkm")
                            paced = None
                            if kind in ("echo", "sklearn") and ref is not None:
                                paced = ref.paced.rate
                            bench.contest(res[kind], src, rows, rnd, last, paced)
                            r = res[kind]
                            print(
                                f"p={parts} d={d} k={k} round {rnd} {kind:12s} "
                                f"{r.rates[-1]:9,.0f} msgs/s"
                                + (f"  p99 {r.paced.p99_ms:.0f} ms at {r.paced.rate:,.0f}/s, "
                                   f"{r.low.p99_ms:.0f} ms at {r.low.rate:,.0f}/s" if last else ""),
                                flush=True,
                            )  # fmt: skip
                    results += res.values()
            if not args.no_rss:
                rss = bench.rss_run()
                print(f"long run: VmRSS {rss.samples}, peak {rss.peak_mb:.0f} MiB", flush=True)
        finally:
            bench.close()
    finally:
        broker.stop()
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    table, ok = report(results, rss, scale, time.monotonic() - started, command)
    print()
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
