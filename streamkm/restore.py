"""A lost checkpoint volume: restoring the newest model published on ``kafka.model_topic``.

Every checkpoint publishes the model's public state to the compacted model topic (keyed by
the group id, see :func:`streamkm.records.model_record`): version, samples seen, centroids and
counts. When the checkpoint directory lost its files while the group has committed offsets,
``checkpoint.when_lost = "restore-from-model-topic"`` makes the daemon go on from that record
instead of starting a new model:

* :func:`read_newest_model` reads the newest record of the group from the topic (scanning
  each partition backwards from its end, so a long uncompacted tail is not read in full);
* :func:`model_from_record` checks it against ``model.n_clusters`` and ``input.dim`` and
  builds a :class:`~streamkm.model.StreamingKMeans` from it through the model's own state
  format;
* :func:`calibrated` re-estimates, from the first batch after the restore, what the record
  does not hold and the anomaly score needs: each cluster's spread.

Not in the record, hence not restored: the weighted sample the centroids are refined on (it
fills again from the input; the first refinement waits until it could be full), the clusters'
spreads (re-estimated from the first batch), the inertia history, the refinement count and
the random generator's state.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
from confluent_kafka import KafkaError as _CKafkaError
from confluent_kafka import KafkaException, TopicPartition

from streamkm.config import Settings
from streamkm.errors import RestoreError, StateError
from streamkm.kafka import admin_config, make_consumer, to_error
from streamkm.learner import learner_from_settings
from streamkm.model import scoring
from streamkm.model.scoring import CLIP
from streamkm.model.state import STATE_VERSION

TopicPart = tuple[str, int]

READ_TIMEOUT_S = 15.0
_FIRST_WINDOW = 16  # records read back from the end of a partition, then 4 times more
NOT_RESTORED = (
    "the sample the centroids are refined on (it fills again from the input), the clusters' "
    "spreads (re-estimated from the first batch), the inertia history and the random state"
)


def read_newest_model(settings: Settings, timeout_s: float = READ_TIMEOUT_S) -> bytes | None:
    """The value of the newest record keyed by ``kafka.group_id`` in ``kafka.model_topic``.

    Returns None when the topic holds no record of the group.

    Raises
    ------
    RestoreError
        The topic does not exist, or could not be read within ``timeout_s``.
    KafkaClientError
        A Kafka call failed.
    """
    k = settings.kafka
    topic = k.model_topic
    if topic is None:
        raise RestoreError("kafka.model_topic is not set")
    key = k.group_id.encode()
    consumer = make_consumer(
        {
            **admin_config(settings),
            # Never joins the group nor commits: assign() only.
            "group.id": f"{k.group_id}-model-reader",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    deadline = time.monotonic() + timeout_s
    try:
        # All topics, not this one by name: naming it could create it.
        md = consumer.list_topics(timeout=timeout_s).topics.get(topic)
        if md is None or md.error is not None or not md.partitions:
            raise RestoreError(f"the model topic {topic} does not exist")
        newest: tuple[float, bytes] | None = None
        for p in sorted(md.partitions):
            value = _newest_in_partition(consumer, topic, p, key, deadline)
            if value is None:
                continue
            when = _created_at(value)
            if newest is None or when > newest[0]:
                newest = (when, value)
        return None if newest is None else newest[1]
    except KafkaException as exc:
        raise to_error(exc, f"reading the model topic {topic}") from None
    finally:
        consumer.close()


def _newest_in_partition(
    consumer: Any, topic: str, partition: int, key: bytes, deadline: float
) -> bytes | None:
    low, end = consumer.get_watermark_offsets(
        TopicPartition(topic, partition), timeout=max(0.1, deadline - time.monotonic())
    )
    window = _FIRST_WINDOW
    while end > low:
        start = max(low, end - window)
        consumer.assign([TopicPartition(topic, partition, start)])
        found: bytes | None = None
        done = False
        while not done:
            if time.monotonic() > deadline:
                raise RestoreError(f"reading {topic}[{partition}] took too long")
            for m in consumer.consume(500, 0.2):
                err = m.error()
                if err is not None:
                    if err.code() == _CKafkaError._PARTITION_EOF:
                        done = True
                        continue
                    raise to_error(KafkaException(err), f"reading {topic}[{partition}]")
                if m.offset() >= end:
                    done = True
                elif m.key() == key:
                    found = m.value()
        if found is not None:
            return found
        end, window = start, window * 4
    return None


def _created_at(value: bytes) -> float:
    try:
        return float(json.loads(value).get("created_at", 0.0))
    except (ValueError, TypeError, AttributeError):
        return 0.0


def model_from_record(value: bytes | None, settings: Settings) -> tuple[Any, dict[str, Any]]:
    """A model built from a model record, and the record's parsed fields.

    The record must match ``model.n_clusters`` and, when set, ``input.dim``.

    Raises
    ------
    RestoreError
        No record, or one that is not a model of the configured shape.
    """
    if value is None:
        raise RestoreError("it holds no model of this group")
    try:
        rec = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        raise RestoreError("its newest record is not JSON") from None
    if not isinstance(rec, dict):
        raise RestoreError("its newest record is not a JSON object")
    try:
        version = _count(rec, "model_version")
        n_seen = _count(rec, "n_samples_seen")
        k, d = _count(rec, "n_clusters"), _count(rec, "dim")
        C = np.asarray(rec["centroids"], dtype=np.float64)
        counts = np.asarray(rec["counts"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise RestoreError(f"its newest record is not a streamkm model ({exc})") from None
    if C.shape != (k, d) or counts.shape != (k,) or k < 1 or d < 1:
        raise RestoreError(
            f"its newest record has centroids of shape {C.shape} and counts of shape "
            f"{counts.shape}, for n_clusters {k} and dim {d}"
        )
    if not (np.isfinite(C).all() and np.isfinite(counts).all() and (counts >= 0).all()):
        raise RestoreError("its newest record holds centroids or counts that are not finite")
    want_k, want_d = settings.model.n_clusters, settings.input.dim
    if k != want_k:
        raise RestoreError(f"its newest model has {k} clusters but model.n_clusters is {want_k}")
    if want_d is not None and d != want_d:
        raise RestoreError(f"its newest model has dimension {d} but input.dim is {want_d}")
    try:
        model = _build(settings, version, n_seen, C, counts)
    except StateError as exc:
        raise RestoreError(f"its newest model cannot be rebuilt: {exc}") from None
    fields: dict[str, Any] = {
        "model_version": version,
        "n_samples_seen": n_seen,
        "n_clusters": k,
        "dim": d,
        "created_at": rec.get("created_at"),
    }
    return model, fields


def _count(rec: dict[str, Any], name: str) -> int:
    value = rec[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} is not a number")
    if not (math.isfinite(value) and value >= 0 and float(value).is_integer()):
        raise ValueError(f"{name} = {value} is not a count")
    return int(value)


def _build(settings: Settings, version: int, n_seen: int, C: np.ndarray, counts: np.ndarray) -> Any:
    """The model as the record describes it, through the estimator's own state format."""
    template = learner_from_settings(settings).estimator  # the configured, unfitted model
    k, d = C.shape
    dtype = np.dtype(template.dtype)
    arrays: dict[str, np.ndarray] = {}
    params: dict[str, Any] = {}
    for name, v in template.get_params(deep=False).items():
        if name == "init" and not isinstance(v, str):
            params[name] = None
            arrays["init"] = np.asarray(v)
        elif name == "dtype":
            params[name] = np.dtype(v).name
        elif isinstance(v, np.integer):
            params[name] = int(v)
        elif isinstance(v, np.floating):
            params[name] = float(v)
        else:
            params[name] = v
    total = float(counts.sum())
    weights = counts / total if total > 0 else np.full(k, 1.0 / k)
    centre = weights @ C
    # Placeholders until the first batch calibrates the spreads (see calibrated()).
    spread = float(weights @ ((C - centre) ** 2).sum(axis=1)) / k
    arrays.update(
        centroids=C.astype(dtype),
        counts=counts.copy(),
        sse=np.zeros(k),
        sse2=np.zeros(k),
        recent=np.zeros(k),
        shift=centre.astype(dtype),
        sample_rows=np.empty((0, d), dtype=dtype),
        sample_lw=np.empty(0),
        sample_lq=np.empty(0),
        sample_free=np.empty(0, dtype=np.int64),
    )
    seed = settings.model.seed
    meta = {
        "class": type(template).__name__,
        "state_version": STATE_VERSION,
        "params": params,
        "n_clusters": k,
        "dim": d,
        "dtype": dtype.name,
        "n_samples_seen": n_seen,
        "n_steps": version,
        "inertia": None,
        "inertia_ewma": None,
        "last_shift": 0.0,
        "scale0": spread if spread > 0 else 1.0,
        # The sample starts empty: refine once it could be full again, not on one batch.
        "next_refine": n_seen + max(settings.model.batch_size, settings.model.sample_size),
        "n_refines": 0,
        "sample": {"used": 0, "n_free": 0, "tau": None},
        "rng_state": np.random.default_rng(seed).bit_generator.state,
    }
    return type(template).from_state(meta, arrays)


