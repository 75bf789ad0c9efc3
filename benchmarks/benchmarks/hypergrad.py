"""Hypergradient methods on the dense quadratic bilevel problem, at equal accuracy.

Every method starts from the lower solution y*(x) (``lower_solved=True`` for the implicit
methods; ITD unrolls from y0 = y*) and is tuned to relative error <= 1e-6 against the closed
form (see :mod:`.common`). ``scipy-cg`` is the same CG hypergradient written by a user with
``scipy.sparse.linalg.cg`` and a ``LinearOperator`` over the NumPy HVP.
"""
from .common import (ALL_METHODS, get_case, lower_solve_error, peak_rss_increase, warm_up)


class Hypergrad:
    """Time, oracle calls and error of one hypergradient, per method and lower size dy."""

    params = ([10, 100, 1000], list(ALL_METHODS))
    param_names = ["dy", "method"]
    timeout = 300
    repeat = (3, 10, 20.0)

    def setup(self, dy, method):
        # get_case and warm_up are memoized per process: asv re-runs setup before every
        # sample, and the calibration and the compile / cache load must not be timed.
        self.case = get_case(dy)
        warm_up(self.case, method)

    def time_hypergrad(self, dy, method):
        self.case.run(method)

    def track_relerr(self, dy, method):
        return self.case.data.relerr(self.case.grad(method))

    track_relerr.unit = "relative error"

    def track_oracle_calls(self, dy, method):
        return self.case.oracle_calls(method)

    track_oracle_calls.unit = "calls"

    def track_unrolled_steps(self, dy, method):
        """T for ITD (and the number of Neumann terms) that reaches the target accuracy;
        NaN (shown as n/a) for the other methods."""
        if not (method.startswith("itd") or method == "neumann"):
            return float("nan")
        return self.case.T

    track_unrolled_steps.unit = "steps"


class PeakMemory:
    """Reverse ITD stores its T iterates (T * dy floats); implicit CG does not grow with T.

    ``peakmem_*`` is the peak RSS of the whole benchmark process (imports and data
    included); ``track_peak_increase`` isolates the call (the kernel's allocations are made
    by numba's runtime, invisible to tracemalloc: the process high-water mark is reset
    through /proc/self/clear_refs on Linux).
    """

    params = ([100, 1000, 10000], ["cg", "itd-reverse"])
    param_names = ["T", "method"]
    timeout = 300
    DY = 1000

    def setup(self, T, method):
        self.case = get_case(self.DY)
        warm_up(self.case, method)

    def peakmem_hypergrad(self, T, method):
        self.case.run(method, T=T)  # T is ignored by CG

    def track_peak_increase(self, T, method):
        inc = peak_rss_increase(lambda: self.case.run(method, T=T))
        if inc is None:
            raise NotImplementedError("no way to reset the peak RSS on this platform")
        return inc / 2.0 ** 20

    track_peak_increase.unit = "MiB"


class LowerSolve:
    """``solve_lower`` from y0 = 0 to |grad_y g| <= 1e-8."""

    params = ([10, 100, 1000], ["newton-cg", "agd"])
    param_names = ["dy", "method"]
    timeout = 300

    def setup(self, dy, method):
        self.case = get_case(dy)
        self.method_ = method
        self.y0 = 0.0 * self.case.data.y_star
        self._solve()  # warm-up

    def _solve(self):
        import mlocore as mlo
        d = self.case.data
        return mlo.solve_lower(self.case.problem, d.x, self.y0, method=self.method_,
                               tol=1e-8)

    def time_solve_lower(self, dy, method):
        self._solve()

    def track_lower_error(self, dy, method):
        return lower_solve_error(self.case, self._solve().y)

    track_lower_error.unit = "relative error"
