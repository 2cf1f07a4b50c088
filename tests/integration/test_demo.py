"""`streamkm demo` end to end: it streams, reports and exits cleanly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_demo_streams_summarises_and_draws(tmp_path: Path, kafka_bootstrap: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMKM_")}
    env["STREAMKM_KAFKA__BOOTSTRAP_SERVERS"] = kafka_bootstrap
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
