"""n-level hypergradients: the implicit modes against the unrolled baseline.

Problems with closed forms (``mlocore.problems``):

- ``trilevel-50``: the trilevel quadratic of Giovannelli, Kent & Vicente, dim 50 per level
  (``make_trilevel_quadratic(50)``; grad F = c + 7 x, F* known);
- ``nlevel-3`` / ``nlevel-4`` / ``nlevel-5``: random n-level quadratics
  ``make_nlevel_quadratic(n, dims, seed=0)`` with dims (10,)*3, (5,)*4, (2,)*5. The sizes
  shrink with n because both sides grow exponentially with the depth: the implicit
  recursion nests one CG solve per level (~ d CG steps each, so ~ d^(n-1) products), the
  unrolled baseline nests T gradient steps per level (~ T^(n-1) products).

Methods: the implicit modes ``exact``, ``fd``, ``truncated`` and the unrolled baseline
``itd`` (Sato et al. 2021) with T per level doubled until its hypergradient reaches the
relative error ``TARGET_RELERR`` against the closed form (capped at ``ITD_T_MAX``, where the
baseline becomes too slow; ``track_relerr`` then shows how far it got), and its inner steps
taken from one calibration call and passed in (``step=``): the baseline does not pay for
its power iterations (they are what it would compute itself; for quadratics the unrolled
Hessians are constant); ``itd-auto`` is the same T with the library default
``step=None``, which re-runs that power iteration in every call. Every call starts the
lower levels at zero ("cold"). ``setup`` builds the (memoized) case, calibrates T and makes
a warm-up call, so neither calibration nor compile time is ever timed.

``MultilevelMinimize``: ``minimize_multilevel`` (default Barzilai-Borwein + Armijo steps)
from x0s = 0 until ``|F(x_1) - F*| <= 1e-6 |F*|`` (true F, closed form, checked by a
callback that stops the run); "itd" with T per level doubled until it gets there.

``MultilevelPeakMemory``: one "itd" hypergradient on ``trilevel-50`` as T grows against
"exact" (no T): process peak RSS (``peakmem_``), its increase over the call
(``track_peak_increase``, /proc/self/clear_refs) and the tracemalloc peak (Python and
NumPy allocations only; numba's runtime allocations are invisible to it).

The helpers (``get_case``, ``minimize_to_target``, ...) are shared with
``benchmarks/multilevel_ratios.py``.
"""
from __future__ import annotations

import functools
import time
import tracemalloc

import numpy as np

import mlocore as mlo

from .common import environment_lines as common_environment_lines  # noqa: F401 (script)
from .common import peak_rss_increase  # noqa: F401  (used by the suite and the script)
from mlocore.problems import make_nlevel_quadratic, make_trilevel_quadratic

TARGET_RELERR = 1e-6   # one hypergradient call: relative error against the closed form
TARGET_FREL = 1e-6     # minimization: |F - F*| <= TARGET_FREL |F*|
MODES = ("exact", "fd", "truncated")
METHODS = MODES + ("itd", "itd-auto")
#: "itd": the baseline with its inner steps passed in (computed once per T by its own
#: power iteration); "itd-auto": the library default (``step=None`` / ``inner_step=None``),
#: which re-runs that power iteration (15 products per level) in every call
PROBLEMS = ("trilevel-50", "nlevel-3", "nlevel-4", "nlevel-5")
NLEVEL = {  # name: (n, dims, cond)
    "nlevel-3": (3, (10, 10, 10), 4.0),
    "nlevel-4": (4, (5, 5, 5, 5), 4.0),
    "nlevel-5": (5, (2, 2, 2, 2, 2), 4.0),
    # a harder 3-level instance (worse conditioned levels: the baseline needs more steps)
    "nlevel-3-cond100": (3, (10, 10, 10), 100.0),
}
#: the largest T per level tried for the baseline (cost ~ T^(n-1))
ITD_T_MAX = {"trilevel-50": 64, "nlevel-3": 128, "nlevel-3-cond100": 256, "nlevel-4": 32,
             "nlevel-5": 8}


def describe(name):
    if name.startswith("trilevel-"):
        d = int(name.split("-")[1])
        return f"make_trilevel_quadratic(dim={d})"
    n, dims, cond = NLEVEL[name]
    return f"make_nlevel_quadratic(n={n}, dims={dims}, seed=0, cond={cond:g})"


def total_calls(oracle_calls):
    """Sum of grad + hvp + tvp + value calls over all levels."""
    return int(sum(sum(c.values()) for c in oracle_calls.values()))


