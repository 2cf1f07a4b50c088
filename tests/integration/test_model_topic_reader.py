"""Reading the group's newest model back from a real model topic."""

from __future__ import annotations

import json
import uuid

import pytest

from streamkm.config import Settings
from streamkm.errors import RestoreError
from streamkm.restore import read_newest_model
from tests.kafka_util import produce_values

pytestmark = pytest.mark.integration


def settings(bootstrap: str, topic: str, group: str) -> Settings:
    return Settings.model_validate(
        {"kafka": {"bootstrap_servers": bootstrap, "group_id": group, "model_topic": topic}}
    )


def test_the_newest_record_of_the_group_is_found_behind_other_groups_records(
    kafka_bootstrap: str, make_topic
) -> None:
    topic = make_topic(partitions=3, **{"cleanup.policy": "compact"})
    ours = f"g-{uuid.uuid4().hex[:8]}"

    def record(version: int, at: float) -> bytes:
        return json.dumps({"model_version": version, "created_at": at}).encode()

    # Ours in partition 1 (versions 1..3), then 200 records of other groups after them, so the
    # backwards scan has to widen its window; an older one of ours in partition 0.
    produce_values(kafka_bootstrap, topic, [record(0, 1.0)], keys=[ours.encode()], partition=0)
    produce_values(
        kafka_bootstrap, topic, [record(v, 10.0 + v) for v in (1, 2, 3)],
        keys=[ours.encode()] * 3, partition=1,
    )  # fmt: skip
    others = [record(99, 1e12)] * 200
    produce_values(
        kafka_bootstrap, topic, others, keys=[f"other-{i}".encode() for i in range(200)],
        partition=1,
    )  # fmt: skip
    newest = read_newest_model(settings(kafka_bootstrap, topic, ours))
    assert newest is not None and json.loads(newest)["model_version"] == 3
    assert read_newest_model(settings(kafka_bootstrap, topic, "nobody")) is None


def test_a_missing_model_topic_is_refused(kafka_bootstrap: str) -> None:
    missing = f"absent-{uuid.uuid4().hex[:8]}"
    with pytest.raises(RestoreError, match=f"the model topic {missing} does not exist"):
        read_newest_model(settings(kafka_bootstrap, missing, "g"))
