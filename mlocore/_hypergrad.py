"""Public bilevel entry points: :func:`solve_lower` and :func:`hypergrad`."""
from __future__ import annotations

import numpy as np
from scipy.optimize import OptimizeResult

from ._callbacks import call_bound, call_bound_typed
from ._kernels import implicit as _imp
from ._kernels import lower as _low
from ._kernels import unrolled as _itd
from ._options import (HYPERGRAD_METHODS, LINEAR_SOLVERS, LOWER_METHODS, LowerOptions,
                       hypergrad_options, reject_unused)
from ._multilevel import (MULTILEVEL_MODES, multilevel_hypergrad,
                          unrolled_multilevel_hypergrad)
from ._problem import BilevelProblem, MultilevelProblem
from ._results import (HypergradResult, add_counts, counts_dict, implicit_result_from,
                       new_counts, status_message)
from ._validation import as_vector, check_backend, check_choice, check_cpu_output
from .cuda._implicit import hypergrad as _hypergrad_cuda
from .cuda._implicit import solve_lower as _solve_lower_cuda
from .cuda._multilevel import multilevel_hypergrad as _multilevel_cuda

__all__ = ["solve_lower", "hypergrad", "HYPERGRAD_METHODS", "LOWER_METHODS"]


def _check_problem(problem):
    if not isinstance(problem, BilevelProblem):
        raise TypeError(f"problem must be an mlocore.BilevelProblem, got {type(problem).__name__}")


class _Compiled:
    """Both objectives compiled, and checked once at a first point (the compiled forms
    remember it; a changed callback gives a new compiled form, checked again)."""

    def __init__(self, problem, x, y):
        self.upper = up = problem.upper.compiled("upper")
        self.lower = lo = problem.lower.compiled("lower")
        dx = problem.dx
        if up.checked_dx != dx or lo.checked_dx != dx:
            z = np.concatenate([x, y])
            up.check_at(z, dx)
            lo.check_at(z, dx)
            up.checked_dx = lo.checked_dx = dx


def _compiled(problem, x, y):
    return _Compiled(problem, x, y)


def solve_lower(problem, x, y0, *, method="newton-cg", tol=1e-10, maxiter=1000, step=None,
                backend=None, output="numpy"):
    """Minimize the lower objective g(x, .) from y0 until ``|grad_y g| <= tol``.

    Parameters
    ----------
    problem : BilevelProblem
    x, y0 : array_like
        Upper point and starting lower point (warm start).
    method : {"newton-cg", "agd", "gd"}
        Newton-CG on the Hessian-vector products (backtracking on ``|grad_y g|``), Nesterov's
        accelerated gradient with adaptive restart, or gradient descent with a fixed step.
    step : float, optional
        Step for "gd"/"agd"; default ``1/L`` with L a power-iteration estimate of
        ``lambda_max(H_yy)`` at (x, y0) (times a 1.05 safety factor).
    backend : {"cpu", "cuda"}, optional
        Default: the process-wide one (:func:`mlocore.set_backend`, ``MLOCORE_BACKEND``).
        Device problems (:mod:`mlocore.cuda`) run on "cuda"; CPU problems on "cpu".
    output : {"numpy", "device"}
        Device problems: return the vectors as NumPy arrays (default, counted copies) or
        leave them on the device. "device" with the CPU backend is a ValueError.

    Returns
    -------
    OptimizeResult
        ``y``, ``success``, ``status``, ``message``, ``nit``, ``grad_norm``, ``step``,
        ``oracle_calls``.
    """
    if getattr(problem, "on_device", False) or check_backend(backend, "solve_lower") == "cuda":
        return _solve_lower_cuda(problem, x, y0, method=method, tol=tol, maxiter=maxiter,
                                 step=step, backend=backend, output=output)
    check_cpu_output(output)
    _check_problem(problem)
    x = as_vector("x", x, problem.dx)
    y0 = as_vector("y0", y0, problem.dy)
    opts = LowerOptions(method, tol, maxiter, step)
    comp = _compiled(problem, x, y0)
    counts = new_counts()
    lo = comp.lower
    y, status, nit, gnorm, used_step = call_bound(
        lo.bound_kernels, None, _low.solve_lower_kernel, lambda: (lo.fns, lo.kargs, lo.flags),
        x, y0, opts.code, opts.tol, opts.maxiter, opts.step, counts)
    detail = f"|grad_y g| = {gnorm:.3e} after {nit} iterations (lower_tol = {opts.tol:.1e})."
    return OptimizeResult(y=y, x=x, success=status == 0, status=int(status),
                          message=status_message(status, detail), nit=int(nit),
                          grad_norm=float(gnorm), step=None if used_step <= 0 else used_step,
                          method=method, oracle_calls=counts_dict(counts))


