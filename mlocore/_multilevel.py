"""n-level implicit differentiation (Gu & Chen 2024; ALGORITHMS.md section 3).

Levels k = 1..n, blocks x_k of z; phi_n = f_n, phi_k(x_<=k) = f_k(x_<=k, x_>k*(x_<=k)).
Everything is matrix-free and recursive over the levels, built from three primitives at a
point z whose levels > k are solved for its x_<=k:

- ``adjoint(k, z, w)  = M_k^T w``, M_k = d x_>k / d x_<=k (total best-response Jacobian);
  one solve with the reduced Hessian block of level k+1, recursing downwards;
- ``tangent(k, z, s)  = M_k s`` (forward composition of the best-response Jacobians);
- ``hvp_reduced(k, z, s) = Hess(phi_k) s``:
  ``[I, M_k^T] Hess(f_k) (s, M_k s)`` plus the best-response curvature term
  ``D_s[M_k^T w]`` at ``w = grad_>k f_k`` (third derivatives of the lower levels):
  "exact" takes it from third-order products (the ``tvp`` callback, or central differences
  of ``hvp``) for k = n-1 and from central differences of the adjoint (lower levels re-solved)
  deeper down, so it is exact for n <= 3; "truncated" drops it (exact when best responses are
  affine); "fd" takes the whole product by central differences of the reduced gradient with
  the lower levels re-solved, warm-started.

The hypergradient is ``grad F = grad_x1 phi_1 = d_1 f_1 + M_1^T d_>1 f_1``. The innermost
level's solves and CG run in the compiled bilevel kernels (level n against x_<n is a bilevel
lower problem); the recursion across levels is orchestrated in Python.
"""
from __future__ import annotations

import numpy as np

from ._callbacks import call_kernel
from ._config import FD_REL_STEP
from ._kernels import linalg as _kl
from ._kernels import lower as _low
from ._kernels import unrolled as _kl_unrolled
from ._kernels.oracles import LOWER_GRAD, LOWER_HVP
from ._problem import MultilevelProblem
from ._results import HypergradResult, linear_info_message, new_counts, status_message
from ._validation import as_vector, check_choice, check_int, check_positive

__all__ = ["MULTILEVEL_MODES", "multilevel_hypergrad", "MultilevelEngine",
           "unrolled_multilevel_hypergrad"]

MULTILEVEL_MODES = ("exact", "fd", "truncated")
_GRAD, _HVP, _TVP, _VALUE = range(4)
FD_SHIFT_STEP = 1e-3
UNROLLED_FD_STEP = 1e-4


class LevelFailure(Exception):
    """A lower level could not be solved or its reduced Hessian is not positive definite."""

    def __init__(self, status, level, detail):
        super().__init__(detail)
        self.status, self.level, self.detail = status, level, detail


