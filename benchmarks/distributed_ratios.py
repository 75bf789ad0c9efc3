"""Throughput of mlocore.distributed on a local Dask cluster against the serial loop.

    python benchmarks/distributed_ratios.py            # 1000 small + 16 large problems
    python benchmarks/distributed_ratios.py --quick    # 200 small + 4 large

Measured in one run, on a ``LocalCluster(n_workers=W, threads_per_worker=1)`` (default W = 2)
whose workers were warmed by one task each (mlocore's kernels loaded from numba's cache);
best of 3 interleaved rounds (--quick: 2) for (a)-(c):

(a) small problems: ``hypergrad_many`` of quadratics (dx=2, dy=5, built per param by
    ``make_quadratic``): the plain Python loop, ``client="serial"``, and the cluster with the
    default chunks and with one param per task; problems/s and ratios to the plain loop;
(b) the per-task overhead: (time with one param per task - time with default chunks) /
    (difference in the number of tasks);
(c) large problems: ``minimize_bilevel`` on quadratics (dx=20, dy=300), the same modes;
(d) plain-NumPy callbacks (compiled by mlocore, not cached on disk): the first cluster run
    compiles them once per worker, a second run with the same ``build`` finds them warm in
    the per-worker memo; the serial loop compiles them once per process.

The table is written to ``benchmarks/results/distributed_ratios.txt`` (``--quick``:
``distributed_ratios-quick.txt``).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import mlocore as mlo  # noqa: E402
from mlocore.distributed import default_chunksize, hypergrad_many, minimize_many  # noqa: E402
from mlocore.problems import make_quadratic  # noqa: E402

LARGE_OPTS = dict(method="aid", maxiter=30, tol=1e-8)


def build_small(seed):
    q = make_quadratic(dx=2, dy=5, n_outer=4, n_inner=8, seed=seed)
    return q.problem, np.zeros(2), np.zeros(5)


def build_large(seed, data):
    dx, dy = data
    q = make_quadratic(dx=dx, dy=dy, n_outer=2, n_inner=2, seed=seed)
    return q.problem, np.zeros(dx), np.zeros(dy)


# plain NumPy callbacks: mlocore compiles them in each process (no disk cache)
def plain_lower_grad(z, A, c):
    dx = z.shape[0] - c.shape[0]
    out = np.empty_like(z)
    out[:dx] = -0.1 * z[dx:].sum()
    out[dx:] = A @ z[dx:] + c - 0.1 * z[:dx].sum()
    return out


def plain_lower_hvp(z, v, A, c):
    dx = z.shape[0] - c.shape[0]
    out = np.empty_like(z)
    out[:dx] = -0.1 * v[dx:].sum()
    out[dx:] = A @ v[dx:] - 0.1 * v[:dx].sum()
    return out


def plain_upper_grad(z, t):
    dx = z.shape[0] - t.shape[0]
    out = np.empty_like(z)
    out[:dx] = 0.1 * z[:dx]
    out[dx:] = z[dx:] - t
    return out


def build_plain(seed):
    rng = np.random.default_rng(seed)
    dy = 6
    M = rng.standard_normal((dy, dy))
    A = M @ M.T / dy + np.eye(dy)
    problem = mlo.BilevelProblem(
        upper=mlo.Objective(plain_upper_grad, args=(rng.standard_normal(dy),)),
        lower=mlo.Objective(plain_lower_grad, hvp=plain_lower_hvp,
                            args=(A, rng.standard_normal(dy))),
        dims=(2, dy))
    return problem, np.zeros(2), np.zeros(dy)


def _timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def _interleaved(k, calls):
    """Best wall time of each call over k rounds that run every call once, in turn (the
    machine is shared: interleaving spreads load changes over all of them); the outputs of
    the last round."""
    best = [np.inf] * len(calls)
    outs = [None] * len(calls)
    for _ in range(k):
        for i, (fn, args, kw) in enumerate(calls):
            t, outs[i] = _timed(fn, *args, **kw)
            best[i] = min(best[i], t)
    return best, outs


def _same(a, b, attr):
    return all(np.array_equal(np.asarray(x[attr]), np.asarray(y[attr])) for x, y in zip(a, b))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="200 small and 4 large problems")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/")
    args = p.parse_args(argv)
    n_small, n_large = (200, 4) if args.quick else (1000, 16)
    k = 2 if args.quick else 3  # rounds of the small and large rows (best of k)
    large_dims = (20, 300)
    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    from dask.distributed import Client, LocalCluster
    import dask
    t_start, cluster = _timed(LocalCluster, n_workers=args.workers, threads_per_worker=1,
                              processes=True, dashboard_address=None)
    client = Client(cluster)
    try:
        now = datetime.datetime.now(datetime.timezone.utc)
        out(f"mlocore.distributed throughput ({now:%Y-%m-%d %H:%M} UTC"
            f"{', --quick' if args.quick else ''}); {platform.python_version()}, dask "
            f"{dask.__version__}, {os.cpu_count()} cores, load average "
            f"{os.getloadavg()[0]:.1f} at start")
        out(f"LocalCluster(n_workers={args.workers}, threads_per_worker=1): start "
            f"{t_start:.1f} s")
        # warm every worker (mlocore's kernels from numba's disk cache) and this process
        t_warm, _ = _timed(minimize_many, build_small, [0] * args.workers, client=client,
                           chunksize=1)
        minimize_many(build_small, [0], client="serial")
        hypergrad_many(build_small, [0], client="serial")
        minimize_many(build_large, [0], client="serial", data=large_dims, **LARGE_OPTS)
        out(f"first task on each worker (kernels loaded from the cache): {t_warm:.1f} s "
            "(not counted below)")
        out()

        rows = []
        small = list(range(n_small))

        def plain_small():
            return [mlo.hypergrad(*build_small(s)) for s in small]

        (t_loop, t_ser, t_chunk, t_one), (ref, ser, par, par1) = _interleaved(k, [
            (plain_small, (), {}),
            (hypergrad_many, (build_small, small), dict(client="serial")),
            (hypergrad_many, (build_small, small), dict(client=client)),
            (hypergrad_many, (build_small, small), dict(client=client, chunksize=1))])
        size = default_chunksize(n_small, args.workers)
        ok = _same(ref, ser, "grad") and _same(ref, par, "grad") and _same(ref, par1, "grad")
        rows.append((f"{n_small} small: plain loop", t_loop, n_small, t_loop))
        rows.append(("  client='serial'", t_ser, n_small, t_loop))
        rows.append((f"  cluster, chunksize={size}", t_chunk, n_small, t_loop))
        rows.append(("  cluster, chunksize=1", t_one, n_small, t_loop))
        n_tasks = -(-n_small // size)
        overhead = (t_one - t_chunk) / max(1, n_small - n_tasks)

        large = list(range(n_large))

        def plain_large():
            return [mlo.minimize_bilevel(*build_large(s, large_dims), **LARGE_OPTS)
                    for s in large]

        (t_lloop, t_lser, t_lpar), (lref, lser, lpar) = _interleaved(k, [
            (plain_large, (), {}),
            (minimize_many, (build_large, large),
             dict(client="serial", data=large_dims, **LARGE_OPTS)),
            (minimize_many, (build_large, large),
             dict(client=client, data=large_dims, **LARGE_OPTS))])
        ok = ok and _same(lref, lser, "x") and _same(lref, lpar, "x")
        lsize = default_chunksize(n_large, args.workers)
        rows.append((f"{n_large} large (dx={large_dims[0]}, dy={large_dims[1]}): plain loop",
                     t_lloop, n_large, t_lloop))
        rows.append(("  client='serial'", t_lser, n_large, t_lloop))
        rows.append((f"  cluster, chunksize={lsize}", t_lpar, n_large, t_lloop))

        n_plain = 40
        plain = list(range(n_plain))
        t_pser, pser = _timed(hypergrad_many, build_plain, plain, client="serial")
        t_pser2, _ = _timed(hypergrad_many, build_plain, plain, client="serial")
        t_p1, pp1 = _timed(hypergrad_many, build_plain, plain, client=client)
        t_p2, pp2 = _timed(hypergrad_many, build_plain, plain, client=client)
        ok = ok and _same(pser, pp1, "grad") and _same(pser, pp2, "grad")
        rows.append((f"{n_plain} plain-NumPy-callback: serial, 1st (compiles)", t_pser,
                     n_plain, t_pser))
        rows.append(("  serial, 2nd", t_pser2, n_plain, t_pser))
        rows.append(("  cluster, 1st (compiles once per worker)", t_p1, n_plain, t_pser))
        rows.append(("  cluster, 2nd (per-worker memo warm)", t_p2, n_plain, t_pser))

        out(f"  {'problems / mode':<52}{'wall s':>9}{'problems/s':>12}{'ratio':>8}")
        for name, t, n, base in rows:
            out(f"  {name:<52}{t:9.3f}{n / t:12.1f}{base / t:8.2f}")
        out("  (ratio: throughput against the first row of its group)")
        out()
        out(f"per-task overhead (one param per task against chunks of {size}): "
            f"{overhead * 1e3:.2f} ms per task; a small hypergradient (build included) costs "
            f"{t_loop / n_small * 1e3:.2f} ms in the plain loop")
        out(f"results identical to the plain loop bit for bit: {'yes' if ok else 'NO'}")
        out(f"load average at the end: {os.getloadavg()[0]:.1f} (the machine's 2 cores are "
            "shared: ratios move with the load)")
    finally:
        client.close()
        cluster.close()
    if not args.no_save:
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        name = f"distributed_ratios{'-quick' if args.quick else ''}.txt"
        with open(os.path.join(HERE, "results", name), "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
