"""A local single-node Apache Kafka (KRaft) for the demo and the tests.

The broker is the official Apache Kafka build: the ``org.apache.kafka:kafka_2.13`` artifacts
and their dependencies from Maven Central, fetched once with ``mvn`` into
``~/.cache/streamkm/kafka-<version>/libs`` and run with Java 17+. A broker's directory holds
its settings, data, log and pid file, so ``stop`` followed by ``start`` on the same directory
brings the same topics back.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamkm.errors import BrokerError

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
# Kafka 4.x logs through log4j2; these make its jars complete and quiet.
_LOG4J_VERSION = "2.24.3"
_SLF4J_VERSION = "2.0.17"

DEFAULT_PORT = 9092
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


def cache_dir() -> Path:
    """Where fetched jars live (``$STREAMKM_CACHE_DIR`` or ``~/.cache/streamkm``)."""
    root = os.environ.get("STREAMKM_CACHE_DIR") or Path.home() / ".cache" / "streamkm"
    return Path(root)


def default_broker_dir(port: int) -> Path:
    """The data directory used when ``--dir`` is not given."""
    return cache_dir() / f"broker-{port}"


_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>io.streamkm</groupId>
  <artifactId>local-kafka</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>{slf4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <File name="file" fileName="{log}">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="file"/></Root>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="org.apache.kafka.clients" level="WARN"/>
  </Loggers>
</Configuration>
"""


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise BrokerError(
            f"{tool} is not installed; the local Apache Kafka needs it "
            f"(on Debian/Ubuntu: apt-get install {package})"
        )
    return path


