"""Secure connections: the daemon over SASL against a real Apache Kafka, and secrets never shown.

The module starts its own local Apache Kafka with a PLAINTEXT listener (topics are created and
read back through it) and a SASL_PLAINTEXT listener accepting SCRAM-SHA-256, SCRAM-SHA-512 and
PLAIN for one user. The daemon only ever gets the SASL listener.

The last tests check that the examples in docs/security.md load and that librdkafka accepts
the properties they use.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import KafkaException, Producer
from prometheus_client.parser import text_string_to_metric_families

from streamkm.checkpoint import CheckpointStore
from streamkm.checkpoint import read as read_checkpoint
from streamkm.config import REDACTED, load_settings
from streamkm.errors import ConfigError, StreamkmError
from streamkm.tools.broker import LocalBroker, ScramUser, free_port
from tests.daemon import Daemon, write_config
from tests.kafka_util import create_topic, drain, produce_values

pytestmark = pytest.mark.integration

USER = "streamkm"
# Distinctive, so that any occurrence in captured output can only be a leak.
PASSWORD = f"pw-{uuid.uuid4().hex[:12]}-wombat"
DIM = 4
N = 600
AUTH_FAILURE = re.compile(r"SASL authentication error: .*invalid credentials", re.IGNORECASE)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A local Apache Kafka with a SASL listener and the user ``USER``/``PASSWORD``."""
    local = LocalBroker(
        dir=tmp_path_factory.mktemp("sasl-broker"),
        port=free_port(),
        sasl_port=free_port(),
        scram_users=(ScramUser(USER, PASSWORD),),
    )
    try:
        local.start()
    except (StreamkmError, OSError) as exc:
        pytest.fail(
            "the local Apache Kafka with a SASL listener did not start (it needs Java 17+ and "
            f"Maven): {exc}",
            pytrace=False,
        )
    try:
        yield local
    finally:
        local.stop()


def _sasl_bootstrap(broker: LocalBroker) -> str:
    assert broker.sasl_bootstrap is not None
    return broker.sasl_bootstrap


def _topics(broker: LocalBroker) -> tuple[str, str]:
    src, out = f"sec-in-{uuid.uuid4().hex[:8]}", f"sec-out-{uuid.uuid4().hex[:8]}"
    create_topic(broker.bootstrap, src)
    create_topic(broker.bootstrap, out)
    return src, out


def _vectors(n: int, seed: int = 0) -> list[bytes | None]:
    rng = np.random.default_rng(seed)
    centers = np.array([[0, 0, 0, 0], [20, 20, 0, 0], [0, 20, 20, 20]], dtype=np.float32)
    X = centers[rng.integers(0, 3, size=n)] + rng.normal(0, 1.0, size=(n, DIM))
    return [row.astype("<f4").tobytes() for row in X]


def _sasl_client(mechanism: str) -> dict[str, str]:
    return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": mechanism}


def _log_text(d: Daemon) -> str:
    return d.log_path.read_text(errors="replace")


def _all_label_values(metrics_page: str) -> list[str]:
    return [
        value
        for family in text_string_to_metric_families(metrics_page)
        for sample in family.samples
        for value in sample.labels.values()
    ]


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.upper().startswith("STREAMKM_")]:
        monkeypatch.delenv(name)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAMKM_")}
    return subprocess.run(
        [sys.executable, "-m", "streamkm.cli", *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=120,
        check=False,
    )


# -- the daemon over SASL --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mechanism", "password_from_env"),
    [("SCRAM-SHA-512", False), ("SCRAM-SHA-256", True), ("PLAIN", False)],
)
def test_daemon_over_sasl_turns_n_vectors_into_n_assignments(
    broker: LocalBroker, tmp_path: Path, mechanism: str, password_from_env: bool
) -> None:
    src, out = _topics(broker)
    placed = produce_values(broker.bootstrap, src, _vectors(N))
    kafka: dict[str, Any] = {"client": _sasl_client(mechanism), "sasl_username": USER}
    env: dict[str, str] = {}
    if password_from_env:
        env["STREAMKM_KAFKA__SASL_PASSWORD"] = PASSWORD
    else:
        kafka["sasl_password"] = PASSWORD
    with Daemon(tmp_path / "d", _sasl_bootstrap(broker), src, out, env=env, kafka=kafka) as d:
        if password_from_env:
            assert "sasl_password" not in d.config_path.read_text()
        d.start()
        got = drain(broker.bootstrap, out, expected=N, timeout_s=120)
        d.wait_http("/readyz", 200)
        status, page = d.get("/metrics")
        assert d.stop() == 0, d.tail()
    records = [json.loads(m.value()) for m in got]
    assert len(records) == N, f"{len(records)} assignments for {N} inputs"
    assert {r["topic"] for r in records} == {src}
    assert sorted((r["partition"], r["offset"]) for r in records) == sorted(placed)
    assert float(read_checkpoint(d.checkpoint_dir).model.n_samples_seen_) == N
    log = _log_text(d)
    assert not AUTH_FAILURE.search(log), log
    assert status == 200
    assert PASSWORD not in log and PASSWORD not in page


