"""Settings: TOML + environment, one-line errors with their source, secrets never shown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from streamkm.config import REDACTED, Settings, load_settings, to_toml
from streamkm.errors import ConfigError

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith("STREAMKM_") and "__" in name:
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_example_config_loads_and_matches_defaults(repo_root: Path) -> None:
    example = load_settings(repo_root / "config.example.toml")
    assert example.redacted() == load_settings(None).redacted()


def test_file_values_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[model]\nn_clusters = 4\nbatch_size = 64\n[kafka]\ngroup_id = "g1"\n')
    monkeypatch.setenv("STREAMKM_MODEL__N_CLUSTERS", "12")
    s = load_settings(path)
    assert s.model.n_clusters == 12  # env wins
    assert s.model.batch_size == 64  # file kept where env is silent
    assert s.kafka.group_id == "g1"


def test_unknown_key_in_file_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[model]\nn_clusterz = 4\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == f"model.n_clusterz: unknown key (from config file {path})"


def test_bad_type_from_env_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMKM_MODEL__BATCH_SIZE", "lots")
    with pytest.raises(
        ConfigError, match=r"^model\.batch_size: .*environment variable STREAMKM_MODEL__BATCH_SIZE"
    ):
        load_settings(None)


def test_unknown_env_section_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMKM_MODLE__N_CLUSTERS", "3")
    with pytest.raises(ConfigError, match="modle: unknown section"):
        load_settings(None)


@pytest.mark.parametrize(
    "text, key",
    [
        ('[input]\nformat = "xml"\n', "input.format"),
        ("[model]\nn_clusters = 0\n", "model.n_clusters"),
        ('[model]\ninit = "kmeans"\n', "model.init"),
        ('[delivery]\nguarantee = "maybe-once"\n', "delivery.guarantee"),
        ("[checkpoint]\ninterval_s = -1\n", "checkpoint.interval_s"),
        ("[metrics]\nport = 70000\n", "metrics.port"),
        ('[kafka.client]\n"a" = [1, 2]\n', "kafka.client"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}"):
        load_settings(write(tmp_path, text))


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[model\n"))


def test_secrets_are_redacted_but_passed_to_librdkafka(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        '[kafka]\nsasl_username = "alice"\nsasl_password = "pw-file-1"\n'
        '[kafka.client]\n"ssl.key.password" = "pw-file-2"\n"my.secret.token" = "pw-file-3"\n'
        '"security.protocol" = "SASL_SSL"\n',
    )
    monkeypatch.setenv("STREAMKM_KAFKA__CLIENT__SASL.OAUTHBEARER.CLIENT.SECRET", "pw-env-4")
    s = load_settings(path)
    shown = to_toml(s.redacted()) + repr(s) + str(s)
    for secret in ("pw-file-1", "pw-file-2", "pw-file-3", "pw-env-4"):
        assert secret not in shown
    assert shown.count(REDACTED) >= 4
    conf = s.librdkafka()
    assert conf["sasl.password"] == "pw-file-1"
    assert conf["ssl.key.password"] == "pw-file-2"
    assert conf["my.secret.token"] == "pw-file-3"
    assert conf["sasl.oauthbearer.client.secret"] == "pw-env-4"
    assert conf["security.protocol"] == "SASL_SSL"


def test_secret_with_bad_sibling_is_not_echoed(tmp_path: Path) -> None:
    path = write(tmp_path, '[kafka]\nsasl_password = "pw-9"\nbogus = "pw-10"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "pw-9" not in str(info.value) and "pw-10" not in str(info.value)


def test_init_size_default_and_bound(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "[model]\nn_clusters = 500\nbatch_size = 256\n"))
    assert s.model.effective_init_size == 1500
    with pytest.raises(ConfigError, match="init_size"):
        load_settings(write(tmp_path, "[model]\nn_clusters = 10\ninit_size = 5\n"))


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAMKM_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "streamkm.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        check=False,
    )


def test_cli_config_show_redacts_and_bad_config_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, '[kafka]\nsasl_password = "pw-cli-1"\n[model]\nn_clusters = 3\n')
    ok = _cli("config", "show", "--config", str(path))
    assert ok.returncode == 0, ok.stderr
    assert "n_clusters = 3" in ok.stdout and "pw-cli-1" not in ok.stdout + ok.stderr
    assert f'sasl_password = "{REDACTED}"' in ok.stdout

    bad = _cli("config", "show", "--config", str(path), env={"STREAMKM_MODEL__N_CLUSTERS": "-1"})
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in bad.stderr
    assert lines[0].startswith("streamkm: config error: model.n_clusters")
    assert "STREAMKM_MODEL__N_CLUSTERS" in lines[0]


def test_cli_help_lists_commands() -> None:
    out = _cli("--help")
    assert out.returncode == 0
    for command in ("run", "config", "broker", "checkpoint", "produce", "demo"):
        assert command in out.stdout


def test_client_limits_follow_the_input_limit_and_can_be_overridden() -> None:
    from streamkm.kafka import consumer_config, producer_config

    def noop(*args: Any) -> None:
        return None

    s = Settings.model_validate({"input": {"max_message_bytes": 8_000_000}})
    prod = producer_config(s, noop, noop)
    # A dead letter carries the whole input plus its headers.
    assert prod["message.max.bytes"] >= 8_000_000 + 32 * 1024
    assert (
        Settings().input.max_message_bytes + 32 * 1024
        <= producer_config(Settings(), noop, noop)["message.max.bytes"]
    )
    assert consumer_config(s, noop, None)["topic.metadata.refresh.interval.ms"] == 10_000
    s = Settings.model_validate(
        {"kafka": {"client": {"topic.metadata.refresh.interval.ms": 60_000}}}
    )
    assert consumer_config(s, noop, None)["topic.metadata.refresh.interval.ms"] == 60_000


def test_checkpoint_when_lost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().checkpoint.when_lost == "new-model"  # as before the setting existed
    monkeypatch.setenv("STREAMKM_CHECKPOINT__WHEN_LOST", "stop")
    assert load_settings(None).checkpoint.when_lost == "stop"
    monkeypatch.setenv("STREAMKM_CHECKPOINT__WHEN_LOST", "restore-from-model-topic")
    with pytest.raises(ConfigError, match=r"needs kafka\.model_topic"):
        load_settings(None)  # the model topic is where the model comes from
    path = write(tmp_path, '[kafka]\nmodel_topic = "models"\n')
    assert load_settings(path).checkpoint.when_lost == "restore-from-model-topic"
    monkeypatch.setenv("STREAMKM_CHECKPOINT__WHEN_LOST", "guess")
    with pytest.raises(ConfigError, match=r"^checkpoint\.when_lost: .*STREAMKM_CHECKPOINT__"):
        load_settings(path)
    monkeypatch.delenv("STREAMKM_CHECKPOINT__WHEN_LOST")
    shown = _cli("config", "show", "--config", str(path))
    assert shown.returncode == 0 and 'when_lost = "new-model"' in shown.stdout