def ensure_kafka_jars(version: str = KAFKA_VERSION) -> Path:
    """Fetch Apache Kafka's jars from Maven Central once; return the directory holding them."""
    home = cache_dir() / f"kafka-{version}"
    libs = home / "libs"
    done = home / ".complete"
    if done.exists():
        return libs
    mvn = _need("mvn", "maven")
    _need("java", "openjdk-17-jre-headless")
    home.mkdir(parents=True, exist_ok=True)
    pom = home / "pom.xml"
    pom.write_text(_POM.format(kafka=version, slf4j=_SLF4J_VERSION, log4j=_LOG4J_VERSION))
    staging = home / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    print(f"fetching Apache Kafka {version} from Maven Central into {home} ...", file=sys.stderr)
    proc = subprocess.run(
        [
            mvn, "-B", "-q", "-f", str(pom), "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}", "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise BrokerError("mvn could not fetch Apache Kafka:\n" + "\n".join(tail))
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    done.write_text(version)
    return libs


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for brokers, metrics and tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ScramUser:
    """A SASL/SCRAM user created when the broker's storage is formatted."""

    name: str
    password: str
    mechanism: str = "SCRAM-SHA-256"


@dataclass
class LocalBroker:
    """A single-node Apache Kafka in KRaft mode, listening on 127.0.0.1.

    Parameters
    ----------
    dir : Path
        The broker's own directory (settings, data, log, pid file).
    port : int
        The PLAINTEXT listener.
    sasl_port : int or None
        An extra SASL_PLAINTEXT listener with SCRAM-SHA-256/512 and PLAIN, if given.
    scram_users : tuple of ScramUser
        Users created at format time (used with ``sasl_port``).
    """

    dir: Path
    port: int = DEFAULT_PORT
    sasl_port: int | None = None
    scram_users: tuple[ScramUser, ...] = ()
    heap: str = "768m"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str | None:
        return None if self.sasl_port is None else f"127.0.0.1:{self.sasl_port}"

    @property
    def pid_file(self) -> Path:
        return self.dir / "broker.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / "logs" / "server.log"

    @property
    def _state_file(self) -> Path:
        return self.dir / "broker.json"

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """Start the broker (if not running) and wait until it answers metadata requests.

        Returns
        -------
        str
            The bootstrap address ``host:port``.
        """
        if self.pid() is not None:
            if self.answers():
                return self.bootstrap
            raise BrokerError(f"a broker process runs from {self.dir} but does not answer")
        # A port another process holds would make this broker die at once while whatever
        # listens there (often another broker) answers in its place: refuse up front.
        for what, port in (("port", self.port), ("SASL port", self.sasl_port)):
            if port is not None:
                _check_port_free(port, what)
        java = _need("java", "openjdk-17-jre-headless")
        libs = ensure_kafka_jars()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        state = self._load_or_create_state()
        _check_port_free(int(str(state["controller_port"])), "controller port", self.dir)
        props = self.dir / "server.properties"
        props.write_text(self._properties(state["controller_port"]))
        log4j = self.dir / "log4j2.xml"
        log4j.write_text(_LOG4J2.format(log=self.log_file))
        classpath = f"{libs}/*"
        jvm = [java, f"-Xmx{self.heap}", "-Xms256m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
               f"-Dlog4j2.configurationFile={log4j}", f"-Dkafka.logs.dir={self.dir / 'logs'}",
               "-cp", classpath]  # fmt: skip
        if not (self.dir / "data" / "meta.properties").exists():
            self._format(jvm, props, state["cluster_id"])
        with open(self.dir / "logs" / "stdout.log", "ab") as out:
            proc = subprocess.Popen(
                [*jvm, "kafka.Kafka", str(props)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # outlives `streamkm broker start`
            )
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise BrokerError(
                    f"Apache Kafka exited with status {proc.returncode}; last log lines:\n"
                    + self._log_tail()
                )
            cluster = cluster_id(self.bootstrap, timeout_s=2.0)
            if cluster is not None:
                if cluster == state["cluster_id"] and proc.poll() is None:
                    return self.bootstrap
                # Another cluster took the port between the check and the start.
                self.stop()
                raise BrokerError(
                    f"port {self.port} is answered by another Kafka cluster ({cluster}), "
                    f"not the one in {self.dir}; choose another --port or stop that broker"
                )
            time.sleep(0.25)
        self.stop()
        raise BrokerError(
            f"Apache Kafka did not answer within {timeout_s:.0f}s:\n{self._log_tail()}"
        )

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> bool:
        """Stop the broker cleanly (SIGTERM, then SIGKILL after ``timeout_s``).

        Returns whether a broker was running.
        """
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            log.warning("broker pid %d ignored SIGTERM for %.0fs; killing it", pid, timeout_s)
            os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
        return True

    def pid(self) -> int | None:
        """The broker's pid if it runs, else None (a stale pid file is removed)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if _alive(pid) and _is_kafka(pid):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def answers(self, timeout_s: float = 5.0) -> bool:
        """Whether the broker answers a metadata request."""
        return broker_answers(self.bootstrap, timeout_s)

    # -- internals -----------------------------------------------------------------------

    def _load_or_create_state(self) -> dict[str, object]:
        if self._state_file.exists():
            state: dict[str, object] = json.loads(self._state_file.read_text())
        else:
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            state = {"cluster_id": cluster_id, "controller_port": free_port()}
            self._state_file.write_text(json.dumps(state))
        return state

    def _properties(self, controller_port: object) -> str:
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
        extra: list[str] = []
        if self.sasl_port is not None:
            listeners.append(f"SASL://127.0.0.1:{self.sasl_port}")
            protocols.append("SASL:SASL_PLAINTEXT")
            plain_users = " ".join(f'user_{u.name}="{u.password}"' for u in self.scram_users)
            extra += [
                "listener.name.sasl.sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512,PLAIN",
                "listener.name.sasl.scram-sha-256.sasl.jaas.config="
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                "listener.name.sasl.scram-sha-512.sasl.jaas.config="
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                "listener.name.sasl.plain.sasl.jaas.config="
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain_users};",
            ]
        return "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
                f"listeners={','.join(listeners)},CONTROLLER://127.0.0.1:{controller_port}",
                f"advertised.listeners={','.join(listeners)}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                f"listener.security.protocol.map={','.join(protocols)}",
                f"log.dirs={self.dir / 'data'}",
                "num.partitions=1",
                "auto.create.topics.enable=true",
                # Single node: replication 1 everywhere, so groups and transactions work.
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=10",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "transaction.state.log.num.partitions=10",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "min.insync.replicas=1",
                # Consumer groups join at once instead of waiting for more members.
                "group.initial.rebalance.delay.ms=0",
                "transaction.abort.timed.out.transaction.cleanup.interval.ms=10000",
                "log.retention.hours=168",
                *extra,
                "",
            ]
        )

    def _format(self, jvm: list[str], props: Path, cluster_id: object) -> None:
        cmd = [*jvm, "kafka.tools.StorageTool", "format",
               f"--cluster-id={cluster_id}", f"--config={props}"]  # fmt: skip
        for user in self.scram_users:
            for mech in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                cmd.append(f"--add-scram={mech}=[name={user.name},password={user.password}]")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            # The output may echo SCRAM passwords; show only the first line of the error.
            first = (proc.stderr or proc.stdout).strip().splitlines()[:1]
            raise BrokerError(f"formatting the broker storage failed: {' '.join(first)}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        with contextlib.suppress(FileNotFoundError):
            text += (self.dir / "logs" / "stdout.log").read_text(errors="replace")
        return "\n".join(text.strip().splitlines()[-lines:])


def _check_port_free(port: int, what: str = "port", where: Path | None = None) -> None:
    """Raise BrokerError if something listens on 127.0.0.1:``port`` (as Kafka would bind it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the JVM does
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            hint = (
                f" (kept in {where / 'broker.json'}; delete that file to pick a new one)"
                if where is not None
                else "; choose another with --port, or stop what listens there"
            )
            raise BrokerError(
                f"cannot start the broker: {what} {port} on 127.0.0.1 is in use by another "
                f"process ({exc.strerror or exc}){hint}"
            ) from exc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; look at its state where /proc tells.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _is_kafka(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"kafka.Kafka" in fh.read()
    except OSError:
        return True  # no /proc: trust the pid file


def cluster_id(
    bootstrap: str, timeout_s: float = 5.0, conf: dict[str, object] | None = None
) -> str | None:
    """The id of the cluster answering at ``bootstrap``, or None if none answers in time."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    settings: dict[str, Any] = {"bootstrap.servers": bootstrap, "log_level": 0, **(conf or {})}
    try:
        md = AdminClient(settings).list_topics(timeout=timeout_s)
    except KafkaException:
        return None
    return str(md.cluster_id) if md.brokers else None


def broker_answers(
    bootstrap: str, timeout_s: float = 5.0, conf: dict[str, object] | None = None
) -> bool:
    """Whether the cluster at ``bootstrap`` answers a metadata request within ``timeout_s``."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    settings: dict[str, Any] = {"bootstrap.servers": bootstrap, "log_level": 0, **(conf or {})}
    admin = AdminClient(settings)
    try:
        md = admin.list_topics(timeout=timeout_s)
    except KafkaException:
        return False
    return bool(md.brokers)
