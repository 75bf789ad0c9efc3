"""Matrix-free linear solvers: conjugate gradient, Neumann series, dense direct.

Each accepts the operator ``A`` as

- a dense 2-D array (products ``A @ p`` run compiled),
- an ``@njit`` function (or plain NumPy function, compiled here) ``matvec(p, *args)``
  (run compiled, with ``args`` passed through as in scipy),
- a ``scipy.sparse.linalg.LinearOperator`` or a scipy sparse matrix (the same algorithm runs
  interpreted, since its products are Python calls).

The signatures mirror ``scipy.sparse.linalg.cg``: ``(x, info)`` with info 0 on success,
``> 0`` the number of iterations when ``maxiter`` was reached, ``< 0`` a failure
(-1 breakdown, -2 negative curvature, -3 divergence, -4 not positive definite). With
``full_output=True`` a third item, an ``OptimizeResult``, gives ``nit``, ``residual_norm``,
``n_matvec`` and a ``message``.
"""
from __future__ import annotations

import numba
import numpy as np
from scipy.optimize import OptimizeResult
from scipy.sparse.linalg import LinearOperator, aslinearoperator

from ._callbacks import VEC, FnTuple, call_kernel, compile_callback
from ._config import LIPSCHITZ_SAFETY, POWER_ITERS
from ._kernels import linalg as _k
from ._results import linear_info_message
from ._validation import as_vector, check_backend, check_int, check_positive
from .cuda import _linalg as _cuda
from .cuda._direct import solve_direct as _solve_direct_cuda

__all__ = ["cg", "neumann", "solve_direct", "largest_eigenvalue"]


class _Operator:
    """Resolved form of A: a kernel-callable ``matvec`` with ``margs``, or a Python one."""

    def __init__(self, A, args, n_hint):
        self.compiled = True
        if isinstance(A, np.ndarray) or (isinstance(A, (list, tuple)) and not callable(A)):
            M = np.asarray(A)
            if M.ndim != 2 or M.shape[0] != M.shape[1]:
                raise ValueError(f"expected a square matrix, but got shape={M.shape}")
            if M.dtype.kind not in "iuf":
                raise TypeError(f"A must be a real matrix, got dtype={M.dtype}")
            M = np.ascontiguousarray(M, dtype=np.float64)
            if not np.all(np.isfinite(M)):
                raise ValueError("A contains non-finite values")
            self.n = M.shape[0]
            self.op = (M,)
        elif isinstance(A, LinearOperator) or hasattr(A, "tocsr"):
            op = aslinearoperator(A)
            if op.shape[0] != op.shape[1]:
                raise ValueError(f"expected a square operator, but got shape={op.shape}")
            self.n = op.shape[0]
            self.compiled = False
            self.op = (lambda p, _op=op: np.asarray(_op.matvec(p), dtype=np.float64).ravel(),)
        elif callable(A):
            if n_hint is None:
                raise ValueError("a matvec function needs b to know the size")
            if isinstance(args, list):
                args = tuple(args)
            elif not isinstance(args, tuple):
                args = (args,)
            argt = tuple(numba.typeof(a) for a in args)
            disp, fty = compile_callback(A, "matvec", (VEC,) + argt, "vector")
            self.n = n_hint
            self.op = (FnTuple(disp, fty, single=True), tuple(args))
            self._py = disp
        else:
            raise TypeError("A must be a 2-D array, a LinearOperator, a sparse matrix or a "
                            f"matvec function, got {type(A).__name__}")

    def python_op(self):
        """The operator for the interpreted path: ``(matvec,)`` with a Python matvec."""
        if not self.compiled:
            return self.op
        if len(self.op) == 2:
            fn, args = self._py, self.op[1]
            return (lambda p: fn(p, *args),)
        M = self.op[0]
        return (lambda p: M @ p,)


def _prepare(A, b, x0, args, maxiter, rtol, atol, default_maxiter):
    b = as_vector("b", b)
    op = _Operator(A, args, b.shape[0])
    if op.n != b.shape[0]:
        raise ValueError(f"A has shape ({op.n}, {op.n}) but b has shape {b.shape}")
    x0 = np.zeros(op.n) if x0 is None else as_vector("x0", x0, op.n)
    rtol = check_positive("rtol", rtol, allow_zero=True)
    atol = check_positive("atol", atol, allow_zero=True)
    maxiter = default_maxiter(op.n) if maxiter is None else check_int("maxiter", maxiter, 0)
    return op, b, x0, rtol, atol, maxiter


