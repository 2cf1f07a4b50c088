"""Anomaly detection on a stream: ROC-AUC of StreamingKMeans.anomaly_score vs scikit-learn.

The stream holds imbalanced normal clusters of very different spreads plus 1% injected
outliers (see ``_streams.anomaly_stream``). Scoring is prequential: every batch of 1024 rows
is scored with the model as it was before it learnt from that batch (``StreamingKMeans.step``;
for scikit-learn, the distance to the nearest centroid from ``transform`` and then
``partial_fit``). The first batch is left out of both figures because scikit-learn has no
model before it. Also shown: the plain nearest-centroid distance of StreamingKMeans, to
separate the gain of the score from the gain of the clustering.

Run ``python bench/bench_anomaly.py`` (``--seeds N`` for more repetitions).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _streams import anomaly_stream

from streamkm.model import StreamingKMeans

B = 1024
THREADS = 2
# (d, k, outlier distance range in units of the cluster's typical member distance)
CONFIGS = [
    (8, 8, (5.0, 8.0)),
    (32, 16, (5.0, 8.0)),
    (64, 32, (5.0, 8.0)),
    (8, 8, (2.0, 3.0)),
    (32, 16, (1.5, 2.0)),
]


def run(seeds: int, n: int) -> list[dict]:
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics import roc_auc_score
    from threadpoolctl import threadpool_limits

    rows = []
    with threadpool_limits(limits=THREADS):
        for d, k, radius in CONFIGS:
            res: dict[str, list[float]] = {"score": [], "distance": [], "sklearn": []}
            for seed in range(seeds):
                X, is_out = anomaly_stream(n, d, k, seed, radius=radius)
                ours = StreamingKMeans(k, batch_size=B, random_state=seed)
                skl = MiniBatchKMeans(
                    k, batch_size=B, init="k-means++", n_init=1, random_state=seed
                )
                s_ours, s_dist, s_skl = [], [], []
                for start in range(0, n, B):
                    xb = X[start : start + B]
                    if start:
                        s_skl.append(skl.transform(xb).min(axis=1))
                    skl.partial_fit(xb)
                    result = ours.step(xb)
                    if start:
                        s_ours.append(result.scores)
                        s_dist.append(result.distances)
                truth = is_out[B:]
                res["score"].append(roc_auc_score(truth, np.concatenate(s_ours)))
                res["distance"].append(roc_auc_score(truth, np.concatenate(s_dist)))
                res["sklearn"].append(roc_auc_score(truth, np.concatenate(s_skl)))
            rows.append({"d": d, "k": k, "radius": radius, **res})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    rows = run(args.seeds, args.rows)
    print(
        f"Prequential ROC-AUC, {args.rows:,} rows, 1% outliers, B={B}; median [worst] over "
        f"{args.seeds} seeds.\n"
    )
    print(
        "| d | k | outliers at | streamkm anomaly_score | streamkm nearest distance | "
        "sklearn MBK nearest distance | target (≥ 0.95 and > sklearn) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ours, skl = np.array(r["score"]), np.array(r["sklearn"])
        ok = ours.min() >= 0.95 and bool(np.all(ours > skl))
        cells = [
            f"{np.median(r[c]):.4f} [{min(r[c]):.4f}]" for c in ("score", "distance", "sklearn")
        ]
        lo, hi = r["radius"]
        print(
            f"| {r['d']} | {r['k']} | {lo:g}–{hi:g}× | "
            + " | ".join(cells)
            + f" | {'met' if ok else 'MISSED'} |"
        )


if __name__ == "__main__":
    main()
