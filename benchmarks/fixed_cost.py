"""Fixed cost of a small hypergradient call: what a repeated call costs beyond its arithmetic.

    python benchmarks/fixed_cost.py            # dy = 5, 10, 50
    python benchmarks/fixed_cost.py --quick    # fewer samples

Problem: ``mlocore.problems.make_quadratic(dx=5, dy)`` (deterministic form, block oracles).
At a solved lower point, ``hypergrad(problem, x, y, lower_solved=True)`` (CG to 1e-10), against

- kernel, bound: the same compiled kernel entered as ``hypergrad`` enters it, with its
  problem-fixed arguments keyed and unwrapped once (``_callbacks.call_bound``);
- kernel, keyed: the same kernel entered through the per-call type key of every
  argument (``_callbacks.call_kernel``, the route before the bound entry points);
- fused: one ``@njit`` function that calls the same callbacks directly (upper value and
  gradient blocks, CG on ``hvp_yy``, one ``hvp_xy``) with the same stopping rule and
  iteration count: the arithmetic plus one plain Numba call.

``hypergrad - fused`` is the fixed cost a user pays per call. Times are the best of
interleaved samples in one process (one BLAS thread when threadpoolctl is installed).
Results go to ``benchmarks/results/fixed-cost-<date>.txt``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import timeit

import numba
import numpy as np

import mlocore as mlo
from mlocore import _hypergrad
from mlocore._callbacks import call_bound, call_kernel
from mlocore._kernels import implicit as _imp
from mlocore._results import new_counts
from mlocore.problems import make_quadratic
from mlocore.problems import quadratic as qm

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-10


@numba.njit(cache=True)
def fused_hypergrad(z, dx, uargs, largs, tol, maxiter):
    """grad_x f - H_xy v with H_yy v = grad_y f by CG (|r| <= tol |b|), and f(z)."""
    fun = qm.quad_value(z, *uargs)
    gx = qm.quad_grad_x(z, *uargs)
    b = qm.quad_grad_y(z, *uargs)
    v = np.zeros(b.shape[0])
    r = b.copy()
    p = r.copy()
    rr = r @ r
    stop = (tol * tol) * rr
    nit = 0
    while rr > stop and nit < maxiter:
        hp = qm.quad_hvp_yy(z, p, *largs)
        alpha = rr / (p @ hp)
        v += alpha * p
        r -= alpha * hp
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
        nit += 1
    return gx - qm.quad_hvp_xy(z, v, *largs), v, fun, nit


def _best(fns, number, repeat):
    """Best time per call of each function, sampled interleaved."""
    best = [np.inf] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], timeit.timeit(fn, number=number) / number)
    return best


def measure(dy, number, repeat):
    q = make_quadratic(dx=5, dy=dy, seed=0)
    P = q.problem
    x = np.zeros(5)
    y = mlo.hypergrad(P, x, np.zeros(dy)).y
    res = mlo.hypergrad(P, x, y, lower_solved=True, tol=TOL)
    comp = _hypergrad._compiled(P, x, y)
    up, lo = comp.upper, comp.lower
    v0 = np.zeros(dy)
    maxiter = 10 * dy
    opts = (False, 0, 1e-10, 1000, -1.0, _imp.CG, TOL, 0.0, maxiter, -1.0)

    def fixed():
        return up.fns, up.kargs, up.has_value, lo.fns, lo.kargs, lo.flags

    z = np.concatenate([x, y])
    uargs, largs = P.upper.args, P.lower.args
    g_fused, _, _, nit_fused = fused_hypergrad(z, 5, uargs, largs, TOL, maxiter)
    err = np.max(np.abs(g_fused - res.grad)) / np.max(np.abs(res.grad))
    calls = [
        lambda: mlo.hypergrad(P, x, y, lower_solved=True, tol=TOL),
        lambda: call_bound(lo.bound_kernels, up, _imp.implicit_hypergrad, fixed, x, y, v0,
                           *opts, new_counts()),
        lambda: call_kernel(_imp.implicit_hypergrad, *fixed(), x, y, v0, *opts,
                            new_counts()),
        lambda: fused_hypergrad(z, 5, uargs, largs, TOL, maxiter),
    ]
    for fn in calls:
        fn()
    for name, fn in (("bound", calls[1]), ("keyed", calls[2])):  # same arguments as hypergrad
        g = fn()[0]
        if not np.allclose(g, res.grad, rtol=1e-12, atol=1e-14 * np.max(np.abs(res.grad))):
            raise RuntimeError(f"kernel, {name}: gradient differs from hypergrad's by "
                               f"{np.max(np.abs(g - res.grad)):.3e}; kernel arguments stale?")
    t = _best(calls, number, repeat)
    return dict(dy=dy, nit=res.nit, nit_fused=nit_fused, err=err, whole=t[0], bound=t[1],
                keyed=t[2], fused=t[3])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    number, repeat = (500, 7) if args.quick else (2000, 15)
    try:
        from threadpoolctl import threadpool_limits
        limiter = threadpool_limits(1)
    except ImportError:
        limiter = None
    lines = [f"# fixed cost of hypergrad(lower_solved=True), dx = 5, CG to {TOL:g}; "
             f"{datetime.date.today()}; best of {repeat} interleaved samples of {number} "
             f"calls; times in microseconds",
             f"{'dy':>4} {'CG it':>6} {'hypergrad':>10} {'kernel bound':>13} "
             f"{'kernel keyed':>13} {'fused':>7} {'fixed cost':>11} {'|g - fused|':>12}"]
    for dy in (5, 10, 50):
        m = measure(dy, number, repeat)
        lines.append(f"{m['dy']:>4} {m['nit']:>6} {1e6 * m['whole']:>10.2f} "
                     f"{1e6 * m['bound']:>13.2f} {1e6 * m['keyed']:>13.2f} "
                     f"{1e6 * m['fused']:>7.2f} {1e6 * (m['whole'] - m['fused']):>11.2f} "
                     f"{m['err']:>12.1e}")
        print(lines[-1], flush=True)
    del limiter
    out = os.path.join(HERE, "results", f"fixed-cost-{datetime.date.today()}"
                       f"{'-quick' if args.quick else ''}.txt")
    with open(out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines[:2]))
    print(f"written {out}")


if __name__ == "__main__":
    main()