def test_wrong_password_is_reported_and_never_ready(broker: LocalBroker, tmp_path: Path) -> None:
    src, out = _topics(broker)
    # Enough input to seed the model: were the daemon let in, it would become ready.
    produce_values(broker.bootstrap, src, _vectors(400))
    wrong = f"wrong-{uuid.uuid4().hex[:12]}"
    kafka = {"client": _sasl_client("SCRAM-SHA-512"), "sasl_username": USER, "sasl_password": wrong}
    with Daemon(tmp_path / "d", _sasl_bootstrap(broker), src, out, kafka=kafka) as d:
        d.start()
        deadline = time.monotonic() + 60
        while (
            not AUTH_FAILURE.search(_log_text(d)) and d.proc is not None and d.proc.poll() is None
        ):
            assert time.monotonic() < deadline, f"no authentication error logged:\n{d.tail()}"
            time.sleep(0.2)
        assert d.proc is not None
        if d.proc.poll() is None:
            # librdkafka reports a failed SASL handshake as a non-fatal _AUTHENTICATION error
            # and keeps reconnecting: the daemon must stay alive, healthy and unready.
            window_end = time.monotonic() + 10
            checks = 0
            while time.monotonic() < window_end:
                d.assert_running()
                assert d.get("/readyz")[0] == 503, d.tail()
                checks += 1
                time.sleep(0.25)
            assert checks >= 20
            assert d.get("/healthz")[0] == 200
            assert d.stop() == 0, d.tail()
        else:
            # A daemon that gives up on bad credentials must say so with a failure status.
            assert d.proc.returncode != 0
    log = _log_text(d)
    assert AUTH_FAILURE.search(log), log
    assert "SCRAM-SHA-512" in log
    assert wrong not in log and PASSWORD not in log
    assert drain(broker.bootstrap, out, idle_s=1.0, timeout_s=10) == []
    assert CheckpointStore(d.checkpoint_dir).paths() == []


# -- secrets never shown ---------------------------------------------------------------------

CLIENT_SECRET = f"cs-{uuid.uuid4().hex[:12]}-quokka"
KEY_PASSWORD = f"kp-{uuid.uuid4().hex[:12]}-numbat"
SECRETS = (PASSWORD, CLIENT_SECRET, KEY_PASSWORD)


def _assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a secret appears in {where}"


def test_secrets_never_appear_in_logs_metrics_or_config_show(
    broker: LocalBroker, tmp_path: Path
) -> None:
    src, out = _topics(broker)
    produce_values(broker.bootstrap, src, _vectors(N, seed=5))
    kafka = {
        "client": {
            **_sasl_client("SCRAM-SHA-512"),
            # Secrets librdkafka receives but SCRAM does not use: they travel the same path.
            "sasl.oauthbearer.client.secret": CLIENT_SECRET,
        },
        "sasl_username": USER,
        "sasl_password": PASSWORD,
    }
    env = {"STREAMKM_KAFKA__CLIENT__SSL.KEY.PASSWORD": KEY_PASSWORD}
    with Daemon(
        tmp_path / "d",
        _sasl_bootstrap(broker),
        src,
        out,
        env=env,
        kafka=kafka,
        log={"level": "DEBUG", "format": "json"},
    ) as d:
        d.start()
        assert len(drain(broker.bootstrap, out, expected=N, timeout_s=120)) == N
        d.wait_metric("streamkm_checkpoints_total", 1)
        # Lag series carry the topic as a label once librdkafka has sent its statistics.
        d.wait_metric("streamkm_consumer_lag", 0, labels={"topic": src})
        status, page = d.get("/metrics")
        for path in ("/healthz", "/readyz"):
            _assert_no_secret(d.get(path)[1], path)
        assert d.stop() == 0, d.tail()

    assert status == 200
    _assert_no_secret(page, "/metrics")
    labels = _all_label_values(page)
    assert any(v == src for v in labels), "no topic label: the label check would be vacuous"
    _assert_no_secret("\n".join(labels), "metric label values")

    log = _log_text(d)
    assert f"assigned {src}[0]" in log  # the whole run was captured
    _assert_no_secret(log, "the daemon log")

    shown = _cli("config", "show", "--config", str(d.config_path), env=env)
    assert shown.returncode == 0, shown.stderr
    _assert_no_secret(shown.stdout + shown.stderr, "config show")
    assert f'sasl_password = "{REDACTED}"' in shown.stdout
    assert f'"sasl.oauthbearer.client.secret" = "{REDACTED}"' in shown.stdout
    assert f'"ssl.key.password" = "{REDACTED}"' in shown.stdout
    assert f'sasl_username = "{USER}"' in shown.stdout  # not a secret: still shown


