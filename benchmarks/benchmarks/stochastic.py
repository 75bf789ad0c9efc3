"""Stochastic bilevel methods (``minimize_bilevel(..., batch_size=...)``) on the quadratic.

Problem: ``make_quadratic(dx=10, dy=20, n_outer=1000, n_inner=1000, seed=0)`` (closed-form
F*, x*), minibatches of 64, seed 0, x0 = y0 = 0, a fixed number of iterations per method
(``ITERATIONS``). Methods are discovered at import time from ``mlocore.stochastic.METHODS``,
so families registered later are benchmarked without editing this file.

Default steps (what users get), computed once per method by one short default run in
``setup`` and passed explicitly to the timed calls, so the driver's Lipschitz estimates (power
iterations with exact hypergradients) are not timed: the timed call is the same run a user
makes after the first one. ``setup`` also makes a warm-up call (compile or disk-cache load);
both are memoized per process, as asv re-runs ``setup`` before every sample.

- ``time_minimize``: ``ITERATIONS`` iterations, one checkpoint, no reference evaluation;
- ``track_suboptimality``: ``F(x) - F*`` after them (closed form);
- ``track_oracle_samples``: oracle samples used (sum of batch sizes over all oracle calls);
- ``track_loop_time``: seconds inside the compiled loop only (``res.time``), to separate the
  per-call Python overhead of the driver from the loop.

The one-run tables (suboptimality against samples and time, sample-complexity slopes,
compiled vs plain NumPy loops) are ``benchmarks/stochastic_ratios.py``.
"""
from __future__ import annotations

import functools

import numpy as np

import mlocore as mlo
from mlocore.stochastic import METHODS
from mlocore.problems import make_quadratic

ITERATIONS = 200
BATCH = 64
SEED = 0
STOCHASTIC = list(METHODS)


@functools.lru_cache(maxsize=None)
def get_quadratic():
    return make_quadratic(dx=10, dy=20, n_outer=1000, n_inner=1000, seed=0)


@functools.lru_cache(maxsize=None)
def default_steps(method):
    """The driver's default steps for this problem and start (one short default run); also
    the warm-up call."""
    q = get_quadratic()
    res = mlo.minimize_bilevel(q.stochastic_problem, np.zeros(q.dx), np.zeros(q.dy),
                               method=method, batch_size=BATCH, seed=SEED, maxiter=2)
    kw = {"step": res.steps["alpha"], "inner_step": res.steps["beta"]}
    if "neumann_step" in METHODS[method].uses:
        kw["neumann_step"] = res.steps["neumann_step"]
    return kw


def run(method, reference=None):
    q = get_quadratic()
    return mlo.minimize_bilevel(q.stochastic_problem, np.zeros(q.dx), np.zeros(q.dy),
                                method=method, batch_size=BATCH, seed=SEED,
                                maxiter=ITERATIONS, eval_every=ITERATIONS,
                                reference=reference, **default_steps(method))


class Stochastic:
    """Fixed-iteration runs of every registered stochastic method, default steps."""

    params = [STOCHASTIC]
    param_names = ["method"]
    timeout = 300

    def setup(self, method):
        default_steps(method)  # memoized: steps + compile / cache load, never timed
        self.method = method

    def time_minimize(self, method):
        run(method)

    def track_suboptimality(self, method):
        q = get_quadratic()
        return float(q.F(run(method).x) - q.F_star)

    track_suboptimality.unit = "F - F*"

    def track_oracle_samples(self, method):
        return int(sum(run(method).oracle_samples.values()))

    track_oracle_samples.unit = "samples"

    def track_loop_time(self, method):
        return float(run(method).time)

    track_loop_time.unit = "seconds"
