"""End-to-end benchmark: Kafka in → assignments out, streamkm against two hand-written loops.

On one local Apache Kafka, with the same pre-produced float32 vectors, three contestants run
one after the other, each as its own process (so that their RSS compares), each in its own
consumer group on the shared input topic and writing to its own output topic:

  (a) echo      consume(1024) → produce every record unchanged: the Python ceiling;
  (b) sklearn   consume(1024) → np.frombuffer → MiniBatchKMeans.partial_fit + predict →
                one JSON record per input (bench/_e2e_loops.py);
  (c) streamkm  ``streamkm run`` with batch_size 1024 and max_batch_wait_ms 100.

Measures, for d=16/k=8 and d=128/k=100:

* throughput: the input topic is filled before the contestant starts, and the rate is
  (N − 1) / (timestamp of output N − timestamp of output 1). Output topics use LogAppendTime,
  so the timestamps are the broker's append times; start-up (imports, JIT, group join) is
  outside the span, the whole consume → process → produce path inside it. The topic holds
  10% more than N so that the span ends inside the backlog: how a contestant treats the
  end of its input (a partial batch waiting for more) is a latency matter, measured below.
  Every contestant does this ``--rounds`` times (a fresh process and group each time, the
  three interleaved so that they share the machine's noise); the median is reported.
* latency: in the last round, once the contestant has caught up, a producer paced at 20% of
  streamkm's median rate (for that d, k) writes for a fixed time, then one at 1,000 msgs/s
  (low traffic, where the max-wait flush matters); latency = broker append time of the
  output − CreateTime of its input. Every contestant emits one record per input in input
  order on a single partition, so output offset i answers input offset i (checked on every
  record of these phases).
* RSS: peak resident set (VmHWM from /proc) of the contestant's process, highest over the
  rounds. In a separate long run streamkm's VmRSS is sampled after 1M and after 5M messages.

    python bench/e2e.py [--messages N] [--rounds R] [--quick] [--keep]

Targets (issue 4): (c) ≥ 80% of (a) at d=16, k=8; (c) ≥ 2× (b) at d=128, k=100;
p99 ≤ max_batch_wait_ms + 100 ms at 20% of the maximum rate; RSS flat (±10%) from 1M to 5M.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

import numpy as np
from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME, Consumer, Message, Producer, TopicPartition

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _streams import blobs  # noqa: E402

from streamkm.tools.broker import LocalBroker, free_port  # noqa: E402
from tests.daemon import write_config  # noqa: E402
from tests.kafka_util import create_topic  # noqa: E402

BATCH = 1024
WAIT_MS = 100
CONFIGS = [(16, 8), (128, 100)]
PACED_FRACTION = 0.2
LOW_RATE = 1_000.0  # msgs/s of the low-traffic latency phase
UNIQUE_ROWS = 100_000  # distinct vectors per topic; longer streams cycle through them
OUT_TOPIC_CONF = {"message.timestamp.type": "LogAppendTime"}
# Given to all three consumers. librdkafka stops fetching a partition once queued.min.messages
# (100,000) are queued and then waits fetch.queue.backoff.ms (1 s by default) before fetching
# again, although a Python loop drains the queue in well under a second: with the default every
# contestant is capped near 100k msgs/s per partition and the benchmark would measure that timer.
CONSUMER_TUNING: dict[str, str | int] = {"fetch.queue.backoff.ms": 10}
CONTESTANTS = ("streamkm", "echo", "sklearn")  # streamkm first: it sets the paced rate


@dataclass
class Scale:
    messages: int  # N per throughput run
    rounds: int  # throughput runs per contestant (median reported)
    paced_s: float  # length of the paced phase at 20% of the maximum rate
    low_s: float  # length of the paced phase at LOW_RATE
    rss_at: tuple[int, int]  # streamkm RSS samples in the long run


FULL = Scale(1_000_000, 3, 20.0, 6.0, (1_000_000, 5_000_000))
QUICK = Scale(400_000, 2, 8.0, 4.0, (200_000, 1_000_000))


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
    rates: list[float] = field(default_factory=list)  # one per round
    paced: Latency = field(default_factory=Latency)
    low: Latency = field(default_factory=Latency)
    peak_rss_mb: float = 0.0

    @property
    def rate(self) -> float:
        return float(np.median(self.rates))


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
    def __init__(self, bootstrap: str, workdir: Path, scale: Scale) -> None:
        self.bootstrap = bootstrap
        self.workdir = workdir
        self.scale = scale
        # One consumer, never subscribed, only asks for high watermarks.
        self.watch = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-watch"})
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

    def high(self, topic: str) -> int:
        _, hi = self.watch.get_watermark_offsets(TopicPartition(topic, 0), timeout=10, cached=False)
        return int(hi)

    def fill(self, topic: str, rows: list[bytes], n: int) -> None:
        """Produce ``n`` records, cycling through ``rows``, as fast as the client goes."""
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
        m = len(rows)
        for i in range(n):
            while True:
                try:
                    p.produce(topic, rows[i % m])
                    break
                except BufferError:
                    p.poll(0.05)
            if i % 10_000 == 0:
                p.poll(0)
        if p.flush(120) or failures:
            raise RuntimeError(f"prefill of {topic} failed: {failures[:1]}")

    def pace(self, topic: str, rows: list[bytes], rate: float, seconds: float) -> tuple[int, int]:
        """Produce at ``rate`` msgs/s for ``seconds``; return the [first, end) offsets written.

        The producer's own batching delay (linger 5 ms) is part of the latency measured, as it
        would be in real use.
        """
        p = self.pacer
        first = self.high(topic)
        total = max(1, int(rate * seconds))
        m = len(rows)
        sent = 0
        start = time.monotonic()
        while sent < total:
            due = min(total, int(rate * (time.monotonic() - start)) + 1)
            while sent < due:
                p.produce(topic, rows[sent % m])
                sent += 1
            p.poll(0)
            time.sleep(0.002)
        if p.flush(60) or self.pace_failures:
            raise RuntimeError(f"paced producer failed: {self.pace_failures[:1]}")
        end = self.high(topic)
        assert end - first == total, (first, end, total)
        return first, end

    def records(self, topic: str, start: int, end: int) -> Iterator[Message]:
        """Records [start, end) of partition 0, in offset order."""
        c = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": "bench-read",
                "enable.auto.commit": False,
            }
        )
        c.assign([TopicPartition(topic, 0, start)])
        got = 0
        deadline = time.monotonic() + 120
        try:
            while got < end - start:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"read {got} of {end - start} records of {topic}")
                for msg in c.consume(min(10_000, end - start - got), 1.0):
                    if msg.error() is not None:
                        raise RuntimeError(msg.error().str())
                    if msg.offset() < end:
                        got += 1
                        yield msg
        finally:
            c.close()

    def timestamp_at(self, topic: str, offset: int) -> int:
        return next(self.records(topic, offset, offset + 1)).timestamp()[1]

    def wait_outputs(
        self, proc: subprocess.Popen[bytes], log: Path, topic: str, n: int, on_poll=None
    ) -> None:
        """Wait until ``topic`` holds ``n`` records; fail if the contestant dies or stalls."""
        last, last_change = -1, time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{log.name} exited with {proc.returncode}:\n{tail(log)}")
            have = self.high(topic)
            if on_poll is not None:
                on_poll(have)
            if have >= n:
                return
            if have != last:
                last, last_change = have, time.monotonic()
            elif time.monotonic() - last_change > 120:
                raise TimeoutError(f"{topic} stuck at {have} of {n} records:\n{tail(log)}")
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
    ) -> tuple[subprocess.Popen[bytes], Path]:
        """Start a contestant; ``python_args`` go before the module (e.g. ``-m cProfile``)."""
        name = f"{kind}-d{d}-{dst}"
        wd = self.workdir / name
        wd.mkdir(parents=True, exist_ok=True)
        log = wd / f"{name}.log"
        env = {key: v for key, v in os.environ.items() if not key.startswith("STREAMKM_")}
        env.update(extra_env or {})
        if kind == "streamkm":
            cfg = write_config(
                wd / "config.toml",
                {
                    "kafka": {"bootstrap_servers": self.bootstrap, "input_topic": src,
                              "output_topic": dst, "group_id": f"g-{name}",
                              "client": dict(CONSUMER_TUNING)},
                    "input": {"format": "float32", "dim": d},
                    "model": {"n_clusters": k, "batch_size": BATCH, "max_batch_wait_ms": WAIT_MS,
                              "seed": 0},
                    "checkpoint": {"dir": str(wd / "ckpt")},
                    "metrics": {"host": "127.0.0.1", "port": free_port()},
                    "log": {"level": "INFO"},
                },
            )  # fmt: skip
            cmd = [sys.executable, *python_args, "-m", "streamkm.cli", "run", "--config", str(cfg)]
        else:
            cmd = [sys.executable, *python_args, str(ROOT / "bench" / "_e2e_loops.py"), kind,
                   "--bootstrap", self.bootstrap, "--input", src, "--output", dst,
                   "--group", f"g-{name}", "--dim", str(d), "--k", str(k),
                   "--consumer-conf", json.dumps(CONSUMER_TUNING)]  # fmt: skip
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        return proc, log

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
        dst = f"out-{kind}-d{d}-r{rnd}"
        create_topic(self.bootstrap, dst, 1, OUT_TOPIC_CONF)
        proc, log = self.launch(kind, d, k, src, dst)

        def sample(_: int) -> None:
            res.peak_rss_mb = max(res.peak_rss_mb, proc_mem_mb(proc.pid).get("VmHWM", 0.0))

        phases: list[tuple[float, int, int]] = []  # (offered rate, first offset, end offset)
        try:
            self.wait_outputs(proc, log, dst, n, sample)
            t_first, t_last = self.timestamp_at(dst, 0), self.timestamp_at(dst, n - 1)
            res.rates.append((n - 1) / max((t_last - t_first) / 1000.0, 1e-3))
            if latency:
                # Catch up with what earlier contestants' paced phases appended.
                self.wait_outputs(proc, log, dst, self.high(src), sample)
                rate = PACED_FRACTION * res.rate if paced_rate is None else paced_rate
                for r, secs in ((rate, self.scale.paced_s), (LOW_RATE, self.scale.low_s)):
                    first, end = self.pace(src, rows, r, secs)
                    self.wait_outputs(proc, log, dst, end, sample)
                    phases.append((r, first, end))
            sample(0)
        finally:
            stop(proc)
        if phases:
            (r1, f1, e1), (r2, f2, e2) = phases
            res.paced = Latency.of(r1, self.latencies(kind, src, dst, f1, e1))
            res.low = Latency.of(r2, self.latencies(kind, src, dst, f2, e2))
            # Exactly one output per input: the output topic ends where the input does.
            assert self.high(dst) == e2, (kind, self.high(dst), e2)

    def latencies(self, kind: str, src: str, dst: str, first: int, end: int) -> np.ndarray:
        """Output append time − input create time (ms) of inputs [first, end), checked pairs."""
        lat = np.empty(end - first, dtype=np.float64)
        pairs = zip(self.records(src, first, end), self.records(dst, first, end), strict=True)
        for j, (i, o) in enumerate(pairs):
            if o.timestamp()[0] != TIMESTAMP_LOG_APPEND_TIME:
                raise AssertionError(f"{dst} does not use LogAppendTime")
            if kind == "echo":
                ok = o.value() == i.value()
            else:
                rec = json.loads(o.value())
                ok = rec["offset"] == i.offset() and rec["topic"] == src
            if not ok:
                raise AssertionError(f"{dst}@{o.offset()} does not answer {src}@{i.offset()}")
            lat[j] = o.timestamp()[1] - i.timestamp()[1]
        return lat

    def rss_run(self) -> RssRun:
        """streamkm alone on a long stream (d=16, k=8): VmRSS after 1M and after 5M outputs."""
        d, k = CONFIGS[0]
        small, big = self.scale.rss_at
        src, dst = "in-rss", "out-rss"
        create_topic(self.bootstrap, src, 1)
        create_topic(self.bootstrap, dst, 1, OUT_TOPIC_CONF)
        rows = vector_rows(big, d, k, seed=7)
        # Fill in a thread while streamkm consumes: the RSS, not the rate, is measured here.
        filler = threading.Thread(target=self.fill, args=(src, rows, big), daemon=True)
        filler.start()
        run = RssRun()
        proc, log = self.launch("streamkm", d, k, src, dst)

        def sample(have: int) -> None:
            mem = proc_mem_mb(proc.pid)
            run.peak_mb = max(run.peak_mb, mem.get("VmHWM", 0.0))
            for mark in (small, big):
                if have >= mark and mark not in run.samples:
                    run.samples[mark] = mem["VmRSS"]

        try:
            self.wait_outputs(proc, log, dst, big, sample)
        finally:
            stop(proc)
            filler.join(600)
        t_first, t_last = self.timestamp_at(dst, 0), self.timestamp_at(dst, big - 1)
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
    return f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}"


def report(results: list[Result], rss: RssRun, scale: Scale, elapsed: float) -> tuple[str, bool]:
    by = {(r.kind, r.d): r for r in results}
    lines = [
        f"Machine: {machine()}. N = {scale.messages:,} per throughput run, median of "
        f"{scale.rounds} rounds; paced phases {scale.paced_s:.0f} s at 20% of streamkm's rate "
        f"and {scale.low_s:.0f} s at {LOW_RATE:,.0f} msgs/s; batch_size {BATCH}, "
        f"max_batch_wait_ms {WAIT_MS}. Total time {elapsed / 60:.1f} min.",
        "",
        "| d | k | contestant | msgs/s | rounds | vs echo | vs sklearn "
        "| p50 / p99 / max ms at 20% | p50 / p99 / max ms at 1k/s | peak RSS MiB |",
        "|---:|---:|---|---:|---|---:|---:|---|---|---:|",
    ]
    for d, k in CONFIGS:
        echo, skl = by[("echo", d)].rate, by[("sklearn", d)].rate
        for kind in ("echo", "sklearn", "streamkm"):
            r = by[(kind, d)]
            rounds = " ".join(f"{x / 1000:.0f}k" for x in r.rates)
            lines.append(
                f"| {d} | {k} | {kind} | {r.rate:,.0f} | {rounds} | {r.rate / echo:.2f} "
                f"| {r.rate / skl:.2f} | {_lat(r.paced)} | {_lat(r.low)} | {r.peak_rss_mb:.0f} |"
            )
    small, big = scale.rss_at
    rss_small, rss_big = rss.samples[small], rss.samples[big]
    growth = rss_big / rss_small - 1.0
    lines += [
        "",
        f"Long run (streamkm, d=16, k=8, input produced while it runs): VmRSS {rss_small:.0f} MiB "
        f"after {small:,} messages, {rss_big:.0f} MiB after {big:,} ({growth:+.1%}); "
        f"peak {rss.peak_mb:.0f} MiB; {rss.rate:,.0f} msgs/s over the run.",
        "",
        "| target | measured | result |",
        "|---|---|---|",
    ]
    limit = WAIT_MS + 100
    s16, e16 = by[("streamkm", 16)], by[("echo", 16)]
    s128, k128 = by[("streamkm", 128)], by[("sklearn", 128)]
    checks = [
        ("streamkm ≥ 80% of echo at d=16, k=8", f"{s16.rate / e16.rate:.0%}",
         s16.rate >= 0.8 * e16.rate),
        ("streamkm ≥ 2× sklearn at d=128, k=100", f"{s128.rate / k128.rate:.2f}×",
         s128.rate >= 2.0 * k128.rate),
    ]  # fmt: skip
    for d, k in CONFIGS:
        r = by[("streamkm", d)]
        checks.append(
            (
                f"streamkm p99 ≤ {limit} ms at 20% of its rate (d={d}, k={k})",
                f"{r.paced.p99_ms:.0f} ms at {r.paced.rate:,.0f} msgs/s",
                r.paced.p99_ms <= limit,
            )
        )
    checks.append(
        (f"streamkm RSS flat (±10%) from {small:,} to {big:,}", f"{growth:+.1%}",
         abs(growth) <= 0.10)
    )  # fmt: skip
    for name, value, ok in checks:
        lines.append(f"| {name} | {value} | {'pass' if ok else '**FAIL**'} |")
    # Not one of the targets, but what max_batch_wait_ms promises at low traffic.
    lines += ["", "| further check | measured | result |", "|---|---|---|"]
    for d, k in CONFIGS:
        r = by[("streamkm", d)]
        ok = r.low.p99_ms <= limit
        lines.append(
            f"| streamkm p99 ≤ {limit} ms at {LOW_RATE:,.0f} msgs/s (d={d}, k={k}) "
            f"| {r.low.p99_ms:.0f} ms | {'pass' if ok else '**FAIL**'} |"
        )
    return "\n".join(lines), all(ok for *_, ok in checks)


def _lat(x: Latency) -> str:
    return f"{x.p50_ms:.0f} / {x.p99_ms:.0f} / {x.max_ms:.0f}"


def main() -> int:
    p = argparse.ArgumentParser(description="End-to-end benchmark: streamkm vs echo vs sklearn.")
    p.add_argument(
        "--messages", type=int, help="N per throughput run (default 1M, 400k with --quick)"
    )
    p.add_argument("--rounds", type=int, help="throughput runs per contestant (default 3, 2)")
    p.add_argument("--quick", action="store_true", help="smaller runs (about 5 minutes)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    args = p.parse_args()
    scale = QUICK if args.quick else FULL
    scale = replace(
        scale, messages=args.messages or scale.messages, rounds=args.rounds or scale.rounds
    )
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="streamkm-e2e-"))
    broker = LocalBroker(dir=workdir / "broker", port=free_port())
    results: list[Result] = []
    try:
        bench = Bench(broker.start(), workdir, scale)
        try:
            for d, k in CONFIGS:
                src = f"in-d{d}"
                create_topic(bench.bootstrap, src, 1)
                rows = vector_rows(scale.messages, d, k, seed=d + k)
                t0 = time.monotonic()
                filled = scale.messages + scale.messages // 10
                bench.fill(src, rows, filled)
                print(f"d={d}: {filled:,} vectors in {time.monotonic() - t0:.0f} s", flush=True)
                res = {kind: Result(kind, d, k) for kind in CONTESTANTS}
                for rnd in range(1, scale.rounds + 1):
                    last = rnd == scale.rounds
                    for kind in CONTESTANTS:  # streamkm first: it sets the paced rate
                        paced = None if kind == "streamkm" else res["streamkm"].paced.rate
                        bench.contest(res[kind], src, rows, rnd, last, paced)
                        r = res[kind]
                        print(
                            f"d={d} k={k} round {rnd} {kind:8s} {r.rates[-1]:9,.0f} msgs/s"
                            + (f"  p99 {r.paced.p99_ms:.0f} ms at {r.paced.rate:,.0f}/s, "
                               f"{r.low.p99_ms:.0f} ms at {r.low.rate:,.0f}/s" if last else ""),
                            flush=True,
                        )  # fmt: skip
                results += res.values()
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
    table, ok = report(results, rss, scale, time.monotonic() - started)
    print()
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