# Each config is wrong somewhere and carries a secret, often right next to the mistake.
BAD_CONFIGS = {
    "misspelt key holding the secret": (f'[kafka]\nsasl_pasword = "{PASSWORD}"\n', {}),
    "bad sibling": (f'[kafka]\nsasl_password = "{PASSWORD}"\n[model]\nn_clusters = "x"\n', {}),
    "secret of the wrong type": (f'[kafka]\nsasl_password = {{ value = "{PASSWORD}" }}\n', {}),
    "client secret of the wrong type": (
        f'[kafka.client]\n"ssl.key.password" = ["{KEY_PASSWORD}"]\n',
        {},
    ),
    "unterminated secret string": (f'[kafka]\nsasl_password = "{PASSWORD}\n', {}),
    "unquoted secret": (f"[kafka]\nsasl_password = {PASSWORD}\n", {}),
    "unknown section": (f'[kafak]\nsasl_password = "{PASSWORD}"\n', {}),
    "misspelt env key": ("", {"STREAMKM_KAFKA__SASL_PASWORD": PASSWORD}),
    "misspelt env section": ("", {"STREAMKM_KAKFA__SASL_PASSWORD": PASSWORD}),
    "broken JSON in env": ("", {"STREAMKM_KAFKA__CLIENT": f'{{"sasl.password": "{PASSWORD}",'}),
    "env JSON with an unknown key": (
        "",
        {"STREAMKM_KAFKA": f'{{"sasl_password": "{PASSWORD}", "sasl_passwrd": "{PASSWORD}"}}'},
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_config_errors_never_echo_secrets(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text, env = BAD_CONFIGS[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    for command in (("config", "show"), ("run",)):
        proc = _cli(*command, "--config", str(path), env=env)
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("streamkm: config error:"), proc.stderr
        _assert_no_secret(proc.stdout + proc.stderr, f"`streamkm {' '.join(command)}`")

    _clean_env(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    exc = info.value
    _assert_no_secret(str(exc), "the error message")
    _assert_no_secret(repr(exc), "the error's repr")
    _assert_no_secret("".join(traceback.format_exception(exc)), "the printed traceback")


@pytest.mark.parametrize(
    "client",
    [
        pytest.param({"sasl.mechanism": "SCRAM-SHA-1024"}, id="unknown-mechanism"),
        pytest.param(
            {
                "sasl.mechanism": "OAUTHBEARER",
                "sasl.oauthbearer.method": "oidc",
                "sasl.oauthbearer.client.id": "streamkm",
            },
            id="oidc-without-token-endpoint",
        ),
    ],
)
def test_client_errors_never_echo_secrets(
    broker: LocalBroker, tmp_path: Path, client: dict[str, str]
) -> None:
    kafka = {
        "client": {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.oauthbearer.client.secret": CLIENT_SECRET,
            **client,
        },
        "sasl_username": USER,
        "sasl_password": PASSWORD,
    }
    with Daemon(tmp_path / "d", _sasl_bootstrap(broker), "in", "out", kafka=kafka) as d:
        d.start()
        code = d.wait_exit(timeout_s=60)
    log = _log_text(d)
    assert code != 0, log
    # The topics are checked before the consumer joins: the admin client is the first one.
    assert "creating the admin client" in log and "_INVALID_ARG" in log, log
    _assert_no_secret(log, "the daemon's error")


@pytest.mark.parametrize(
    "prop",
    [
        "sasl.password",
        "ssl.key.password",
        "ssl.keystore.password",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.client.credentials.client.secret",
        "ssl.key.pem",
        "sasl.oauthbearer.assertion.private.key.pem",
        "sasl.oauthbearer.assertion.private.key.passphrase",
        "sasl.oauthbearer.config",
    ],
)
def test_config_show_redacts_every_secret_client_property(tmp_path: Path, prop: str) -> None:
    path = write_config(tmp_path / "c.toml", {"kafka": {"client": {prop: KEY_PASSWORD}}})
    shown = _cli("config", "show", "--config", str(path))
    assert shown.returncode == 0, shown.stderr
    _assert_no_secret(shown.stdout + shown.stderr, f"config show of {prop}")
    assert f'"{prop}" = "{REDACTED}"' in shown.stdout


# -- the examples in docs/security.md --------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "security.md"


def _doc_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", DOCS.read_text(), re.MULTILINE | re.DOTALL)


def _librdkafka_error(conf: dict[str, Any]) -> str | None:
    """What librdkafka says when a client is created with ``conf``, or None if it is happy.

    Files named by ``*.location`` exist only where the example is deployed, so those are left
    out; credentials the example takes from the environment are filled in.
    """
    conf = {k: v for k, v in conf.items() if not k.endswith(".location")}
    conf.setdefault("sasl.username", "user")
    conf.setdefault("sasl.password", "password")
    try:
        Producer({**conf, "bootstrap.servers": "127.0.0.1:1", "log_level": 0})
    except KafkaException as exc:
        return str(exc.args[0].str())
    return None


@pytest.mark.parametrize("index", range(len(_doc_blocks("toml"))))
def test_docs_toml_examples_load_and_use_real_librdkafka_properties(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_env(monkeypatch)
    path = tmp_path / "example.toml"
    path.write_text(_doc_blocks("toml")[index])
    settings = load_settings(path)
    conf = settings.librdkafka()
    assert len(conf) > 1, "the example sets nothing"
    assert _librdkafka_error(conf) is None


def _env_assignments(block: str) -> dict[str, str]:
    text = block.replace("\\\n", " ")
    found: dict[str, str] = {}
    for line in text.splitlines():
        for token in shlex.split(line):
            name, sep, value = token.partition("=")
            if sep and name.upper().startswith("STREAMKM_"):
                found[name] = value
    return found


def _property_of(env_name: str) -> str:
    rest = env_name.upper().removeprefix("STREAMKM_KAFKA__")
    if rest.startswith("CLIENT__"):
        return env_name[len("STREAMKM_KAFKA__CLIENT__") :].lower()
    return {"SASL_USERNAME": "sasl.username", "SASL_PASSWORD": "sasl.password"}[rest]


@pytest.mark.parametrize("index", range(len(_doc_blocks("sh"))))
def test_docs_environment_examples_reach_librdkafka(
    index: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_env(monkeypatch)
    assignments = _env_assignments(_doc_blocks("sh")[index])
    assert assignments, "no STREAMKM_ variable in the example"
    for name, value in assignments.items():
        monkeypatch.setenv(name, value)
    conf = load_settings(None).librdkafka()
    for name, value in assignments.items():
        if name.upper() == "STREAMKM_KAFKA__CLIENT":
            for prop, item in json.loads(value).items():
                assert conf[prop] == item
        else:
            assert conf[_property_of(name)] == value


def test_docs_environment_table_matches_the_toml_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_env(monkeypatch)
    rows = re.findall(
        r'^\| `\[(kafka(?:\.client)?)\] "?([\w.]+)"?` \| `(STREAMKM_[\w.]+)` \|$',
        DOCS.read_text(),
        re.MULTILINE,
    )
    assert len(rows) >= 4
    for section, key, env_name in rows:
        value = f"v-{uuid.uuid4().hex[:8]}"
        from_file = write_config(
            tmp_path / "t.toml",
            {"kafka": {key: value}} if section == "kafka" else {"kafka": {"client": {key: value}}},
        )
        expected = load_settings(from_file).librdkafka()
        monkeypatch.setenv(env_name, value)
        assert load_settings(None).librdkafka() == expected, env_name
        monkeypatch.delenv(env_name)