class MultilevelEngine:
    """The recursion over levels for one problem and one mode (keeps oracle counts)."""

    def __init__(self, problem: MultilevelProblem, mode="exact", tol=1e-10, lower_tol=None,
                 lower_maxiter=100, fd_step=None):
        self.p = problem
        self.n = problem.n
        self.off = problem.offsets
        self.mode = mode
        self.tol = tol
        self.lower_tol = tol if lower_tol is None else lower_tol
        self.lower_maxiter = lower_maxiter
        # step of the central differences with re-solved lower levels: their solver noise
        # (~lower_tol) is divided by the step, so it is much larger than for oracle
        # differences; 1e-3 relative balances noise against the O(h^2) truncation error
        self.fd_step = FD_SHIFT_STEP if fd_step is None else fd_step
        self.comp = [obj.compiled(f"level{k}") for k, obj in enumerate(problem.levels, 1)]
        self.counts = np.zeros((self.n, 4), dtype=np.int64)
        self.lower_nit = np.zeros(self.n, dtype=np.int64)
        # The lower levels must be solved for the problem itself whatever the mode: for
        # n >= 4 the truncated reduced gradients of the middle levels would move their
        # solutions, so "truncated" solves them with the exact recursion (sharing counters).
        self._solver = None
        if mode == "truncated" and self.n >= 4:
            self._solver = MultilevelEngine(problem, "exact", tol, lower_tol, lower_maxiter,
                                            fd_step)
            self._solver.comp = self.comp
            self._solver.counts = self.counts
            self._solver.lower_nit = self.lower_nit

    # -- oracles ----------------------------------------------------------------------------
    def check_at(self, z):
        for c in self.comp:
            c.check_at(z)

    def grad(self, k, z):
        c = self.comp[k - 1]
        self.counts[k - 1, _GRAD] += 1
        return c.grad(z, *c.args)

    def value(self, k, z):
        c = self.comp[k - 1]
        self.counts[k - 1, _VALUE] += 1
        return float(c.value(z, *c.args)) if c.has_value else np.nan

    def hvp(self, k, z, v):
        c = self.comp[k - 1]
        if c.has_hvp:
            self.counts[k - 1, _HVP] += 1
            return c.hvp(z, v, *c.args)
        vn = np.linalg.norm(v)
        if vn == 0.0:
            return np.zeros_like(z)
        eps = FD_REL_STEP * (1.0 + np.linalg.norm(z)) / vn
        return (self.grad(k, z + eps * v) - self.grad(k, z - eps * v)) / (2.0 * eps)

    def tvp(self, k, z, u, w):
        """Third-order product d/ds hvp_k(z + s u, w): the callback, or central differences."""
        c = self.comp[k - 1]
        if c.has_tvp:
            self.counts[k - 1, _TVP] += 1
            return c.tvp(z, u, w, *c.args)
        un = np.linalg.norm(u)
        if un == 0.0:
            return np.zeros_like(z)
        eps = FD_REL_STEP * (1.0 + np.linalg.norm(z)) / un
        return (self.hvp(k, z + eps * u, w) - self.hvp(k, z - eps * u, w)) / (2.0 * eps)

    # -- kernels for the innermost level -----------------------------------------------------
    def _fold(self, counts6):
        self.counts[self.n - 1, _GRAD] += counts6[LOWER_GRAD]
        self.counts[self.n - 1, _HVP] += counts6[LOWER_HVP]

    def _solve_innermost(self, z):
        c = self.comp[-1]
        o = self.off[-2]
        counts6 = new_counts()
        y, status, nit, gnorm, _ = call_kernel(
            _low.solve_lower_kernel, c.fns, c.kargs, c.has_hvp, z[:o].copy(), z[o:].copy(),
            _low.NEWTON_CG, self.lower_tol, self.lower_maxiter, -1.0, counts6)
        self._fold(counts6)
        self.lower_nit[-1] += nit
        if status not in (_low.OK,):
            raise LevelFailure(status, self.n, f"level {self.n}: |grad| = {gnorm:.3e} after "
                                               f"{nit} iterations")
        out = z.copy()
        out[o:] = y
        return out

    def solve_block(self, j, z, b, rtol=None):
        """Solve (reduced Hessian of phi_j, block x_j) v = b by CG."""
        rtol = self.tol if rtol is None else rtol
        d = self.p.dims[j - 1]
        maxiter = 10 * d + 20
        if j == self.n:
            c = self.comp[-1]
            counts6 = new_counts()
            op = (c.fns, c.kargs, c.has_hvp, z, self.off[-2], counts6)
            v, info, nit, res, _ = call_kernel(_kl.cg_core, op, b, np.zeros(d), rtol, 0.0,
                                               maxiter, (), None)
            self._fold(counts6)
        else:
            lo, hi = self.off[j - 1], self.off[j]

            def matvec(p):
                s = np.zeros(hi)
                s[lo:hi] = p
                return self.hvp_reduced(j, z, s)[lo:hi]

            v, info, nit, res, _ = _kl.cg_core.py_func((matvec,), b, np.zeros(d), rtol, 0.0,
                                                       maxiter, (), None)
        if info < 0:
            raise LevelFailure(3, j, f"level {j}: reduced Hessian solve: "
                                     f"{linear_info_message(info)}")
        if info > 0:
            raise LevelFailure(5, j, f"level {j}: reduced Hessian solve: "
                                     f"{linear_info_message(info)}, residual {res:.3e}")
        return v

    # -- the recursion -----------------------------------------------------------------------
    def solve_from(self, z, k):
        """z with levels k+1..n solved for its x_<=k (warm-started from z's own blocks)."""
        if self._solver is not None:
            return self._solver.solve_from(z, k)
        if k >= self.n:
            return z
        if k == self.n - 1:
            return self._solve_innermost(z)
        j = k + 1
        lo, hi = self.off[j - 1], self.off[j]
        z = self.solve_from(z, j)
        g = self.grad_reduced(j, z)[lo:hi]
        gnorm = np.linalg.norm(g)
        for it in range(self.lower_maxiter):
            if gnorm <= self.lower_tol:
                self.lower_nit[j - 1] += it
                return z
            # inexact Newton on phi_j with a backtracking search on |grad phi_j|
            d = -self.solve_block(j, z, g, rtol=min(0.5, np.sqrt(gnorm)))
            t = 1.0
            for _ in range(40):
                z_try = z.copy()
                z_try[lo:hi] += t * d
                z_try = self.solve_from(z_try, j)
                g_try = self.grad_reduced(j, z_try)[lo:hi]
                gn_try = np.linalg.norm(g_try)
                if np.isfinite(gn_try) and gn_try <= (1.0 - 1e-4 * t) * gnorm:
                    break
                t *= 0.5
            else:
                raise LevelFailure(4, j, f"level {j}: line search failed at |grad| = "
                                         f"{gnorm:.3e}")
            z, g, gnorm = z_try, g_try, gn_try
        if gnorm <= self.lower_tol:
            self.lower_nit[j - 1] += self.lower_maxiter
            return z
        raise LevelFailure(1, j, f"level {j}: |grad| = {gnorm:.3e} after "
                                 f"{self.lower_maxiter} iterations")

    def grad_reduced(self, k, z):
        """Total gradient of phi_k over x_<=k at a solved point."""
        g = self.grad(k, z)
        if k == self.n:
            return g
        o = self.off[k]
        return g[:o] + self.adjoint(k, z, g[o:])

    def adjoint(self, k, z, w):
        """``M_k^T w`` with ``M_k = d x_>k / d x_<=k`` (w over the blocks of levels > k)."""
        o, o1 = self.off[k], self.off[k + 1]
        if k + 1 == self.n:
            u = np.zeros(o1)
        else:
            u = self.adjoint(k + 1, z, w[o1 - o:])
        a = w[:o1 - o] + u[o:o1]
        v = self.solve_block(k + 1, z, a)
        s = np.zeros(o1)
        s[o:o1] = v
        c = self.hvp_reduced(k + 1, z, s)[:o]  # cross block: -J_{k+1}^T a = c
        return u[:o] - c

    def tangent(self, k, z, s):
        """``M_k s``: the change of x_>k along a direction s of x_<=k."""
        o, o1 = self.off[k], self.off[k + 1]
        s1 = np.zeros(o1)
        s1[:o] = s
        r = self.hvp_reduced(k + 1, z, s1)[o:o1]
        t = -self.solve_block(k + 1, z, r)
        if k + 1 == self.n:
            return t
        s1[o:o1] = t
        return np.concatenate([t, self.tangent(k + 1, z, s1)])

    def hvp_reduced(self, k, z, s):
        """Hessian of phi_k (over x_<=k) times s, in this engine's mode."""
        if k == self.n:
            return self.hvp(k, z, s)
        o = self.off[k]
        if self.mode == "fd":
            zp, zm, eps = self._shifted(k, z, s)
            return (self.grad_reduced(k, zp) - self.grad_reduced(k, zm)) / (2.0 * eps)
        sh = np.concatenate([s, self.tangent(k, z, s)])
        h = self.hvp(k, z, sh)
        out = h[:o] + self.adjoint(k, z, h[o:])
        if self.mode == "exact":
            out += self.curvature(k, z, s, sh)
        return out

    def curvature(self, k, z, s, sh):
        """``D_s[M_k^T w]`` at fixed ``w = grad_>k f_k``: the best-response curvature term."""
        o = self.off[k]
        w = self.grad(k, z)[o:]
        if k == self.n - 1:
            # M^T w = -C^T H^{-1} w with H, C blocks of Hess f_n: differentiating gives
            # -[I, M^T] T_n[sh](0, v), v = H^{-1} w (third-order product of f_n)
            v = self.solve_block(self.n, z, w)
            e = np.zeros(z.shape[0])
            e[o:] = v
            q = self.tvp(self.n, z, sh, e)
            return -(q[:o] + self.adjoint(k, z, q[o:]))
        zp, zm, eps = self._shifted(k, z, s)
        return (self.adjoint(k, zp, w) - self.adjoint(k, zm, w)) / (2.0 * eps)

    def _shifted(self, k, z, s):
        o = self.off[k]
        sn = np.linalg.norm(s)
        eps = self.fd_step * (1.0 + np.linalg.norm(z[:o])) / max(sn, np.finfo(float).tiny)
        zp = z.copy()
        zp[:o] += eps * s
        zm = z.copy()
        zm[:o] -= eps * s
        return self.solve_from(zp, k), self.solve_from(zm, k), eps

    def oracle_calls(self):
        return {f"level{k}": {"grad": int(c[_GRAD]), "hvp": int(c[_HVP]), "tvp": int(c[_TVP]),
                              "value": int(c[_VALUE])}
                for k, c in enumerate(self.counts, 1)}


