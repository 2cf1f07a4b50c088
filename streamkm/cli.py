"""Command line: argument parsing and logging set-up, nothing else."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from streamkm import __version__
from streamkm.codec import FORMATS
from streamkm.errors import ConfigError, StreamkmError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception text)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once for the whole process (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamkm",
        description="Keep a k-means model current over a Kafka stream of feature vectors.",
    )
    parser.add_argument("--version", action="version", version=f"streamkm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", metavar="FILE", help="TOML settings file (env STREAMKM_* wins)")
        return p

    run = with_config(sub.add_parser("run", help="run the daemon"))
    run.add_argument(
        "--reset-model",
        action="store_true",
        help="start a new model even if the checkpoints hold one of another shape",
    )

    config = sub.add_parser("config", help="inspect settings")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    with_config(
        config_sub.add_parser("show", help="print the effective settings, secrets redacted")
    )

    broker = sub.add_parser("broker", help="a local single-node Apache Kafka for demos and tests")
    broker_sub = broker.add_subparsers(dest="broker_command", metavar="ACTION", required=True)
    for name, text in (
        ("start", "start it (fetching Apache Kafka once) and print host:port"),
        ("stop", "stop it; its data stays in DIR"),
        ("status", "tell whether it runs"),
    ):
        p = broker_sub.add_parser(name, help=text)
        p.add_argument("--port", type=int, default=9092, help="listener port (default 9092)")
        p.add_argument(
            "--dir", type=Path, help="data directory (default ~/.cache/streamkm/broker-PORT)"
        )

    ckpt = sub.add_parser("checkpoint", help="inspect checkpoints")
    ckpt_sub = ckpt.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    show = ckpt_sub.add_parser("show", help="print a checkpoint (a file, or a directory's newest)")
    show.add_argument("path", type=Path)
    show.add_argument("--json", action="store_true", help="print a JSON object")
    export = ckpt_sub.add_parser(
        "export", help="write a checkpoint's model as a file StreamingKMeans.load() opens"
    )
    export.add_argument("path", type=Path, help="a checkpoint file, or a directory's newest")
    export.add_argument("--out", type=Path, help="the model file (.npz)")
    export.add_argument("--centroids", type=Path, help="also (or only) the centroids, as .npy")

    tail = with_config(sub.add_parser("tail", help="print the newest records of a topic"))
    tail.add_argument(
        "topic", nargs="?", help="default: kafka.output_topic (dead letters: --dead-letters)"
    )
    tail.add_argument("--dead-letters", action="store_true", help="the dead-letter topic")
    tail.add_argument("-n", "--count", type=int, default=10, help="records per partition")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new records")

    produce = with_config(sub.add_parser("produce", help="feed vectors to a topic"))
    produce.add_argument(
        "source", nargs="?", default="-", help="FILE.npy, FILE.csv or - (stdin CSV)"
    )
    produce.add_argument("--topic", help="target topic (default: kafka.input_topic)")
    produce.add_argument("--format", choices=FORMATS, help="default: input.format")
    produce.add_argument("--bootstrap", help="bootstrap servers (default: kafka.bootstrap_servers)")
    produce.add_argument(
        "--synthetic-rate", type=float, metavar="N",
        help="instead of a file, send drifting synthetic clusters at N vectors/s until stopped",
    )  # fmt: skip
    produce.add_argument("--dim", type=int, default=16, help="dimension of synthetic vectors")
    produce.add_argument("--count", type=int, help="stop after this many synthetic vectors")
    produce.add_argument(
        "--header", action=argparse.BooleanOptionalAction, default=None,
        help="the first CSV row names the columns (default: detected, a first row that is "
        "not all numbers)",
    )  # fmt: skip
    produce.add_argument(
        "--key-column", metavar="NAME|N",
        help="CSV column sent as each message's key (a header name or a 0-based number)",
    )  # fmt: skip

    demo = with_config(
        sub.add_parser("demo", help="stream a realistic workload through the daemon")
    )
    demo.add_argument("--messages", type=int, default=200_000, help="vectors to stream")
    demo.add_argument("--report", type=Path, metavar="FILE.png", help="draw the run to a PNG")

    report = sub.add_parser("report", help="draw a run's history to a PNG")
    report.add_argument("checkpoint_dir", type=Path)
    report.add_argument("--out", type=Path, required=True, metavar="FILE.png")
    return parser


def _cmd_config_show(args: argparse.Namespace) -> int:
    from streamkm.config import load_settings, to_toml

    print(to_toml(load_settings(args.config).redacted()), end="")
    return EXIT_OK


def _cmd_broker(args: argparse.Namespace) -> int:
    from streamkm.tools.broker import LocalBroker, default_broker_dir

    broker = LocalBroker(dir=args.dir or default_broker_dir(args.port), port=args.port)
    if args.broker_command == "start":
        print(broker.start())
    elif args.broker_command == "stop":
        print("stopped" if broker.stop() else "not running")
    else:
        pid = broker.pid()
        if pid is None:
            print("not running")
            return 3
        state = "answering" if broker.answers() else "not answering"
        print(f"running (pid {pid}) at {broker.bootstrap}, {state}")
    return EXIT_OK


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    if args.checkpoint_command == "export":
        return _cmd_checkpoint_export(args)
    return _cmd_checkpoint_show(args)


def _cmd_checkpoint_export(args: argparse.Namespace) -> int:
    import numpy as np

    from streamkm.checkpoint import read

    if args.out is None and args.centroids is None:
        raise ConfigError("checkpoint export: give --out FILE.npz and/or --centroids FILE.npy")
    ckpt = read(args.path)
    model = ckpt.model
    if args.out is not None:
        if not hasattr(model, "save"):
            raise StreamkmError(
                f"{ckpt.path.name} holds a shared model (kafka.sync_topic); export its "
                "centroids with --centroids FILE.npy (usable as model.init)"
            )
        model.save(args.out)
        print(f"model version {model.n_steps_} written to {args.out}")
    if args.centroids is not None:
        np.save(args.centroids, np.asarray(model.cluster_centers_, dtype=np.float64))
        print(f"{model.n_clusters} centroids written to {args.centroids}")
    return EXIT_OK


def _cmd_tail(args: argparse.Namespace) -> int:
    from streamkm.config import load_settings
    from streamkm.tools.tail import tail

    settings = load_settings(args.config)
    topic = args.topic
    if topic is None:
        topic = (
            settings.kafka.dead_letter_topic if args.dead_letters else settings.kafka.output_topic
        )
        if topic is None:
            raise ConfigError("kafka.dead_letter_topic is not set")
    tail(settings, topic, count=args.count, follow=args.follow)
    return EXIT_OK


def _cmd_checkpoint_show(args: argparse.Namespace) -> int:
    from streamkm.checkpoint import checkpoint_summary, read

    summary = checkpoint_summary(read(args.path))
    if args.json:
        print(json.dumps(summary))
        return EXIT_OK
    print(f"file            {summary['file']}")
    print(f"created_at      {summary['created_at']}")
    print(f"model_version   {summary['model_version']}")
    print(f"n_samples_seen  {summary['n_samples_seen']}")
    print(f"n_clusters      {summary['n_clusters']}")
    print(f"dim             {summary['dim']}")
    print("counts          " + " ".join(f"{c:g}" for c in summary["counts"]))
    if summary["sync_offset"] is not None:
        print(f"sync_offset     {summary['sync_offset']}")
    print("centroids")
    for j, c in enumerate(summary["centroids"]):
        print(f"  {j:<4} " + " ".join(f"{x:.6g}" for x in c))
    print("offsets")
    for topic, parts in summary["offsets"].items():
        for partition, offset in parts.items():
            print(f"  {topic}[{partition}]  {offset}")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from streamkm.app import App
    from streamkm.config import load_settings

    settings = load_settings(args.config)
    setup_logging(settings.log.level, settings.log.format)
    return App(settings, reset_model=args.reset_model).run()


def _cmd_produce(args: argparse.Namespace) -> int:
    from streamkm.config import load_settings
    from streamkm.tools.produce import produce_command

    settings = load_settings(args.config)
    setup_logging(settings.log.level, settings.log.format)
    return produce_command(settings, args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from streamkm.config import load_settings
    from streamkm.tools.demo import run_demo

    settings = load_settings(args.config)
    setup_logging("WARNING", settings.log.format)
    return run_demo(
        settings, messages=args.messages, report=args.report, config_given=bool(args.config)
    )


def _cmd_report(args: argparse.Namespace) -> int:
    from streamkm.tools.report import draw_report

    draw_report(args.checkpoint_dir, args.out)
    print(args.out)
    return EXIT_OK


def _single_threaded_blas() -> None:
    """One BLAS thread unless the user says otherwise.

    The daemon shares its cores with librdkafka's threads (and often a broker); BLAS threads
    that wait for a core slow the assignment GEMM down more than they speed it up. Must run
    before numpy is imported.
    """
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``streamkm`` console script."""
    args = _parser().parse_args(argv)
    if args.command in ("run", "demo"):
        _single_threaded_blas()
    handlers = {
        "config": _cmd_config_show,
        "broker": _cmd_broker,
        "checkpoint": _cmd_checkpoint,
        "tail": _cmd_tail,
        "run": _cmd_run,
        "produce": _cmd_produce,
        "demo": _cmd_demo,
        "report": _cmd_report,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"streamkm: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StreamkmError as exc:
        print(f"streamkm: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
