"""Shared problem for the benchmarks: a dense quadratic bilevel problem with a closed form.

Lower level  g(x, y) = 0.5 y^T A y + y^T C x        (A SPD, eigenvalues in [1, kappa])
Upper level  f(x, y) = 0.5 |y - y_t|^2 + 0.5 mu |x|^2

    y*(x)   = -A^{-1} C x
    grad F  = mu x + J^T (y* - y_t),   J = dy*/dx = -A^{-1} C

Built here (not taken from ``mlocore.problems``) so that the benchmarks depend only on the
public API: ``Objective``, ``BilevelProblem``, ``hypergrad``, ``solve_lower``, ``linalg.cg``.

Callbacks are module-level ``@njit(cache=True)`` functions with the data passed through
``args`` (never closures), as the README asks of users. Their ``.py_func`` is the plain NumPy
version that the scipy baseline uses, so both sides compute exactly the same products.

"Equal accuracy" (see :func:`get_case`): every method is tuned to the loosest setting whose
hypergradient has relative error <= ``TARGET_RELERR`` against the closed form:

- ITD (reverse and forward): the smallest T, from the closed form of the unrolled Jacobian
  with the known step beta = 1 / lambda_max(A) (passed as ``step=``);
- Neumann: with the same eta = 1 / lambda_max(A), T terms of the Neumann series give exactly
  the ITD error, so the same T is used, expressed as a residual tolerance (``tol``);
- CG (mlocore and scipy): the largest tol in 1e-3 .. 1e-13 that reaches the target;
- direct: exact up to round-off (no knob).
"""
from __future__ import annotations

import functools
import os
import time

import numba
import numpy as np

import mlocore as mlo

DX = 5
KAPPA = 100.0
MU = 0.1
SEED = 0
TARGET_RELERR = 1e-6
METHODS = ("cg", "neumann", "direct", "itd-reverse", "itd-forward")
ALL_METHODS = METHODS + ("scipy-cg",)
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------
# Callbacks over z = concat(x, y)
# ---------------------------------------------------------------------------------------
@numba.njit(cache=True)
def lower_grad(z, A, C):
    dx = C.shape[1]
    x = z[:dx]
    y = z[dx:]
    out = np.empty(z.shape[0])
    out[:dx] = C.T @ y
    out[dx:] = A @ y + C @ x
    return out


@numba.njit(cache=True)
def lower_hvp(z, v, A, C):
    dx = C.shape[1]
    vx = v[:dx]
    vy = v[dx:]
    out = np.empty(z.shape[0])
    out[:dx] = C.T @ vy
    out[dx:] = A @ vy + C @ vx
    return out


@numba.njit(cache=True)
def lower_grad_y(z, A, C):
    """Block oracle ``grad_y g = A y + C x``."""
    dx = C.shape[1]
    return A @ z[dx:] + C @ z[:dx]


@numba.njit(cache=True)
def lower_hvp_yy(z, v, A, C):
    """Block oracle ``H_yy v = A v``: the one product CG needs per iteration."""
    return A @ v


@numba.njit(cache=True)
def lower_hvp_xy(z, v, A, C):
    """Block oracle ``H_xy v = C^T v``: the cross product, once per hypergradient."""
    return C.T @ v


@numba.njit(cache=True)
def lower_value(z, A, C):
    dx = C.shape[1]
    x = z[:dx]
    y = z[dx:]
    return 0.5 * (y @ (A @ y)) + y @ (C @ x)


@numba.njit(cache=True)
def upper_grad(z, y_t, mu):
    dx = z.shape[0] - y_t.shape[0]
    out = np.empty(z.shape[0])
    out[:dx] = mu * z[:dx]
    out[dx:] = z[dx:] - y_t
    return out


@numba.njit(cache=True)
def upper_value(z, y_t, mu):
    dx = z.shape[0] - y_t.shape[0]
    r = z[dx:] - y_t
    x = z[:dx]
    return 0.5 * (r @ r) + 0.5 * mu * (x @ x)


