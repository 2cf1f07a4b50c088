"""Features far from the origin keep their labels through the real daemon.

Two clusters 3 units apart (noise 0.3) under a common offset of 1e3 and 1e4, sent as float32.
Computed as ``‖x‖² − 2x·c + ‖c‖²`` in float32, such offsets cancel almost every digit of the
distance: labels came out little better than chance and most distances were exactly 0. The
published labels must match the true clusters and the distances must be positive.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.daemon import Daemon
from tests.kafka_util import create_topic, drain, produce_values

pytestmark = pytest.mark.integration

DIM = 4
N = 4096


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_labels_and_distances_survive_a_large_common_offset(
    offset: float, kafka_bootstrap: str, tmp_path
) -> None:
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, size=N)
    centers = np.zeros((2, DIM))
    centers[1, 0] = 3.0
    X = (offset + centers[truth] + rng.normal(0, 0.3, size=(N, DIM))).astype("<f4")
    tag = os.urandom(4).hex()
    src, out = f"offset-in-{tag}", f"offset-out-{tag}"
    create_topic(bootstrap := kafka_bootstrap, src)
    create_topic(bootstrap, out)
    produce_values(bootstrap, src, [row.tobytes() for row in X])
    with Daemon(
        tmp_path, bootstrap, src, out,
        input={"format": "float32", "dim": DIM},
        model={"n_clusters": 2, "batch_size": 512, "max_batch_wait_ms": 100, "seed": 0},
    ) as d:  # fmt: skip
        d.start()
        records = drain(bootstrap, out, expected=N, timeout_s=120)
        d.assert_running()
    by_offset = {}
    for m in records:
        value = json.loads(m.value())
        by_offset[value["offset"]] = value
    assert sorted(by_offset) == list(range(N))
    labels = np.array([by_offset[i]["cluster"] for i in range(N)])
    distances = np.array([by_offset[i]["distance"] for i in range(N)])
    # Labels are defined up to a permutation of the two clusters; skip the seeding rows' noise
    # by scoring the second half of the stream, labelled by a settled model.
    half = slice(N // 2, N)
    agree = float(np.mean(labels[half] == truth[half]))
    accuracy = max(agree, 1.0 - agree)
    assert accuracy >= 0.99, f"label accuracy {accuracy:.3f} at offset {offset:g}"
    # (k-means++ seeds on rows of the first batch, whose distances are truly 0: second half only)
    zeros = int(np.count_nonzero(distances[half] == 0.0))
    assert zeros == 0, f"{zeros} exact-zero distances for distinct points at offset {offset:g}"
    # Typical distance to the own centre is about 0.3·sqrt(DIM) = 0.6.
    assert 0.2 < float(np.median(distances[half])) < 1.2