def hypergrad(problem, x, y=None, method=None, *, tol=1e-10, atol=0.0, maxiter=None,
              v0=None, eta=None, lower_solved=False, lower_method="newton-cg", lower_tol=None,
              lower_maxiter=None, lower_step=None, T=100, K=None, step=None, fd_step=None,
              backend=None, output="numpy"):
    """Hypergradient ``grad F(x)`` of ``F(x) = f(x, y*(x))``, or of ``F = phi_1`` for n levels.

    Parameters
    ----------
    problem : BilevelProblem or MultilevelProblem
    x : array_like, shape (dx,)
        For a MultilevelProblem: ``xs``, a list of the n levels' arrays (levels 2..n are
        warm starts of the lower solves, or the solutions with ``lower_solved=True``).
    y : array_like, shape (dy,)
        Implicit methods: warm start of the lower solve (or the solution itself with
        ``lower_solved=True``). Unrolled methods: the starting point y_0 of the unrolled loop.
    method : str
        Bilevel (default "cg"): implicit differentiation with ``H_yy v = grad_y f`` solved by
        conjugate gradient ("cg"), a dense Cholesky solve ("direct") or a Neumann series
        ("neumann"); or unrolled differentiation through T gradient steps ("itd-reverse",
        "itd-forward"); docs/mathematics.md sections 1-2. Multilevel (default "exact";
        docs/mathematics.md section 3, Gu & Chen 2024), by the terms of the reduced Hessians
        ``Hess phi_k s = [I, M_k^T] Hess f_k (s, M_k s) + D_s[M_k^T] grad_>k f_k`` they keep:

        - "exact": both terms. The curvature term ``D_s[M_k^T] w`` (derivatives of order >= 2
          of the best responses below level k) from the third-order product of f_n (the
          ``tvp`` callback, else central differences of ``hvp``) for k = n - 1, and by
          central differences of the adjoint (the lower levels re-solved, or moved along
          the tangent of their solution in the dense form) for k < n - 1
          (n >= 4: derivatives of order up to n, cost growing like the product of the
          ``2 d_k``). Skipped, being exactly zero, for every level k whose levels below are
          all declared ``Objective(quadratic=True)``. Exact for n <= 3 with ``tvp`` and for
          declared quadratic levels; otherwise up to the differences' error.
        - "truncated": the first term only (exact when the best responses are affine). The
          lower levels are still solved for the problem itself: for n >= 4, unless levels
          4..n are declared quadratic, with the exact recursion, which costs as "exact".
        - "fd": the whole product by central differences of the reduced gradient, the lower
          levels re-solved (any n; cost like "exact" undeclared).
        - "itd": the unrolled baseline of Sato et al. (T steps per lower level from the
          given starts; T and step may be per-level sequences).
    tol, atol : float
        Linear solve: ``|grad_y f - H_yy v| <= max(tol |grad_y f|, atol)``. The lower level is
        solved to ``|grad_y g| <= lower_tol``, by default ``min(tol, 1e-10)``.
    maxiter : int, optional
        Linear-solver iterations (default ``10 dy`` for CG; ``max(100 dy, 10000)`` for
        Neumann, whose number of terms grows with the condition number, not the size).
    v0 : array_like, optional
        Warm start of the adjoint v (CG, Neumann).
    eta : float, optional
        Neumann step (default ``1/L`` from power iteration).
    lower_solved : bool
        Implicit methods: y is already the lower solution; skip the lower solve.
    lower_method, lower_tol, lower_maxiter, lower_step
        Options of :func:`solve_lower`.
    T, K : int
        Unrolled methods: T inner gradient steps, differentiated through the last K
        (truncated back-propagation; default K = T).
    step : float, optional
        Unrolled methods: inner step beta (default ``1/L`` at (x, y)).
    backend : {"cpu", "cuda"}, optional
        Default: the process-wide one (:func:`mlocore.set_backend`, ``MLOCORE_BACKEND``).
        Device problems (:mod:`mlocore.cuda`) run on "cuda"; CPU problems on "cpu".
    output : {"numpy", "device"}
        Device problems: return the vectors as NumPy arrays (default, counted copies) or
        leave them on the device. "device" with the CPU backend is a ValueError.

    Returns
    -------
    HypergradResult
        ``grad``, ``y`` (the lower point used), ``v``, ``fun``, ``success``, ``message``,
        ``nit``, ``oracle_calls``, ... (see :class:`HypergradResult`). Multilevel: ``xs``,
        ``z``, ``oracle_calls`` per level (``{"level1": {"grad", "hvp", "tvp", "value"},
        ..}``) and per-level arrays (index k - 1 for level k): ``lower_nit`` (Newton
        iterations over all solves of the level; "itd": gradient steps run),
        ``lower_solves`` (how often the level was solved, nested re-solves included;
        "itd": inner loops run) and ``lower_grad_norm`` (``|grad phi_k|`` where the solve
        of the given point left it; NaN for level 1, with ``lower_solved`` and for "itd").
    """
    if type(problem) is not BilevelProblem or check_backend(backend, "hypergrad") != "cpu":
        return _dispatch(problem, x, y, method, tol=tol, atol=atol, maxiter=maxiter, v0=v0,
                         eta=eta, lower_solved=lower_solved, lower_method=lower_method,
                         lower_tol=lower_tol, lower_maxiter=lower_maxiter,
                         lower_step=lower_step, T=T, K=K, step=step, fd_step=fd_step,
                         backend=backend, output=output)
    check_cpu_output(output)
    return _bilevel(problem, x, y, method, tol, atol, maxiter, v0, eta, lower_solved,
                    lower_method, lower_tol, lower_maxiter, lower_step, T, K, step, fd_step)