@numba.njit(cache=True)
def hvp_loop(z, v, A, C, n):
    """n products ``lower_hvp(z, v, A, C)`` in a compiled loop: the pure compute floor."""
    s = 0.0
    for _ in range(n):
        s += lower_hvp(z, v, A, C)[0]
    return s


@numba.njit(cache=True)
def matvec_loop(A, v, n):
    """n dense products ``A @ v`` in a compiled loop (BLAS gemv, no Python in between)."""
    s = 0.0
    for _ in range(n):
        s += (A @ v)[0]
    return s


# ---------------------------------------------------------------------------------------
# Data, problem, closed form
# ---------------------------------------------------------------------------------------
class QuadData:
    """Random instance with its eigendecomposition, closed forms and ITD error model."""

    def __init__(self, dy, dx=DX, kappa=KAPPA, mu=MU, seed=SEED):
        rng = np.random.default_rng([seed, dy, dx])
        self.dx, self.dy, self.kappa, self.mu = dx, dy, float(kappa), float(mu)
        Q, R = np.linalg.qr(rng.standard_normal((dy, dy)))
        Q *= np.sign(np.diag(R))  # Haar-distributed orthogonal matrix
        self.Q = Q
        self.lam = np.geomspace(1.0, kappa, dy) if dy > 1 else np.array([1.0])
        A = (Q * self.lam) @ Q.T
        self.A = np.ascontiguousarray(0.5 * (A + A.T))
        self.C = np.ascontiguousarray(rng.standard_normal((dy, dx)) / np.sqrt(dx))
        self.y_t = rng.standard_normal(dy)
        self.x = rng.standard_normal(dx)
        self.L = float(self.lam.max())  # exact lambda_max(A): the ITD step / Neumann eta
        self.beta = 1.0 / self.L
        # closed forms at x
        self.y_star = self.solve_A(-self.C @ self.x)
        self.r = self.y_star - self.y_t            # grad_y f at (x, y*)
        self.v_star = self.solve_A(self.r)         # adjoint H_yy^{-1} grad_y f
        self.grad_true = self.mu * self.x - self.C.T @ self.v_star
        self.gnorm = float(np.linalg.norm(self.grad_true))
        # ITD model: from y0 = y*, the unrolled adjoint is Q diag((1 - q^T)/lam) Q^T r,
        # so the error is M @ (q^T * w / lam) with w = Q^T r, M = C^T Q, q = 1 - beta lam.
        self._w = Q.T @ self.r
        self._M = self.C.T @ Q
        self._q = 1.0 - self.beta * self.lam

    def solve_A(self, b):
        return self.Q @ ((self.Q.T @ b) / self.lam)

    def relerr(self, g):
        return float(np.linalg.norm(np.asarray(g) - self.grad_true) / self.gnorm)

    def itd_relerr_model(self, T):
        """Relative error of the T-step ITD (and T-term Neumann) hypergradient, closed form."""
        e = self._M @ (self._q ** T * self._w / self.lam)
        return float(np.linalg.norm(e) / self.gnorm)

    def itd_T_for(self, target=TARGET_RELERR):
        """Smallest T with ``itd_relerr_model(T) <= target`` (doubling, then bisection)."""
        hi = 1
        while self.itd_relerr_model(hi) > target:
            hi *= 2
            if hi > 10 ** 8:
                raise RuntimeError("ITD does not reach the target accuracy")
        lo = hi // 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.itd_relerr_model(mid) <= target:
                hi = mid
            else:
                lo = mid
        return hi

    def neumann_tol_for(self, T):
        """A relative residual tolerance that stops the Neumann series after exactly T terms
        (geometric mean of the residuals after T - 1 and T terms)."""
        bn = np.linalg.norm(self._w)
        r_prev = np.linalg.norm(self._q ** (T - 1) * self._w) / bn
        r_T = np.linalg.norm(self._q ** T * self._w) / bn
        return float(np.sqrt(r_prev * r_T))


