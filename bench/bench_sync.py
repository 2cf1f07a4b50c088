"""Shared-model mode: what a delta costs (bytes on the sync log, time to build and to fold).

For each (d, k), batches of 1024 float32 rows from blobs are labelled by a replica, turned into
one delta (sparse: only the centroids the batch touches), encoded, decoded and folded. The
numbers feed the scaling model in docs/scaling.md: every instance folds every instance's
deltas, so the fold cost per input, times the group's total input rate, is the load the log
puts on each replica.

    python bench/bench_sync.py [--repeats 7] [--batches 50]
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _streams import blobs

from streamkm.shared import wire
from streamkm.shared.replica import Replica, seed_centroids
from streamkm.shared.sync import merge

B = 1024
MERGED = 10  # batches merged into one record (at-least-once, kafka.sync_interval_ms)
CONFIGS = [(16, 8), (128, 100), (384, 256)]


def measure(d: int, k: int, repeats: int, n_batches: int) -> dict[str, float]:
    X, _ = blobs((n_batches + 1) * B, d, k, seed=d + k)
    batches = [X[(i + 1) * B : (i + 2) * B] for i in range(n_batches)]
    base = Replica.from_centroids(seed_centroids(X[:B], k, seed=0))
    labelled = [base.assign(xb) for xb in batches]
    build_s, fold_s, assign_s, sizes = [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for xb in batches:
            base.assign(xb)
        assign_s.append((time.perf_counter() - t0) / n_batches)
        t0 = time.perf_counter()
        values = []
        for i, (xb, (labels, d2, _)) in enumerate(zip(batches, labelled, strict=True)):
            delta = base.delta("a", "in", 0, i * B, (i + 1) * B, xb, labels, d2)
            values.append(wire.encode_delta(delta))
        build_s.append((time.perf_counter() - t0) / n_batches)
        sizes = [len(v) for v in values]
        deltas = [wire.decode(v)[1] for v in values]
        merged = [
            len(wire.encode_delta(functools.reduce(merge, deltas[i : i + MERGED])))
            for i in range(0, len(deltas) - MERGED + 1, MERGED)
        ]
        r = Replica.from_state(*base.to_state())
        t0 = time.perf_counter()
        for v in values:
            _, delta = wire.decode(v)
            r.apply(delta)
        fold_s.append((time.perf_counter() - t0) / n_batches)
    return {
        "bytes_per_input": float(np.median(sizes)) / B,
        "merged_bytes_per_input": float(np.median(merged)) / (B * MERGED),
        "build_us_per_input": float(np.median(build_s)) / B * 1e6,
        "fold_us_per_input": float(np.median(fold_s)) / B * 1e6,
        "assign_us_per_input": float(np.median(assign_s)) / B * 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batches", type=int, default=50)
    args = p.parse_args()
    print(
        f"machine: {platform.machine()}, {platform.python_version()}, batches of {B} float32 rows"
    )
    print(f"median of {args.repeats} repeats × {args.batches} batches\n")
    print(f"| d | k | delta bytes / input | … {MERGED} batches merged | build µs / input "
          "| fold µs / input | label µs / input | fold / label |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for d, k in CONFIGS:
        m = measure(d, k, args.repeats, args.batches)
        print(
            f"| {d} | {k} | {m['bytes_per_input']:.2f} | {m['merged_bytes_per_input']:.2f} | "
            f"{m['build_us_per_input']:.3f} | "
            f"{m['fold_us_per_input']:.3f} | {m['assign_us_per_input']:.3f} | "
            f"{m['fold_us_per_input'] / m['assign_us_per_input']:.2f} |"
        )


if __name__ == "__main__":
    main()
