"""Small helpers the integration tests share: topics, producing and draining."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
)


def create_topic(
    bootstrap: str, name: str, partitions: int = 1, config: dict[str, str] | None = None
) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})]
    )
    futures[name].result(timeout=30)
    # Wait until every partition has a leader, so the first produce does not race it.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        md = admin.list_topics(topic=name, timeout=5).topics.get(name)
        if (
            md is not None
            and md.error is None
            and len(md.partitions) == partitions
            and all(p.leader >= 0 for p in md.partitions.values())
        ):
            return
        time.sleep(0.1)
    raise TimeoutError(f"topic {name} has no leaders after 30s")


def produce_values(
    bootstrap: str,
    topic: str,
    values: list[bytes | None],
    keys: list[bytes | None] | None = None,
    partition: int | None = None,
    headers: list[Any] | None = None,
    config: dict[str, Any] | None = None,
) -> list[tuple[int, int]]:
    """Produce ``values`` in order; return their (partition, offset), checked delivered.

    ``headers`` holds one header list (or None) per value; names may be bytes, which
    librdkafka sends as they are (valid UTF-8 or not). ``config`` adds producer properties.
    """
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True}
        | (config or {})
    )
    delivered: list[tuple[int, int] | None] = [None] * len(values)
    failures: list[str] = []

    def report(index: int) -> Any:
        def cb(err: Any, msg: Message) -> None:
            if err is not None:
                failures.append(str(err))
            else:
                delivered[index] = (msg.partition(), msg.offset())

        return cb

    for i, value in enumerate(values):
        kwargs: dict[str, Any] = {"value": value, "on_delivery": report(i)}
        if keys is not None:
            kwargs["key"] = keys[i]
        if partition is not None:
            kwargs["partition"] = partition
        if headers is not None and headers[i] is not None:
            kwargs["headers"] = headers[i]
        while True:
            try:
                producer.produce(topic, **kwargs)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    remaining = producer.flush(60)
    assert remaining == 0 and not failures, f"undelivered: {remaining}, errors: {failures[:3]}"
    return [d for d in delivered if d is not None]


def drain(
    bootstrap: str,
    topic: str,
    expected: int | None = None,
    timeout_s: float = 60.0,
    isolation: str = "read_committed",
    idle_s: float = 3.0,
) -> list[Message]:
    """Read a topic from the beginning until ``expected`` records (or ``idle_s`` of silence)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"drain-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": isolation,
        }
    )
    md = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, 0) for p in md.partitions])
    out: list[Message] = []
    deadline = time.monotonic() + timeout_s
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            if expected is not None and len(out) >= expected:
                # Keep reading briefly so that extra (duplicate) records would be seen too.
                if time.monotonic() - last > 1.0:
                    break
            elif expected is None and time.monotonic() - last > idle_s:
                break
            for msg in consumer.consume(1000, 0.2):
                if msg.error() is not None:
                    if msg.error().code() == -191:  # _PARTITION_EOF
                        continue
                    raise KafkaException(msg.error())
                out.append(msg)
                last = time.monotonic()
    finally:
        consumer.close()
    return out


def set_topic_config(bootstrap: str, topic: str, **config: str) -> None:
    """Change topic settings (``set_topic_config(b, t, **{"max.message.bytes": "2000"})``)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    entries = [
        ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in config.items()
    ]
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=entries)
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)


def add_partitions(bootstrap: str, topic: str, total: int) -> None:
    """Grow ``topic`` to ``total`` partitions and wait until each has a leader."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_partitions([NewPartitions(topic, total)])[topic].result(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        md = admin.list_topics(topic=topic, timeout=5).topics.get(topic)
        if (
            md is not None
            and len(md.partitions) == total
            and all(p.leader >= 0 for p in md.partitions.values())
        ):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{topic} did not reach {total} partitions with leaders in 30s")