def _dispatch(problem, x, y, method, *, tol, atol, maxiter, v0, eta, lower_solved,
              lower_method, lower_tol, lower_maxiter, lower_step, T, K, step, fd_step, backend,
              output):
    """:func:`hypergrad` for device problems, the CUDA backend, n levels and subclasses."""
    if getattr(problem, "device_multilevel", False):  # DeviceMultilevelProblem
        return _multilevel_cuda(problem, x, method, tol=tol, lower_solved=lower_solved,
                                lower_tol=lower_tol, lower_maxiter=lower_maxiter,
                                fd_step=fd_step, backend=backend, y=y, atol=atol,
                                maxiter=maxiter, v0=v0, eta=eta, lower_method=lower_method,
                                lower_step=lower_step, T=T, K=K, step=step, output=output)
    if getattr(problem, "on_device", False) or check_backend(backend, "hypergrad") == "cuda":
        return _hypergrad_cuda(problem, x, y, method, tol=tol, atol=atol, maxiter=maxiter,
                               v0=v0, eta=eta, lower_solved=lower_solved,
                               lower_method=lower_method, lower_tol=lower_tol,
                               lower_maxiter=lower_maxiter, lower_step=lower_step,
                               backend=backend, T=T, K=K, step=step, fd_step=fd_step,
                               output=output)
    check_cpu_output(output)
    unrolled = isinstance(method, str) and method.startswith("itd")
    if isinstance(problem, MultilevelProblem):
        check_choice("method", "exact" if method is None else method,
                     MULTILEVEL_MODES + ("itd",))
        reject_unused(method or "exact", maxiter=maxiter is not None, v0=v0 is not None,
                       eta=eta is not None, atol=atol != 0.0,
                       lower_method=lower_method != "newton-cg",
                       lower_step=lower_step is not None, K=K is not None,
                       step=step is not None and not unrolled,
                       lower_solved=lower_solved and unrolled,
                       lower_tol=lower_tol is not None and unrolled,
                       lower_maxiter=lower_maxiter is not None and unrolled)
        if y is not None:
            raise TypeError("for a MultilevelProblem pass xs, the list of all levels' arrays, "
                            "as the second argument and no y")
        if method == "itd":
            return unrolled_multilevel_hypergrad(problem, x, T=T, steps=step, fd_step=fd_step)
        return multilevel_hypergrad(problem, x, "exact" if method is None else method,
                                    tol=tol, lower_solved=lower_solved, lower_tol=lower_tol,
                                    lower_maxiter=100 if lower_maxiter is None else lower_maxiter,
                                    fd_step=fd_step)
    _check_problem(problem)
    return _bilevel(problem, x, y, method, tol, atol, maxiter, v0, eta, lower_solved,
                    lower_method, lower_tol, lower_maxiter, lower_step, T, K, step, fd_step)