def make_problem(data, blocks=True):
    """A fresh :class:`mlocore.BilevelProblem` on ``data`` (callbacks from numba's cache);
    with ``blocks`` the lower objective also gives the block oracles (the fast form)."""
    upper = mlo.Objective(grad=upper_grad, value=upper_value, args=(data.y_t, data.mu))
    extra = dict(grad_y=lower_grad_y, hvp_yy=lower_hvp_yy, hvp_xy=lower_hvp_xy) if blocks \
        else {}
    lower = mlo.Objective(grad=lower_grad, hvp=lower_hvp, value=lower_value,
                          args=(data.A, data.C), **extra)
    return mlo.BilevelProblem(upper, lower, dims=(data.dx, data.dy))


# ---------------------------------------------------------------------------------------
# The same CG hypergradient as a user would write it with scipy and NumPy
# ---------------------------------------------------------------------------------------
def scipy_cg_hypergrad(data, x, y, rtol, counter=None):
    """``grad_x f - H_xy v`` with ``H_yy v = grad_y f`` by ``scipy.sparse.linalg.cg``; the
    products are the NumPy HVP ``lower_hvp.py_func`` (the user's function, uncompiled)."""
    from scipy.sparse.linalg import LinearOperator, cg

    dx, dy = data.dx, data.dy
    A, C = data.A, data.C
    hvp = lower_hvp.py_func
    z = np.concatenate([x, y])
    gf = upper_grad.py_func(z, data.y_t, data.mu)
    w = np.zeros(dx + dy)

    def matvec(p):
        if counter is not None:
            counter[0] += 1
        w[dx:] = p.ravel()
        return hvp(z, w, A, C)[dx:]

    op = LinearOperator((dy, dy), matvec=matvec, dtype=np.float64)
    v, info = cg(op, gf[dx:], rtol=rtol, atol=0.0, maxiter=10 * dy)
    if info != 0:
        raise RuntimeError(f"scipy cg did not converge (info={info})")
    w[dx:] = v
    return gf[:dx] - hvp(z, w, A, C)[:dx]


# ---------------------------------------------------------------------------------------
# Benchmark cases: problem + per-method settings at equal accuracy (memoized per process)
# ---------------------------------------------------------------------------------------
TOL_GRID = tuple(10.0 ** -k for k in range(3, 14))


class Case:
    """A problem of size dy with the equal-accuracy settings of every method."""

    def __init__(self, dy):
        self.data = d = QuadData(dy)
        self.problem = make_problem(d)
        self.problem_joint = make_problem(d, blocks=False)
        self.T = d.itd_T_for()
        self.neumann_tol = d.neumann_tol_for(self.T)
        self.cg_tol = self._loosest(lambda tol: self.run("cg", tol=tol).grad)
        self.scipy_tol = self._loosest(lambda tol: self.run("scipy-cg", tol=tol))

    def _loosest(self, grad_at):
        for tol in TOL_GRID:
            if self.data.relerr(grad_at(tol)) <= TARGET_RELERR:
                return tol
        return TOL_GRID[-1]

    def kwargs(self, method, T=None, tol=None):
        """Keyword arguments of ``mlocore.hypergrad`` for ``method`` at equal accuracy."""
        d = self.data
        if method == "cg":
            return dict(method="cg", tol=self.cg_tol if tol is None else tol,
                        lower_solved=True)
        if method == "neumann":
            return dict(method="neumann", tol=self.neumann_tol if tol is None else tol,
                        eta=d.beta, maxiter=10 * self.T + 10, lower_solved=True)
        if method == "direct":
            return dict(method="direct", lower_solved=True)
        if method in ("itd-reverse", "itd-forward"):
            return dict(method=method, T=self.T if T is None else T, step=d.beta)
        raise ValueError(method)

    def run(self, method, T=None, tol=None, counter=None, joint=False):
        """One hypergradient at (x, y*); returns the mlocore result (or the array, scipy).
        ``joint``: on the problem without block oracles (every product a joint HVP)."""
        d = self.data
        if method == "scipy-cg":
            return scipy_cg_hypergrad(d, d.x, d.y_star, self.scipy_tol if tol is None else tol,
                                      counter)
        problem = self.problem_joint if joint else self.problem
        return mlo.hypergrad(problem, d.x, d.y_star, **self.kwargs(method, T, tol))

    def grad(self, method, **kw):
        out = self.run(method, **kw)
        return out if method == "scipy-cg" else out.grad

    def oracle_calls(self, method):
        """Total oracle calls (grad + hvp, both levels; matvecs for scipy)."""
        if method == "scipy-cg":
            counter = [0]
            self.run(method, counter=counter)
            return counter[0] + 2  # + upper grad + the final H_xy product
        res = self.run(method)
        return int(sum(res.oracle_calls.values()))