def _finish(x, info, nit, res, nmv, full_output, extra=None):
    if not full_output:
        return x, int(info)
    out = OptimizeResult(x=x, info=int(info), success=info == 0, nit=int(nit),
                         residual_norm=float(res), n_matvec=int(nmv),
                         message=linear_info_message(int(info)))
    if extra:
        out.update(extra)
    return x, int(info), out


def _run(core, op, callback, *rest):
    """Run a solver core compiled, or interpreted when products or callback are Python."""
    if op.compiled and callback is None:
        return call_kernel(core, op.op, *rest, None)
    return core.py_func(op.python_op(), *rest, callback)


def cg(A, b, x0=None, *, rtol=1e-5, atol=0.0, maxiter=None, M=None, callback=None, args=(),
       full_output=False, backend=None, output="numpy"):
    """Conjugate gradient for symmetric positive definite A (scipy-compatible).

    Parameters
    ----------
    A : ndarray, LinearOperator, sparse matrix or callable
        The SPD operator (see module docstring). A callable is ``matvec(p, *args)``.
    b : array_like, shape (n,)
    x0 : array_like, optional
        Warm start (zeros by default).
    rtol, atol : float
        Stop when ``|b - A x| <= max(rtol * |b|, atol)``.
    maxiter : int, optional
        Default ``10 * n`` (as scipy).
    M : array_like, LinearOperator or sparse matrix, optional
        Preconditioner approximating ``A^{-1}`` (as scipy): a 2-D array, a LinearOperator or
        a sparse matrix; also a 1-D array, read as a diagonal ``M * r``. A LinearOperator or
        sparse M runs the interpreted path.
    callback : callable, optional
        ``callback(xk)`` after each iteration (forces the interpreted path).
    full_output : bool
        Also return an ``OptimizeResult`` with ``nit``, ``residual_norm``, ``n_matvec``.
    backend : {"cpu", "cuda"}, optional
        Default: the process-wide one (:func:`mlocore.set_backend`). "cuda" runs the solver
        as fused numba.cuda kernels (:mod:`mlocore.cuda._linalg`): A is then a 2-D array
        (copied to the device once) or a device callback ``matvec(p, out, *args)`` writing
        A p into the device array ``out``; b and x0 may be device arrays. The result also
        reports ``transfers`` (host/device copies, counted).
    output : {"numpy", "device"}
        With backend "cuda": return x as a NumPy array (one counted copy) or leave it on
        the device.

    Returns
    -------
    x : ndarray
    info : int
        0 converged; ``> 0`` iterations done when maxiter was reached; -1 breakdown
        (``p^T A p == 0`` or non-finite); -2 negative curvature (A not positive definite).
    """
    if check_backend(backend, "mlocore.linalg.cg") == "cuda" or output != "numpy":
        _cuda.check_output(output, check_backend(backend, "mlocore.linalg.cg"))
        return _cuda.cg(A, b, x0, rtol=rtol, atol=atol, maxiter=maxiter, M=M,
                        callback=callback, args=args, full_output=full_output, output=output)
    op, b, x0, rtol, atol, maxiter = _prepare(A, b, x0, args, maxiter, rtol, atol,
                                              lambda n: 10 * n)
    Mt, python_M = _preconditioner(M, op.n)
    if python_M:  # a LinearOperator / sparse / callable M: run the interpreted path
        x, info, nit, res, nmv = _k.cg_core.py_func(op.python_op(), b, x0, rtol, atol,
                                                    maxiter, Mt, callback)
    else:
        x, info, nit, res, nmv = _run(_k.cg_core, op, callback, b, x0, rtol, atol, maxiter,
                                      Mt)
    return _finish(x, info, nit, res, nmv, full_output)


def _preconditioner(M, n):
    """``(M tuple, needs_python)`` for cg_core; M as scipy accepts it, or a diagonal."""
    if M is None:
        return (), False
    if isinstance(M, LinearOperator) or hasattr(M, "tocsr"):
        op = aslinearoperator(M)
        if op.shape != (n, n):
            raise ValueError(f"M must have shape ({n}, {n}), got {op.shape}")
        return (lambda r, _op=op: np.asarray(_op.matvec(r), dtype=np.float64).ravel(),), True
    if callable(M):
        return (lambda r, _m=M: np.asarray(_m(r), dtype=np.float64).ravel(),), True
    Marr = np.asarray(M)
    if Marr.dtype.kind not in "iuf":
        raise TypeError(f"M must be a real array, a LinearOperator or a sparse matrix, got "
                        f"dtype={Marr.dtype}")
    if Marr.shape not in ((n,), (n, n)):
        raise ValueError(f"M must have shape ({n},) (diagonal) or ({n}, {n}), got {Marr.shape}")
    if not np.all(np.isfinite(Marr)):
        raise ValueError("M contains non-finite values")
    return (np.ascontiguousarray(Marr, dtype=np.float64),), False