def _bilevel(problem, x, y, method, tol, atol, maxiter, v0, eta, lower_solved, lower_method,
             lower_tol, lower_maxiter, lower_step, T, K, step, fd_step):
    """:func:`hypergrad` of a CPU bilevel problem (options validated here)."""
    opts = hypergrad_options(method, problem.dy, tol, atol, maxiter, v0 is not None, eta,
                             lower_solved, lower_method, lower_tol, lower_maxiter, lower_step,
                             T, K, step, fd_step)
    if y is None:
        raise TypeError("hypergrad(problem, x, y): y, the lower-level start, is required")
    x = as_vector("x", x, problem.dx)
    y = as_vector("y", y, problem.dy)
    comp = _compiled(problem, x, y)
    counts = new_counts()
    if opts.unrolled:
        return _unrolled(comp, opts.method, x, y, opts.T, opts.K, opts.beta, counts)
    v0 = np.zeros(problem.dy) if v0 is None else as_vector("v0", v0, problem.dy)
    return _implicit(comp, opts.method, x, (x, y, v0) + opts.kernel_scalars + (counts,),
                     opts.kernel_types, counts, opts.solve_lower, True)


def implicit_call(comp, method, x, y, v0, solve_lower_flag, lower, tol, atol, maxiter, eta,
                  counts, value=True):
    """Run the implicit kernel on validated inputs and build the result (also used by
    the optimization drivers, which keep y and v warm between calls; ``value=False``
    leaves out F, ``fun`` is then NaN)."""
    scalars = (solve_lower_flag, lower.code, lower.tol, lower.maxiter, lower.step,
               LINEAR_SOLVERS[method], tol, atol, maxiter, eta)
    varying = (x, y, v0) + scalars + (counts,)
    return _implicit(comp, method, x, varying, tuple(map(type, varying)), counts,
                     solve_lower_flag, value)


def _implicit(comp, method, x, varying, varying_types, counts, solve_lower_flag, value):
    """:func:`implicit_call` on the kernel's per-call arguments ``varying`` (from x to
    counts) and their Python types."""
    up, lo = comp.upper, comp.lower
    with_value = bool(up.has_value and value)
    out = call_bound_typed(
        lo.bound_kernels, (up, with_value), _imp.implicit_hypergrad,
        lambda: (up.fns, up.kargs, with_value, lo.fns, lo.kargs, lo.flags),
        varying_types, varying)
    return implicit_result_from(method, x, out, solve_lower_flag, counts)


def _unrolled(comp, method, x, y, T, K, beta, counts):
    up, lo = comp.upper, comp.lower
    kernel = _itd.itd_reverse if method == "itd-reverse" else _itd.itd_forward
    grad, yT, aux, fun, status, beta_used = call_bound(
        lo.bound_kernels, up, kernel,
        lambda: (up.fns, up.kargs, up.has_value, lo.fns, lo.kargs, lo.flags),
        x, y, T, K, beta, counts)
    out = HypergradResult(
        grad=grad, x=x, y=yT, v=aux if method == "itd-reverse" else None,
        jacobian=aux if method == "itd-forward" else None, fun=fun, method=method,
        success=status == 0, status=int(status),
        message=status_message(status, f"Unrolled T={T} steps (K={K}) with step {beta_used:.3e}."),
        nit=T, K=K, step=beta_used, lower_nit=T, lower_grad_norm=np.nan)
    add_counts(out, counts)
    return out


def unrolled_call(comp, method, x, y, T, K, beta, counts):
    """Unrolled hypergradient on validated inputs (used by the drivers)."""
    return _unrolled(comp, method, x, y, T, K, beta, counts)
