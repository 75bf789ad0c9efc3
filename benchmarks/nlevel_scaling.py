"""How the n-level hypergradient grows with n (one run, one process, 1 BLAS thread).

    python benchmarks/nlevel_scaling.py            # n = 2..8 (a few minutes)
    python benchmarks/nlevel_scaling.py --quick    # n = 2..6

For random n-level quadratic chains (``make_nlevel_quadratic``, d variables per level, every
level started away from its best response) and each implicit mode, one
``hypergrad(problem, xs, method=mode)``: time (best of 3 after a warm-up), Newton iterations
and oracle calls summed over the levels, relative error against the closed form, and the
growth t(n) / t(n - 1). The reference "n x bilevel" is n hypergradients of a bilevel
quadratic with dx = dy = d (lower level solved from y = 0, CG), the cost of solving the same
number of levels one at a time. A last table does the same for a non-quadratic chain (levels
``logcosh + quadratic`` of dimension 1, the family of the n = 4 test), where "exact" and
"truncated" differ by the curvature terms. A configuration stops growing n once one call
takes more than ``--cap`` seconds. The table goes to
``benchmarks/results/nlevel-scaling-<date>[-quick].txt``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import mlocore as mlo  # noqa: E402
from mlocore.problems import make_nlevel_quadratic, make_quadratic  # noqa: E402
from mlocore.problems.nonquadratic_trilevel import (  # noqa: E402
    logcosh_quad_grad, logcosh_quad_hvp, logcosh_quad_tvp, logcosh_quad_value)

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET_N5_MS = 50.0
TARGET_GROWTH_6_3 = 30.0


def best_of(fn, k=3):
    fn()
    best = np.inf
    for _ in range(k):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def logcosh_chain(n, seed=1):
    """n levels of dimension 1: f_k = sum_i c_i logcosh(G_i . z - b_i) + 1/2 z.P z + q.z,
    P couples level k with level k - 1 (the n = 4 family of tests/test_multilevel.py)."""
    rng = np.random.default_rng(seed)
    levels = []
    for k in range(n):
        G = rng.standard_normal((3, n)) * 1.5
        b = rng.standard_normal(3)
        c = rng.uniform(0.5, 1.5, 3)
        P = np.zeros((n, n))
        P[k, k] = 3.0 if k > 0 else 0.5
        if k > 0:
            P[k, k - 1] = P[k - 1, k] = 0.5
        q = rng.standard_normal(n) * 0.5
        levels.append(mlo.Objective(logcosh_quad_grad, hvp=logcosh_quad_hvp,
                                    value=logcosh_quad_value, tvp=logcosh_quad_tvp,
                                    args=(G, b, c, P, q)))
    return mlo.MultilevelProblem(levels, (1,) * n)


def bilevel_reference(d, n):
    q = make_quadratic(dx=d, dy=d, seed=0)
    x, y = np.ones(d), np.zeros(d)
    t, _ = best_of(lambda: mlo.hypergrad(q.problem, x, y, method="cg"))
    return n * t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cap", type=float, default=5.0)
    args = ap.parse_args()
    n_max = 6 if args.quick else 8
    lines = [f"benchmarks/nlevel_scaling.py, {datetime.datetime.now():%Y-%m-%d %H:%M}, "
             f"numba {__import__('numba').__version__}, numpy {np.__version__}, "
             f"{os.cpu_count()} cpus, 1 BLAS thread", ""]

    def emit(s=""):
        print(s, flush=True)
        lines.append(s)

    times = {}
    for d in (2, 5):
        emit(f"quadratic chain, d = {d} per level")
        emit(f"{'mode':>10} {'n':>3} {'time':>10} {'growth':>7} {'n x bilevel':>12} "
             f"{'ratio':>7} {'newton it':>10} {'grad':>8} {'hvp':>9} {'rel err':>9}")
        for mode in ("exact", "truncated"):
            prev = None
            for n in range(2, n_max + 1):
                q = make_nlevel_quadratic(n=n, dims=(d,) * n, seed=0)
                rng = np.random.default_rng(1)
                xs = [rng.normal(size=d) for _ in range(n)]
                t, res = best_of(lambda: mlo.hypergrad(q.problem, xs, method=mode), k=1 if
                                 prev is not None and prev > 1.0 else 3)
                g = q.hypergrad(xs[0])
                err = np.linalg.norm(res.grad - g) / np.linalg.norm(g)
                ref = bilevel_reference(d, n)
                times[(d, mode, n)] = t
                growth = "-" if prev is None else f"{t / prev:.1f}"
                emit(f"{mode:>10} {n:>3} {t * 1e3:>8.2f}ms {growth:>7} {ref * 1e3:>10.3f}ms "
                     f"{t / ref:>7.0f} {int(res.lower_nit.sum()):>10} {res.ngrad:>8} "
                     f"{res.nhvp:>9} {err:>9.1e}" + ("" if res.success else
                                                      f"  {res.message}"))
                prev = t
                if t > args.cap:
                    break
        emit()

    emit("non-quadratic chain (logcosh + quadratic levels of dimension 1)")
    emit(f"{'n':>3} {'exact':>10} {'truncated':>10} {'growth ex':>9} {'|ex - tr|/|ex|':>15}")
    prev = None
    for n in range(3, n_max + 1):
        p = logcosh_chain(n)
        xs = [np.array([0.3])] + [np.zeros(1)] * (n - 1)
        te, ex = best_of(lambda: mlo.hypergrad(p, xs, method="exact"), k=1)
        tt, tr = best_of(lambda: mlo.hypergrad(p, xs, method="truncated"), k=1)
        gap = np.linalg.norm(ex.grad - tr.grad) / np.linalg.norm(ex.grad)
        growth = "-" if prev is None else f"{te / prev:.1f}"
        emit(f"{n:>3} {te * 1e3:>8.2f}ms {tt * 1e3:>8.2f}ms {growth:>9} {gap:>15.2e}"
             + ("" if ex.success and tr.success else f"  {ex.message} / {tr.message}"))
        prev = te
        if te > args.cap:
            break
    emit()

    t5, t3, t6 = (times.get((5, "exact", n)) for n in (5, 3, 6))
    if t5 is not None:
        emit(f"target: exact, d = 5, n = 5 within {TARGET_N5_MS:.0f} ms: {t5 * 1e3:.1f} ms "
             f"({'MET' if t5 * 1e3 <= TARGET_N5_MS else 'not met'})")
    if t3 is not None and t6 is not None:
        emit(f"target: exact, d = 5, t(6) / t(3) <= {TARGET_GROWTH_6_3:.0f}: {t6 / t3:.0f} "
             f"({'MET' if t6 / t3 <= TARGET_GROWTH_6_3 else 'not met'})")
    name = f"nlevel-scaling-{datetime.date.today()}{'-quick' if args.quick else ''}.txt"
    with open(os.path.join(HERE, "results", name), "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
