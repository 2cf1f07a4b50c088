"""A lost checkpoint volume: checkpoint.when_lost and the held input (streamkm.recovery)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Message, TopicPartition

from streamkm.config import Settings
from streamkm.errors import CheckpointError
from streamkm.learner import learner_from_settings
from streamkm.records import model_record
from streamkm.recovery import LostVolume

pytestmark = pytest.mark.unit

DIM = 3
P0 = ("in", 0)


def settings(when_lost: str) -> Settings:
    return Settings.model_validate(
        {
            "kafka": {"input_topic": "in", "output_topic": "out", "model_topic": "models"},
            "input": {"format": "float32", "dim": DIM},
            "model": {"n_clusters": 2, "batch_size": 4, "seed": 0},
            "checkpoint": {"when_lost": when_lost},
        }
    )


def record() -> bytes:
    learner = learner_from_settings(settings("new-model"))
    rng = np.random.default_rng(5)
    for _ in range(3):
        learner.step(np.concatenate([rng.normal(0, 1, (2, DIM)), rng.normal(9, 1, (2, DIM))]))
    return model_record(learner.version, learner.public_state())


class FakeSource:
    """The part of a Source the hold uses: its consumer's pause/resume, consume and seek."""

    def __init__(self) -> None:
        self.consumer = self
        self.paused: set[int] = set()
        self.queue: list[Any] = []
        self.seeks: list[dict[Any, int]] = []

    def pause(self, tps: list[TopicPartition]) -> None:
        self.paused |= {tp.partition for tp in tps}

    def resume(self, tps: list[TopicPartition]) -> None:
        self.paused -= {tp.partition for tp in tps}

    def consume_messages(self, n: int, timeout: float) -> list[Any]:
        out, self.queue = self.queue[:n], self.queue[n:]
        return out

    def seek(self, offsets: dict[Any, int]) -> None:
        self.seeks.append(dict(offsets))


def test_known_partitions_and_fitted_models_need_no_policy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    restored: list[Any] = []
    lost = LostVolume(settings("stop"), False, lambda: None, restored.append)
    lost.on_assigned([P0], {P0: 500}, {P0: 400}, known=[P0], fitted=False)  # the checkpoint's
    lost.on_assigned([P0], {}, {}, known=[], fitted=False)  # the group has nothing committed
    with caplog.at_level(logging.ERROR):
        lost.on_assigned([P0], {P0: 500}, {}, known=[], fitted=True)
    assert "takes them on from those offsets" in caplog.text
    assert lost.held is None and restored == []


def test_stop_raises_and_new_model_says_it_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(CheckpointError, match=r'in\[0\]@500.*when_lost = "stop": exiting'):
        LostVolume(settings("stop"), False, lambda: None, print).on_assigned(
            [P0], {P0: 500}, {}, known=[], fitted=False
        )
    with caplog.at_level(logging.ERROR):
        LostVolume(settings("new-model"), False, lambda: None, print).on_assigned(
            [P0], {P0: 500}, {}, known=[], fitted=False
        )
    assert "starting a NEW model" in caplog.text
    # --reset-model wants a new model whatever the policy says
    LostVolume(settings("stop"), True, lambda: None, print).on_assigned(
        [P0], {P0: 500}, {}, known=[], fitted=False
    )


def test_a_refused_restore_holds_the_input_and_a_later_one_resumes_it() -> None:
    now = [0.0]
    topic: dict[str, bytes | None] = {"value": None}
    restored: list[Any] = []
    lost = LostVolume(
        settings("restore-from-model-topic"), False, lambda: lambda: topic["value"],
        restored.append, retry_s=30.0, clock=lambda: now[0],
    )  # fmt: skip
    lost.on_assigned([P0], {P0: 500}, {}, known=[], fitted=False)
    assert lost.held is not None and "holds no model of this group" in lost.held
    source = FakeSource()
    source.queue = [Message(topic="in", partition=1, offset=42, value=b"")]
    lost.on_assigned([("in", 1)], {("in", 1): 40}, {}, known=[], fitted=False)  # waits too
    lost.hold_turn(source, [P0, ("in", 1)])
    assert source.paused == {0, 1} and source.seeks == [] and restored == []
    topic["value"] = record()
    lost.hold_turn(source, [P0, ("in", 1)])
    assert restored == [] and lost.held is not None  # the retry is not due yet
    now[0] = 30.0
    lost.hold_turn(source, [P0])  # partition 1 was let go meanwhile
    assert lost.held is None and len(restored) == 1 and restored[0].n_steps_ == 3
    assert 0 not in source.paused
    assert source.seeks == [{P0: 500}]  # from the group's offset, read again
    X = np.random.default_rng(0).normal(size=(4, DIM)).astype(np.float32)
    calibrated = lost.first_batch(restored[0], X)
    assert calibrated is not None and calibrated.n_steps_ == 3
    assert lost.first_batch(calibrated, X) is None  # once


def test_without_a_reader_the_restore_is_refused() -> None:
    lost = LostVolume(settings("restore-from-model-topic"), False, lambda: None, print)
    lost.on_assigned([P0], {P0: 7}, {}, known=[], fitted=False)
    assert lost.held is not None and "kafka.model_topic is not set" in lost.held
    lost.note_consumed({P0: 3})
    assert lost.starts == {P0: 7}  # the first start noted stays
    lost.let_go([P0])
    assert lost.starts == {}
