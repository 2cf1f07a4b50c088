"""The two hand-written contestants of ``bench/e2e.py``, each run as its own process.

``echo``: consume in bulk and produce every record unchanged — the ceiling of any Python
consume → produce loop. With ``--keep-partition`` each record goes to the output partition of
its input's number (so the benchmark can pair outputs with inputs when the input has several
partitions); without, to the producer's default partitioner. ``sklearn``: what a user would write with scikit-learn — decode a bulk
of 1024 float32 vectors with one ``np.frombuffer``, ``MiniBatchKMeans.partial_fit`` + ``predict``,
then one JSON record per input with the same fields as streamkm's assignments.

Both use the producer settings of streamkm's own producer (idempotent, acks=all, linger 5 ms,
only failed deliveries reported) so that the three contestants differ only in their loop. They
run until SIGTERM, then flush and exit 0.

    python bench/_e2e_loops.py echo|sklearn --bootstrap HOST:PORT --input T --output T
        --group G [--dim D --k K] [--consumer-conf JSON] [--keep-partition]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaException, Producer

BULK = 1024  # consume(num_messages) and, for sklearn, the mini-batch size
POLL_S = 0.1  # longest wait for a bulk (what a hand-written loop would choose)


class Loop:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = False
        self.failed: list[str] = []
        self.consumer = Consumer(
            {
                "bootstrap.servers": args.bootstrap,
                "group.id": args.group,
                "auto.offset.reset": "earliest",
                **json.loads(args.consumer_conf),
            }
        )
        self.producer = Producer(
            {
                "bootstrap.servers": args.bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "delivery.report.only.error": True,
                "on_delivery": self._report,
            }
        )
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stop", True))

    def _report(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed.append(err.str())

    def produce(self, value: bytes, key: bytes | None) -> None:
        while True:
            try:
                self.producer.produce(self.args.output, value, key)
                return
            except BufferError:  # local queue full: let librdkafka drain it
                self.producer.poll(0.05)

    def produce_to(self, value: bytes, key: bytes | None, partition: int) -> None:
        while True:
            try:
                self.producer.produce(self.args.output, value, key, partition)
                return
            except BufferError:
                self.producer.poll(0.05)

    def run(self) -> int:
        self.consumer.subscribe([self.args.input])
        while not self.stop:
            msgs = self.consumer.consume(BULK, POLL_S)
            good = []
            for m in msgs:
                if m.error() is not None:
                    raise KafkaException(m.error())
                good.append(m)
            if good:
                self.handle(good)
            self.producer.poll(0)
            if self.failed:
                print(f"undelivered: {self.failed[0]}", file=sys.stderr)
                return 1
        left = self.producer.flush(30)
        self.consumer.close()
        return 0 if left == 0 and not self.failed else 1

    def handle(self, msgs: list[Any]) -> None:
        raise NotImplementedError


class Echo(Loop):
    def handle(self, msgs: list[Any]) -> None:
        if self.args.keep_partition:
            for m in msgs:
                self.produce_to(m.value(), m.key(), m.partition())
        else:
            for m in msgs:
                self.produce(m.value(), m.key())


class SklearnLoop(Loop):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        from sklearn.cluster import MiniBatchKMeans

        self.km = MiniBatchKMeans(
            n_clusters=args.k, batch_size=BULK, n_init=1, random_state=0, init="k-means++"
        )
        self.version = 0
        self.held: list[Any] = []  # only before the first fit, which needs k rows

    def handle(self, msgs: list[Any]) -> None:
        if self.version == 0:
            self.held += msgs
            if len(self.held) < self.args.k:
                return
            msgs, self.held = self.held, []
        d = self.args.dim
        X = np.frombuffer(b"".join([m.value() for m in msgs]), dtype="<f4").reshape(-1, d)
        self.km.partial_fit(X)
        self.version += 1
        labels = self.km.predict(X)
        diff = X - self.km.cluster_centers_[labels]
        d2 = np.einsum("ij,ij->i", diff, diff, dtype=np.float64)
        # The anomaly score a user would reach for: squared distance over its batch mean.
        score = d2 / max(float(d2.mean()), 1e-12)
        dist = np.sqrt(d2)
        for m, c, di, s in zip(msgs, labels.tolist(), dist.tolist(), score.tolist(), strict=True):
            value = json.dumps(
                {
                    "cluster": c,
                    "distance": di,
                    "score": s,
                    "model_version": self.version,
                    "topic": m.topic(),
                    "partition": m.partition(),
                    "offset": m.offset(),
                }
            ).encode()
            self.produce(value, m.key())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=["echo", "sklearn"])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--consumer-conf", default="{}", help="extra consumer properties (JSON)")
    p.add_argument(
        "--keep-partition", action="store_true", help="echo: output partition = input partition"
    )
    args = p.parse_args()
    loop = Echo(args) if args.kind == "echo" else SklearnLoop(args)
    return loop.run()


if __name__ == "__main__":
    sys.exit(main())