def largest_eigenvalue(A, n=None, *, iters=None, args=()):
    """Power-iteration estimate of the largest eigenvalue of a symmetric PSD operator.

    The estimate (a Rayleigh quotient) approaches ``lambda_max`` from below.
    """
    if n is None and not (hasattr(A, "shape")):
        raise ValueError("pass n, the operator size, for a matvec function")
    size = n if n is not None else A.shape[0]
    op = _Operator(A, args, size)
    iters = POWER_ITERS if iters is None else check_int("iters", iters, 1)
    if op.compiled:
        lam, _ = call_kernel(_k.power_iteration, op.op, op.n, iters)
    else:
        lam, _ = _k.power_iteration.py_func(op.op, op.n, iters)
    return float(lam)


def neumann(A, b, x0=None, *, eta=None, rtol=1e-5, atol=0.0, maxiter=None, callback=None,
            args=(), full_output=False, backend=None, output="numpy"):
    """Neumann series ``eta * sum_{q=0}^{k-1} (I - eta A)^q b`` for SPD A (matrix-free).

    Written as Richardson iteration ``x <- x + eta (b - A x)``, which from ``x0 = 0`` gives
    exactly the truncated series and from ``x0 != 0`` a warm start.

    Parameters
    ----------
    eta : float, optional
        Step, ``0 < eta < 2 / lambda_max(A)``; default ``1 / (1.05 * L)`` with L from power
        iteration (reported as ``eta`` with ``full_output``).
    maxiter : int, optional
        Number of terms at most (default ``max(100 n, 10000)``: the terms needed grow like
        ``kappa * log(1 / rtol)`` with the condition number kappa, not with n).

    Returns
    -------
    x, info (and an ``OptimizeResult`` with ``full_output``); info -3 means divergence.
    """
    if check_backend(backend, "mlocore.linalg.neumann") == "cuda" or output != "numpy":
        _cuda.check_output(output, check_backend(backend, "mlocore.linalg.neumann"))
        return _cuda.neumann(A, b, x0, eta=eta, rtol=rtol, atol=atol, maxiter=maxiter,
                             callback=callback, args=args, full_output=full_output,
                             output=output)
    op, b, x0, rtol, atol, maxiter = _prepare(A, b, x0, args, maxiter, rtol, atol,
                                              lambda n: max(100 * n, 10_000))
    if eta is None:
        lam = largest_eigenvalue(A, op.n, args=args) if op.compiled else \
            float(_k.power_iteration.py_func(op.op, op.n, POWER_ITERS)[0])
        if not lam > 0:
            x = np.zeros(op.n)
            return _finish(x, _k.INFO_NEGATIVE_CURVATURE, 0, np.nan, POWER_ITERS, full_output,
                           {"eta": np.nan})
        eta = 1.0 / (LIPSCHITZ_SAFETY * lam)
    else:
        eta = check_positive("eta", eta)
    x, info, nit, res, nmv = _run(_k.neumann_core, op, callback, b, x0, eta, rtol, atol,
                                  maxiter)
    return _finish(x, info, nit, res, nmv, full_output, {"eta": eta})


def solve_direct(A, b, *, args=(), full_output=False, backend=None):
    """Dense reference solve of SPD ``A x = b`` (Cholesky), assembling A by n products.

    info -4 when A is not positive definite. Cost O(n^3): meant for small n and as the
    reference the iterative solvers are tested against.
    """
    if check_backend(backend, "mlocore.linalg.solve_direct") == "cuda":  # mlocore.cuda._direct
        return _solve_direct_cuda(A, b, args=args, full_output=full_output)
    b = as_vector("b", b)
    op = _Operator(A, args, b.shape[0])
    if op.n != b.shape[0]:
        raise ValueError(f"A has shape ({op.n}, {op.n}) but b has shape {b.shape}")
    if op.compiled:
        x, info, nit, res, nmv = call_kernel(_k.direct_core, op.op, b)
    else:
        eye = np.eye(op.n)
        dense = np.column_stack([op.op[0](eye[:, j]) for j in range(op.n)])
        x, info = _k.cholesky_solve(dense, b)
        res, nit, nmv = float(np.linalg.norm(b - dense @ x)), 1, op.n
    return _finish(x, info, nit, res, nmv, full_output)
