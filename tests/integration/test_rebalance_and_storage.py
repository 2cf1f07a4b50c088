"""Rebalances hand partitions over cleanly; checkpoints of another shape are refused."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from streamkm.checkpoint import read as read_checkpoint
from tests.daemon import Daemon
from tests.integration.test_daemon import blobs, raw
from tests.kafka_util import drain, produce_values

pytestmark = pytest.mark.integration


def test_a_second_instance_takes_over_partitions_without_loss_or_repeats(
    tmp_path: Path, kafka_bootstrap: str, make_topic, group_id: str
) -> None:
    src, out = make_topic(partitions=4), make_topic()
    X, _ = blobs(8000, seed=9)
    produce_values(kafka_bootstrap, src, raw(X[:4000]))
    common = {"kafka": {"group_id": group_id}}
    with (
        Daemon(
            tmp_path / "a", kafka_bootstrap, src, out, **common, delivery={"instance_id": "a"}
        ) as a,
        Daemon(
            tmp_path / "b", kafka_bootstrap, src, out, **common, delivery={"instance_id": "b"}
        ) as b,
    ):
        a.start()
        a.wait_metric("streamkm_samples_seen", 4000)
        # B joins: A gives up some partitions cooperatively, checkpointing and committing first.
        b.start()
        b.wait_log(rf"assigned {src}\[")
        produce_values(kafka_bootstrap, src, raw(X[4000:]))
        got = drain(kafka_bootstrap, out, expected=len(X), timeout_s=180)
        assert a.stop() == 0 and b.stop() == 0
    sources = Counter(
        (json.loads(m.value())["partition"], json.loads(m.value())["offset"]) for m in got
    )
    assert len(sources) == len(X)  # none missing
    assert max(sources.values()) == 1  # a clean hand-over repeats nothing
    log_a = a.log_path.read_text()
    assert "revoked" in log_a
    seen_a = read_checkpoint(a.checkpoint_dir).model.n_samples_seen_
    seen_b = read_checkpoint(b.checkpoint_dir).model.n_samples_seen_
    assert seen_a + seen_b == len(X) and seen_b > 0  # each input counted by exactly one model


def test_checkpoint_of_another_shape_is_refused_unless_reset(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    src, out = make_topic(), make_topic()
    X, _ = blobs(600, seed=10)
    produce_values(kafka_bootstrap, src, raw(X))
    with Daemon(tmp_path / "d", kafka_bootstrap, src, out) as d:
        d.start()
        d.wait_metric("streamkm_samples_seen", len(X))
        assert d.stop() == 0
    before = sorted(p.name for p in d.checkpoint_dir.glob("ckpt-*"))
    with Daemon(tmp_path / "d", kafka_bootstrap, src, out, model={"n_clusters": 5}) as d5:
        d5.start()
        assert d5.wait_exit(60) == 1
        assert "n_clusters 3 but 5 is configured" in d5.tail()
        assert sorted(p.name for p in d5.checkpoint_dir.glob("ckpt-*")) == before  # untouched
        d5.start("--reset-model")
        d5.wait_metric("streamkm_model_version", 1)
        assert d5.stop() == 0
    ckpt = read_checkpoint(d5.checkpoint_dir)
    assert ckpt.model.n_clusters == 5
    assert (
        sorted(p.name for p in next(d5.checkpoint_dir.glob("replaced-*")).glob("ckpt-*")) == before
    )


def test_model_topic_receives_each_checkpointed_model(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    src, out = make_topic(), make_topic()
    models = make_topic(**{"cleanup.policy": "compact"})
    X, _ = blobs(1200, seed=11)
    produce_values(kafka_bootstrap, src, raw(X))
    with Daemon(tmp_path / "d", kafka_bootstrap, src, out, kafka={"model_topic": models}) as d:
        d.start()
        d.wait_metric("streamkm_samples_seen", len(X))
        assert d.stop() == 0
    published = [json.loads(m.value()) for m in drain(kafka_bootstrap, models)]
    assert published, "no model was published"
    last = published[-1]
    ckpt = read_checkpoint(d.checkpoint_dir)
    assert last["model_version"] == ckpt.model.n_steps_
    assert last["n_samples_seen"] == len(X) and last["dim"] == 4 and last["n_clusters"] == 3
    assert len(last["centroids"]) == 3 and abs(sum(last["counts"]) - len(X)) < 1e-6


def test_corrupt_newest_checkpoint_falls_back_and_counts_stay_exact(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    src, out = make_topic(), make_topic()
    X, _ = blobs(3000, seed=12)
    produce_values(kafka_bootstrap, src, raw(X[:1500]))
    # A checkpoint after every batch: at least two files whatever the machine's speed (the
    # model may learn all 1500 rows within one interval).
    ckpt = {"interval_s": 0.3, "every_batches": 1}
    with Daemon(tmp_path / "d", kafka_bootstrap, src, out, checkpoint=ckpt) as d:
        d.start()
        d.wait_metric("streamkm_samples_seen", 1500)
        assert d.stop() == 0
        newest, previous = sorted(d.checkpoint_dir.glob("ckpt-*"), reverse=True)[:2]
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
        produce_values(kafka_bootstrap, src, raw(X[1500:]))
        d.start()
        d.wait_metric("streamkm_samples_seen", len(X))
        assert d.stop() == 0
    log = d.log_path.read_text()
    assert f"skipping unreadable checkpoint {newest}" in log
    assert f"restored {previous.name}" in log
    assert read_checkpoint(d.checkpoint_dir).model.n_samples_seen_ == len(X)


def test_checkpoint_dir_lost_mid_run_stops_with_a_clear_error(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    src, out = make_topic(), make_topic()
    X, _ = blobs(2000, seed=13)
    produce_values(kafka_bootstrap, src, raw(X[:1000]))
    with Daemon(tmp_path / "d", kafka_bootstrap, src, out, checkpoint={"interval_s": 0.5}) as d:
        d.start()
        d.wait_metric("streamkm_checkpoints_total", 1)
        d.wait_metric("streamkm_samples_seen", 1000)
        # The volume goes away: its path now names a file, so no checkpoint can be written.
        kept = d.checkpoint_dir.rename(tmp_path / "kept")
        d.checkpoint_dir.write_text("not a directory")
        produce_values(kafka_bootstrap, src, raw(X[1000:]))
        assert d.wait_exit(60) == 1
    errors = [line for line in d.tail().splitlines() if " ERROR " in line]
    assert errors and "cannot write checkpoint" in errors[-1], d.tail()
    assert "Traceback" not in d.log_path.read_text()
    # What was written before is intact and readable.
    assert 0 < read_checkpoint(kept).model.n_samples_seen_ <= 1000


def test_a_lost_checkpoint_volume_stops_or_goes_on_from_the_model_topic(
    tmp_path: Path, kafka_bootstrap: str, make_topic, group_id: str
) -> None:
    src, out = make_topic(), make_topic()
    models = make_topic(**{"cleanup.policy": "compact"})
    X, truth = blobs(2400, seed=14)
    produce_values(kafka_bootstrap, src, raw(X[:1200]))
    ckpt_dir = tmp_path / "volume"

    def daemon(name: str, when_lost: str) -> Daemon:
        return Daemon(
            tmp_path / name, kafka_bootstrap, src, out,
            kafka={"group_id": group_id, "model_topic": models},
            checkpoint={"dir": str(ckpt_dir), "when_lost": when_lost},
        )  # fmt: skip

    with daemon("first", "new-model") as first:
        first.start()
        first.wait_metric("streamkm_samples_seen", 1200)
        assert first.stop() == 0  # its last checkpoint commits the offsets, then publishes
    published = json.loads(drain(kafka_bootstrap, models)[-1].value())
    assert published["n_samples_seen"] == 1200
    shutil.rmtree(ckpt_dir)  # the volume is lost; the group's offsets stay at 1200

    with daemon("stop", "stop") as stop:
        stop.start()
        assert stop.wait_exit(90) == 1
    log = stop.log_path.read_text()
    assert f"({src}[0]@1200): the checkpoint volume was lost" in log
    assert 'checkpoint.when_lost = "stop": exiting' in log and "Traceback" not in log
    assert not list(ckpt_dir.iterdir())  # nothing written: the next start decides again

    produce_values(kafka_bootstrap, src, raw(X[1200:]))
    with daemon("restore", "restore-from-model-topic") as restore:
        restore.start()
        restore.wait_log(rf"restored model version {published['model_version']} \(1200 samples")
        restore.wait_metric("streamkm_samples_seen", len(X))
        assert restore.stop() == 0
    ckpt = read_checkpoint(ckpt_dir)
    # The model went on from the published one: its counts and version continue.
    assert ckpt.model.n_samples_seen_ == len(X)
    assert ckpt.model.counts_.sum() == pytest.approx(len(X))
    assert ckpt.model.n_steps_ > published["model_version"]
    got = [json.loads(m.value()) for m in drain(kafka_bootstrap, out, expected=len(X))]
    after = [a for a in got if a["offset"] >= 1200]
    assert sorted(a["offset"] for a in after) == list(range(1200, len(X)))
    assert min(a["model_version"] for a in after) == published["model_version"] + 1
    # ... and with its centroids: each blob keeps the cluster number it had before.
    before = {truth[a["offset"]]: a["cluster"] for a in got if a["offset"] < 1200}
    assert all(a["cluster"] == before[truth[a["offset"]]] for a in after)


def test_a_restore_without_a_model_in_the_topic_holds_the_input_and_stays_up(
    tmp_path: Path, kafka_bootstrap: str, make_topic, group_id: str
) -> None:
    src, out = make_topic(), make_topic()
    models = make_topic(**{"cleanup.policy": "compact"})  # no model of this group in it
    X, _ = blobs(900, seed=15)
    produce_values(kafka_bootstrap, src, raw(X[:600]))
    ckpt_dir = tmp_path / "volume"
    kafka = {"group_id": group_id}
    with Daemon(tmp_path / "a", kafka_bootstrap, src, out, kafka=kafka,
                checkpoint={"dir": str(ckpt_dir)}) as first:  # fmt: skip
        first.start()
        first.wait_metric("streamkm_samples_seen", 600)
        assert first.stop() == 0
    shutil.rmtree(ckpt_dir)
    produce_values(kafka_bootstrap, src, raw(X[600:]))
    with Daemon(
        tmp_path / "b", kafka_bootstrap, src, out, kafka={**kafka, "model_topic": models},
        checkpoint={"dir": str(ckpt_dir), "when_lost": "restore-from-model-topic"},
    ) as held:  # fmt: skip
        held.start()
        held.wait_log("no model restored from the model topic")
        body = held.wait_http("/readyz", status=503)
        assert "it holds no model of this group" in body and "input held" in body
        assert held.metric("streamkm_ready") == 0 and held.metric("streamkm_samples_seen") == 0
        # It stays up and held over several turns (each waits 0.5 s on the paused partitions).
        until = time.monotonic() + 3.0
        while time.monotonic() < until:
            held.assert_running()
            assert held.get("/healthz")[0] == 200 and held.get("/readyz")[0] == 503
            time.sleep(0.2)
        assert held.stop() == 0
    # Nothing of the 300 new inputs was consumed into a model or published, and nothing was
    # written: the next start meets the same choice.
    assert len(drain(kafka_bootstrap, out, expected=600)) == 600
    assert not list(ckpt_dir.iterdir())