class TcpProxy:
    """Forward a local port to ``target`` once :meth:`open` is called; refuse until then.

    A client bootstrapping through the port finds no broker until the proxy opens (the
    broker's advertised address is direct, so only the bootstrap goes through it).
    """

    def __init__(self, target: str, port: int) -> None:
        host, _, p = target.rpartition(":")
        self.target = (host, int(p))
        self.port = port
        self._server: socket.socket | None = None
        self._stop = threading.Event()

    def open(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        server.settimeout(0.2)
        self._server = server
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()


def produce_with_raw_header_names(
    bootstrap: str, topic: str, value: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """Produce one record whose header names are the given bytes, valid UTF-8 or not.

    confluent-kafka turns a ``bytes`` header name into its ``str()``; a C or Go producer sends
    any bytes. This goes to the librdkafka that confluent-kafka ships, through ctypes and
    ``rd_kafka_produceva`` (a non-variadic call), as such a producer would.
    """
    import ctypes
    import glob

    import confluent_kafka

    libs = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
    lib = ctypes.CDLL(sorted(glob.glob(str(libs / "librdkafka*.so*")))[0])
    lib.rd_kafka_conf_new.restype = ctypes.c_void_p
    lib.rd_kafka_conf_set.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                                      ctypes.c_char_p, ctypes.c_size_t]  # fmt: skip
    lib.rd_kafka_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]

    class _Header(ctypes.Structure):
        _fields_ = [("name", ctypes.c_char_p), ("val", ctypes.c_void_p), ("size", ctypes.c_ssize_t)]

    class _Mem(ctypes.Structure):
        _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t)]

    class _U(ctypes.Union):
        _fields_ = [("cstr", ctypes.c_char_p), ("mem", _Mem), ("header", _Header),
                    ("i", ctypes.c_int), ("pad", ctypes.c_char * 64)]  # fmt: skip

    class _Vu(ctypes.Structure):
        _fields_ = [("vtype", ctypes.c_int), ("u", _U)]

    vtype_topic, vtype_value, vtype_msgflags, vtype_header = 1, 4, 7, 9
    msg_f_copy = 0x2
    err = ctypes.create_string_buffer(512)
    conf = lib.rd_kafka_conf_new()
    for k, v in (("bootstrap.servers", bootstrap), ("linger.ms", "0")):
        assert lib.rd_kafka_conf_set(conf, k.encode(), v.encode(), err, 512) == 0, err.value
    rk = lib.rd_kafka_new(0, conf, err, 512)  # RD_KAFKA_PRODUCER
    assert rk, err.value
    lib.rd_kafka_produceva.restype = ctypes.c_void_p
    lib.rd_kafka_produceva.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    lib.rd_kafka_flush.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.rd_kafka_outq_len.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
    keep: list[Any] = []  # buffers must outlive the call
    vus = (_Vu * (3 + len(headers)))()
    vus[0].vtype, vus[0].u.cstr = vtype_topic, topic.encode()
    buf = ctypes.create_string_buffer(value, len(value))
    keep.append(buf)
    vus[1].vtype = vtype_value
    vus[1].u.mem = _Mem(ctypes.cast(buf, ctypes.c_void_p), len(value))
    vus[2].vtype, vus[2].u.i = vtype_msgflags, msg_f_copy
    for j, (name, hval) in enumerate(headers):
        vbuf = ctypes.create_string_buffer(hval, len(hval))
        keep.append(vbuf)
        vus[3 + j].vtype = vtype_header
        vus[3 + j].u.header = _Header(name, ctypes.cast(vbuf, ctypes.c_void_p), len(hval))
    try:
        assert not lib.rd_kafka_produceva(rk, vus, len(vus)), "rd_kafka_produceva failed"
        assert lib.rd_kafka_flush(rk, 30_000) == 0 and lib.rd_kafka_outq_len(rk) == 0
    finally:
        lib.rd_kafka_destroy(rk)