@functools.lru_cache(maxsize=None)
def get_case(dy):
    return Case(dy)


_WARM: set = set()


def warm_up(case, method):
    """One call so compile / cache-load time is excluded from timings (once per process)."""
    key = (case.data.dy, method)
    if key not in _WARM:
        case.run(method, T=2 if method.startswith("itd") else None)
        _WARM.add(key)


def best_of(fn, repeat=5, min_time=0.02, max_total=None):
    """Best per-call time of ``fn`` over ``repeat`` samples, each of >= ``min_time`` seconds
    (calls per sample chosen from one timed call); stops early after ``max_total`` seconds."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    number = max(1, int(min_time / max(first, 1e-9)))
    best = first
    start = time.perf_counter()
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
        if max_total is not None and time.perf_counter() - start > max_total:
            break
    return best


def lower_solve_error(case, y):
    """Relative error of a lower solution against the closed form y*(x)."""
    ys = case.data.y_star
    return float(np.linalg.norm(y - ys) / np.linalg.norm(ys))


# ---------------------------------------------------------------------------------------
# Peak memory of one call
# ---------------------------------------------------------------------------------------
def _status_kib(field):
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


_MMAP_FIXED = []


def _release_free_heap():
    """Let the next allocations show up in the RSS (glibc; a no-op elsewhere).

    By default glibc raises its mmap threshold after large frees (up to 32 MiB) and keeps
    freed heap pages resident, so a later 8 MiB array can reuse pages that are already
    counted and the call would show no RSS increase at all. So: fix M_MMAP_THRESHOLD at
    128 KiB once (large arrays are mmap-ed and unmapped on free), and ``malloc_trim(0)``
    before each measurement (free heap pages are returned to the kernel).
    """
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        if not _MMAP_FIXED:
            _MMAP_FIXED.append(True)
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD = -3
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_increase(fn):
    """Bytes by which the process's peak RSS exceeds its RSS before ``fn()``.

    Arrays allocated by compiled kernels come from numba's runtime (malloc), which
    tracemalloc does not see; so this resets the kernel's high-water mark (VmHWM) by
    writing 5 to /proc/self/clear_refs (Linux >= 4.0) and reads it after the call.
    Returns None where that is not possible.
    """
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


# ---------------------------------------------------------------------------------------
# Header shared by the ratio scripts
# ---------------------------------------------------------------------------------------
def environment_lines(title, quick, sampling_note):
    """Title, versions (with the git commit), machine and load: the context of a table."""
    import datetime
    import os
    import platform
    import subprocess

    import numba
    import scipy

    here = os.path.dirname(os.path.abspath(__file__))

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=here, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    dirty = " (+ uncommitted changes)" if git("status", "--porcelain", "--",
                                              "../../mlocore") else ""
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return [
        f"{title}, {datetime.datetime.now():%Y-%m-%d %H:%M}{'  (--quick)' if quick else ''}",
        f"  mlocore {mlo.__version__} at {git('rev-parse', '--short', 'HEAD')}{dirty}; "
        f"numpy {np.__version__}, scipy {scipy.__version__}, numba {numba.__version__}, "
        f"Python {platform.python_version()}",
        f"  {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{', '.join(f'{x:.2f}' if isinstance(x, float) else str(x) for x in load)} "
        f"(shared machine: {sampling_note})",
    ]


class Report:
    """Prints lines and keeps them for the results file (the ratio scripts' output)."""

    def __init__(self):
        self.lines = []

    def __call__(self, line=""):
        print(line, flush=True)
        self.lines.append(line)


def fmt_t(t):
    """A duration in us / ms / s, or "n/a"."""
    if t is None or not np.isfinite(t):
        return "n/a"
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    if t < 1.0:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.3f} s"
