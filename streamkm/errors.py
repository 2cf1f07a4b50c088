"""The exception tree of streamkm: one root, a few specific children."""

from __future__ import annotations


class StreamkmError(Exception):
    """Root of every error streamkm raises on purpose."""


class ConfigError(StreamkmError):
    """A setting is missing, unknown or of the wrong type or value."""


class DecodeError(StreamkmError, ValueError):
    """A message could not be turned into a feature vector.

    Parameters
    ----------
    reason : str
        A short machine-readable code (``"undecodable"``, ``"wrong_dim"``, ``"non_finite"``,
        ``"empty"``, ``"oversized"``, ``"bad_shape"``), used as a metric label and a
        dead-letter header.
    message : str
        A human-readable explanation.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class CorruptFileError(StreamkmError, ValueError):
    """A model or checkpoint file is truncated, corrupt or of an unknown format."""


class CheckpointError(StreamkmError):
    """A checkpoint could not be written, or none that fits could be read."""


class RestoreError(StreamkmError):
    """A model could not be restored from the model topic (none there, or not a fitting one)."""


class KafkaClientError(StreamkmError):
    """A Kafka operation failed; ``code`` keeps librdkafka's error code when there is one.

    (Named apart from confluent-kafka's ``KafkaError``, which is an error *code* object.)
    """

    def __init__(self, message: str, code: int | None = None, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.fatal = fatal


# The name before 0.2, kept so code written against 0.1 still imports.
KafkaError = KafkaClientError


class FencedError(KafkaClientError):
    """Another instance with the same transactional id took over; this one must stop."""


class BrokerError(StreamkmError):
    """The local Apache Kafka broker could not be fetched, started or stopped."""


class NotFittedError(StreamkmError, ValueError, AttributeError):
    """The model is used before it has seen any data."""


class StateError(StreamkmError, ValueError):
    """A saved model state does not describe a valid model, or not the one expected."""
