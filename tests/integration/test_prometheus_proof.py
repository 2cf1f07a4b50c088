"""The dashboard and the alert rules, proven on a real Prometheus scraping a real daemon.

Prometheus (Debian's package) scrapes a running daemon fed by the session's Kafka; every
PromQL expression of ``deploy/grafana/streamkm.json`` and every operand of every alert rule in
``deploy/prometheus/alerts.yml`` is evaluated through Prometheus' HTTP API and must return
data. No panel may point at a series that does not exist.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from streamkm.tools.broker import free_port
from tests.daemon import Daemon
from tests.kafka_util import produce_values

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy"))
import queries  # noqa: E402  (deploy/queries.py: the expression extractor)

DASHBOARD = REPO / "deploy/grafana/streamkm.json"
ALERTS = REPO / "deploy/prometheus/alerts.yml"
PROM_CONFIG = REPO / "deploy/prometheus/prometheus.yml"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: apt-get install prometheus (make test does it as root)"
        )
    return path


def test_promtool_accepts_config_and_rules() -> None:
    promtool = _tool("promtool")
    rules = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = subprocess.run(
        [promtool, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True
    )
    assert config.returncode == 0, config.stdout + config.stderr


_TOP_CMP = re.compile(r"\s(==|!=|>=|<=|>|<)\s")


def _split_top(expr: str, sep: re.Pattern[str]) -> list[str]:
    """Split ``expr`` on ``sep`` where it occurs outside any brackets."""
    parts, depth, start = [], 0, 0
    i = 0
    while i < len(expr):
        ch = expr[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            m = sep.match(expr, i)
            if m:
                parts.append(expr[start:i])
                start = i = m.end()
                continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts if p.strip()]


def alert_operands(expr: str) -> list[str]:
    """The sides of an alert's conditions: what must return data for the alert to be able to fire.

    ``a > b and c > 0`` gives ``a``, ``b`` and ``c``; plain numbers are dropped.
    """
    out = []
    for clause in _split_top(expr, re.compile(r"\s+(and|or|unless)\s+")):
        for side in _split_top(clause, _TOP_CMP):
            if not re.fullmatch(r"[0-9.e+-]+", side):
                out.append(side)
    return out


class Prometheus:
    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        config = yaml.safe_load(PROM_CONFIG.read_text())
        config["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s"})
        config["rule_files"] = [str(ALERTS)]
        config["scrape_configs"] = [
            {**job, "static_configs": [{"targets": [target]}]}
            for job in config["scrape_configs"]
            if job["job_name"] == "streamkm"
        ]
        cfg = workdir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115  (closed in close())
        self.proc = subprocess.Popen(
            [
                _tool("prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait(self, expr: str, timeout_s: float = 90.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "prometheus exited"
            try:
                result = self.query(expr)
                if result:
                    return result
            except OSError as exc:
                last = exc
            time.sleep(0.5)
        raise TimeoutError(f"no data for {expr} within {timeout_s}s ({last})")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def test_every_dashboard_and_alert_expression_returns_data(
    tmp_path: Path, kafka_bootstrap: str, make_topic
) -> None:
    src, out, dlq = make_topic(partitions=2), make_topic(), make_topic()
    rng = np.random.default_rng(0)
    stop = threading.Event()

    def feed() -> None:  # steady traffic with a few malformed messages, so rates are not empty
        while not stop.is_set():
            X = rng.normal(size=(300, 4)).astype("<f4") + rng.integers(0, 3, size=(300, 1)) * 10
            values = [row.tobytes() for row in X] + [b"\x00\x01\x02"]
            produce_values(kafka_bootstrap, src, values)
            stop.wait(0.3)

    feeder = threading.Thread(target=feed, daemon=True)
    with Daemon(
        tmp_path / "d", kafka_bootstrap, src, out,
        kafka={"dead_letter_topic": dlq}, checkpoint={"interval_s": 1.0},
    ) as d:  # fmt: skip
        feeder.start()
        prom = None
        try:
            d.start()
            d.wait_http("/readyz", 200)
            prom = Prometheus(tmp_path, f"127.0.0.1:{d.port}")
            prom.wait('up{job="streamkm"} == 1')
            # rate() and histogram_quantile() need a few scrapes with movement; the lag comes
            # from librdkafka's statistics every 5 s.
            prom.wait("streamkm_consumer_lag")
            prom.wait("rate(streamkm_checkpoint_duration_seconds_count[1m]) > 0")
            missing = [e for e in queries.dashboard_exprs(DASHBOARD) if not prom.query(e)]
            assert not missing, f"dashboard expressions without data: {missing}"
            now = time.time()
            empty = []
            for name, expr in queries.rule_exprs(ALERTS).items():
                for operand in alert_operands(expr):
                    # An operand looking back with `offset X` is evaluated X later, when the
                    # window it reads holds samples of this run.
                    offset = re.search(r"offset\s+(\d+)m", operand)
                    at = now + 60 * int(offset.group(1)) if offset else None
                    if not prom.query(operand, at=at):
                        empty.append((name, operand))
            assert not empty, f"alert operands without data: {empty}"
            assert d.metric("streamkm_messages_dead_lettered_total", {"reason": "undecodable"}) >= 1
        finally:
            stop.set()
            feeder.join()
            if prom is not None:
                prom.close()
        assert d.stop() == 0


def test_alert_operands_split_as_intended() -> None:
    assert alert_operands('up{job="streamkm"} == 0') == ['up{job="streamkm"}']
    assert alert_operands("a > 3 * b") == ["a", "3 * b"]
    assert alert_operands("sum by (x) (rate(m[5m])) > 0\nand\nsum(m) > 10000") == [
        "sum by (x) (rate(m[5m]))",
        "sum(m)",
    ]