class Case:
    """A multilevel problem with its closed form, a fixed point x and cold starts."""

    def __init__(self, name):
        self.name = name
        if name.startswith("trilevel-"):
            self.obj = make_trilevel_quadratic(dim=int(name.split("-")[1]))
        else:
            n, dims, cond = NLEVEL[name]
            self.obj = make_nlevel_quadratic(n=n, dims=dims, seed=0, cond=cond)
        self.problem = self.obj.problem
        self.dims = tuple(self.problem.dims)
        self.n = len(self.dims)
        d1 = self.dims[0]
        self.x = np.linspace(-1.0, 1.0, d1)
        self.xs = [self.x] + [np.zeros(d) for d in self.dims[1:]]
        self.x0s = [np.zeros(d) for d in self.dims]
        self.grad_true = np.asarray(self.obj.hypergrad(self.x))
        self.F_star = float(self.obj.F_star)
        self._first = {}
        self._itd_T = None

    # -- closed forms ----------------------------------------------------------------------
    def F(self, x1):
        return float(self.obj.F(x1))

    def relerr(self, g):
        return float(np.linalg.norm(np.asarray(g) - self.grad_true)
                     / np.linalg.norm(self.grad_true))

    # -- the baseline's settings -----------------------------------------------------------
    def Ts(self, T):
        """T as the per-level tuple (levels 2..n)."""
        return tuple(T) if isinstance(T, (tuple, list)) else (int(T),) * (self.n - 1)

    def itd_first(self, T):
        """The baseline's own call at this T (it computes its inner steps by power
        iteration); memoized, it gives the steps passed in afterwards."""
        T = self.Ts(T)
        if T not in self._first:
            self._first[T] = mlo.hypergrad(self.problem, self.xs, method="itd", T=list(T))
        return self._first[T]

    def itd_steps(self, T):
        """The inner steps the baseline computes itself for this T."""
        return [float(s) for s in self.itd_first(T).step]

    @property
    def itd_T(self):
        """Smallest T (same for every level, doubled from 1) whose one-call hypergradient
        reaches TARGET_RELERR, capped at ITD_T_MAX; memoized."""
        if self._itd_T is None:
            T = 1
            while True:
                err = self.relerr(self.itd_first(T).grad)
                if err <= TARGET_RELERR or 2 * T > ITD_T_MAX[self.name]:
                    break
                T *= 2
            self._itd_T = T
        return self._itd_T

    # -- one hypergradient -----------------------------------------------------------------
    def run(self, method, T=None, xs=None):
        xs = self.xs if xs is None else xs
        if method in ("itd", "itd-auto"):
            T = self.Ts(self.itd_T if T is None else T)
            step = self.itd_steps(T) if method == "itd" else None
            return mlo.hypergrad(self.problem, xs, method="itd", T=list(T), step=step)
        return mlo.hypergrad(self.problem, xs, method=method)


@functools.lru_cache(maxsize=None)
def get_case(name):
    return Case(name)


_WARM: set = set()


def warm_up(case, method):
    """One call so that compile / cache-load time is never timed (once per process)."""
    key = (case.name, method)
    if key not in _WARM:
        if method in ("itd", "itd-auto"):
            case.run(method, T=1)
            mlo.minimize_multilevel(case.problem, case.x0s, method="itd", T=1, maxiter=1,
                                    inner_step=case.itd_steps(1) if method == "itd" else None)
        else:
            case.run(method)
            mlo.minimize_multilevel(case.problem, case.x0s, method=method, maxiter=1)
        _WARM.add(key)


# ---------------------------------------------------------------------------------------
# Minimization to a target accuracy on F
# ---------------------------------------------------------------------------------------
def minimize_to_target(case, method, T=None, step=None, maxiter=100, frel=TARGET_FREL):
    """``minimize_multilevel`` from x0s = 0 until ``|F(x_1) - F*| <= frel |F*|``.

    The true F (closed form) is checked by a callback after every iteration, which stops
    the run (``StopIteration``); its cost (microseconds) is included in the time. Returns a
    dict: time (wall, s), calls (total oracle calls), nit, frel (reached), reached, status,
    message, T, result.
    """
    target = frel * abs(case.F_star)
    kw = {}
    if method in ("itd", "itd-auto"):
        T = case.Ts(T)
        kw = dict(T=list(T), inner_step=case.itd_steps(T) if method == "itd" else None)
        method = "itd"

    def stop(r):
        if abs(case.F(r.x) - case.F_star) <= target:
            raise StopIteration

    t0 = time.perf_counter()
    res = mlo.minimize_multilevel(case.problem, case.x0s, method=method, step=step,
                                  maxiter=maxiter, tol=1e-12, callback=stop, **kw)
    elapsed = time.perf_counter() - t0
    err = abs(case.F(res.x) - case.F_star)
    return dict(time=elapsed, calls=total_calls(res.oracle_calls), nit=int(res.nit),
                frel=err / abs(case.F_star), reached=bool(err <= target), status=res.status,
                message=res.message, T=T, result=res)


