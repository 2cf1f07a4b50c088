"""Settings: one frozen pydantic-settings model read from TOML with environment overrides.

Sources, strongest first: values passed in code, environment variables
``STREAMKM_<SECTION>__<KEY>`` (for example ``STREAMKM_MODEL__N_CLUSTERS=16``), the TOML file
given with ``--config``, and the defaults below. Every error is reported as one line naming
the key and where its value came from; secrets are held as :class:`pydantic.SecretStr` and
never printed.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from streamkm.codec import Format
from streamkm.errors import ConfigError

ENV_PREFIX = "STREAMKM_"
ENV_DELIMITER = "__"
REDACTED = "**********"

ClientValue = str | int | float | bool


_SECRET_MARKERS = ("password", "secret", "passphrase", "key.pem", "oauthbearer.config")


def is_secret_property(name: str) -> bool:
    """Whether a librdkafka property holds a secret (its value is never shown).

    Passwords, secrets and passphrases, inline private keys (``ssl.key.pem``,
    ``sasl.oauthbearer.assertion.private.key.pem``) and the OAUTHBEARER config string.
    """
    lowered = name.lower()
    return any(marker in lowered for marker in _SECRET_MARKERS)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    """``[kafka]``: where to read and write, and extra librdkafka properties."""

    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "streamkm"
    input_topic: str = "vectors"
    output_topic: str = "assignments"
    dead_letter_topic: str | None = None
    model_topic: str | None = None
    # Shared-model mode: the single-partition topic every instance of the group writes its
    # deltas to and folds in order (unset: each instance keeps its own model).
    sync_topic: str | None = None
    # At-least-once: deltas of this long are merged into one record per partition.
    sync_interval_ms: int = Field(default=200, ge=0)
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    client: dict[str, ClientValue | SecretStr] = Field(default_factory=dict)

    @field_validator("bootstrap_servers", "group_id", "input_topic", "output_topic")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("client", mode="before")
    @classmethod
    def _hide_client_secrets(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        out: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(item, dict | list):
                raise ValueError(f"property {key!r} must be a string, number or boolean")
            if is_secret_property(str(key)) and not isinstance(item, SecretStr):
                item = SecretStr(str(item))
            out[str(key)] = item
        return out


class InputSettings(_Section):
    """``[input]``: how input messages encode a vector."""

    format: Format = "json"
    json_field: str | None = None
    dim: int | None = Field(default=None, ge=1)
    max_message_bytes: int = Field(default=1_048_576, ge=1)


class ModelSettings(_Section):
    """``[model]``: the k-means model and its mini-batches."""

    n_clusters: int = Field(default=8, ge=1)
    batch_size: int = Field(default=1024, ge=1)
    max_batch_wait_ms: int = Field(default=500, ge=1)
    init: str = "k-means++"
    init_size: int | None = Field(default=None, ge=1)
    half_life: float | None = Field(default=None, gt=0)
    reassignment_ratio: float = Field(default=0.01, ge=0)
    sample_size: int = Field(default=32768, ge=0)
    seed: int | None = Field(default=None, ge=0)

    @field_validator("init")
    @classmethod
    def _known_init(cls, value: str) -> str:
        if value in ("k-means++", "random"):
            return value
        if not value.endswith(".npy"):
            raise ValueError('must be "k-means++", "random" or the path of a .npy file')
        return value

    @model_validator(mode="after")
    def _init_holds_enough(self) -> ModelSettings:
        if self.init_size is not None and self.init_size < self.n_clusters:
            raise ValueError(
                f"init_size ({self.init_size}) must be >= n_clusters ({self.n_clusters})"
            )
        return self

    @property
    def effective_init_size(self) -> int:
        """How many vectors seed the model: ``init_size``, else max(batch_size, 3·n_clusters).

        The daemon's one rule (the estimator's own default, for library use, is scikit-learn's
        3·batch_size). Given centroids (a ``.npy`` init) need no seeding buffer: the first batch
        is then a normal one, of at least n_clusters rows.
        """
        if self.init.endswith(".npy"):
            return max(self.batch_size, self.n_clusters)
        if self.init_size is not None:
            return self.init_size
        return max(self.batch_size, 3 * self.n_clusters)


class CheckpointSettings(_Section):
    """``[checkpoint]``: where and how often the model and offsets are saved."""

    dir: Path = Path("checkpoints")
    interval_s: float = Field(default=30.0, gt=0)
    # Also checkpoint after this many batches (unset: on the interval only).
    every_batches: int | None = Field(default=None, ge=1)
    keep: int = Field(default=3, ge=1)
    # The directory has no checkpoint but the group has committed offsets (a lost volume):
    # "new-model" starts a new model from those offsets (with an error in the log),
    # "restore-from-model-topic" goes on from the newest model in kafka.model_topic, "stop"
    # exits with status 1.
    when_lost: Literal["new-model", "restore-from-model-topic", "stop"] = "new-model"


class TopicsSettings(_Section):
    """``[topics]``: the output topics the daemon creates when they are missing."""

    create: bool = True
    # Partitions of a created topic; unset: as many as the input topic has.
    partitions: int | None = Field(default=None, ge=1)
    # -1: the brokers' default.
    replication_factor: int = Field(default=-1, ge=-1)
    # Topic configurations of created topics (the model topic is always compacted).
    output: dict[str, str] = Field(default_factory=dict)
    dead_letter: dict[str, str] = Field(default_factory=dict)
    model: dict[str, str] = Field(default_factory=dict)


class MetricsSettings(_Section):
    """``[metrics]``: the Prometheus endpoint (``/metrics``, ``/healthz``, ``/readyz``)."""

    host: str = "0.0.0.0"
    port: int = Field(default=9464, ge=0, le=65535)


class DeliverySettings(_Section):
    """``[delivery]``: at-least-once (default) or exactly-once through Kafka transactions."""

    guarantee: Literal["at-least-once", "exactly-once"] = "at-least-once"
    instance_id: str = "0"
    # Exactly-once: batches go into one transaction until it is this old (0: one per batch).
    transaction_ms: int = Field(default=100, ge=0)


class LogSettings(_Section):
    """``[log]``: log level and line format."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class Settings(BaseSettings):
    """Every setting of streamkm; see ``config.example.toml`` for each key."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        case_sensitive=False,
        extra="forbid",
        frozen=True,
    )
    toml_file: ClassVar[Path | None] = None

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    input: InputSettings = Field(default_factory=InputSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    topics: TopicsSettings = Field(default_factory=TopicsSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_file))
        return tuple(sources)

    @model_validator(mode="after")
    def _restore_needs_a_model_topic(self) -> Settings:
        if self.checkpoint.when_lost == "restore-from-model-topic" and not self.kafka.model_topic:
            raise ValueError(
                'checkpoint.when_lost = "restore-from-model-topic" needs kafka.model_topic'
            )
        return self

    # -- derived views -------------------------------------------------------------------

    def librdkafka(self) -> dict[str, ClientValue]:
        """Connection properties for every client: bootstrap, SASL and the ``client`` table."""
        conf: dict[str, ClientValue] = {"bootstrap.servers": self.kafka.bootstrap_servers}
        if self.kafka.sasl_username is not None:
            conf["sasl.username"] = self.kafka.sasl_username
        if self.kafka.sasl_password is not None:
            conf["sasl.password"] = self.kafka.sasl_password.get_secret_value()
        for key, value in self.kafka.client.items():
            conf[key] = value.get_secret_value() if isinstance(value, SecretStr) else value
        return conf

    @property
    def transactional_id(self) -> str:
        """Stable per instance, so a restarted instance fences its own zombie."""
        return f"streamkm-{self.kafka.group_id}-{self.delivery.instance_id}"

    def redacted(self) -> dict[str, Any]:
        """All settings as plain data with every secret replaced by ``**********``."""

        def scrub(value: Any) -> Any:
            if isinstance(value, SecretStr):
                return REDACTED
            if isinstance(value, dict):
                return {k: scrub(v) for k, v in value.items()}
            if isinstance(value, Path):
                return str(value)
            return value

        raw = {name: dict(getattr(self, name)) for name in type(self).model_fields}
        return {name: scrub(section) for name, section in raw.items()}


# -- loading with readable errors --------------------------------------------------------


def _env_name(loc: tuple[Any, ...]) -> str:
    return ENV_PREFIX + ENV_DELIMITER.join(str(part) for part in loc).upper()


def _find_env(loc: tuple[Any, ...]) -> str | None:
    """The environment variable that set ``loc`` (or one of its parents), if any."""
    env = {key.upper(): key for key in os.environ}
    for depth in range(len(loc), 0, -1):
        name = _env_name(loc[:depth])
        if name in env:
            return env[name]
    return None


def _where(loc: tuple[Any, ...], path: Path | None) -> str:
    env = _find_env(loc)
    if env is not None:
        return f"environment variable {env}"
    if path is not None:
        return f"config file {path}"
    return "defaults"


def _describe(error: dict[str, Any], path: Path | None) -> str:
    loc = tuple(part for part in error["loc"] if not isinstance(part, int))
    key = ".".join(str(part) for part in loc) or "settings"
    if error["type"] == "extra_forbidden":
        what = "unknown key"
    else:
        # pydantic's text never includes the input value, so secrets cannot leak here.
        what = error["msg"][0].lower() + error["msg"][1:]
    return f"{key}: {what} (from {_where(loc, path)})"


def _check_env_sections() -> None:
    """Refuse ``STREAMKM_<SECTION>__…`` variables whose section does not exist.

    pydantic-settings silently ignores them, and a typo in a section name would then
    run the daemon on a default the user meant to change.
    """
    sections = {name.upper() for name in Settings.model_fields}
    for name in os.environ:
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and ENV_DELIMITER in upper:
            section = upper[len(ENV_PREFIX) :].split(ENV_DELIMITER, 1)[0]
            if section not in sections:
                raise ConfigError(
                    f"{section.lower()}: unknown section (from environment variable {name})"
                )


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read settings from ``path`` (TOML, optional) and the environment.

    Raises
    ------
    ConfigError
        With one line naming the offending key and its source.
    """
    toml_path = Path(path) if path is not None else None
    if toml_path is not None:
        try:
            with open(toml_path, "rb") as fh:
                tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {toml_path} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"config file {toml_path} cannot be read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {toml_path} is not valid TOML: {exc}") from None

    _check_env_sections()

    class _FromFile(Settings):
        toml_file = toml_path

    problem: str | None = None
    try:
        return _FromFile()
    except ValidationError as exc:
        errors = exc.errors(include_input=False)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        problem = _describe(dict(errors[0]), toml_path) + more
    except (ValueError, json.JSONDecodeError) as exc:
        # pydantic-settings parses complex env values as JSON before validation.
        problem = f"environment: {exc}"
    # Raised outside the except block: the original error holds the raw (maybe secret) input
    # and must not travel along as this exception's context.
    raise ConfigError(problem)


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def to_toml(data: dict[str, Any]) -> str:
    """Render settings data (e.g. :meth:`Settings.redacted`) as TOML.

    ``{section: {key: value, table: {key: value}}}``; unset (None) keys become comments.
    """
    lines: list[str] = []
    scalar = _toml_scalar

    for section, values in data.items():
        lines.append(f"[{section}]")
        tables: list[tuple[str, dict[str, Any]]] = []
        for key, value in values.items():
            if isinstance(value, dict):
                tables.append((key, value))
            elif value is None:
                lines.append(f"# {key} = (unset)")
            else:
                lines.append(f"{key} = {scalar(value)}")
        for name, table in tables:
            lines.append("")
            lines.append(f"[{section}.{name}]")
            lines.extend(f"{json.dumps(k)} = {scalar(v)}" for k, v in table.items())
        lines.append("")
    return "\n".join(lines)