def as_joint(problem, xs, name="xs"):
    """Validate a list of per-level arrays and return the joint vector z."""
    if isinstance(xs, np.ndarray) and xs.ndim == 1 and xs.shape[0] == problem.size:
        return as_vector(name, xs, problem.size)
    try:
        xs = list(xs)
    except TypeError:
        raise TypeError(f"{name} must be a list of {problem.n} arrays (one per level), got "
                        f"{type(xs).__name__}") from None
    if len(xs) != problem.n:
        raise ValueError(f"{name} must hold {problem.n} arrays (one per level), got {len(xs)}")
    return np.concatenate([as_vector(f"{name}[{k}]", x, d)
                           for k, (x, d) in enumerate(zip(xs, problem.dims))])


def multilevel_hypergrad(problem, xs, mode="exact", *, tol=1e-10, lower_solved=False,
                         lower_tol=None, lower_maxiter=100, fd_step=None):
    """The hypergradient of F = phi_1 for a :class:`MultilevelProblem` (see module docs)."""
    check_choice("method", mode, MULTILEVEL_MODES)
    tol = check_positive("tol", tol, allow_zero=True)
    lower_maxiter = check_int("lower_maxiter", lower_maxiter, 0)
    if fd_step is not None:
        fd_step = check_positive("fd_step", fd_step)
    z = as_joint(problem, xs)
    eng = MultilevelEngine(problem, mode, tol, lower_tol, lower_maxiter, fd_step)
    if not getattr(problem, "_checked", False):
        eng.check_at(z)
        problem._checked = True
    return _hypergrad_with(eng, z, lower_solved)


