"""Exactly-once mode: transactions, replay after a crash, fencing."""

from __future__ import annotations

import json
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest

from streamkm.checkpoint import read as read_checkpoint
from tests.daemon import Daemon
from tests.integration.test_daemon import blobs, raw
from tests.kafka_util import drain, produce_values

pytestmark = pytest.mark.integration

EOS = {"guarantee": "exactly-once"}


def committed_outputs(bootstrap: str, topic: str, expected: int) -> Counter:
    msgs = drain(bootstrap, topic, expected=expected, timeout_s=120, isolation="read_committed")
    return Counter(
        (json.loads(m.value())["partition"], json.loads(m.value())["offset"]) for m in msgs
    )


def test_exactly_once_survives_sigkill_without_duplicates(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    src, out = make_topic(partitions=2), make_topic()
    X, _ = blobs(6000, seed=5)
    produce_values(kafka_bootstrap, src, raw(X[:3000]))
    # No checkpoint before the crash (interval of an hour), but committed transactions: the
    # restart must replay those inputs into the model without emitting them again.
    with Daemon(
        tmp_path / "d", kafka_bootstrap, src, out, delivery=EOS, checkpoint={"interval_s": 3600}
    ) as d:
        d.start()
        d.wait_metric("streamkm_samples_seen", 2900)
        assert d.stop(signal.SIGKILL) == -signal.SIGKILL
        produce_values(kafka_bootstrap, src, raw(X[3000:]))
        d.start()
        outputs = committed_outputs(kafka_bootstrap, out, expected=len(X))
        d.wait_metric("streamkm_samples_seen", len(X))
        assert d.stop() == 0
    assert len(outputs) == len(X) and max(outputs.values()) == 1, outputs.most_common(3)
    ckpt = read_checkpoint(d.checkpoint_dir)
    assert ckpt.model.n_samples_seen_ == len(X)
    assert "replaying" in d.log_path.read_text()


def test_a_second_instance_with_the_same_id_fences_the_first(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    src, out = make_topic(partitions=2), make_topic()
    X, _ = blobs(1000, seed=6)
    stop = threading.Event()

    def feed() -> None:  # steady traffic, so the first instance keeps committing
        while not stop.is_set():
            produce_values(kafka_bootstrap, src, raw(X[:100]))
            stop.wait(0.2)

    group = {"group_id": f"g-fence-{tmp_path.name}"}
    feeder = threading.Thread(target=feed, daemon=True)
    with (
        Daemon(tmp_path / "a", kafka_bootstrap, src, out, delivery=EOS, kafka=group) as first,
        Daemon(tmp_path / "b", kafka_bootstrap, src, out, delivery=EOS, kafka=group) as second,
    ):
        feeder.start()
        try:
            first.start()
            first.wait_metric("streamkm_samples_seen", 500)
            # Same group and instance id: the newcomer's init_transactions fences the first,
            # whose next commit fails; it must stop with a clear error, not carry on.
            second.start()
            assert first.wait_exit(90) == 1
            assert "fenced" in first.tail().lower()
            second.wait_metric("streamkm_batches_total", 1)
            assert second.stop() == 0
        finally:
            stop.set()
            feeder.join()
