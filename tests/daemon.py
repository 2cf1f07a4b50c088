"""Run ``streamkm run`` as a real subprocess in tests: config file, signals, metrics port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from streamkm.config import to_toml
from streamkm.tools.broker import free_port


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    path.write_text(to_toml(sections))
    return path


class Daemon:
    """One ``streamkm run`` process with its own config, checkpoint dir and metrics port."""

    def __init__(
        self,
        workdir: Path,
        bootstrap: str,
        input_topic: str,
        output_topic: str,
        env: dict[str, str] | None = None,
        **sections: dict[str, Any],
    ):
        # The process gets none of the test process's STREAMKM_* variables (a developer's
        # shell must not change a test), only those given in ``env``.
        self.env = dict(env or {})
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config: dict[str, dict[str, Any]] = {
            "kafka": {"bootstrap_servers": bootstrap, "input_topic": input_topic, "output_topic": output_topic,
                      "group_id": f"g-{uuid.uuid4().hex[:10]}"},
            "input": {"format": "float32"},
            "model": {"n_clusters": 3, "batch_size": 256, "max_batch_wait_ms": 200, "seed": 1},
            "checkpoint": {"dir": str(workdir / "ckpt"), "interval_s": 2.0},
            "metrics": {"host": "127.0.0.1", "port": self.port},
            "log": {"level": "INFO"},
        }  # fmt: skip
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        self.config = config
        self.config_path = write_config(workdir / "config.toml", config)
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config["checkpoint"]["dir"])

    def start(self, *extra: str) -> Daemon:
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMKM_")}
        env.update(self.env)
        command = [sys.executable, "-m", "streamkm.cli", "run", "--config", str(self.config_path)]
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== start {self.starts} ====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [*command, *extra], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_http(self, path: str = "/healthz", status: int = 200, timeout_s: float = 90.0) -> str:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            self.assert_running()
            try:
                code, body = self.get(path)
                if code == status:
                    return body
                last = (code, body)
            except OSError as exc:
                last = exc
            time.sleep(0.2)
        raise TimeoutError(
            f"{path} did not answer {status} in {timeout_s}s (last: {last})\n{self.tail()}"
        )

    def assert_running(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"daemon ignored signal {sig} for {timeout_s}s:\n{self.tail()}"
            ) from None

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def wait_log(self, pattern: str, timeout_s: float = 90.0) -> str:
        """Wait until a line of the daemon's log matches the regular expression ``pattern``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.assert_running()
            match = re.search(pattern, self.log_path.read_text(errors="replace"))
            if match:
                return match.group(0)
            time.sleep(0.2)
        raise TimeoutError(f"no log line matching {pattern!r} in {timeout_s}s\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample's value from the live /metrics page."""
        from prometheus_client.parser import text_string_to_metric_families

        code, body = self.get("/metrics")
        assert code == 200
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == name and (
                    labels is None or all(sample.labels.get(k) == v for k, v in labels.items())
                ):
                    return float(sample.value)
        return None

    def wait_metric(
        self,
        name: str,
        at_least: float,
        timeout_s: float = 90.0,
        labels: dict[str, str] | None = None,
    ) -> float:
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            self.assert_running()
            try:
                value = self.metric(name, labels)
            except OSError:  # the server is not up yet
                time.sleep(0.2)
                continue
            if value is not None and value >= at_least:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"{name} stayed at {value} < {at_least}\n{self.tail()}")

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