def _hypergrad_with(eng, z, lower_solved):
    p = eng.p
    d1 = p.dims[0]
    status, detail = 0, ""
    grad, fun = np.full(d1, np.nan), np.nan
    try:
        if not lower_solved:
            z = eng.solve_from(z, 1)
        grad = eng.grad_reduced(1, z)[:d1]
        fun = eng.value(1, z)
        if not np.all(np.isfinite(grad)):
            status, detail = 6, ""
    except LevelFailure as fail:
        status, detail = fail.status, fail.detail
    except FloatingPointError as exc:  # pragma: no cover - numpy configured to raise
        status, detail = 6, str(exc)
    out = HypergradResult(
        grad=grad, z=z, xs=[z[p.block(k)].copy() for k in range(1, p.n + 1)], fun=fun,
        method=eng.mode, success=status == 0, status=int(status),
        message=status_message(status, detail), lower_nit=eng.lower_nit.copy(),
        nit=int(eng.lower_nit.sum()), oracle_calls=eng.oracle_calls())
    out.ngrad = int(eng.counts[:, _GRAD].sum())
    out.nhvp = int(eng.counts[:, _HVP].sum())
    return out


class UnrolledEngine:
    """The unrolled baseline of Sato, Tanaka & Takeda (2021) for n levels.

    Each lower level k is replaced by ``T_k`` gradient steps with step ``beta_k`` on its
    unrolled reduced objective ``phi~_k(x_<=k) = f_k(x_<=k, X_>k(x_<=k))``, every inner loop
    starting from the fixed points given for levels 2..n. The hypergradient is the gradient of
    ``f_1(x_1, X_>1(x_1))`` by reverse mode through the nested loops: level n's loop runs in the
    compiled ``unrolled_vjp`` kernel (exact, with the hvp callback); the Hessian-vector
    products of ``phi~_k`` that the reverse pass of an outer loop needs (k < n) are central
    differences of its reverse-mode gradient. Cost and memory grow like T_2 * ... * T_n.
    """

    def __init__(self, problem, T, steps, starts, fd_step=None):
        self.p = problem
        self.n = problem.n
        self.off = problem.offsets
        self.T = T            # T[k] for k = 2..n (index k)
        self.beta = steps     # beta[k], filled lazily when None
        self.starts = starts  # the joint vector whose blocks 2..n start every inner loop
        # the outer levels' HVPs are central differences nested n-2 deep: a step larger than
        # the single-difference optimum keeps the amplified round-off small (no re-solves)
        self.fd_step = UNROLLED_FD_STEP if fd_step is None else fd_step
        self.eng = MultilevelEngine(problem, "truncated")  # oracles and their counts
        self.counts = self.eng.counts

    def _start(self, z, k):
        """z with the blocks of levels > k reset to the fixed starting points."""
        out = z.copy()
        out[self.off[k]:] = self.starts[self.off[k]:]
        return out

    def step_size(self, k, z):
        """beta_k: 1/L from power iteration on the block Hessian of phi~_k at z."""
        if self.beta[k] is None:
            lo, hi = self.off[k - 1], self.off[k]
            v = np.linspace(1.0, 2.0, hi - lo)
            v /= np.linalg.norm(v)
            lam = 0.0
            for _ in range(15):
                s = np.zeros(hi)
                s[lo:hi] = v
                w = self.hvp_unrolled(k, z, s)[lo:hi]
                lam = v @ w
                nw = np.linalg.norm(w)
                if nw == 0 or not np.isfinite(nw):
                    break
                v = w / nw
            if not lam > 0:
                raise LevelFailure(3, k, f"level {k}: the unrolled block Hessian is not "
                                         "positive definite at the starting point")
            self.beta[k] = 1.0 / (1.05 * lam)
        return self.beta[k]

    def forward(self, k, z):
        """z with levels k+1..n replaced by their unrolled outputs (from the fixed starts)."""
        if k >= self.n:
            return z
        z = self._start(z, k)
        j = k + 1
        lo, hi = self.off[j - 1], self.off[j]
        if j == self.n:
            c = self.eng.comp[-1]
            counts6 = new_counts()
            beta = self.step_size(j, z)
            y, status, _, _, _ = call_kernel(
                _low.solve_lower_kernel, c.fns, c.kargs, c.has_hvp, z[:lo].copy(),
                z[lo:].copy(), _low.GD, 0.0, self.T[j], beta, counts6)
            self.eng._fold(counts6)
            if status == _low.NONFINITE:
                raise LevelFailure(2, j, f"level {j}: unrolled iterates diverged "
                                         f"(step {beta:.3e})")
            z[lo:] = y
            return z
        beta = self.step_size(j, z)
        for _ in range(self.T[j]):
            g = self.grad_unrolled(j, z)[lo:hi]
            z[lo:hi] -= beta * g
            if not np.all(np.isfinite(z[lo:hi])):
                raise LevelFailure(2, j, f"level {j}: unrolled iterates diverged "
                                         f"(step {beta:.3e})")
        return self.forward(j, z)

    def grad_unrolled(self, j, z):
        """Gradient of phi~_j over x_<=j (reverse mode through the loops of levels > j)."""
        zz = self.forward(j, z)
        g = self.eng.grad(j, zz)
        if j == self.n:
            return g
        o = self.off[j]
        return g[:o] + self.vjp(j, z, g[o:])

    def hvp_unrolled(self, j, z, s):
        if j == self.n:
            return self.eng.hvp(j, z, s)
        o = self.off[j]
        eps = self.fd_step * (1.0 + np.linalg.norm(z[:o])) / max(np.linalg.norm(s), 1e-300)
        zp = z.copy()
        zp[:o] += eps * s
        zm = z.copy()
        zm[:o] -= eps * s
        return (self.grad_unrolled(j, zp) - self.grad_unrolled(j, zm)) / (2.0 * eps)

    def vjp(self, k, z, w):
        """``w^T d X_>k / d x_<=k`` for the unrolled outputs X_>k (w over levels > k)."""
        j = k + 1
        lo, hi = self.off[k], self.off[j]
        z = self._start(z, k)
        if j == self.n:
            c = self.eng.comp[-1]
            counts6 = new_counts()
            beta = self.step_size(j, z)
            _, h, ok = call_kernel(_kl_unrolled.unrolled_vjp, c.fns, c.kargs, c.has_hvp,
                                   z[:lo].copy(), z[lo:].copy(), self.T[j], beta,
                                   np.ascontiguousarray(w), counts6)
            self.eng._fold(counts6)
            if not ok:
                raise LevelFailure(2, j, f"level {j}: unrolled iterates diverged")
            return h
        beta = self.step_size(j, z)
        traj = []
        for _ in range(self.T[j]):  # forward through level j's loop, keeping its iterates
            traj.append(z[lo:hi].copy())
            z[lo:hi] -= beta * self.grad_unrolled(j, z)[lo:hi]
        u = self.vjp(j, z, w[hi - lo:])
        a = w[:hi - lo] + u[lo:hi]
        g = u[:lo].copy()
        s = np.zeros(hi)
        for xt in reversed(traj):
            z[lo:hi] = xt
            s[lo:hi] = a
            h = self.hvp_unrolled(j, z, s)
            g -= beta * h[:lo]
            a = a - beta * h[lo:hi]
        return g


