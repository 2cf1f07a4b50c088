"""streamkm: keep a k-means model current over a Kafka stream of feature vectors."""

from __future__ import annotations

from streamkm.errors import (
    CheckpointError,
    ConfigError,
    CorruptFileError,
    DecodeError,
    KafkaClientError,
    StreamkmError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CorruptFileError",
    "DecodeError",
    "KafkaClientError",
    "StreamingKMeans",
    "StreamkmError",
    "__version__",
]


def __getattr__(name: str) -> object:
    # Importing the model pulls in numba; keep `import streamkm` (and the CLI) light.
    if name == "StreamingKMeans":
        from streamkm.model import StreamingKMeans

        return StreamingKMeans
    raise AttributeError(f"module 'streamkm' has no attribute {name!r}")
