"""Stochastic loops with sample block oracles against the joint callbacks (one run).

    NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \\
        python benchmarks/stochastic_blocks.py [--quick]

Problem: the stochastic quadratic of :mod:`mlocore.problems.quadratic` (``make_quadratic``,
dx=20, dy=200, 500 samples per level, batch 32). Per sample, the joint lower HVP with
direction (0, v) passes over the dx x dy matrix C_i; the block ``hvp_yy`` reads u_i only
(O(dy)), ``hvp_xy`` reads C_i once, ``grad_y`` skips the x-part of the gradient.

Each method runs the same iterations from the same seed with the library problem (its
sample blocks) and with a copy that has the joint callbacks only; the time is the
driver's ``res.time`` (seconds inside the compiled loop, compile excluded), best of
``--repeats``. The iterates agree to round-off (printed). Results go to
``benchmarks/results/stochastic-blocks-<date>.txt``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import numpy as np

import mlocore as mlo
from mlocore.problems import make_quadratic

HERE = os.path.dirname(os.path.abspath(__file__))

#: method -> (maxiter, options)
RUNS = {
    "soba": (400, {}),
    "stocbio": (100, dict(inner_steps=10, neumann_terms=10)),
    "aid": (100, dict(inner_steps=10, neumann_terms=10)),
    "stable": (20, dict(hessian_floor=0.1)),
    "hessian-free": (50, dict(inner_steps=10, directions=5)),
    "mrbo": (100, dict(neumann_terms=10)),
}


def joint_only(problem):
    """The same bilevel problem with the block oracles removed."""
    def strip(o):
        return mlo.Objective(o.grad, hvp=o.hvp, value=o.value, args=o.args,
                             n_samples=o.n_samples)
    return mlo.BilevelProblem(strip(problem.upper), strip(problem.lower), problem.dims)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    dx, dy, n = (5, 50, 100) if a.quick else (20, 200, 500)
    q = make_quadratic(dx=dx, dy=dy, n_outer=n, n_inner=n, seed=0)
    blk, jnt = q.stochastic_problem, joint_only(q.stochastic_problem)
    x0, y0 = np.zeros(dx), np.zeros(dy)
    lines = [f"stochastic quadratic dx={dx} dy={dy} n={n} batch 32, "
             f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', '-')}",
             f"{'method':14s} {'iters':>6s} {'joint s':>9s} {'blocks s':>9s} {'ratio':>7s} "
             f"{'|dx|':>9s}"]
    print(lines[0])
    print(lines[1])
    for method, (iters, opts) in RUNS.items():
        if a.quick:
            iters = max(2, iters // 10)
        kw = dict(method=method, maxiter=iters, eval_every=iters, batch_size=32, seed=1,
                  step=0.01, inner_step=0.1, **opts)
        if method in ("stocbio", "mrbo"):
            kw["neumann_step"] = 0.1
        times = {}
        res = {}
        for name, prob in (("joint", jnt), ("blocks", blk)):
            best = np.inf
            for _ in range(a.repeats):
                r = mlo.minimize_bilevel(prob, x0, y0, **kw)
                best = min(best, r.time)
            times[name], res[name] = best, r
        diff = float(np.abs(res["blocks"].x - res["joint"].x).max())
        line = (f"{method:14s} {iters:6d} {times['joint']:9.4f} {times['blocks']:9.4f} "
                f"{times['joint'] / times['blocks']:7.2f} {diff:9.1e}")
        print(line, flush=True)
        lines.append(line)
    if not a.quick:
        out = os.path.join(HERE, "results",
                           f"stochastic-blocks-{datetime.date.today().isoformat()}.txt")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        print("written", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
