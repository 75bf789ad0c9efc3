"""n-level implicit differentiation on the device ("one large problem" mode).

The CUDA backend of the recursion of :mod:`mlocore._multilevel` (Gu & Chen 2024, *Towards
Differentiable Multilevel Optimization: A Gradient-Based Approach*): the algorithm is
:class:`mlocore._multilevel.LevelRecursion`, written once; :class:`DeviceMultilevelEngine`
supplies its operations on device vectors.

What runs where: every vector (the joint z, gradients, adjoints, tangents, CG iterates) lives
on the device; the innermost level is solved by the device Newton-CG of
:mod:`mlocore.cuda._implicit` (level n against x_<n is a bilevel lower problem) and every
reduced-Hessian system by :func:`mlocore.cuda._linalg.cg_device`, whose operator for a level
j < n applies the recursive reduced-Hessian product. The host orchestrates the recursion and
reads back only the scalars of each stopping test, line search and difference step (counted in
``res.transfers``). The iterate sequence is the CPU engine's step for step, so results agree
with the CPU backend to rounding.

The unrolled baseline (``method="itd"``, Sato et al. 2021) is likewise written once, as
:class:`mlocore._multilevel.UnrolledRecursion` (T gradient steps per lower level from fixed
starts, reverse mode through the nested loops, outer levels' HVPs by central differences of
unrolled gradients); :class:`DeviceUnrolledEngine` supplies level n's loop and its VJP (the
CPU's ``unrolled_vjp`` kernel with device joint hvps).

Third-order products (mode "exact", level n): a :class:`~mlocore.cuda.DeviceObjective` has no
``tvp`` callback, so they are always central differences of the level-n Hessian-vector product
(the CPU's fallback when ``tvp`` is absent); on problems whose level n is quadratic both are
exactly zero.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .._config import FD_REL_STEP
from .._kernels.oracles import UPPER_GRAD, UPPER_HVP, UPPER_VALUE
from .._multilevel import (MULTILEVEL_MODES, LevelFailure, LevelRecursion, UnrolledRecursion,
                           unrolled_options)
from .._results import new_counts
from .._validation import check_backend, check_choice, check_int, check_positive
from . import _linalg as dl
from ._device import Transfers, is_device_array, to_device, to_host
from ._implicit import _HyyOperator, lower_core
from .._problem import BilevelProblem, MultilevelProblem
from ._problem import DeviceObjective, DeviceOracle
from ._unrolled import _matrix

__all__ = ["DeviceMultilevelProblem", "multilevel_hypergrad", "DeviceMultilevelEngine",
           "DeviceUnrolledEngine", "unrolled_multilevel_hypergrad"]

OUTPUTS = ("numpy", "device")


class DeviceMultilevelProblem:
    """An n-level problem with device callbacks: level 1 minimizes ``F = phi_1``, each lower
    level k minimizes its reduced objective given the levels above (docs/mathematics.md section 3).

    Parameters
    ----------
    levels : sequence of DeviceObjective
        ``[f_1, ..., f_n]`` (n >= 2), level 1 outermost; every objective's callbacks work on
        the joint device vector ``z = concat(x_1, ..., x_n)``.
    dims : sequence of int
        ``(d_1, ..., d_n)``, positive.
    bounds, project
        Constraints on x_1, as for :class:`mlocore.MultilevelProblem` (box bounds, or a
        projection such as :class:`mlocore.Ball`). ``project`` is a *host* function of a
        NumPy array x_1: :func:`mlocore.minimize_multilevel` keeps x_1, which is small, on the
        host and projects there, as the CPU backend does.

    Notes
    -----
    The levels take the joint callbacks only: a DeviceObjective with block oracles
    (``grad_y``, ``hvp_yy``, ...) is rejected (ValueError).
    As :class:`mlocore.MultilevelProblem`: every lower level k >= 2 must be strongly convex in
    x_k near the solution (the Hessian of its reduced objective in x_k is inverted, Gu & Chen
    2024, Lemmas 3.1-3.2). The callbacks are checked once, at the first point a hypergradient
    sees. Constraints are honoured by :func:`mlocore.minimize_multilevel` (projected steps);
    ``hypergrad`` ignores them, as on the CPU.

    Attributes
    ----------
    levels, dims, n
        As given; n the number of levels.
    offsets : tuple of int
        ``(0, d_1, d_1 + d_2, ..., sum(dims))``: block k of z is ``offsets[k-1]:offsets[k]``.
    size : int
        ``sum(dims)``.
    lb, ub : ndarray or None
        The box on x_1 (None without bounds).
    constrained : bool
        Whether x_1 has bounds or a projection.
    transfers : dict
        Host -> device copies of the levels' args, made at construction.
    """

    #: routes :func:`mlocore.hypergrad` to :func:`multilevel_hypergrad` (deliberately no
    #: ``on_device``: that marker routes bilevel entry points to the bilevel device code)
    device_multilevel = True

    def __init__(self, levels, dims, bounds=None, project=None):
        try:
            levels = list(levels)
        except TypeError:
            raise TypeError("levels must be a sequence of DeviceObjective instances, got "
                            f"{type(levels).__name__}") from None
        if len(levels) < 2:
            raise ValueError(f"a multilevel problem needs at least 2 levels, got {len(levels)}")
        for k, obj in enumerate(levels, start=1):
            if not isinstance(obj, DeviceObjective):
                raise TypeError(f"level {k} must be an mlocore.cuda.DeviceObjective (device "
                                f"callbacks), got {type(obj).__name__}")
            if obj.blocks:
                raise ValueError(f"level {k} has block oracles ({', '.join(obj.blocks)}), "
                                 "which the n-level device path does not use; give the "
                                 "levels of a DeviceMultilevelProblem the joint callbacks "
                                 "only")
        MultilevelProblem._set_layout(self, levels, dims, bounds, project)
        self._checked = False

    # the CPU's: x_1 is on the host in the driver that projects
    project = MultilevelProblem.project
    constrained = BilevelProblem.constrained
    dx = MultilevelProblem.dx  # the CPU's project reads dx (= d_1)

    def block(self, k: int) -> slice:
        """The slice of z holding x_k (k = 1..n)."""
        return slice(self.offsets[k - 1], self.offsets[k])

    @property
    def transfers(self) -> dict:
        """Host -> device copies made at construction (all levels' args)."""
        out = Transfers().as_dict()
        for obj in self.levels:
            for key, val in obj.transfers.as_dict().items():
                out[key] += val
        return out

    def __repr__(self):
        return f"DeviceMultilevelProblem(n={self.n}, dims={self.dims})"


class _Shared:
    """Device state shared by an engine and its exact-mode solver: the level oracles (one
    counter array per level), transfers, iteration counts, and the innermost level seen as
    the lower level of a bilevel session (for :func:`lower_core` and ``_HyyOperator``)."""

    def __init__(self, problem):
        self.counter = Transfers()
        self.counts = [new_counts() for _ in range(problem.n)]
        self.oracles = []
        for k, (obj, c) in enumerate(zip(problem.levels, self.counts), start=1):
            o = DeviceOracle(obj, "upper", c, self.counter, problem.size)
            o.role = f"level{k}"  # names the callback in errors
            self.oracles.append(o)
        self.value_calls = np.zeros(problem.n, dtype=np.int64)
        self.lower_nit = np.zeros(problem.n, dtype=np.int64)
        self.scalars = dl.Scalars(self.counter)
        # the innermost level as a bilevel session: x = x_<n, y = x_n
        self.dx, self.dy, self.n = problem.offsets[-2], problem.dims[-1], problem.size
        self.lower = self.oracles[-1]
        self.lower.dx = self.dx  # its block methods slice the joint callbacks (no blocks)

    def norm(self, a) -> float:
        """``|a|`` on the host (one counted read-back)."""
        self.scalars.dot(a, a, dl.S_AUX)
        return math.sqrt(self.scalars.read()[dl.S_AUX])

    def norms(self, a, b):
        """``(|a|, |b|)`` with one counted read-back."""
        self.scalars.dot(a, a, dl.S_AUX)
        self.scalars.dot(b, b, dl.S_AUX2)
        s = self.scalars.read()
        return math.sqrt(s[dl.S_AUX]), math.sqrt(s[dl.S_AUX2])


class _ReducedHessianBlock(dl.DeviceOperator):
    """``p -> (Hess phi_j)[x_j, x_j] p``: the reduced product with direction (0, .., 0, p)."""

    def __init__(self, eng, j, z):
        super().__init__(None, eng.p.dims[j - 1], name=f"level{j}.reduced_hvp")
        self.eng, self.j, self.z = eng, j, z

    def apply(self, p, out):  # LevelFailure and CallbackError pass through unchanged
        self.n_matvec += 1
        dl.copy(self.eng.block_product(self.j, self.z, p), out)


def _joined(a, b):
    """A new device vector ``concat(a, b)``."""
    out = dl.empty(a.shape[0] + b.shape[0])
    dl.copy(a, out[:a.shape[0]])
    dl.copy(b, out[a.shape[0]:])
    return out


def _copy(a):
    out = dl.empty(a.shape[0])
    dl.copy(a, out)
    return out


def _embedded(size, lo, v):
    """A new device vector of zeros of length ``size`` with ``v`` at ``[lo:lo + len(v)]``."""
    out = dl.zeros(size)
    dl.copy(v, out[lo:lo + v.shape[0]])
    return out


class DeviceMultilevelEngine(LevelRecursion):
    """The CUDA backend of :class:`mlocore._multilevel.LevelRecursion`, for one problem and
    one mode: device vectors in and out, the innermost level by the device Newton-CG of
    :func:`mlocore.cuda._implicit.lower_core`, every block system by
    :func:`mlocore.cuda._linalg.cg_device`. Vectors passed in are never modified; results
    are new device vectors (or views of them).

    Parameters
    ----------
    problem : DeviceMultilevelProblem
    mode : {"exact", "truncated", "fd"}
    tol, lower_tol, lower_maxiter, fd_step
        As the CPU engine: reduced-Hessian solves to relative residual ``tol``, lower levels
        to ``|grad phi_k| <= lower_tol`` within ``lower_maxiter`` Newton steps, central
        differences with re-solved lower levels with relative step ``fd_step``.
    shared : _Shared, optional
        Oracles, counters and transfers shared with another engine.
    """

    def __init__(self, problem, mode="exact", tol=1e-10, lower_tol=None, lower_maxiter=100,
                 fd_step=None, shared=None):
        super().__init__(problem, mode, tol, lower_tol, lower_maxiter, fd_step)
        self.sh = _Shared(problem) if shared is None else shared
        self._init_solver()

    def _shared_state(self):
        return self.sh

    @property
    def lower_nit(self):
        """Newton iterations per level (shared with the exact solver)."""
        return self.sh.lower_nit

    # -- oracles ------------------------------------------------------------------------------
    def check_at(self, z):
        for o in self.sh.oracles:
            o.check_at(z)

    def grad(self, k, z):
        out = dl.empty(self.N)
        self.sh.oracles[k - 1].grad(z, out)
        return out

    def value(self, k, z):
        o = self.sh.oracles[k - 1]
        if o.has_value:
            return o.value(z)
        o.counts[UPPER_VALUE] += 1  # counted as the CPU engine counts it
        return np.nan

    def hvp(self, k, z, v):
        out = dl.empty(self.N)
        self.sh.oracles[k - 1].hvp(z, v, out)  # central differences of grad without hvp
        return out

    def tvp(self, k, z, u, w):
        """Third-order product ``d/ds hvp_k(z + s u, w)`` by central differences of hvp,
        step ``FD_REL_STEP (1 + |z|) / |u|`` (the CPU's fallback without ``tvp``)."""
        zn, un = self.sh.norms(z, u)
        out = dl.empty(self.N)
        if un == 0.0:
            dl.fill(out, 0.0)
            return out
        eps = FD_REL_STEP * (1.0 + zn) / un
        zs = dl.empty(self.N)
        dl.axpy_into(zs, z, eps, u)
        hp = self.hvp(k, zs, w)
        dl.axpy_into(zs, z, -eps, u)
        hm = self.hvp(k, zs, w)
        dl.difference_quotient(out, hp, hm, 2.0 * eps)
        return out

    def oracle_calls(self):
        """Per level: ``grad``, ``hvp``, ``tvp`` (always 0: differences of hvp), ``value``."""
        return {f"level{k}": {"grad": int(c[UPPER_GRAD]), "hvp": int(c[UPPER_HVP]), "tvp": 0,
                              "value": int(c[UPPER_VALUE])}
                for k, c in enumerate(self.sh.counts, 1)}

    # -- solves on the device -----------------------------------------------------------------
    def _innermost(self, z):
        out, status, nit, gnorm, _ = lower_core(self.sh, z, "newton-cg", self.lower_tol,
                                                self.lower_maxiter, -1.0)
        return out, status, nit, gnorm

    def _cg(self, j, z, b, rtol, maxiter):
        op = _HyyOperator(self.sh, z) if j == self.n else _ReducedHessianBlock(self, j, z)
        v, info, nit, res, _ = dl.cg_device(op, b, None, rtol, 0.0, maxiter,
                                            counter=self.sh.counter)
        return v, info, nit, res

    # -- vectors (host scalars: one counted read-back each) -----------------------------------
    @staticmethod
    def _add(a, b):
        out = dl.empty(a.shape[0])
        dl.axpy_into(out, a, 1.0, b)
        return out

    @staticmethod
    def _sub(a, b):
        out = dl.empty(a.shape[0])
        dl.axpy_into(out, a, -1.0, b)
        return out

    @staticmethod
    def _neg(a):
        out = dl.empty(a.shape[0])
        dl.scale_into(out, -1.0, a)
        return out

    @staticmethod
    def _quotient(a, b, h):
        out = dl.empty(a.shape[0])
        dl.difference_quotient(out, a, b, h)
        return out

    @staticmethod
    def _divide(a, h):
        out = dl.empty(a.shape[0])
        dl.difference_quotient(out, a, dl.zeros(a.shape[0]), h)
        return out

    _copy = staticmethod(_copy)
    _join = staticmethod(_joined)
    _embed = staticmethod(_embedded)

    @staticmethod
    def _set_block(z, lo, hi, v):
        dl.copy(v, z[lo:hi])

    @staticmethod
    def _axpy_into(a, alpha, b):
        dl.axpy_into(a, a, alpha, b)

    @staticmethod
    def _shift(z, lo, hi, t, d):
        out = _copy(z)
        dl.axpy_into(out[lo:hi], z[lo:hi], t, d)
        return out

    @staticmethod
    def _nan(size):
        out = dl.empty(size)
        dl.fill(out, np.nan)
        return out

    def _norm(self, a):
        return self.sh.norm(a)

    def _norms(self, a, b):
        return self.sh.norms(a, b)

    def _all_finite(self, a):
        self.sh.scalars.abs_sum(a, dl.S_AUX)
        return math.isfinite(self.sh.scalars.read()[dl.S_AUX])

    # -- results ------------------------------------------------------------------------------
    def _outputs(self, grad, z, output):
        if output == "numpy":
            grad = to_host(grad, self.sh.counter)
            z = to_host(z, self.sh.counter)
            return grad, z, [z[self.p.block(k)].copy() for k in range(1, self.n + 1)]
        return grad, z, [_copy(z[self.p.block(k)]) for k in range(1, self.n + 1)]

    def _totals(self):
        return (int(sum(c[UPPER_GRAD] for c in self.sh.counts)),
                int(sum(c[UPPER_HVP] for c in self.sh.counts)))

    def _annotate(self, result):
        result.transfers = self.sh.counter.as_dict()


class DeviceUnrolledEngine(UnrolledRecursion):
    """The CUDA backend of :class:`mlocore._multilevel.UnrolledRecursion` (the n-level
    unrolled baseline of Sato, Tanaka & Takeda 2021) on device vectors.

    Level n's loop is the device gradient descent of :func:`mlocore.cuda._implicit.lower_core`
    forwards (the CPU ``solve_lower_kernel`` with ``GD``, tol 0) and, for its VJP, T stored
    steps and the adjoint recursion of the CPU ``unrolled_vjp`` kernel (one level-n joint hvp
    per step back); the outer levels' loops keep their iterates on the device, and their
    Hessian-vector products are central differences of the unrolled gradient (as on the CPU).
    Vectors passed in are never modified.

    Read-backs (counted): the power iteration's ``v.Av`` and ``|Av|`` (one per iteration,
    only for levels whose step is not given) plus one host -> device copy of its start vector
    (the CPU's ``linspace(1, 2, d_k)``, normalized), the norms of every difference step, one
    ``|grad|`` per level-n forward step, one finiteness test per outer-level forward step and
    one per level-n VJP (of ``y_T``: a non-finite entry stays non-finite under
    ``y - beta g``, so the status is the CPU's, which tests every iterate).

    Parameters
    ----------
    problem : DeviceMultilevelProblem
    T : list
        ``T[k]`` for k = 2..n (entries 0 and 1 unused), as the CPU engine.
    steps : list
        ``steps[k]`` (beta_k), or None to estimate it lazily by power iteration (1/L with
        ``L = 1.05 lambda``); filled in place, as on the CPU.
    starts : device array, shape (sum(dims),)
        The joint vector whose blocks 2..n start every inner loop (not modified).
    fd_step : float, optional
        Relative step of the central differences (default 1e-4, the CPU's).
    shared : _Shared, optional
        Oracles, counters and transfers shared with another engine (a driver's).
    """

    def __init__(self, problem, T, steps, starts, fd_step=None, shared=None):
        super().__init__(problem, T, steps, starts, fd_step,
                         DeviceMultilevelEngine(problem, "truncated", shared=shared))
        self.sh = self.eng.sh
        self._zeros = None

    def finite(self, a) -> bool:
        """All entries of the device vector a finite? ``a . 0`` is 0 exactly when they are
        (NaN otherwise, immune to overflow); one counted read-back."""
        if self._zeros is None:
            self._zeros = dl.zeros(self.N)
        self.sh.scalars.dot(a, self._zeros[:a.shape[0]], dl.S_AUX)
        return self.sh.scalars.read()[dl.S_AUX] == 0.0

    def _power_start(self, d):
        v0 = np.linspace(1.0, 2.0, d)
        v0 /= np.linalg.norm(v0)
        return to_device("v", v0, self.sh.counter, d)

    def _dot_norm(self, v, w):
        self.sh.scalars.dot(v, w, dl.S_AUX)
        self.sh.scalars.dot(w, w, dl.S_AUX2)
        r = self.sh.scalars.read()
        return float(r[dl.S_AUX]), math.sqrt(r[dl.S_AUX2])

    def _unroll_innermost(self, z, T, beta):
        out, status, _, _, _ = lower_core(self.sh, z, "gd", 0.0, T, beta)
        return out, status

    def _innermost_vjp(self, z, T, beta, w):
        """``w^T d y_T / d x`` for T gradient steps of level n from the fixed y_0 = z[dx:]
        (x = x_<n = z[:dx]): the CPU ``unrolled_vjp`` kernel on the device."""
        sh = self.sh
        dx, dy, n = sh.dx, sh.dy, sh.n
        zt = _copy(z)
        y = zt[dx:]
        Y = _matrix(T, dy)           # the iterates y_0..y_{T-1}
        g = dl.empty(n)
        for t in range(T):
            dl.copy(y, Y[t])
            sh.lower.grad(zt, g)
            dl.axpy_into(y, y, -beta, g[dx:])
        if not self.finite(y):
            raise LevelFailure(2, self.n, f"level {self.n}: unrolled iterates diverged")
        h = dl.zeros(dx)
        wd = dl.zeros(n)             # the adjoint a_t lives in the direction (0, a_t)
        a = wd[dx:]
        dl.copy(w, a)
        zs = dl.empty(n)
        dl.copy(z[:dx], zs[:dx])
        hv = dl.empty(n)
        for t in range(T - 1, -1, -1):
            dl.copy(Y[t], zs[dx:])
            sh.lower.hvp(zs, wd, hv)
            dl.axpy_into(h, h, -beta, hv[:dx])
            dl.axpy_into(a, a, -beta, hv[dx:])
        return h


def check_multilevel_backend(problem, backend, where):
    """TypeError unless ``problem`` is a DeviceMultilevelProblem on the CUDA backend (a CPU
    MultilevelProblem is pointed to ``backend='cpu'``); CudaUnavailableError without a GPU
    or the simulator."""
    if not isinstance(problem, DeviceMultilevelProblem):
        if isinstance(problem, MultilevelProblem):
            raise TypeError(f"{where}: backend='cuda' needs device callbacks: a "
                            "mlocore.cuda.DeviceMultilevelProblem (e.g. from "
                            "mlocore.problems.cuda_multilevel), got an "
                            "mlocore.MultilevelProblem (CPU callbacks); use backend='cpu' for "
                            "it")
        raise TypeError(f"{where}: problem must be a DeviceMultilevelProblem for "
                        f"backend='cuda', got {type(problem).__name__}")
    if backend is not None and backend != "cuda":
        raise TypeError(f"{where}: a DeviceMultilevelProblem has device callbacks and runs on "
                        f"the CUDA backend only, got backend={backend!r}; pass backend='cuda' "
                        "(or leave it None), or build an mlocore.MultilevelProblem for the CPU")
    check_backend("cuda", where)


def _as_joint(problem, xs, counter, name="xs"):
    """A new joint device vector from ``xs``: a list of n per-level arrays, or one joint
    vector of length ``sum(dims)``; host or device arrays (host ones validated and copied once
    each, counted; device ones read in place). The inputs are never modified."""
    if (is_device_array(xs) or (isinstance(xs, np.ndarray) and xs.ndim == 1)) and \
            len(xs.shape) == 1 and xs.shape[0] == problem.size:
        return _copy(to_device(name, xs, counter, problem.size))
    expected = (f"{name} must be a list of {problem.n} arrays (one per level, sizes "
                f"{problem.dims}) or one joint vector of length {problem.size}, got "
                f"{type(xs).__name__}")
    if is_device_array(xs) or isinstance(xs, np.ndarray):
        raise ValueError(f"{expected} of shape {tuple(xs.shape)}")
    if isinstance(xs, (str, bytes)):
        raise TypeError(expected)
    try:
        xs = list(xs)
    except TypeError:
        raise TypeError(expected) from None
    if len(xs) != problem.n:
        raise ValueError(f"{name} must hold {problem.n} arrays (one per level), got {len(xs)}")
    z = dl.empty(problem.size)
    for k, x in enumerate(xs):
        xd = to_device(f"{name}[{k}]", x, counter, problem.dims[k])
        dl.copy(xd, z[problem.block(k + 1)])
    return z


_NOT_FOR_MULTILEVEL = {"y": None, "atol": 0.0, "maxiter": None, "v0": None, "eta": None,
                       "lower_method": "newton-cg", "lower_step": None, "T": 100, "K": None,
                       "step": None}


def multilevel_hypergrad(problem, xs, method=None, *, tol=1e-10, lower_solved=False,
                         lower_tol=None, lower_maxiter=None, fd_step=None, backend=None,
                         output="numpy", **options):
    """The hypergradient of ``F = phi_1`` for a :class:`DeviceMultilevelProblem`, on the device.

    Reached through ``mlocore.hypergrad(problem, xs, method=...)``. The CPU's
    :func:`mlocore._multilevel.multilevel_hypergrad` on device vectors (docs/mathematics.md
    section 3): the lower levels n..2 are solved from the given warm starts (Newton-CG with
    backtracking on the reduced gradient's norm, level n by the device bilevel Newton-CG), then
    ``grad F = d_1 f_1 + M_1^T d_>1 f_1`` by the matrix-free recursion, every reduced-Hessian
    system solved by device CG.

    Parameters
    ----------
    problem : DeviceMultilevelProblem
    xs : list of n arrays, or one joint vector of length ``sum(dims)``
        x_1 and the warm starts of levels 2..n (the solutions with ``lower_solved=True``).
        Host arrays are validated and copied once each (counted in ``transfers``); device
        arrays are read in place. Never modified.
    method : {"exact", "truncated", "fd", "itd"}, default "exact"
        Best-response curvature: "exact" (third-order products by central differences of the
        level-n hvp, central differences of adjoints with re-solved lower levels deeper down;
        exact for n <= 3), "truncated" (dropped; exact when best responses are affine, e.g.
        quadratic levels), "fd" (whole reduced Hessian-vector products by central differences
        of reduced gradients); or "itd", the unrolled baseline of Sato et al. (2021):
        T gradient steps per lower level from the given starts, differentiated in reverse
        mode (:class:`DeviceUnrolledEngine`, :func:`unrolled_multilevel_hypergrad`), with
        the options ``T``, ``step`` (per-level sequences allowed; default 1/L by power
        iteration) and ``fd_step`` (default 1e-4), as on the CPU.
    tol : float
        Relative residual of every reduced-Hessian CG solve (ignored by "itd").
    lower_solved : bool
        The given levels 2..n are already solved: skip the lower solves.
    lower_tol : float, optional
        Lower levels solved to ``|grad phi_k| <= lower_tol`` (default ``tol``).
    lower_maxiter : int, optional
        Newton iterations per lower level (default 100).
    fd_step : float, optional
        Relative step of the differences with re-solved lower levels (default 1e-3; "itd":
        of the differences of unrolled gradients, default 1e-4).
    T, step
        "itd" only: inner gradient steps and inner steps per lower level.
    backend : {None, "cuda"}
        A device problem runs on the CUDA backend only.
    output : {"numpy", "device"}
        Type of ``grad``, ``z`` and ``xs``.

    Returns
    -------
    HypergradResult
        The CPU's fields (``grad``, ``z``, ``xs``, ``fun``, ``method``, ``success``,
        ``status``, ``message``, ``lower_nit``, ``lower_solves`` and ``lower_grad_norm`` per
        level, ``nit``, ``oracle_calls`` per level, ``ngrad``, ``nhvp``; "itd": ``T``,
        ``step``, ``nit`` = T_2, ``lower_nit`` the steps run per level)
        plus ``transfers``: this call's host <-> device copies (inputs, the scalars read back
        by every stopping test, line search and difference step, one finiteness check of
        grad, the outputs; "itd" also copies one power-iteration start vector per level whose
        step is estimated; the first call on a problem also reads back one scalar per callback
        check).

    Raises
    ------
    TypeError
        Not a DeviceMultilevelProblem, backend "cpu", or options that do not apply.
    ValueError
        Bad method, sizes, non-finite inputs, or bad ``T`` / ``step`` for "itd".
    """
    where = "hypergrad"
    check_multilevel_backend(problem, backend, where)
    unknown = sorted(set(options) - set(_NOT_FOR_MULTILEVEL))
    if unknown:
        raise TypeError(f"{where}: unexpected keyword argument(s) {', '.join(unknown)}")
    given = sorted(k for k, v in options.items() if not _is_default(v, _NOT_FOR_MULTILEVEL[k]))
    if "y" in given:
        raise TypeError("for a DeviceMultilevelProblem pass xs, the list of all levels' "
                        "arrays, as the second argument and no y")
    method = "exact" if method is None else method
    if method == "itd":  # the options of the CPU's: T, step, fd_step (tol is ignored)
        given = [k for k in given if k not in ("T", "step")]
        given = sorted(given + [name for name, was_given in (
            ("lower_solved", lower_solved), ("lower_tol", lower_tol is not None),
            ("lower_maxiter", lower_maxiter is not None)) if was_given])
    else:
        check_choice("method", method, MULTILEVEL_MODES)
    if given:
        raise TypeError(f"option{'s' if len(given) > 1 else ''} {', '.join(given)} "
                        f"{'do' if len(given) > 1 else 'does'} not apply to method={method!r} "
                        "for a DeviceMultilevelProblem")
    if output not in OUTPUTS:
        raise ValueError(f"output must be 'numpy' or 'device', got {output!r}")
    if method == "itd":
        return unrolled_multilevel_hypergrad(
            problem, xs, T=options.get("T", _NOT_FOR_MULTILEVEL["T"]), steps=options.get("step"),
            fd_step=fd_step, output=output)
    tol = check_positive("tol", tol, allow_zero=True)
    if lower_tol is not None:
        lower_tol = check_positive("lower_tol", lower_tol, allow_zero=True)
    lower_maxiter = 100 if lower_maxiter is None else check_int("lower_maxiter", lower_maxiter, 0)
    if fd_step is not None:
        fd_step = check_positive("fd_step", fd_step)
    eng = DeviceMultilevelEngine(problem, method, tol, lower_tol, lower_maxiter, fd_step)
    z = _as_joint(problem, xs, eng.sh.counter)
    if not problem._checked:
        eng.check_at(z)
        problem._checked = True
    return eng.hypergrad_at(z, lower_solved, output)


def _is_default(value, default):
    if default is None or value is None:
        return value is default
    return isinstance(value, (str, numbers.Real)) and value == default


def unrolled_core(ueng, z, value_only=False):
    """The CPU ``unrolled_multilevel_hypergrad``'s computation on the device, from the joint
    device vector z (x_1 and the starts; not modified). Returns ``(grad, zz, fun, status,
    detail)``: device vectors ``grad`` (d_1; NaN unless computed) and ``zz`` (the unrolled
    outputs, or z when the forward pass failed)."""
    return ueng.core(z, value_only)


def unrolled_multilevel_hypergrad(problem, xs, T=50, steps=None, fd_step=None,
                                  value_only=False, output="numpy"):
    """Hypergradient of the n-level unrolled approximation (Sato et al. 2021) on the device:
    the CPU :func:`mlocore._multilevel.unrolled_multilevel_hypergrad` with
    :class:`DeviceUnrolledEngine` (reached through ``mlocore.hypergrad(problem, xs,
    method="itd", T=..., step=..., fd_step=...)``).

    ``xs`` (host or device, a list of n arrays or one joint vector; never modified) gives x_1
    and the fixed starts of levels 2..n; ``T`` and ``steps`` are ints / steps or per-level
    sequences (levels 2..n; a None entry is estimated by power iteration). The result has the
    CPU's fields (``grad``, ``z``, ``xs``, ``fun``, ``method="itd"``, ``success``,
    ``status``, ``message``, ``T``, ``step`` (the inner steps used: pass them back to keep
    the same approximation), ``nit``, ``oracle_calls``, ``ngrad``, ``nhvp``) plus
    ``transfers``. Diverging inner iterates end with status 2 (never an exception), a
    non-finite gradient with status 6. ``value_only``: only the forward passes and ``fun``.
    """
    check_multilevel_backend(problem, None, "unrolled_multilevel_hypergrad")
    if output not in OUTPUTS:
        raise ValueError(f"output must be 'numpy' or 'device', got {output!r}")
    Ts, betas = unrolled_options(problem.n, T, steps)
    if fd_step is not None:
        fd_step = check_positive("fd_step", fd_step)
    ueng = DeviceUnrolledEngine(problem, Ts, betas, None, fd_step)
    z = _as_joint(problem, xs, ueng.sh.counter)
    ueng.starts = z
    if not problem._checked:
        ueng.eng.check_at(z)
        problem._checked = True
    return ueng.hypergrad_at(z, value_only, output)
