"""The local broker's start-up checks that need no broker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "missing, package", [("mvn", "maven"), ("java", "openjdk-17-jre-headless")]
)
def test_missing_java_or_maven_is_one_clear_line(
    tmp_path: Path, missing: str, package: str
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in {"mvn", "java"} - {missing}:  # the other tool is there
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": str(bin_dir), "STREAMKM_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "streamkm.cli", "broker", "start", "--dir", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"streamkm: {missing} is not installed")
    assert f"apt-get install {package}" in lines[0]


def test_start_on_a_taken_port_fails_before_starting_java(tmp_path: Path) -> None:
    """A port another process listens on is refused at once, with the port named, rather
    than a broker that dies while whatever holds the port answers in its place."""
    import socket

    env = {
        **os.environ,
        "PATH": str(tmp_path / "no-tools"),  # no java: the check must come first
        "STREAMKM_CACHE_DIR": str(tmp_path / "cache"),
    }
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "streamkm.cli", "broker", "start", "--port", str(port),
             "--dir", str(tmp_path / "b")],
            capture_output=True, text=True, env=env, check=False, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"port {port} on 127.0.0.1 is in use" in lines[0]
    assert "--port" in lines[0]
