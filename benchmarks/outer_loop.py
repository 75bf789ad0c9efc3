"""Outer loops of minimize_bilevel: L-BFGS (default) against Barzilai-Borwein and scipy.

    python benchmarks/outer_loop.py            # writes benchmarks/results/outer-loop-<date>.txt
    python benchmarks/outer_loop.py --quick    # one timing sample

For each problem, ``minimize_bilevel(method="aid", outer=...)`` with ``outer="lbfgs"`` and
``outer="bb"``, and ``scipy.optimize.minimize(HyperObjective(...), jac=True,
method="L-BFGS-B")`` (``gtol`` = tol, ``ftol`` = 0; the same bounds), all from zeros:

- ``nit``: outer iterations; ``hg``: hypergradients (upper-gradient evaluations of
  minimize_bilevel, ``HyperObjective.ncalls`` for scipy); ``time``: best of the samples, in
  ms (the first, compiling call excluded); ``F``: the final value; ``err``: ``|x - x*| /
  |x*|`` against the closed form (quadratics; the logistic problem is not convex in the
  penalties, and the runs may stop at different local minima); ``ok``: reported success.
- ratios: bb / lbfgs and scipy / lbfgs for hypergradients and time.

Problems: ``make_quadratic`` at three sizes / ridges (the ridge sets the conditioning), tol
1e-10; ``make_logistic`` (per-feature penalties, box ``|lam| <= 20``), tol 1e-6.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np
import scipy.optimize as so

import mlocore as mlo
from mlocore.problems import make_logistic, make_quadratic

HERE = os.path.dirname(os.path.abspath(__file__))


def _hypergrads(res):
    c = res.oracle_calls
    return max(c["upper_grad"], c["upper_grad_x"], c["upper_grad_y"])


def _best(fn, samples):
    fn()  # compiles
    best, out = np.inf, None
    for _ in range(samples):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, 1e3 * best


def _cases():
    for dx, dy, ridge in ((10, 15, 0.1), (20, 30, 0.1), (50, 80, 0.02)):
        q = make_quadratic(dx=dx, dy=dy, ridge=ridge, seed=1)
        yield f"quadratic dx={dx} dy={dy} ridge={q.ridge:g}", q.problem, None, 1e-10, q.x_star
    lg = make_logistic(n_train=200, n_val=200, n_features=10, seed=0)
    d = lg.n_features
    bounds = (np.full(d, -20.0), np.full(d, 20.0))
    p = mlo.BilevelProblem(lg.problem.upper, lg.problem.lower, dims=(d, d), bounds=bounds)
    yield f"logistic n_features={d} n=200", p, bounds, 1e-6, None


def run(samples):
    lines = [f"# benchmarks/outer_loop.py, {datetime.date.today()}, {samples} samples, "
             f"python {sys.version.split()[0]}, numpy {np.__version__}", ""]
    head = (f"{'problem':<38}{'loop':<8}{'nit':>5}{'hg':>6}{'time ms':>10}{'F':>14}"
            f"{'err':>10}{'ok':>4}")
    lines.append(head)
    ratios = []
    for name, p, bounds, tol, x_star in _cases():
        dx, dy = p.dx, p.dy
        x0, y0 = np.zeros(dx), np.zeros(dy)
        rows = {}
        for outer in ("lbfgs", "bb"):
            res, ms = _best(lambda: mlo.minimize_bilevel(p, x0, y0, method="aid", tol=tol,
                                                         outer=outer), samples)
            rows[outer] = (res.x, res.fun, res.nit, _hypergrads(res), ms, res.success)

        def scipy_run():
            fobj = mlo.HyperObjective(p, y0)
            r = so.minimize(fobj, x0, jac=True, method="L-BFGS-B",
                            bounds=None if bounds is None else list(zip(*bounds)),
                            options={"gtol": tol, "ftol": 0.0, "maxiter": 1000})
            return r, fobj.ncalls

        (res, ncalls), ms = _best(scipy_run, samples)
        rows["scipy"] = (res.x, res.fun, res.nit, ncalls, ms, res.success)
        for loop, (x, fun, nit, hg, ms, ok) in rows.items():
            err = "-" if x_star is None else \
                f"{np.linalg.norm(x - x_star) / np.linalg.norm(x_star):.1e}"
            lines.append(f"{name:<38}{loop:<8}{nit:>5}{hg:>6}{ms:>10.2f}{fun:>14.10f}"
                         f"{err:>10}{'y' if ok else 'n':>4}")
        lb = rows["lbfgs"]
        ratios.append((name, rows["bb"][3] / lb[3], rows["bb"][4] / lb[4],
                       rows["scipy"][3] / lb[3], rows["scipy"][4] / lb[4]))
    lines += ["", "ratios to lbfgs (hypergradients, time); bb stops at maxiter=100 where "
              "its ok is n", f"{'problem':<38}{'bb hg':>8}{'bb t':>8}{'scipy hg':>10}"
              f"{'scipy t':>9}"]
    for name, a, b, c, d in ratios:
        lines.append(f"{name:<38}{a:>8.2f}{b:>8.2f}{c:>10.2f}{d:>9.2f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    out = run(1 if args.quick else 5)
    print(out)
    path = os.path.join(HERE, "results", f"outer-loop-{datetime.date.today()}.txt")
    with open(path, "w") as fh:
        fh.write(out + "\n")


if __name__ == "__main__":
    main()
