"""The topics as the running daemon sees them (streamkm.topics.TopicWatch), without a broker."""

from __future__ import annotations

import pytest

from streamkm.config import Settings
from streamkm.topics import TopicState, TopicWatch

pytestmark = pytest.mark.unit


def test_readiness_names_a_missing_input_topic_only_once_the_brokers_said_so() -> None:
    settings = Settings.model_validate({"kafka": {"input_topic": "in", "output_topic": "out"}})
    watch = TopicWatch(settings, every_s=10.0, clock=lambda: 0.0)
    assert watch.missing() is None  # not prepared (embedded use): nothing to say
    watch.check_if_due()  # and nothing to check
    assert watch.state is None
    watch.state = TopicState(checked=False, input_exists=False)
    assert watch.missing() is None  # the brokers did not answer: unknown
    watch.state = TopicState(checked=True, input_exists=False)
    assert watch.missing() == "input topic in does not exist; waiting for it"
    watch.state = TopicState(checked=True, input_exists=True)
    assert watch.missing() is None