def calibrated(model: Any, X: np.ndarray) -> Any:
    """``model`` with each cluster's spread estimated from the batch ``X`` (n, d).

    The record holds no spreads; without them every anomaly score of the restored model
    would be meaningless. A cluster without rows in the batch takes the batch's mean.
    """
    if not len(X):
        return model
    D = np.asarray(model.transform(X), dtype=np.float64)
    labels = D.argmin(axis=1)
    d2 = D[np.arange(len(X)), labels] ** 2
    overall = float(d2.mean())
    if not overall > 0:
        return model
    meta, arrays = model.to_state()
    k = D.shape[1]
    n = np.bincount(labels, minlength=k).astype(np.float64)
    clipped = np.minimum(d2, CLIP * overall)
    sums = np.bincount(labels, weights=clipped, minlength=k)
    squares = np.bincount(labels, weights=clipped * clipped, minlength=k)
    per = np.where(n > 0, sums / np.maximum(n, 1.0), overall)
    counts = np.asarray(arrays["counts"], dtype=np.float64)
    arrays["sse"] = counts * per
    # second moments too (the score's dispersion); a cluster without rows: a Gaussian's
    gaussian = scoring.gaussian_sse2(counts, arrays["sse"], X.shape[1])
    arrays["sse2"] = np.where(n > 0, counts * squares / np.maximum(n, 1.0), gaussian)
    meta["scale0"] = overall
    return type(model).from_state(meta, arrays)


def pause(source: Any, keys: list[TopicPart]) -> None:
    """Stop fetching these partitions of the source's consumer (they stay assigned)."""
    if keys:
        try:
            source.consumer.pause([TopicPartition(t, p) for t, p in keys])
        except KafkaException as exc:
            raise to_error(exc, "pausing the input partitions") from None


def resume(source: Any, keys: list[TopicPart]) -> None:
    """Fetch these partitions again."""
    if keys:
        try:
            source.consumer.resume([TopicPartition(t, p) for t, p in keys])
        except KafkaException as exc:
            raise to_error(exc, "resuming the input partitions") from None


__all__ = [
    "NOT_RESTORED",
    "READ_TIMEOUT_S",
    "calibrated",
    "model_from_record",
    "pause",
    "read_newest_model",
    "resume",
]
