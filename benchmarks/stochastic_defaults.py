"""Stochastic methods with their defaults and with ``step="auto"`` (one run).

    python benchmarks/stochastic_defaults.py [--quick]

Part 1, the stochastic quadratic ``make_quadratic(dx=5, dy=10, seed=0)`` (100 lower, 50
upper samples, closed-form x*), batch 16, 3000 iterations from (0, 0), seeds 0, 1, 2: the
relative distance ``|x - x*| / |x*|`` of the returned x for

* ``before``: the former defaults (last iterate; AID with 10 CG iterations per step;
  Hessian-free with T = 10 and the lower schedule's offset 100; penalty with rho = 10 and
  ``alpha ~ k^-3/5``, ``beta ~ k^-2/5``; primal-dual with ``dual_step = 0.1``, the constraint
  at the iterates (``constraint_average = 1``) and the same decaying steps), expressed as
  options. The penalty methods' loop
  itself changed (yhat's last step shares the (x, y) step's batch): their ``before`` runs the
  current loop with the former options; the former loop's distances (measured at commit
  8b60207, before these changes) are printed below the table;
* ``defaults``: the current defaults (tail average over the last half, except SABA / VRBO);
* ``auto``: ``step="auto"`` (its 3 x 3 grid runs 300 iterations per trial).

and the ratio of the oracle calls and of the time of ``auto`` to ``defaults`` (the search's
cost included). Part 2, the other library problems (``make_logistic()``,
``make_logistic_ijcnn1_like`` at 2000 / 2000 samples, ``make_cleaning()``), defaults, batch
32, 1000 iterations (300 with ``--quick``), seed 0: the status, the halvings after
divergence and ``F(x) / F(x0)`` from the problem's reference. Results go to
``benchmarks/results/stochastic-defaults-<date>.txt``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

import numpy as np

import mlocore as mlo
from mlocore.problems import make_cleaning, make_logistic, make_logistic_ijcnn1_like, \
    make_quadratic
from mlocore.stochastic import STOCHASTIC_METHODS, Schedule

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = (0, 1, 2)


def former_defaults(problem, method, x0, y0, seed):
    """The options that reproduce the defaults before the tail average / AID / PZOBO
    changes."""
    opts = {"average": 0.0}
    if method == "penalty":
        base = mlo.minimize_bilevel(problem, x0, y0, method=method, maxiter=0, batch_size=16,
                                    seed=seed).steps
        opts.update(rho=10.0, step=Schedule(base["alpha"].initial, 0.6, 100.0),
                    inner_step=Schedule(base["beta"].initial, 0.4, 100.0))
    if method == "primal-dual":  # constraint_average = 1: c at the iterates y, yhat
        base = mlo.minimize_bilevel(problem, x0, y0, method=method, maxiter=0, batch_size=16,
                                    seed=seed).steps
        opts.update(dual_step=0.1, constraint_average=1.0,
                    step=Schedule(base["alpha"].initial, 0.6, 100.0),
                    inner_step=Schedule(base["beta"].initial, 0.4, 100.0))
    if method == "aid":
        opts["neumann_terms"] = 10
    if method == "hessian-free":
        b0 = mlo.minimize_bilevel(problem, x0, y0, method=method, maxiter=0, batch_size=16,
                                  seed=seed).steps["beta"].initial
        opts.update(inner_steps=10, inner_step=Schedule(b0, 0.4, 100.0))
    return opts


def quadratic_table(maxiter, out):
    q = make_quadratic(dx=5, dy=10, seed=0)
    P, xs = q.stochastic_problem, q.x_star
    x0, y0 = np.zeros(5), np.zeros(10)
    rel = lambda x: np.linalg.norm(x - xs) / np.linalg.norm(xs)  # noqa: E731
    out(f"make_quadratic(5, 10, seed=0), batch 16, maxiter {maxiter}, seeds {SEEDS}: "
        "relative distance |x - x*| / |x*|")
    out(f"{'method':13s} {'before (seeds 0 1 2)':>22s} {'defaults':>22s} {'auto':>22s} "
        f"{'calls auto/def':>14s} {'time auto/def':>13s}")
    for m in STOCHASTIC_METHODS:
        cols = {"before": [], "defaults": [], "auto": []}
        calls = {"defaults": 0, "auto": 0}
        times = {"defaults": 0.0, "auto": 0.0}
        for s in SEEDS:
            kw = dict(method=m, maxiter=maxiter, batch_size=16, seed=s)
            r = mlo.minimize_bilevel(P, x0, y0, **kw, **former_defaults(P, m, x0, y0, s))
            cols["before"].append(rel(r.x))
            for name, extra in (("defaults", {}), ("auto", {"step": "auto"})):
                r = mlo.minimize_bilevel(P, x0, y0, **kw, **extra)
                cols[name].append(rel(r.x))
                calls[name] += sum(r.oracle_calls.values())
                times[name] += r.time
        fmt = lambda v: " ".join(f"{e:6.4f}" for e in v)  # noqa: E731
        out(f"{m:13s} {fmt(cols['before']):>22s} {fmt(cols['defaults']):>22s} "
            f"{fmt(cols['auto']):>22s} {calls['auto'] / calls['defaults']:14.2f} "
            f"{times['auto'] / times['defaults']:13.2f}")
    out("former penalty loop (yhat on its own batches, the minibatch test of c > 0), former "
        "defaults, last iterate: penalty 0.2221 0.2491 0.2298, primal-dual 0.1517 0.2120 "
        "0.0993")


def other_problems(maxiter, out):
    problems = {"make_logistic()": make_logistic(),
                "ijcnn1_like(2000, 2000)": make_logistic_ijcnn1_like(n_train=2000,
                                                                     n_val=2000),
                "make_cleaning()": make_cleaning()}
    out("")
    out(f"other problems, defaults, batch 32, maxiter {maxiter}, seed 0: status, halvings, "
        "F(x) / F(x0)")
    out(f"{'method':13s} " + " ".join(f"{name:>26s}" for name in problems))
    for m in STOCHASTIC_METHODS:
        row = []
        for p in problems.values():
            P = p.stochastic_problem
            x0, y0 = np.zeros(P.dx), np.zeros(P.dy)
            r = mlo.minimize_bilevel(P, x0, y0, method=m, maxiter=maxiter, batch_size=32,
                                     seed=0)
            ratio = p.F(r.x) / p.F(x0)
            row.append(f"{r.status:3d} {r.step_reductions:2d} {ratio:9.4f}")
        out(f"{m:13s} " + " ".join(f"{c:>26s}" for c in row))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 iterations on part 2")
    args = ap.parse_args()
    lines = []

    def out(s):
        print(s, flush=True)
        lines.append(s)

    t0 = time.perf_counter()
    quadratic_table(3000, out)
    other_problems(300 if args.quick else 1000, out)
    out(f"\n(total {time.perf_counter() - t0:.0f} s; mlocore {mlo.__version__})")
    date = datetime.date.today().isoformat()
    path = os.path.join(HERE, "results", f"stochastic-defaults-{date}.txt")
    with open(path, "w") as fh:
        fh.write("python benchmarks/stochastic_defaults.py"
                 + (" --quick" if args.quick else "") + "\n\n" + "\n".join(lines) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
