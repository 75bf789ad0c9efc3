"""n-level implicit differentiation: the recursion over levels, written once.

Reference: Gu & Chen (2024), *Towards Differentiable Multilevel Optimization: A
Gradient-Based Approach*, arXiv:2410.11312.

Levels k = 1..n, blocks x_k of the joint vector z = concat(x_1, .., x_n), objectives f_k(z);

    phi_n = f_n,   phi_k(x_<=k) = f_k(x_<=k, x_>k*(x_<=k)),   x_k*(x_<k) = argmin phi_k,

and F = phi_1. With ``M_k = d x_>k / d x_<=k`` (the total best-response Jacobian of the levels
below k) the hypergradient is ``grad F = d_1 f_1 + M_1^T d_>1 f_1``. Everything is
matrix-free and recursive over the levels, at a point z whose levels > k are solved for its
x_<=k (``H_j`` is the block x_j of the Hessian of phi_j, ``C_j`` its cross block with x_<j):

- ``adjoint(k, z, w) = M_k^T w``: with ``u = M_{k+1}^T w_>k+1`` (0 for k + 1 = n) and
  ``a = w_k+1 + u_k+1``, solve ``H_k+1 v = a`` and return ``u_<=k - C_k+1^T v``;
- ``tangent(k, z, s) = M_k s``: ``t = -H_k+1^{-1} C_k+1 s`` and, below, ``M_k+1 (s, t)``;
- ``hvp_reduced(k, z, s) = Hess(phi_k) s = [I, M_k^T] Hess(f_k) (s, M_k s)`` plus the
  best-response curvature term ``D_s[M_k^T w]`` at fixed ``w = grad_>k f_k``, which holds
  third derivatives of the lower levels.

The mode says how the curvature term is taken:

- "exact": for k = n - 1 from the third-order product of f_n, ``-[I, M^T] T_n[(s, M s)]
  (0, H_n^{-1} w)`` (the ``tvp`` callback, or central differences of ``hvp``); deeper down
  by central differences of the adjoint with the lower levels re-solved (dense form: moved
  along the tangent, not re-solved, see :meth:`LevelRecursion._shifted`). Exact for n <= 3;
  skipped at every level k whose levels below are all declared ``Objective(quadratic=True)``
  (``x_>k*`` is then affine, the term exactly zero);
- "truncated": dropped (exact when the best responses are affine, e.g. quadratic levels);
- "fd": the whole product ``Hess(phi_k) s`` by central differences of the reduced gradient,
  the lower levels re-solved (warm-started) at the shifted points;

and "itd" is the unrolled baseline of Sato, Tanaka & Takeda (2021), see
:class:`UnrolledRecursion`. The lower levels n..2 are solved innermost first: level n by
Newton-CG (a bilevel lower problem against x_<n), each level j < n by inexact Newton on
phi_j with a backtracking search on ``|grad phi_j|``, every block system ``H_j v = b`` by CG
whose operator for j < n is the recursive reduced product. Newton directions come from
the truncated reduced Hessian (exact for quadratic levels); in dense form the levels below
a trial point start from the first-order prediction ``x_>j + t M_j d`` (exact for affine
best responses, so that their re-solves only check). On the CPU, problems with
n >= 4 and joint size up to ``DENSE_LEVELS_MAX_SIZE`` (n = 3: ``DENSE_LEVELS_SMALL_SIZE``)
take the recursion in dense form
(:meth:`LevelRecursion._dense_at`): the blocks x_k of the reduced Hessians are formed by
``d_k`` reduced products per level and factorised once per point, so that solves, adjoints
and tangents are dense products instead of CG iterations multiplied over the levels. The
CUDA engine takes the matrix-free form.

:class:`LevelRecursion` holds this algorithm (what is solved, in which order, how adjoints
and curvature terms compose, iteration counts, the result) over a small backend interface:
the level oracles, the two solves (innermost level, block CG) and a few vector operations;
:class:`UnrolledRecursion` likewise holds the unrolled baseline. :class:`MultilevelEngine` and
:class:`UnrolledEngine` are the CPU backends (NumPy vectors, the innermost level's solves, CG
and unrolled loop in the compiled bilevel kernels);
:class:`mlocore.cuda._multilevel.DeviceMultilevelEngine` and
:class:`~mlocore.cuda._multilevel.DeviceUnrolledEngine` are the CUDA ones.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.linalg import solve_triangular

from ._callbacks import CallbackError, call_bound, call_kernel
from ._config import DENSE_LEVELS_MAX_SIZE, DENSE_LEVELS_SMALL_SIZE, FD_REL_STEP
from ._kernels import linalg as _kl
from ._kernels import lower as _low
from ._kernels import unrolled as _kl_unrolled
from ._kernels.oracles import LOWER_GRAD, LOWER_GRAD_Y, LOWER_HVP, LOWER_HVP_XY, LOWER_HVP_YY
from ._problem import MultilevelProblem
from ._results import HypergradResult, linear_info_message, new_counts, status_message
from ._validation import as_vector, check_choice, check_int, check_positive

__all__ = ["MULTILEVEL_MODES", "multilevel_hypergrad", "LevelRecursion", "MultilevelEngine",
           "unrolled_multilevel_hypergrad"]

MULTILEVEL_MODES = ("exact", "fd", "truncated")
_GRAD, _HVP, _TVP, _VALUE, _GRAD_BLOCK, _HVP_BLOCK = range(6)
_COUNT_NAMES = ("grad", "hvp", "tvp", "value", "grad_block", "hvp_block")
FD_SHIFT_STEP = 1e-3
UNROLLED_FD_STEP = 1e-4


class LevelFailure(Exception):
    """A lower level could not be solved or its reduced Hessian is not positive definite."""

    def __init__(self, status, level, detail):
        super().__init__(detail)
        self.status, self.level, self.detail = status, level, detail


class LevelRecursion:
    """The n-level recursion (see the module docs) for one problem and one mode.

    Backends subclass it and supply the operations; the recursion itself never touches an
    array but through them, and never modifies a vector passed in.

    Notes
    -----
    The backend interface. Oracles: ``check_at(z)``, ``grad(k, z)``, ``value(k, z)``,
    ``hvp(k, z, v)``,
    ``tvp(k, z, u, w)`` (joint vectors in, new joint vectors out), ``oracle_calls()``;
    optionally ``level_rows(k, z, v, rlo, rhi)`` (rows of ``hvp``, from block oracles).
    Solves: ``_innermost(z) -> (z_out, status, nit, gnorm)`` (level n for x_<n, warm-started
    from z), ``_cg(j, z, b, rtol, maxiter) -> (v, info, nit, residual)`` (block system of
    level j from zero; its operator for j < n is :meth:`block_product`).
    Vectors (new vectors out): ``_add(a, b)``, ``_sub(a, b)``, ``_neg(a)``,
    ``_quotient(a, b, h) = (a - b) / h``, ``_divide(a, h)``, ``_copy(a)``, ``_join(a, b)``,
    ``_embed(size, lo, v)`` (zeros with v at ``lo``), ``_shift(z, lo, hi, t, d)`` (z with
    ``z[lo:hi] + t d``), ``_nan(size)``; in place: ``_set_block(z, lo, hi, v)``,
    ``_axpy_into(a, alpha, b)`` (``a += alpha b``);
    host scalars: ``_norm(a)``, ``_norms(a, b)``, ``_all_finite(a)``. Results:
    ``_outputs(grad, z, output) -> (grad, z, xs)``, ``_totals() -> (ngrad, nhvp)``,
    ``_annotate(result)``. State: ``lower_nit`` (per level, shared with the exact solver)
    and ``_shared_state()`` (what a solver built by this engine shares with it).
    """

    #: exceptions of the backend's arithmetic that end a hypergradient with status 6
    _float_errors = ()
    #: whether the backend's vectors are NumPy arrays, so that small problems can take the
    #: recursion in dense form (:meth:`_dense_at`)
    dense_levels = False

    def __init__(self, problem, mode="exact", tol=1e-10, lower_tol=None, lower_maxiter=100,
                 fd_step=None):
        self.p = problem
        self.n = problem.n
        self.off = problem.offsets
        self.N = problem.size
        self.mode = mode
        self.tol = tol
        self.lower_tol = tol if lower_tol is None else lower_tol
        self.lower_maxiter = lower_maxiter
        # step of the central differences with re-solved lower levels: their solver noise
        # (~lower_tol) is divided by the step, so it is much larger than for oracle
        # differences; 1e-3 relative balances noise against the O(h^2) truncation error
        self.fd_step = FD_SHIFT_STEP if fd_step is None else fd_step
        self._solver = None
        limit = DENSE_LEVELS_MAX_SIZE if self.n >= 4 else min(DENSE_LEVELS_SMALL_SIZE,
                                                               DENSE_LEVELS_MAX_SIZE)
        self.dense = self.dense_levels and self.n >= 3 and self.N <= limit
        self._dense_points = {}
        # affine[k]: every level below k is declared quadratic (Objective(quadratic=True)),
        # so x_>k* is affine in x_<=k and the curvature term of level k is exactly zero
        quad = [bool(getattr(obj, "quadratic", False)) for obj in problem.levels]
        self.affine = [all(quad[k:]) for k in range(self.n + 1)]
        # per-level statistics of the solves (shared with the solvers this engine builds):
        # how often each level was solved, and |grad phi_k| where the last solve ended
        self.stats = {"solves": np.zeros(self.n, dtype=np.int64),
                      "grad_norm": np.full(self.n, np.nan)}

    def _sub_engine(self, mode):
        """An engine of the same problem in another mode sharing oracles, counters and
        statistics with this one."""
        eng = type(self)(self.p, mode, self.tol, self.lower_tol, self.lower_maxiter,
                         self.fd_step, shared=self._shared_state())
        eng.stats = self.stats
        return eng

    def _init_solver(self):
        """The lower levels must be solved for the problem itself whatever the mode: for
        n >= 4 the truncated reduced gradients of the middle levels would move their
        solutions, so "truncated" solves them with the exact recursion (sharing state),
        unless levels 4..n are declared quadratic (the terms it drops are zero there)."""
        if self.mode == "truncated" and self.n >= 4 and not self.affine[3]:
            self._solver = self._sub_engine("exact")

    # -- the solves ---------------------------------------------------------------------------
    def solve_block(self, j, z, b, rtol=None):
        """Solve (reduced Hessian of phi_j, block x_j) v = b by CG from zero (dense form:
        by the Cholesky factor at z)."""
        if self.dense:
            Li = self._dense_at(z, j)[1][j]
            return Li.T @ (Li @ b)
        rtol = self.tol if rtol is None else rtol
        maxiter = 10 * self.p.dims[j - 1] + 20
        v, info, nit, res = self._cg(j, z, b, rtol, maxiter)
        if info < 0:
            raise LevelFailure(3, j, f"level {j}: reduced Hessian solve: "
                                     f"{linear_info_message(info)}")
        if info > 0:
            raise LevelFailure(5, j, f"level {j}: reduced Hessian solve: "
                                     f"{linear_info_message(info)}, residual {res:.3e}")
        return v

    def _newton_direction(self, j, z, g, rtol):
        """The nested Newton system of level j, ``H v = g``, with H the reduced Hessian of
        phi_j *without* its best-response curvature terms (the truncated recursion: no
        third-order products, no re-solved levels). Only the solution x_j* matters here,
        not the path to it, so an inexact Hessian is enough: the search on |grad phi_j|
        keeps the iteration safe, and the step is exact when the best responses below are
        affine (quadratic levels: one step). The exact reduced Hessian is the fallback when
        the truncated one is not positive definite."""
        if self.mode == "truncated":
            return self.solve_block(j, z, g, rtol=rtol)
        newton = getattr(self, "_newton", None)
        if newton is None:
            newton = self._newton = self._sub_engine("truncated")
        try:
            return newton.solve_block(j, z, g, rtol=rtol)
        except LevelFailure:
            return self.solve_block(j, z, g, rtol=rtol)

    def block_product(self, j, z, p):
        """``(Hess phi_j)[x_j, x_j] p``: the reduced product with direction (0, .., 0, p)."""
        lo, hi = self.off[j - 1], self.off[j]
        return self.hvp_reduced(j, z, self._embed(hi, lo, p))[lo:hi]

    def solve_from(self, z, k):
        """z with levels k+1..n solved for its x_<=k (warm-started from z's own blocks); a
        new vector unless k >= n."""
        if self._solver is not None:
            return self._solver.solve_from(z, k)
        if k >= self.n:
            return z
        if k == self.n - 1:
            out, status, nit, gnorm = self._innermost(z)
            self.lower_nit[-1] += nit
            self.stats["solves"][-1] += 1
            self.stats["grad_norm"][-1] = gnorm
            if status != _low.OK:
                raise LevelFailure(status, self.n, f"level {self.n}: |grad| = {gnorm:.3e} "
                                                   f"after {nit} iterations")
            return out
        j = k + 1
        lo, hi = self.off[j - 1], self.off[j]
        z = self.solve_from(z, j)
        g = self.grad_reduced(j, z)[lo:hi]
        gnorm = self._norm(g)
        self.stats["solves"][j - 1] += 1
        for it in range(self.lower_maxiter):
            self.stats["grad_norm"][j - 1] = gnorm
            if gnorm <= self.lower_tol:
                self.lower_nit[j - 1] += it
                return z
            # inexact Newton on phi_j with a backtracking search on |grad phi_j|
            d = self._neg(self._newton_direction(j, z, g, min(1e-2, gnorm)))
            if self.dense:
                # the levels below start from the first-order prediction x_>j + t M_j d
                # (exact for affine best responses, so their re-solves only check)
                M = self._dense_at(z, j + 1)[0][j]
                d, lo_d, hi_d = np.concatenate([d, M[:, lo:hi] @ d]), lo, self.N
            else:
                lo_d, hi_d = lo, hi
            t = 1.0
            for _ in range(40):
                z_try = self.solve_from(self._shift(z, lo_d, hi_d, t, d), j)
                g_try = self.grad_reduced(j, z_try)[lo:hi]
                gn_try = self._norm(g_try)
                if math.isfinite(gn_try) and gn_try <= (1.0 - 1e-4 * t) * gnorm:
                    break
                t *= 0.5
            else:
                raise LevelFailure(4, j, f"level {j}: line search failed at |grad| = "
                                         f"{gnorm:.3e}")
            z, g, gnorm = z_try, g_try, gn_try
        self.stats["grad_norm"][j - 1] = gnorm
        if gnorm <= self.lower_tol:
            self.lower_nit[j - 1] += self.lower_maxiter
            return z
        raise LevelFailure(1, j, f"level {j}: |grad| = {gnorm:.3e} after "
                                 f"{self.lower_maxiter} iterations")

    # -- the recursion in dense form (small problems, NumPy backends) -----------------------
    def _dense_at(self, z, j):
        """Dense quantities at z for the levels j..n, built innermost first:
        ``M[k] = d x_>k / d x_<=k`` (a matrix, k = j-1..n-1) and the inverse Cholesky
        factor ``L^{-1}`` of the block x_k of the reduced Hessian ``R_k`` of phi_k
        (k = j..n), in this engine's mode. Level k costs d_k reduced products
        ``R_k[:, x_k] = hvp_reduced(k, z, e_i)`` (their own curvature terms included; the
        levels below answer from their dense factors), then dense algebra: ``t = -R_k[x_k, x_k]^{-1} R_k[x_k, x_<k]`` and
        ``M_{k-1} = [t; M_k [I; t]]`` (Gu & Chen 2024, the recursion of the best-response
        Jacobians). Every later solve, adjoint and tangent at z is then a dense product,
        where the matrix-free recursion would multiply CG iterations over the levels.
        Recently used points are kept: the recursion returns to them."""
        key = z.tobytes()
        entry = self._dense_points.pop(key, None)
        if entry is None:
            if len(self._dense_points) >= 32:
                self._dense_points.pop(next(iter(self._dense_points)))
            entry = {"M": {}, "chol": {}, "low": self.n + 1}
        self._dense_points[key] = entry                   # most recently used last
        M, chol, off = entry["M"], entry["chol"], self.off
        for k in range(entry["low"] - 1, j - 1, -1):
            lo, hi = off[k - 1], off[k]
            R = np.empty((hi, hi - lo))                    # R_k[:, x_k], rows over x_<=k
            for i in range(hi - lo):
                e = np.zeros(hi)
                e[lo + i] = 1.0
                R[:, i] = self.level_rows(k, z, e, 0, hi) if k == self.n else \
                    self.hvp_reduced(k, z, e)[:hi]
            Rbb = 0.5 * (R[lo:hi] + R[lo:hi].T)
            try:
                L = np.linalg.cholesky(Rbb)
            except np.linalg.LinAlgError:
                raise LevelFailure(3, k, f"level {k}: reduced Hessian is not positive "
                                         f"definite") from None
            if not np.all(np.isfinite(L)):
                raise LevelFailure(6, k, f"level {k}: non-finite reduced Hessian")
            Li = chol[k] = solve_triangular(L, np.eye(hi - lo), lower=True)   # L^{-1}
            t = -Li.T @ (Li @ R[:lo].T)                     # d x_k / d x_<k
            M[k - 1] = t if k == self.n else np.vstack(
                [t, M[k][:, :lo] + M[k][:, lo:hi] @ t])
            entry["low"] = k
        return M, chol

    # -- the recursion ------------------------------------------------------------------------
    def grad_reduced(self, k, z):
        """Total gradient of phi_k over x_<=k at a solved point (length ``off[k]``)."""
        g = self.grad(k, z)
        if k == self.n:
            return g
        o = self.off[k]
        return self._add(g[:o], self.adjoint(k, z, g[o:]))

    def adjoint(self, k, z, w):
        """``M_k^T w`` with ``M_k = d x_>k / d x_<=k`` (w over the blocks of levels > k)."""
        if self.dense:
            return self._dense_at(z, k + 1)[0][k].T @ w
        o, o1 = self.off[k], self.off[k + 1]
        if k + 1 == self.n:
            u, a = None, w[:o1 - o]
        else:
            u = self.adjoint(k + 1, z, w[o1 - o:])
            a = self._add(w[:o1 - o], u[o:o1])
        v = self.solve_block(k + 1, z, a)
        if k + 1 == self.n:  # cross block of level n: C^T v = H_n[x_<n, x_n] v
            c = self.level_rows(self.n, z, self._embed(o1, o, v), 0, o)
        else:
            c = self.hvp_reduced(k + 1, z, self._embed(o1, o, v))[:o]  # cross block: C^T v
        return self._neg(c) if u is None else self._sub(u[:o], c)

    def tangent(self, k, z, s):
        """``M_k s``: the change of x_>k along a direction s of x_<=k (length ``N - off[k]``)."""
        if self.dense:
            return self._dense_at(z, k + 1)[0][k] @ s
        o, o1 = self.off[k], self.off[k + 1]
        if k + 1 == self.n:  # H_n[x_n, x_<n] s
            r = self.level_rows(self.n, z, self._embed(o1, 0, s), o, o1)
        else:
            r = self.hvp_reduced(k + 1, z, self._embed(o1, 0, s))[o:o1]
        t = self._neg(self.solve_block(k + 1, z, r))
        if k + 1 == self.n:
            return t
        return self._join(t, self.tangent(k + 1, z, self._join(s, t)))

    def level_rows(self, k, z, v, rlo, rhi):
        """Rows ``rlo:rhi`` (block boundaries) of ``Hess(f_k)(z) v``, v a joint vector: the
        raw level product where the recursion uses only some blocks of it (level n's
        cross blocks and dense columns). Backends with block oracles override it."""
        return self.hvp(k, z, v)[rlo:rhi]

    def hvp_reduced(self, k, z, s):
        """Hessian of phi_k (over x_<=k) times s, in this engine's mode."""
        if k == self.n:
            return self.hvp(k, z, s)
        o = self.off[k]
        if self.mode == "fd":
            zp, zm, eps = self._shifted(k, z, s)
            return self._quotient(self.grad_reduced(k, zp), self.grad_reduced(k, zm),
                                  2.0 * eps)
        sh = self._join(s, self.tangent(k, z, s))
        h = self.hvp(k, z, sh)
        out = self._add(h[:o], self.adjoint(k, z, h[o:]))
        if self.mode == "exact" and not self.affine[k]:
            out = self._add(out, self.curvature(k, z, s, sh))
        return out

    def curvature(self, k, z, s, sh):
        """``D_s[M_k^T w]`` at fixed ``w = grad_>k f_k``: the best-response curvature term."""
        o = self.off[k]
        w = self.grad(k, z)[o:]
        if k == self.n - 1:
            # M^T w = -C^T H^{-1} w with H, C blocks of Hess f_n: differentiating gives
            # -[I, M^T] T_n[sh](0, v), v = H^{-1} w (third-order product of f_n)
            v = self.solve_block(self.n, z, w)
            q = self.tvp(self.n, z, sh, self._embed(self.N, o, v))
            return self._neg(self._add(q[:o], self.adjoint(k, z, q[o:])))
        zp, zm, eps = self._shifted(k, z, s)
        return self._quotient(self.adjoint(k, zp, w), self.adjoint(k, zm, w), 2.0 * eps)

    def _shifted(self, k, z, s):
        """``(z+, z-, eps)``: z with x_<=k moved by ``+-eps s``, levels > k re-solved. In
        dense form the lower levels move along the tangent, ``x_>k +- eps M_k s`` (a cached
        product there), and in "exact" mode they are not re-solved: the solution manifold
        is ``z +- eps t + eps^2 c / 2 + O(eps^3)`` with the same second-order offset c on
        both sides, so a central difference along the tangent of any smooth function of z
        (here the adjoint ``M_k^T w`` as computed at z) has the same O(eps^2) error as at
        the re-solved points, without the solves or their noise. "fd" re-solves (from the
        tangent prediction, an O(eps^2) start for the Newton steps)."""
        o = self.off[k]
        sn, zn = self._norms(s, z[:o])
        eps = self.fd_step * (1.0 + zn) / max(sn, np.finfo(float).tiny)
        d = self._join(s, self.tangent(k, z, s)) if self.dense else s
        hi = self.N if self.dense else o
        zp = self._shift(z, 0, hi, eps, d)
        zm = self._shift(z, 0, hi, -eps, d)
        if self.dense and self.mode == "exact":
            return zp, zm, eps
        return self.solve_from(zp, k), self.solve_from(zm, k), eps

    # -- the result ---------------------------------------------------------------------------
    def hypergrad_at(self, z, lower_solved=False, output="numpy"):
        """:class:`HypergradResult` of ``grad F`` at z (levels 2..n solved first, from z's
        blocks, unless ``lower_solved``); failures end with a status, never an exception."""
        d1 = self.p.dims[0]
        status, detail = 0, ""
        grad, fun = self._nan(d1), np.nan
        gnorms = np.full(self.n, np.nan)
        try:
            if not lower_solved:
                try:
                    z = self.solve_from(z, 1)
                finally:  # where the solve of the given point left each level
                    gnorms = self.stats["grad_norm"].copy()
            grad = self.grad_reduced(1, z)[:d1]
            fun = self.value(1, z)
            if not self._all_finite(grad):
                status, detail = 6, ""
        except LevelFailure as fail:
            status, detail = fail.status, fail.detail
        except self._float_errors as exc:  # pragma: no cover - numpy configured to raise
            status, detail = 6, str(exc)
        grad, z, xs = self._outputs(grad, z, output)
        out = HypergradResult(
            grad=grad, z=z, xs=xs, fun=fun, method=self.mode, success=status == 0,
            status=int(status), message=status_message(status, detail),
            lower_nit=self.lower_nit.copy(), nit=int(self.lower_nit.sum()),
            lower_grad_norm=gnorms, lower_solves=self.stats["solves"].copy(),
            oracle_calls=self.oracle_calls())
        out.ngrad, out.nhvp = self._totals()
        self._annotate(out)
        return out


class MultilevelEngine(LevelRecursion):
    """The CPU backend of :class:`LevelRecursion`: NumPy vectors, the compiled callbacks,
    level n's Newton-CG and CG in the compiled bilevel kernels (keeps oracle counts).

    ``shared``: another CPU engine whose compiled callbacks and counters this one uses.
    """

    _float_errors = (FloatingPointError,)
    dense_levels = True

    def __init__(self, problem: MultilevelProblem, mode="exact", tol=1e-10, lower_tol=None,
                 lower_maxiter=100, fd_step=None, shared=None):
        super().__init__(problem, mode, tol, lower_tol, lower_maxiter, fd_step)
        if shared is None:
            self.comp = [obj.compiled(f"level{k}") for k, obj in enumerate(problem.levels, 1)]
            self.counts = np.zeros((self.n, 6), dtype=np.int64)
            self.lower_nit = np.zeros(self.n, dtype=np.int64)
            # level n as the kernels' lower objective: with its block oracles as grad_y /
            # hvp_yy / hvp_xy when it has them
            self.inner = self.comp[-1].innermost(self.off) or self.comp[-1]
            self._off_arr = np.array(self.off, dtype=np.int64)
            self._block_of = {o: k for k, o in enumerate(self.off)}
        else:
            self.comp, self.counts, self.lower_nit = shared.comp, shared.counts, \
                shared.lower_nit
            self.inner, self._off_arr = shared.inner, shared._off_arr
            self._block_of = shared._block_of
        self._init_solver()

    def _shared_state(self):
        return self

    # -- oracles ------------------------------------------------------------------------------
    def check_at(self, z):
        for c in self.comp:
            c.check_at(z, offsets=self.off)

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

    def level_rows(self, k, z, v, rlo, rhi):
        """Rows ``rlo:rhi`` of ``Hess(f_k)(z) v``: with level k's ``hvp_block``, the sum
        over the blocks x_j where v is nonzero of ``hvp_block(z, v_j, i, j)``, for each
        block x_i of the rows, when that takes at most n block calls (one block row or
        column of the Hessian; zeros without a call when v is zero); the joint product
        otherwise."""
        c = self.comp[k - 1]
        if c.hvp_block is None:
            return self.hvp(k, z, v)[rlo:rhi]
        off = self.off
        # the blocks (1-based) holding the nonzero entries of v; the blocks i0..i1 of the rows
        support = [j for j in range(1, self.n + 1) if v[off[j - 1]:off[j]].any()]
        i0, i1 = self._block_of[rlo] + 1, self._block_of[rhi]
        if len(support) * (i1 - i0 + 1) > self.n:
            return self.hvp(k, z, v)[rlo:rhi]
        rows = c.hvp_rows()
        out = None
        for j in support:
            self.counts[k - 1, _HVP_BLOCK] += i1 - i0 + 1
            try:
                h = rows(z, v[off[j - 1]:off[j]].copy(), j, i0, i1, self._off_arr,
                         *c.args)
            except ValueError as exc:
                raise CallbackError(f"{exc} (for j={j})") from None
            out = h if out is None else out + h
        return np.zeros(rhi - rlo) if out is None else out

    def oracle_calls(self):
        return calls_dict(self.counts, [bool(c.level_blocks) for c in self.comp])

    # -- solves in the compiled kernels -------------------------------------------------------
    def _fold(self, counts6):
        k = self.n - 1
        self.counts[k, _GRAD] += counts6[LOWER_GRAD]
        self.counts[k, _HVP] += counts6[LOWER_HVP]
        self.counts[k, _GRAD_BLOCK] += counts6[LOWER_GRAD_Y]
        # hvp_xy of the innermost level is n - 1 calls of hvp_block (the blocks x_<n)
        self.counts[k, _HVP_BLOCK] += counts6[LOWER_HVP_YY] + (self.n - 1) * counts6[LOWER_HVP_XY]

    def lower_core(self, z, method, tol, maxiter, step):
        """Level n minimized over x_n from z's block (x_<n fixed) by the compiled
        ``solve_lower_kernel``: ``(z_out, status, nit, gnorm)``, z_out a new vector."""
        c = self.inner
        o = self.off[-2]
        counts6 = new_counts()
        y, status, nit, gnorm, _ = call_bound(
            c.bound_kernels, None, _low.solve_lower_kernel, lambda: (c.fns, c.kargs, c.flags),
            z[:o].copy(), z[o:].copy(), method, tol, maxiter, step, counts6)
        self._fold(counts6)
        out = z.copy()
        out[o:] = y
        return out, status, nit, gnorm

    def _innermost(self, z):
        return self.lower_core(z, _low.NEWTON_CG, self.lower_tol, self.lower_maxiter, -1.0)

    def _cg(self, j, z, b, rtol, maxiter):
        d = self.p.dims[j - 1]
        if j == self.n:
            c = self.inner
            counts6 = new_counts()
            op = (c.fns, c.kargs, c.flags, z, self.off[-2], counts6)
            v, info, nit, res, _ = call_kernel(_kl.cg_core, op, b, np.zeros(d), rtol, 0.0,
                                               maxiter, (), None)
            self._fold(counts6)
        else:
            def matvec(p):
                return self.block_product(j, z, p)

            v, info, nit, res, _ = _kl.cg_core.py_func((matvec,), b, np.zeros(d), rtol, 0.0,
                                                       maxiter, (), None)
        return v, info, nit, res

    # -- vectors ------------------------------------------------------------------------------
    @staticmethod
    def _add(a, b):
        return a + b

    @staticmethod
    def _sub(a, b):
        return a - b

    @staticmethod
    def _neg(a):
        return -a

    @staticmethod
    def _quotient(a, b, h):
        return (a - b) / h

    @staticmethod
    def _divide(a, h):
        return a / h

    @staticmethod
    def _join(a, b):
        return np.concatenate([a, b])

    @staticmethod
    def _copy(a):
        return a.copy()

    @staticmethod
    def _set_block(z, lo, hi, v):
        z[lo:hi] = v

    @staticmethod
    def _axpy_into(a, alpha, b):
        a += alpha * b

    @staticmethod
    def _embed(size, lo, v):
        out = np.zeros(size)
        out[lo:lo + v.shape[0]] = v
        return out

    @staticmethod
    def _shift(z, lo, hi, t, d):
        out = z.copy()
        out[lo:hi] += t * d
        return out

    @staticmethod
    def _nan(size):
        return np.full(size, np.nan)

    @staticmethod
    def _norm(a):
        return float(np.linalg.norm(a))

    @staticmethod
    def _norms(a, b):
        return float(np.linalg.norm(a)), float(np.linalg.norm(b))

    @staticmethod
    def _all_finite(a):
        return bool(np.all(np.isfinite(a)))

    # -- results ------------------------------------------------------------------------------
    def _outputs(self, grad, z, output):
        return grad, z, [z[self.p.block(k)].copy() for k in range(1, self.n + 1)]

    def _totals(self):
        return int(self.counts[:, _GRAD].sum()), int(self.counts[:, _HVP].sum())

    def _annotate(self, result):
        pass


def calls_dict(counts, has_blocks):
    """Per-level oracle counts ``{"level<k>": {"grad", "hvp", "tvp", "value"}}`` from the
    ``(n, 6)`` counter array, with ``grad_block`` / ``hvp_block`` for the levels that have
    multilevel block oracles (``has_blocks[k - 1]``)."""
    out = {}
    for k, row in enumerate(counts, 1):
        names = _COUNT_NAMES if has_blocks[k - 1] else _COUNT_NAMES[:4]
        out[f"level{k}"] = {name: int(row[i]) for i, name in enumerate(names)}
    return out


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
    return eng.hypergrad_at(z, lower_solved)


class UnrolledRecursion:
    """The unrolled baseline of Sato, Tanaka & Takeda (2021) for n levels, written once.

    Each lower level k is replaced by ``T_k`` gradient steps with step ``beta_k`` on its
    unrolled reduced objective ``phi~_k(x_<=k) = f_k(x_<=k, X_>k(x_<=k))``, every inner loop
    starting from the fixed points given for levels 2..n. The hypergradient is the gradient of
    ``f_1(x_1, X_>1(x_1))`` by reverse mode through the nested loops: level n's loop and its
    VJP are backend operations (exact, with the hvp callback); the Hessian-vector products of
    ``phi~_k`` that the reverse pass of an outer loop needs (k < n) are central differences of
    its reverse-mode gradient. Cost and memory grow like T_2 * ... * T_n.

    The oracles, counters and vector operations are those of ``self.eng``, a
    :class:`LevelRecursion` backend of the same problem; a backend adds
    ``_power_start(d)`` (the power iteration's start), ``_unroll_innermost(z, T, beta) ->
    (z_out, status)`` (T gradient steps of level n), ``_innermost_vjp(z, T, beta, w)`` and
    ``_dot_norm(v, w) -> (v.w, |w|)``; it may override ``finite(a)``.
    """

    def __init__(self, problem, T, steps, starts, fd_step, eng):
        self.p = problem
        self.n = problem.n
        self.off = problem.offsets
        self.N = problem.size
        self.T = T            # T[k] for k = 2..n (index k)
        self.beta = steps     # beta[k], filled lazily when None
        self.starts = starts  # the joint vector whose blocks 2..n start every inner loop
        # the outer levels' HVPs are central differences nested n-2 deep: a step larger than
        # the single-difference optimum keeps the amplified round-off small (no re-solves)
        self.fd_step = UNROLLED_FD_STEP if fd_step is None else fd_step
        self.eng = eng        # oracles, their counts and the vector operations
        # per level: gradient steps run (forward passes and their re-runs in the reverse
        # passes) and inner loops run
        self.steps_run = np.zeros(self.n, dtype=np.int64)
        self.loops_run = np.zeros(self.n, dtype=np.int64)

    def _start(self, z, k):
        """A new vector: z with the blocks of levels > k reset to the fixed starting points."""
        o = self.off[k]
        return self.eng._join(z[:o], self.starts[o:])

    def step_size(self, k, z):
        """beta_k: 1/L from power iteration on the block Hessian of phi~_k at z."""
        if self.beta[k] is None:
            lo, hi = self.off[k - 1], self.off[k]
            v = self._power_start(hi - lo)
            lam = 0.0
            for _ in range(15):
                e = self.eng._embed(hi, lo, v)
                w = self.eng.level_rows(k, z, e, lo, hi) if k == self.n else \
                    self.hvp_unrolled(k, z, e)[lo:hi]
                lam, nw = self._dot_norm(v, w)
                if nw == 0 or not math.isfinite(nw):
                    break
                v = self.eng._divide(w, nw)
            if not lam > 0:
                raise LevelFailure(3, k, f"level {k}: the unrolled block Hessian is not "
                                         "positive definite at the starting point")
            self.beta[k] = 1.0 / (1.05 * lam)
        return self.beta[k]

    def forward(self, k, z):
        """z with levels k+1..n replaced by their unrolled outputs (from the fixed starts); a
        new vector unless k >= n."""
        if k >= self.n:
            return z
        z = self._start(z, k)
        j = k + 1
        lo, hi = self.off[j - 1], self.off[j]
        beta = self.step_size(j, z)
        self.steps_run[j - 1] += self.T[j]
        self.loops_run[j - 1] += 1
        if j == self.n:
            out, status = self._unroll_innermost(z, self.T[j], beta)
            if status == _low.NONFINITE:
                raise LevelFailure(2, j, f"level {j}: unrolled iterates diverged "
                                         f"(step {beta:.3e})")
            return out
        for _ in range(self.T[j]):
            g = self.grad_unrolled(j, z)[lo:hi]
            self.eng._axpy_into(z[lo:hi], -beta, g)
            if not self.finite(z[lo:hi]):
                raise LevelFailure(2, j, f"level {j}: unrolled iterates diverged "
                                         f"(step {beta:.3e})")
        return self.forward(j, z)

    def grad_unrolled(self, j, z):
        """Gradient of phi~_j over x_<=j (length ``off[j]``; the joint gradient for j = n)."""
        zz = self.forward(j, z)
        g = self.eng.grad(j, zz)
        if j == self.n:
            return g
        o = self.off[j]
        return self.eng._add(g[:o], self.vjp(j, z, g[o:]))

    def hvp_unrolled(self, j, z, s):
        """Hessian of phi~_j times s (s of length ``off[j]``)."""
        if j == self.n:
            return self.eng.hvp(j, z, s)
        o = self.off[j]
        zn, sn = self.eng._norms(z[:o], s)
        eps = self.fd_step * (1.0 + zn) / max(sn, 1e-300)
        zp = self.eng._shift(z, 0, o, eps, s)
        zm = self.eng._shift(z, 0, o, -eps, s)
        return self.eng._quotient(self.grad_unrolled(j, zp), self.grad_unrolled(j, zm),
                                  2.0 * eps)

    def vjp(self, k, z, w):
        """``w^T d X_>k / d x_<=k`` for the unrolled outputs X_>k (w over levels > k)."""
        eng = self.eng
        j = k + 1
        lo, hi = self.off[k], self.off[j]
        z = self._start(z, k)
        beta = self.step_size(j, z)
        self.steps_run[j - 1] += self.T[j]
        self.loops_run[j - 1] += 1
        if j == self.n:
            return self._innermost_vjp(z, self.T[j], beta, w)
        traj = []
        for _ in range(self.T[j]):  # forward through level j's loop, keeping its iterates
            traj.append(eng._copy(z[lo:hi]))
            eng._axpy_into(z[lo:hi], -beta, self.grad_unrolled(j, z)[lo:hi])
        u = self.vjp(j, z, w[hi - lo:])
        a = eng._add(w[:hi - lo], u[lo:hi])
        g = eng._copy(u[:lo])
        for xt in reversed(traj):
            eng._set_block(z, lo, hi, xt)
            h = self.hvp_unrolled(j, z, eng._embed(hi, lo, a))
            eng._axpy_into(g, -beta, h[:lo])
            eng._axpy_into(a, -beta, h[lo:hi])
        return g

    def oracle_calls(self):
        return self.eng.oracle_calls()

    def finite(self, a):
        """All entries of a finite?"""
        return self.eng._all_finite(a)

    # -- the result ---------------------------------------------------------------------------
    def core(self, z, value_only=False):
        """``(grad, zz, fun, status, detail)`` from the joint vector z (x_1 and the starts;
        not modified): ``grad`` (d_1; NaN unless computed) and ``zz`` (the unrolled outputs,
        or z when the forward pass failed)."""
        d1 = self.p.dims[0]
        status, detail = 0, ""
        grad, fun, zz = self.eng._nan(d1), np.nan, z
        try:
            if not value_only:
                grad = self.grad_unrolled(1, z)[:d1]
            zz = self.forward(1, z)
            fun = self.eng.value(1, zz)
            if not value_only and not self.finite(grad):
                status = 6
        except LevelFailure as fail:
            status, detail = fail.status, fail.detail
        return grad, zz, fun, status, detail

    def hypergrad_at(self, z, value_only=False, output="numpy"):
        """:class:`HypergradResult` (``method="itd"``) of the unrolled approximation at z."""
        grad, zz, fun, status, detail = self.core(z, value_only)
        grad, zz, xs = self.eng._outputs(grad, zz, output)
        out = HypergradResult(
            grad=grad, z=zz, xs=xs, fun=fun, method="itd", success=status == 0,
            status=int(status), message=status_message(status, detail), T=self.T[2:],
            step=self.beta[2:], nit=int(self.T[2]), lower_nit=self.steps_run.copy(),
            lower_solves=self.loops_run.copy(), lower_grad_norm=np.full(self.n, np.nan),
            oracle_calls=self.oracle_calls())
        out.ngrad, out.nhvp = self.eng._totals()
        self.eng._annotate(out)
        return out


class UnrolledEngine(UnrolledRecursion):
    """The CPU backend of :class:`UnrolledRecursion`: level n's loop runs in the compiled
    ``solve_lower_kernel`` (gradient descent) and its VJP in the ``unrolled_vjp`` kernel."""

    def __init__(self, problem, T, steps, starts, fd_step=None):
        super().__init__(problem, T, steps, starts, fd_step,
                         MultilevelEngine(problem, "truncated"))
        self.counts = self.eng.counts

    @staticmethod
    def _power_start(d):
        v = np.linspace(1.0, 2.0, d)
        v /= np.linalg.norm(v)
        return v

    @staticmethod
    def _dot_norm(v, w):
        return v @ w, np.linalg.norm(w)

    def _unroll_innermost(self, z, T, beta):
        out, status, _, _ = self.eng.lower_core(z, _low.GD, 0.0, T, beta)
        return out, status

    def _innermost_vjp(self, z, T, beta, w):
        lo = self.off[-2]
        c = self.eng.inner
        counts6 = new_counts()
        _, h, ok = call_kernel(_kl_unrolled.unrolled_vjp, c.fns, c.kargs, c.flags,
                               z[:lo].copy(), z[lo:].copy(), T, beta,
                               np.ascontiguousarray(w), counts6)
        self.eng._fold(counts6)
        if not ok:
            raise LevelFailure(2, self.n, f"level {self.n}: unrolled iterates diverged")
        return h


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
    ueng, z, _, _ = _unrolled_setup(problem, xs, T, steps, fd_step)
    return ueng.hypergrad_at(z, value_only)
