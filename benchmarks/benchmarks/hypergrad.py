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


class LogisticHPO:
    """One hypergradient of the per-feature logistic-regression penalties (the library's
    ``make_logistic``) from the solved lower point, CG to 1e-10: mlocore against the same
    CG hypergradient written with SciPy (a ``LinearOperator`` whose weights are computed once
    per hypergradient, as its users write it)."""

    params = ([(1000, 10), (1000, 100), (10000, 10)], ["mlocore", "scipy"])
    param_names = ["n_train_d", "how"]
    timeout = 300

    def setup(self, n_train_d, how):
        import numpy as np

        import mlocore as mlo
        from mlocore.problems import make_logistic
        n, d = n_train_d
        self.data = make_logistic(n_train=n, n_val=n // 4, n_features=d, seed=0)
        self.lam = np.linspace(-5.0, -1.0, d)
        self.w = mlo.solve_lower(self.data.problem, self.lam, np.zeros(d), tol=1e-12).y
        self.mlo, self.how = mlo, how
        self.run()  # compile / load outside the timing

    def run(self):
        self.grad = self._mlocore() if self.how == "mlocore" else self._scipy()

    def _mlocore(self):
        return self.mlo.hypergrad(self.data.problem, self.lam, self.w, method="cg",
                                  lower_solved=True, tol=1e-10).grad

    def _scipy(self):
        import numpy as np
        from scipy.sparse.linalg import LinearOperator, cg
        from scipy.special import expit
        X, Xv, tv = self.data.X_train, self.data.X_val, self.data.t_val
        n, d = X.shape
        e = np.exp(self.lam)
        s = expit(X @ self.w)
        dd = s * (1.0 - s) / n
        H = LinearOperator((d, d), matvec=lambda p: X.T @ (dd * (X @ p)) + e * p,
                           dtype=np.float64)
        b = Xv.T @ (expit(Xv @ self.w) - tv) / Xv.shape[0]
        v, info = cg(H, b, rtol=1e-10, atol=0.0, maxiter=10 * d)
        return -e * self.w * v

    def time_hypergrad(self, n_train_d, how):
        self.run()
