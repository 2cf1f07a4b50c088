"""`streamkm broker start|stop|status`: a real Apache Kafka whose data survives a restart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from streamkm.tools.broker import free_port
from tests.kafka_util import create_topic

pytestmark = pytest.mark.integration


def broker_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamkm.cli", "broker", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_start_stop_status_and_topics_survive_a_restart(tmp_path: Path) -> None:
    port, data = str(free_port()), str(tmp_path / "broker")
    where = ["--port", port, "--dir", data]
    try:
        started = broker_cli("start", *where)
        assert started.returncode == 0, started.stderr
        bootstrap = started.stdout.strip().splitlines()[-1]
        assert bootstrap == f"127.0.0.1:{port}"  # the last line of stdout is host:port
        assert "running" in broker_cli("status", *where).stdout
        create_topic(bootstrap, "kept-topic", partitions=2)

        assert broker_cli("stop", *where).stdout.strip() == "stopped"
        status = broker_cli("status", *where)
        assert status.stdout.strip() == "not running" and status.returncode == 3

        assert broker_cli("start", *where).returncode == 0
        topics = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=30).topics
        assert "kept-topic" in topics and len(topics["kept-topic"].partitions) == 2
    finally:
        broker_cli("stop", *where)


def test_start_on_a_port_another_broker_owns_fails(tmp_path: Path) -> None:
    """A second broker on a port the first one owns must not report success (the first one
    answers there, while the second died with "Address already in use")."""
    port = str(free_port())
    first = ["--port", port, "--dir", str(tmp_path / "first")]
    second = ["--port", port, "--dir", str(tmp_path / "second")]
    try:
        assert broker_cli("start", *first).returncode == 0
        taken = broker_cli("start", *second)
        assert taken.returncode == 1, taken.stdout + taken.stderr
        assert taken.stdout.strip() == ""
        assert f"port {port} on 127.0.0.1 is in use" in taken.stderr
        status = broker_cli("status", *second)
        assert status.stdout.strip() == "not running" and status.returncode == 3
        assert "running" in broker_cli("status", *first).stdout  # the first one is untouched
    finally:
        broker_cli("stop", *second)
        broker_cli("stop", *first)
