"""Where does a contestant of ``bench/e2e.py`` spend its time? Profile it on a filled topic.

Runs one contestant (default streamkm; ``streamkm-eos`` is streamkm in exactly-once mode)
through N pre-produced vectors, spread over ``--partitions`` input partitions, on a local
broker, as the benchmark's throughput phase does, under one of:

* ``--tool py-spy`` (default): sampling, attached to the running process, low overhead;
  prints the share of the main thread's samples per function, inclusive and self
  (time inside C extensions such as confluent-kafka counts for the Python function calling
  them). Needs ``pip install py-spy``.
* ``--tool cprofile``: ``python -m cProfile``; exact call counts, but its per-call overhead
  inflates the functions called once per message.

    python bench/_e2e_profile.py [--kind streamkm|streamkm-eos|echo|sklearn] [--dim 16 --k 8]
        [--partitions 1] [--messages 300000] [--tool py-spy|cprofile] [--idle]
        [--env KEY=VALUE]
"""

from __future__ import annotations

import argparse
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import OUT_TOPIC_CONF, Bench, Scale, stop, vector_rows

from streamkm.tools.broker import LocalBroker, free_port


def summarise_raw(path: Path, top: int) -> str:
    """Inclusive and self shares per function from py-spy's collapsed stacks."""
    incl: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        # Only the main thread: the others (metrics server) start in threading's _bootstrap.
        if not stack or stack.split(";", 1)[0].startswith(("_bootstrap ", "Thread._bootstrap ")):
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        # A function on the stack twice (recursion) counts once for the inclusive share.
        for f in {_func(fr) for fr in frames}:
            incl[f] += n
        self_[_func(frames[-1])] += n
    lines = [f"{total} samples of the main thread", "", "inclusive:"]
    lines += [f"  {c / total:6.1%}  {f}" for f, c in incl.most_common(top)]
    lines += ["", "self:"]
    lines += [f"  {c / total:6.1%}  {f}" for f, c in self_.most_common(top)]
    return "\n".join(lines)


def _func(frame: str) -> str:
    # "name (path/file.py:LINE)" → "name (file.py)": shares per function, not per line.
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0].rsplit("/", 1)[-1]
    return f"{name} ({file})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--kind", default="streamkm", choices=["streamkm", "streamkm-eos", "echo", "sklearn"]
    )
    p.add_argument("--partitions", type=int, default=1, help="input (and output) partitions")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--messages", type=int, default=300_000)
    p.add_argument("--tool", default="py-spy", choices=["py-spy", "cprofile"])
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of the contestant (e.g. OPENBLAS_NUM_THREADS=1)",
    )
    p.add_argument(
        "--idle", action="store_true", help="py-spy: count waiting (in consume, poll) too"
    )
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="streamkm-e2e-prof-"))
    broker = LocalBroker(dir=workdir / "broker", port=free_port())
    n, d, k = args.messages, args.dim, args.k
    try:
        bench = Bench(broker.start(), workdir, Scale(n, 1, 0.0, 0.0, (0, 0)))
        src = bench.topic("in", args.partitions)
        dst = bench.topic("out", args.partitions, OUT_TOPIC_CONF)
        # 10% beyond N, so that the timed span ends inside the backlog (as in e2e.py).
        bench.fill(src, vector_rows(n, d, k, seed=1), n + n // 10)
        prof = workdir / "profile.out"
        python_args = ("-m", "cProfile", "-o", str(prof)) if args.tool == "cprofile" else ()
        extra_env = dict(kv.split("=", 1) for kv in args.env)
        proc, log, group = bench.launch(args.kind, d, k, src, dst, python_args, extra_env)
        txn_group = group if args.kind == "streamkm-eos" else None
        spy = None
        try:
            # Time (and attach py-spy) from the first output on: start-up is not measured.
            bench.wait_answered(proc, log, dst, txn_group, 1)
            if args.tool == "py-spy":
                py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                spy = subprocess.Popen(
                    [py_spy, "record", "--pid", str(proc.pid), "--rate", "250", "--format", "raw",
                     "--nonblocking", "--output", str(prof), *(["--idle"] if args.idle else [])],
                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                )  # fmt: skip
            t0 = time.monotonic()
            bench.wait_answered(proc, log, dst, txn_group, n)
            print(f"{n:,} outputs in {time.monotonic() - t0:.1f} s (d={d}, k={k}, {args.kind})")
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                spy.wait(60)
            stop(proc)
            bench.close()
        if args.tool == "py-spy":
            print(summarise_raw(prof, args.top))
        else:
            pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(args.top)
            pstats.Stats(str(prof)).sort_stats("tottime").print_stats(args.top)
    finally:
        broker.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