def unrolled_options(n, T, steps):
    """``(Ts, betas)`` for the n-level unrolled baseline (CPU and CUDA): ``Ts[k]`` and
    ``betas[k]`` for levels k = 2..n (entries 0 and 1 None); a None beta is estimated later.
    ``T`` and ``steps`` are one value or a sequence of n - 1 (levels 2..n)."""
    if isinstance(T, (list, tuple)):
        if len(T) != n - 1:
            raise ValueError(f"T must be an int or a sequence of {n - 1} ints (levels 2..n), "
                             f"got {T!r}")
        Ts = [None, None] + [check_int("T", t, 1) for t in T]
    else:
        Ts = [None, None] + [check_int("T", T, 1)] * (n - 1)
    if steps is None:
        betas = [None] * (n + 1)
    elif isinstance(steps, (list, tuple)):
        if len(steps) != n - 1:
            raise ValueError(f"step must be a number or a sequence of {n - 1} numbers, got "
                             f"{steps!r}")
        betas = [None, None] + [None if s is None else check_positive("step", s)
                                for s in steps]
    else:
        betas = [None, None] + [check_positive("step", steps)] * (n - 1)
    return Ts, betas


def _unrolled_setup(problem, xs, T, steps, fd_step):
    Ts, betas = unrolled_options(problem.n, T, steps)
    z = as_joint(problem, xs)
    ueng = UnrolledEngine(problem, Ts, betas, z.copy(), fd_step)
    if not getattr(problem, "_checked", False):
        ueng.eng.check_at(z)
        problem._checked = True
    return ueng, z, Ts, betas


