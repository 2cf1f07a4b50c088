"""`streamkm produce`: vectors from .npy, .csv, stdin or a synthetic stream reach the topic."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from streamkm.codec import VectorDecoder
from streamkm.config import load_settings
from streamkm.tools.broker import free_port
from streamkm.tools.produce import produce_command
from tests.kafka_util import drain

pytestmark = pytest.mark.integration


def run_produce(
    bootstrap: str, *args: str, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMKM_")}
    return subprocess.run(
        [sys.executable, "-m", "streamkm.cli", "produce", "--bootstrap", bootstrap, *args],
        input=stdin, capture_output=True, text=True, env=env, timeout=timeout, check=False,
    )  # fmt: skip


def produce(bootstrap: str, *args: str, stdin: str | None = None) -> str:
    proc = run_produce(bootstrap, *args, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_files_stdin_and_synthetic(tmp_path: Path, kafka_bootstrap: str, make_topic) -> None:
    X = np.arange(12, dtype=np.float64).reshape(4, 3) / 7
    np.save(tmp_path / "v.npy", X)
    np.savetxt(tmp_path / "v.csv", X, delimiter=",")
    for source, fmt in (("v.npy", "float32"), ("v.csv", "json"), ("-", "float64")):
        topic = make_topic()
        stdin = (tmp_path / "v.csv").read_text() if source == "-" else None
        path = source if source == "-" else str(tmp_path / source)
        out = produce(kafka_bootstrap, "--topic", topic, "--format", fmt, path, stdin=stdin)
        assert out.strip() == f"sent 4 vectors of dimension 3 to {topic}"
        got, _, errors = VectorDecoder(fmt).decode_many(
            [m.value() for m in drain(kafka_bootstrap, topic)]
        )
        assert not errors
        np.testing.assert_allclose(got, X, rtol=1e-6 if fmt == "float32" else 1e-12)

    topic = make_topic()
    out = produce(kafka_bootstrap, "--topic", topic, "--format", "float32",
                  "--synthetic-rate", "2000", "--dim", "5", "--count", "300")  # fmt: skip
    assert out.strip() == f"sent 300 vectors to {topic}"
    got, _, errors = VectorDecoder("float32").decode_many(
        [m.value() for m in drain(kafka_bootstrap, topic)]
    )
    assert got.shape == (300, 5) and not errors


def test_csv_with_a_header_row(tmp_path: Path, kafka_bootstrap: str, make_topic) -> None:
    """A first row that is not all numbers is a header (file and stdin); the rest are sent."""
    text = "f0,f1,f2\n0.5,1,2\n3,4,5.25\n"
    (tmp_path / "h.csv").write_text(text)
    for source in (str(tmp_path / "h.csv"), "-"):
        topic = make_topic()
        stdin = text if source == "-" else None
        out = produce(kafka_bootstrap, "--topic", topic, "--format", "json", source, stdin=stdin)
        assert out.strip() == f"sent 2 vectors of dimension 3 to {topic}"
        got, _, errors = VectorDecoder("json").decode_many(
            [m.value() for m in drain(kafka_bootstrap, topic)]
        )
        assert not errors
        np.testing.assert_array_equal(got, [[0.5, 1, 2], [3, 4, 5.25]])

    # A non-number further down is an error naming the line and the column, not a traceback.
    (tmp_path / "bad.csv").write_text(text + "6,seven,8\n")
    proc = run_produce(kafka_bootstrap, "--topic", make_topic(), str(tmp_path / "bad.csv"))
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        == f"streamkm: {tmp_path / 'bad.csv'}, line 4, f1: 'seven' is not a number"
    )


def test_csv_key_column(tmp_path: Path, kafka_bootstrap: str, make_topic) -> None:
    """With a key column (by header name or number) its values become the message keys."""
    (tmp_path / "k.csv").write_text("id,x,y\nsensor-1,1,2\nsensor-2,3,4\n")
    settings = load_settings(None)
    for key_column in ("id", "0"):
        topic = make_topic()
        args = argparse.Namespace(
            source=str(tmp_path / "k.csv"), topic=topic, format="json",
            bootstrap=kafka_bootstrap, synthetic_rate=None, dim=16, count=None,
            header=None, key_column=key_column,
        )  # fmt: skip
        assert produce_command(settings, args) == 0
        messages = drain(kafka_bootstrap, topic, expected=2)
        assert [m.key() for m in messages] == [b"sensor-1", b"sensor-2"]
        got, _, errors = VectorDecoder("json").decode_many([m.value() for m in messages])
        assert not errors
        np.testing.assert_array_equal(got, [[1, 2], [3, 4]])


def test_dead_broker_is_a_clear_error_in_bounded_time(tmp_path: Path) -> None:
    """No broker at the address: an error with the cause within seconds, not 60 s of silence."""
    np.save(tmp_path / "v.npy", np.ones((3, 2)))
    dead = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    proc = run_produce(dead, "--topic", "t", str(tmp_path / "v.npy"), timeout=45)
    took = time.monotonic() - t0
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"streamkm: the brokers at {dead} did not answer within 10 s"), last
    assert "Connection refused" in last
    assert took < 30, f"took {took:.0f}s"
