"""`streamkm produce`: vectors from .npy, .csv, stdin or a synthetic stream reach the topic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamkm.codec import VectorDecoder
from tests.kafka_util import drain

pytestmark = pytest.mark.integration


def produce(bootstrap: str, *args: str, stdin: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMKM_")}
    proc = subprocess.run(
        [sys.executable, "-m", "streamkm.cli", "produce", "--bootstrap", bootstrap, *args],
        input=stdin, capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
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