def unrolled_multilevel_hypergrad(problem, xs, T=50, steps=None, fd_step=None,
                                  value_only=False):
    """Hypergradient of the n-level unrolled approximation (Sato et al. 2021), see
    :class:`UnrolledEngine`. ``xs`` gives x_1 and the fixed starts of levels 2..n; the result's
    ``step`` lists the inner steps used (pass them back to keep the same approximation).
    ``value_only``: only the forward passes and ``fun`` (``grad`` is NaN)."""
    ueng, z, Ts, betas = _unrolled_setup(problem, xs, T, steps, fd_step)
    n = problem.n
    d1 = problem.dims[0]
    status, detail = 0, ""
    grad, fun, zz = np.full(d1, np.nan), np.nan, z
    try:
        if not value_only:
            grad = ueng.grad_unrolled(1, z)[:d1]
        zz = ueng.forward(1, z)
        fun = ueng.eng.value(1, zz)
        if not value_only and not np.all(np.isfinite(grad)):
            status = 6
    except LevelFailure as fail:
        status, detail = fail.status, fail.detail
    out = HypergradResult(
        grad=grad, z=zz, xs=[zz[problem.block(k)].copy() for k in range(1, n + 1)], fun=fun,
        method="itd", success=status == 0, status=int(status),
        message=status_message(status, detail), T=Ts[2:], step=betas[2:], nit=int(Ts[2]),
        oracle_calls=ueng.eng.oracle_calls())
    out.ngrad = int(ueng.counts[:, _GRAD].sum())
    out.nhvp = int(ueng.counts[:, _HVP].sum())
    return out