def calibrate_minimize_T(case, step=None, T_max=None, refine=False, log=None, maxiter=100):
    """T per level for "itd" in :func:`minimize_to_target`: a common T doubled from 1
    until the run reaches the target (then, with ``refine``, each level's T halved once
    if the target is still reached). Returns ``(T tuple or None, runs)``; ``runs`` are the
    (steady-state) runs made, ``(T, info)``."""
    T_max = ITD_T_MAX[case.name] if T_max is None else T_max
    runs = []
    T, found = 1, None
    while T <= T_max:
        info = minimize_to_target(case, "itd", T=T, step=step, maxiter=maxiter)
        runs.append((case.Ts(T), info))
        if log:
            log(case.Ts(T), info)
        if info["reached"]:
            found = case.Ts(T)
            break
        T *= 2
    if found is None:
        return None, runs
    if refine and found[0] > 1:
        cur = list(found)
        tried = {T for T, _ in runs}
        for i in reversed(range(len(cur))):  # innermost level first
            trial = list(cur)
            trial[i] = cur[i] // 2
            if tuple(trial) in tried:  # e.g. the common T/2 that failed already
                continue
            tried.add(tuple(trial))
            info = minimize_to_target(case, "itd", T=trial, step=step, maxiter=maxiter)
            runs.append((tuple(trial), info))
            if log:
                log(tuple(trial), info)
            if info["reached"]:
                cur = trial
        found = tuple(cur)
    return found, runs


# ---------------------------------------------------------------------------------------
# Peak memory of one call
# ---------------------------------------------------------------------------------------
# (shared with the bilevel suite; see common.peak_rss_increase for the method)


def tracemalloc_peak(fn):
    """Peak bytes traced by tracemalloc during ``fn()`` (Python / NumPy allocations)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return max(0, tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------------------------
# asv suites
# ---------------------------------------------------------------------------------------
class MultilevelHypergrad:
    """One hypergradient at x = linspace(-1, 1, d_1), lower levels started at zero.

    itd: T per level doubled until the relative error reaches 1e-6 (``track_T``), capped
    at ``ITD_T_MAX`` (nlevel-5: 8; ``track_relerr`` shows the error reached).
    """

    params = (list(PROBLEMS), list(METHODS))
    param_names = ["problem", "method"]
    timeout = 600
    repeat = (1, 5, 30.0)
    number = 1

    def setup(self, problem, method):
        # memoized per process: asv re-runs setup before every sample
        self.case = get_case(problem)
        if method.startswith("itd"):
            self.case.itd_T  # calibration (several calls) outside the timing
        warm_up(self.case, method)

    def time_hypergrad(self, problem, method):
        self.case.run(method)

    def track_relerr(self, problem, method):
        return self.case.relerr(self.case.run(method).grad)

    track_relerr.unit = "relative error"

    def track_oracle_calls(self, problem, method):
        return total_calls(self.case.run(method).oracle_calls)

    track_oracle_calls.unit = "calls"

    def track_T(self, problem, method):
        """T per level of the baseline (NaN, shown as n/a, for the implicit modes)."""
        return float(self.case.itd_T) if method.startswith("itd") else float("nan")

    track_T.unit = "steps"


class MultilevelMinimize:
    """``minimize_multilevel`` from zero to |F - F*| <= 1e-6 |F*| (default step rule)."""

    params = (["trilevel-50", "nlevel-3", "nlevel-4"], list(METHODS))
    param_names = ["problem", "method"]
    timeout = 600
    repeat = (1, 5, 30.0)
    number = 1
    _T = {}

    def setup(self, problem, method):
        self.case = get_case(problem)
        warm_up(self.case, method)
        if method.startswith("itd") and problem not in self._T:
            T, _ = calibrate_minimize_T(self.case)
            if T is None:
                raise NotImplementedError(f"itd does not reach the target on {problem} "
                                          f"with T <= {ITD_T_MAX[problem]}")
            self._T[problem] = T
        self.T = self._T.get(problem)

    def _run(self, method):
        return minimize_to_target(self.case, method, T=self.T)

    def time_minimize(self, problem, method):
        self._run(method)

    def track_oracle_calls(self, problem, method):
        return self._run(method)["calls"]

    track_oracle_calls.unit = "calls"

    def track_iterations(self, problem, method):
        return self._run(method)["nit"]

    track_iterations.unit = "iterations"

    def track_F_relerr(self, problem, method):
        return self._run(method)["frel"]

    track_F_relerr.unit = "relative error"

    def track_T(self, problem, method):
        return float(self.T[0]) if method.startswith("itd") else float("nan")

    track_T.unit = "steps"


class MultilevelPeakMemory:
    """One hypergradient on trilevel-50: itd (T steps on levels 2 and 3) vs exact."""

    params = ([10, 40, 160], ["exact", "itd"])
    param_names = ["T", "method"]
    timeout = 600
    PROBLEM = "trilevel-50"

    def setup(self, T, method):
        self.case = get_case(self.PROBLEM)
        warm_up(self.case, method)
        if method == "itd":
            self.case.itd_steps(T)

    def _call(self, T, method):
        return self.case.run(method, T=T if method == "itd" else None)

    def peakmem_hypergrad(self, T, method):
        self._call(T, method)

    def track_peak_increase(self, T, method):
        inc = peak_rss_increase(lambda: self._call(T, method))
        if inc is None:
            raise NotImplementedError("no way to reset the peak RSS on this platform")
        return inc / 2.0 ** 10

    track_peak_increase.unit = "KiB"

    def track_tracemalloc_peak(self, T, method):
        return tracemalloc_peak(lambda: self._call(T, method)) / 2.0 ** 10

    track_tracemalloc_peak.unit = "KiB"
