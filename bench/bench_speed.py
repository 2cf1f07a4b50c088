"""Throughput of StreamingKMeans.partial_fit vs scikit-learn's MiniBatchKMeans.partial_fit.

Both models get the same float32 batches of 1024 rows, the same init method (k-means++),
``n_init=1`` and 2 threads; timings are interleaved (sklearn, then streamkm, repeat) so that
both sides share the machine's noise, and the median of the repeats is reported. The first
call (initialisation, plus JIT compilation or cache load for streamkm) is timed apart.

Run ``python bench/bench_speed.py`` (``--quick`` for fewer repeats, ``--crossover`` to time the
two assignment paths of the kernel against each other).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _streams import blobs

B = 1024
CONFIGS = [(16, 8), (64, 32), (128, 100), (384, 256)]
THREADS = 2
#: batches that fill the default sample (32,768 rows, up to 40,960 held) ...
AMORTISED_FILL = 40
#: ... and distinct batches the steady state cycles through (it runs for one whole
#: refinement period, several hundred batches at the default refinement budget)
AMORTISED_POOL = 200


def _compile_seconds() -> float:
    """Import + first step in a fresh interpreter with an empty Numba cache (real JIT cost)."""
    code = (
        "import time, numpy as np; t = time.perf_counter();"
        "from streamkm.model import StreamingKMeans;"
        "X = np.random.default_rng(0).normal(size=(2048, 16)).astype(np.float32);"
        "m = StreamingKMeans(8, random_state=0); m.step(X[:1024]); m.partial_fit(X[1024:]);"
        "print(time.perf_counter() - t)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
    return float(out.stdout.strip().splitlines()[-1])


def _time_batches(fn, batches) -> float:
    t0 = time.perf_counter()
    for xb in batches:
        fn(xb)
    return time.perf_counter() - t0


def run(repeats: int, n_batches: int) -> list[dict[str, float]]:
    from sklearn.cluster import MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    from streamkm.model import StreamingKMeans

    rows = []
    with threadpool_limits(limits=THREADS):
        for d, k in CONFIGS:
            X, _ = blobs((n_batches + 1) * B, d, k, seed=d + k)
            first, rest = X[:B], [X[(i + 1) * B : (i + 2) * B] for i in range(n_batches)]
            t0 = time.perf_counter()
            ours = StreamingKMeans(k, batch_size=B, random_state=0).partial_fit(first)
            t_first_ours = time.perf_counter() - t0
            skl = {}
            t_first_skl = 0.0
            for labels in (True, False):
                t0 = time.perf_counter()
                skl[labels] = MiniBatchKMeans(
                    k,
                    batch_size=B,
                    init="k-means++",
                    n_init=1,
                    random_state=0,
                    compute_labels=labels,
                ).partial_fit(first)
                if labels:
                    t_first_skl = time.perf_counter() - t0
            step_model = StreamingKMeans(k, batch_size=B, random_state=0).partial_fit(first)
            # warm-up: one pass each (caches, BLAS threads, branch predictors)
            _time_batches(ours.partial_fit, rest[:5])
            _time_batches(step_model.step, rest[:5])
            for m in skl.values():
                _time_batches(m.partial_fit, rest[:5])
            t = {"skl": [], "skl_nolabels": [], "ours": [], "step": []}
            for _ in range(repeats):
                t["skl"].append(_time_batches(skl[True].partial_fit, rest))
                t["ours"].append(_time_batches(ours.partial_fit, rest))
                t["skl_nolabels"].append(_time_batches(skl[False].partial_fit, rest))
                t["step"].append(_time_batches(step_model.step, rest))
            n_rows = n_batches * B
            rate = {name: n_rows / float(np.median(v)) for name, v in t.items()}
            # amortised: a fresh model over a long stream, refinements included — the fill
            # of the sample (its geometric refinements) timed apart from the steady state,
            # which is timed over exactly one refinement period (from just after one
            # refinement to just after the next), so the period's refinement is in it once
            fill_n = AMORTISED_FILL
            Xl, _ = blobs((AMORTISED_POOL + 1) * B, d, k, seed=d + k + 1)
            pool = [Xl[(i + 1) * B : (i + 2) * B] for i in range(AMORTISED_POOL)]
            fresh = StreamingKMeans(k, batch_size=B, random_state=0).partial_fit(Xl[:B])
            mbk_l = MiniBatchKMeans(k, batch_size=B, init="k-means++", n_init=1, random_state=0)
            mbk_l.partial_fit(Xl[:B])
            fill = [pool[i % AMORTISED_POOL] for i in range(fill_n)]
            t_fill = _time_batches(fresh.partial_fit, fill)
            i = fill_n
            refines0 = fresh.n_refines_
            while fresh.n_refines_ == refines0:  # untimed, up to the first steady refinement
                fresh.partial_fit(pool[i % AMORTISED_POOL])
                i += 1
            refines0 = fresh.n_refines_
            t_steady = t_mbk_steady = 0.0
            n_period = 0
            while fresh.n_refines_ == refines0:  # both timed on each batch, interleaved
                xb = pool[i % AMORTISED_POOL]
                t0 = time.perf_counter()
                fresh.partial_fit(xb)
                t1 = time.perf_counter()
                mbk_l.partial_fit(xb)
                t_mbk_steady += time.perf_counter() - t1
                t_steady += t1 - t0
                n_period += 1
                i += 1
            rate["amortised"] = n_period * B / t_steady
            rate["amortised_mbk"] = n_period * B / t_mbk_steady
            rate["period_batches"] = n_period
            # one-off cost of the fill phase beyond what the same rows cost in steady state
            extra_fill = t_fill - fill_n * B / rate["amortised"]
            rate["fill_extra_ms"] = 1e3 * extra_fill
            rate["nbytes"] = fresh.nbytes()
            rows.append(
                {
                    "d": d,
                    "k": k,
                    **rate,
                    "first_ours": t_first_ours,
                    "first_skl": t_first_skl,
                }
            )
    return rows


def crossover(repeats: int) -> None:
    """Time the direct and the GEMM assignment paths over a grid of (d, k)."""
    from threadpoolctl import threadpool_limits

    from streamkm import kernel

    rng = np.random.default_rng(0)
    print("| dtype | d | k | d·k | direct µs | GEMM µs | faster |")
    print("|---|---|---|---|---|---|---|")
    with threadpool_limits(limits=THREADS):
        for dt in (np.float32, np.float64):
            for d, k in [
                (2, 8),
                (4, 16),
                (8, 16),
                (16, 8),
                (8, 32),
                (16, 16),
                (32, 16),
                (16, 32),
                (32, 32),
                (64, 32),
                (128, 100),
            ]:
                X = rng.standard_normal((B, d)).astype(dt)
                C = rng.standard_normal((k, d)).astype(dt)
                c_sq = np.einsum("ij,ij->i", C, C)
                lab, d2 = np.empty(B, np.int64), np.empty(B)
                coef, sc = np.empty((0, 0)), np.empty(0)
                work = np.empty(kernel.work_size(k), dt)
                args = (X, C, c_sq, coef, lab, d2, sc, work)
                fns = {
                    name: (lambda th=th, a=args: kernel.assign(*a, gemm_min_dk=th))
                    for name, th in (("direct", 1 << 60), ("gemm", 0))
                }
                for f in fns.values():
                    f()
                samples: dict[str, list[float]] = {name: [] for name in fns}
                for _ in range(repeats):
                    for name, f in fns.items():
                        t0 = time.perf_counter()
                        for _ in range(20):
                            f()
                        samples[name].append((time.perf_counter() - t0) / 20 * 1e6)
                res = {name: float(np.median(v)) for name, v in samples.items()}
                fast = min(res, key=res.__getitem__)
                print(
                    f"| {np.dtype(dt).name} | {d} | {k} | {d * k} | {res['direct']:.1f} | "
                    f"{res['gemm']:.1f} | {fast} |"
                )


def centring_cost(repeats: int) -> list[dict[str, float]]:
    """Time the assignment kernel with and without the centring shift, on the same batches.

    The model assigns in the frame centred on its sample's mean (so that float32 keeps its
    precision for data far from the origin); this measures what that costs per batch for
    every configuration of the main table.
    """
    from threadpoolctl import threadpool_limits

    from streamkm import kernel

    out = []
    with threadpool_limits(limits=THREADS):
        for d, k in CONFIGS:
            X, _ = blobs(B, d, k, seed=d + k)
            X = X + np.float32(1e3)  # data off the origin, where centring matters
            rng = np.random.default_rng(0)
            C = X[rng.choice(B, k, replace=False)].copy()
            shift = X.mean(axis=0).astype(np.float32)
            lab, d2 = np.empty(B, np.int64), np.empty(B)
            coef, sc = np.empty((0, k)), np.empty(0)
            work = np.empty(kernel.work_size(k, d), np.float32)
            Cc = C - shift
            c_sq, cc_sq = np.einsum("ij,ij->i", C, C), np.einsum("ij,ij->i", Cc, Cc)
            out_args = (coef, lab, d2, sc, work)
            fns = {
                "plain": partial(kernel.assign, X, C, c_sq, *out_args),
                "centred": partial(kernel.assign, X, Cc, cc_sq, *out_args, shift=shift),
            }
            for f in fns.values():
                f()
            samples: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(repeats):
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    for _ in range(20):
                        f()
                    samples[name].append((time.perf_counter() - t0) / 20 * 1e6)
            res = {name: float(np.median(v)) for name, v in samples.items()}
            out.append({"d": d, "k": k, **res})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="3 repeats of 20 batches")
    parser.add_argument("--crossover", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.batches = 3, 20
    if args.crossover:
        crossover(args.repeats)
        return
    compile_s = _compile_seconds()
    rows = run(args.repeats, args.batches)
    print(
        f"partial_fit throughput, float32, B={B}, {THREADS} threads, "
        f"median of {args.repeats} repeats × {args.batches} batches (vectors/s)\n"
    )
    print(
        "| d | k | sklearn MBK | sklearn MBK compute_labels=False | streamkm partial_fit "
        "| ratio vs MBK | ratio vs MBK no labels | streamkm step | first call streamkm / "
        "sklearn |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['d']} | {r['k']} | {r['skl']:,.0f} | {r['skl_nolabels']:,.0f} | "
            f"{r['ours']:,.0f} | {r['ours'] / r['skl']:.2f}× | "
            f"{r['ours'] / r['skl_nolabels']:.2f}× | {r['step']:,.0f} | "
            f"{r['first_ours'] * 1e3:.0f} ms / {r['first_skl'] * 1e3:.0f} ms |"
        )
    print(
        f"\nAmortised over a long stream (a fresh model: {AMORTISED_FILL} batches fill the "
        "sample, then one whole refinement period of steady state, from just after one "
        "refinement to just after the next, both timed on each batch in turn; one pass, "
        "vectors/s)\n"
    )
    print(
        "| d | k | sklearn MBK | streamkm | ratio | batches per refinement period "
        "| one-off fill cost | model bytes (sample full) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['d']} | {r['k']} | {r['amortised_mbk']:,.0f} | {r['amortised']:,.0f} | "
            f"{r['amortised'] / r['amortised_mbk']:.2f}× | {r['period_batches']:.0f} | "
            f"{r['fill_extra_ms']:.0f} ms | {r['nbytes'] / 2**20:.1f} MiB |"
        )
    print(
        "\nCost of centring (assignment kernel on one batch at an offset of 1e3, "
        f"median of {args.repeats} repeats × 20 calls)\n"
    )
    print("| d | k | plain µs | centred µs | centred / plain |")
    print("|---|---|---|---|---|")
    for r in centring_cost(args.repeats):
        print(
            f"| {r['d']} | {r['k']} | {r['plain']:.1f} | {r['centred']:.1f} | "
            f"{r['centred'] / r['plain']:.2f}× |"
        )
    print(
        f"\nJIT compile (fresh Numba cache: import + first step + first partial_fit): "
        f"{compile_s:.1f} s"
    )


if __name__ == "__main__":
    main()
