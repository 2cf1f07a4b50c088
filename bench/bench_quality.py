"""Clustering quality of one streaming pass: StreamingKMeans vs scikit-learn.

Each stream is fed once, in order, in batches of 1024 rows to ``partial_fit`` of
StreamingKMeans and of scikit-learn's MiniBatchKMeans (k-means++, n_init=1, default
reassignment). The inertia (sum of squared distances to the nearest centroid) of each final
model on the whole data is divided by the inertia of scikit-learn's ``KMeans(n_init=3)`` fitted
on the whole data in memory: 1.00 means as good as full batch k-means, lower is better.

Two ablations of StreamingKMeans show where the gains come from: without relocation
(``reassignment_ratio=0``: neither starved centroids nor the least useful one are moved), and
with scikit-learn's rule in place of streamkm's (starved centroids moved to uniformly random
rows of the batch, their count set to the smallest other count; no swaps).

For the drifting stream the models are scored on the last regime only, against KMeans fitted
on that regime; StreamingKMeans uses ``half_life``.

Run ``python bench/bench_quality.py`` (``--seeds N`` for more repetitions).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _streams import (
    blobs,
    drifting,
    emerging_groups,
    heavy_tailed,
    imbalanced,
    overlapping,
    rare_far_groups,
)

from streamkm.model import StreamingKMeans

B = 1024
THREADS = 2


class RandomReassignKMeans(StreamingKMeans):
    """StreamingKMeans with scikit-learn's reassignment rule, for the ablation only."""

    def _relocate(self, X, w, labels, d2, d2_second) -> float:  # type: ignore[no-untyped-def]
        ratio = float(self.reassignment_ratio)
        recent = self._recent
        starved = np.flatnonzero(recent < ratio * recent.max())[: X.shape[0] // 2]
        if starved.size == 0:
            return 0.0
        rows = self._rng.choice(X.shape[0], size=starved.size, replace=False)
        old = self.cluster_centers_[starved].astype(np.float64)
        self.cluster_centers_[starved] = X[rows]
        keep = np.setdiff1d(np.arange(recent.size), starved)
        self.counts_[starved] = self.counts_[keep].min() if keep.size else 0.0
        self._recent[starved] = recent[keep].min() if keep.size else 0.0
        diff = self.cluster_centers_[starved].astype(np.float64) - old
        return float(np.sqrt((diff * diff).sum(axis=1)).sum())


class SplitLargestKMeans(StreamingKMeans):
    """StreamingKMeans with Spark StreamingKMeans' rule, for the ablation only.

    A starved centroid is moved next to the heaviest one, which is split in two: both keep
    half of its weight and sit a small perturbation apart, so the next batches pull them
    apart.
    """

    def _relocate(self, X, w, labels, d2, d2_second) -> float:  # type: ignore[no-untyped-def]
        ratio = float(self.reassignment_ratio)
        recent = self._recent
        starved = np.flatnonzero(recent < ratio * recent.max())
        moved = 0.0
        for j in starved:
            big = int(np.argmax(self.counts_))
            if big == j:
                continue
            old = self.cluster_centers_[j].astype(np.float64)
            scale = 1e-3 * (np.abs(self.cluster_centers_[big]).mean() + 1e-12)
            noise = self._rng.normal(size=self.cluster_centers_.shape[1]) * scale
            self.cluster_centers_[j] = self.cluster_centers_[big] + noise
            self.cluster_centers_[big] -= noise
            for arr in (self.counts_, self._recent, self._sse):
                arr[j] = arr[big] = arr[big] / 2
            moved += float(np.linalg.norm(self.cluster_centers_[j] - old))
        return moved


def inertia(X: np.ndarray, C: np.ndarray) -> float:
    X64 = X.astype(np.float64)
    C64 = C.astype(np.float64)
    d2 = (X64 * X64).sum(1)[:, None] - 2 * X64 @ C64.T + (C64 * C64).sum(1)[None]
    return float(np.maximum(d2, 0).min(axis=1).sum())


def one_pass(model, X: np.ndarray):
    for start in range(0, X.shape[0], B):
        model.partial_fit(X[start : start + B])
    return model


def streams(seed: int):
    n = 100_000
    yield "well-separated blobs (d=16, k=16)", blobs(n, 16, 16, seed)[0], None, 16, {}
    yield "well-separated blobs (d=64, k=32)", blobs(n, 64, 32, seed)[0], None, 32, {}
    yield "imbalanced, 1% clusters (d=16, k=30)", imbalanced(n, 16, 30, seed)[0], None, 30, {}
    yield "rare far-away groups (d=16, k=10)", rare_far_groups(n, 16, 10, seed)[0], None, 10, {}
    yield (
        "groups emerging mid-stream (d=16, k=10)",
        emerging_groups(n, 16, 10, seed)[0],
        None,
        10,
        {},
    )
    yield "overlapping clusters (d=4, k=50)", overlapping(n, 4, 50, seed)[0], None, 50, {}
    yield "heavy-tailed features (d=16, k=10)", heavy_tailed(n, 16, 10, seed)[0], None, 10, {}
    X, _, seg = drifting(n, 8, 8, seed)
    yield "drifting, 4 jumps (d=8, k=8)", X, seg == seg.max(), 8, {"half_life": 2000.0}


WELL_DEFINED = {"well-separated", "imbalanced", "rare far-away", "groups emerging"}


def run(seeds: int) -> list[dict]:
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    results: dict[str, dict[str, list[float]]] = {}
    with threadpool_limits(limits=THREADS):
        for seed in range(seeds):
            for name, X, eval_mask, k, extra in streams(seed):
                X_eval = X if eval_mask is None else X[eval_mask]
                ref = KMeans(k, n_init=3, random_state=seed).fit(X_eval)
                base = inertia(X_eval, ref.cluster_centers_)
                models = {
                    "streamkm": StreamingKMeans(k, batch_size=B, random_state=seed, **extra),
                    "no relocation": StreamingKMeans(
                        k, batch_size=B, random_state=seed, reassignment_ratio=0.0, **extra
                    ),
                    "sklearn-style reassignment": RandomReassignKMeans(
                        k, batch_size=B, random_state=seed, **extra
                    ),
                    "Spark-style split-the-largest": SplitLargestKMeans(
                        k, batch_size=B, random_state=seed, **extra
                    ),
                    "MiniBatchKMeans": MiniBatchKMeans(
                        k, batch_size=B, init="k-means++", n_init=1, random_state=seed
                    ),
                }
                if extra:
                    models["streamkm no half_life"] = StreamingKMeans(
                        k, batch_size=B, random_state=seed
                    )
                row = results.setdefault(name, {})
                for label, model in models.items():
                    t0 = time.perf_counter()
                    one_pass(model, X)
                    _ = time.perf_counter() - t0
                    ratio = inertia(X_eval, model.cluster_centers_) / base
                    row.setdefault(label, []).append(ratio)
    return [{"stream": name, **cols} for name, cols in results.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    rows = run(args.seeds)
    cols = [
        "streamkm",
        "MiniBatchKMeans",
        "no relocation",
        "sklearn-style reassignment",
        "Spark-style split-the-largest",
        "streamkm no half_life",
    ]
    print(
        f"Inertia relative to KMeans(n_init=3) on the whole data (1.000 = as good; lower is "
        f"better). One pass, B={B}; median [worst] over {args.seeds} seeds.\n"
    )
    print("| stream | " + " | ".join(cols) + " | target |")
    print("|---|" + "---|" * (len(cols) + 1))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("–" if v is None else f"{np.median(v):.3f} [{max(v):.3f}]")
        ours, mbk = np.array(r["streamkm"]), np.array(r["MiniBatchKMeans"])
        well = any(r["stream"].startswith(w) for w in WELL_DEFINED)
        ok_mbk = bool(np.all(ours <= mbk * 1.0005))
        verdict = ("≤1.02 " + ("met" if ours.max() <= 1.02 else "MISSED") + "; ") if well else ""
        verdict += "≤ MBK " + ("met" if ok_mbk else "MISSED")
        print(f"| {r['stream']} | " + " | ".join(cells) + f" | {verdict} |")


if __name__ == "__main__":
    main()
