"""`streamkm demo` end to end: it streams, reports and exits cleanly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamkm.tools.broker import free_port

pytestmark = pytest.mark.integration


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STREAMKM_") or k == "STREAMKM_CACHE_DIR"
    }
    return {**env, **extra}


def streamkm(*args: str, cwd: Path, env: dict[str, str], timeout: float = 240):
    return subprocess.run(
        [sys.executable, "-m", "streamkm.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_demo_streams_summarises_and_draws(tmp_path: Path, kafka_bootstrap: str) -> None:
    env = _env(STREAMKM_KAFKA__BOOTSTRAP_SERVERS=kafka_bootstrap)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamkm.cli",
            "demo",
            "--messages",
            "30000",
            "--report",
            "run.png",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "summary" in out and "Traceback" not in proc.stderr
    sent = int(re.search(r"vectors sent\s+([\d,]+)", out).group(1).replace(",", ""))
    assigned = int(re.search(r"assignments\s+([\d,]+)", out).group(1).replace(",", ""))
    malformed = int(re.search(r"sent ([\d,]+) malformed", out).group(1).replace(",", ""))
    assert sent == 30000 and assigned == sent - malformed
    auc = float(re.search(r"ROC-AUC ([\d.]+)", out).group(1))
    assert auc > 0.95
    png = tmp_path / "run.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    checkpoints = list((tmp_path / "demo-data").glob("run-*/checkpoints/ckpt-*.npz"))
    assert checkpoints

    # The report command on the run's checkpoints; an output it cannot write is one clear line.
    ckpt_dir = checkpoints[0].parent
    report = streamkm("report", str(ckpt_dir), "--out", "again.png", cwd=tmp_path, env=env)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"
    bad = streamkm("report", str(ckpt_dir), "--out", "/nonexistent/x.png", cwd=tmp_path, env=env)
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        "streamkm: cannot write the report to /nonexistent/x.png: "
        "directory /nonexistent does not exist"
    )


def _without_matplotlib(tmp_path: Path) -> dict[str, str]:
    """An environment where `import matplotlib` fails, as after a plain `pip install .`."""
    stub = tmp_path / "no-matplotlib" / "matplotlib"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError(\"No module named 'matplotlib'\")\n")
    path = os.pathsep.join(filter(None, [str(stub.parent), os.environ.get("PYTHONPATH")]))
    # A broker nobody answers at: were the check late, the run would start (and fail) first.
    return _env(PYTHONPATH=path, STREAMKM_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")


def test_demo_report_needs_the_report_extra_before_the_run(tmp_path: Path) -> None:
    env = _without_matplotlib(tmp_path)
    t0 = time.monotonic()
    proc = streamkm("demo", "--messages", "1000", "--report", "run.png", cwd=tmp_path, env=env,
                    timeout=60)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "pip install 'streamkm[report]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "streaming" not in proc.stdout and "using the configured Kafka" not in proc.stdout
    assert time.monotonic() - t0 < 30
    # Nor does `report` get past the check (it names the extra, without a traceback).
    report = streamkm("report", str(tmp_path), "--out", "x.png", cwd=tmp_path, env=env)
    assert report.returncode == 1 and "pip install 'streamkm[report]'" in report.stderr


def test_demo_report_to_an_unwritable_place_fails_before_the_run(tmp_path: Path) -> None:
    env = _env(STREAMKM_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
    proc = streamkm("demo", "--report", "/nonexistent/run.png", cwd=tmp_path, env=env, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "streamkm demo: cannot write the report to /nonexistent/run.png: "
        "directory /nonexistent does not exist"
    )


def test_demo_removes_its_broker_directory(tmp_path: Path) -> None:
    """The demo's own broker lives in a temporary directory, removed when the demo ends."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = streamkm("demo", "--messages", "3000", cwd=tmp_path, env=_env(TMPDIR=str(tmp)),
                    timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Apache Kafka up at" in proc.stdout
    assert not list(tmp.glob("streamkm-demo-broker-*")), sorted(p.name for p in tmp.iterdir())
