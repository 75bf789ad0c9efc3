"""Options of the bilevel entry points, shared by the CPU and CUDA backends.

Both backends validate an option once, here, with the same message, default and meaning;
the kernels receive validated values only.
"""
from __future__ import annotations

from collections import namedtuple
from types import SimpleNamespace

import numpy as np

from ._kernels import implicit as _imp
from ._kernels import lower as _low
from ._validation import check_choice, check_int, check_positive

__all__ = ["LOWER_METHODS", "IMPLICIT_METHODS", "UNROLLED_METHODS", "HYPERGRAD_METHODS",
           "LowerOptions", "HypergradOptions", "hypergrad_options", "unrolled_steps",
           "default_linear_maxiter", "reject_unused"]

#: lower-level solvers, with their codes in :mod:`mlocore._kernels.lower`
LOWER_METHODS = {"gd": _low.GD, "agd": _low.AGD, "newton-cg": _low.NEWTON_CG}
#: implicit hypergradients: the linear solver of ``H_yy v = grad_y f``
IMPLICIT_METHODS = ("direct", "cg", "neumann")
#: linear solvers of the implicit methods, with their codes in :mod:`mlocore._kernels.implicit`
LINEAR_SOLVERS = {"direct": _imp.DIRECT, "cg": _imp.CG, "neumann": _imp.NEUMANN}
#: unrolled (iterative) differentiation through T lower gradient steps
UNROLLED_METHODS = ("itd-forward", "itd-reverse")
HYPERGRAD_METHODS = IMPLICIT_METHODS + UNROLLED_METHODS


class LowerOptions(namedtuple("LowerOptions", "name tol maxiter step")):
    """Validated options of the lower-level solver (every bilevel driver, both backends).

    ``step`` is -1.0 for the default (``1/L`` from power iteration); ``code`` is the
    solver's code for the CPU kernels.
    """

    __slots__ = ()

    def __new__(cls, method="newton-cg", tol=1e-10, maxiter=1000, step=None):
        check_choice("lower_method", method, tuple(LOWER_METHODS))
        return super().__new__(cls, method, check_positive("lower_tol", tol, allow_zero=True),
                               check_int("lower_maxiter", maxiter, 0),
                               -1.0 if step is None else check_positive("lower_step", step))

    @property
    def code(self) -> int:
        return LOWER_METHODS[self.name]


def default_linear_maxiter(method, dy):
    """Default iteration limit of the linear solver of an implicit method: ``10 dy`` for
    CG, ``max(100 dy, 10000)`` for Neumann (its number of terms grows with the condition
    number, not the size), 1 for the direct solve."""
    if method == "neumann":
        return max(100 * dy, 10_000)
    return 10 * dy if method == "cg" else 1


def reject_unused(method, **given):
    """A TypeError for options that the chosen method would silently ignore."""
    unused = [name for name, was_given in given.items() if was_given]
    if unused:
        raise TypeError(f"option{'s' if len(unused) > 1 else ''} {', '.join(unused)} "
                        f"{'do' if len(unused) > 1 else 'does'} not apply to method="
                        f"{method!r} for this problem")


def unrolled_steps(T, K, step):
    """Validated ``(T, K, beta)`` of an unrolled hypergradient (beta -1.0: the default
    ``1/L``): T inner steps, the last K of them differentiated."""
    T = check_int("T", T, 0)
    K = T if K is None else check_int("K", K, 0)
    if K > T:
        raise ValueError(f"K (steps differentiated) must be <= T = {T}, got K={K}")
    beta = -1.0 if step is None else check_positive("step", step)
    return T, K, beta


class HypergradOptions(SimpleNamespace):
    """Validated options of a bilevel :func:`mlocore.hypergrad` call (both backends):
    ``method``, ``unrolled``, ``tol``, ``atol``, ``T``, ``K``, ``beta`` (unrolled) and
    ``lower`` (:class:`LowerOptions`), ``solve_lower``, ``maxiter``, ``eta`` (-1.0: the
    default ``1/L``) (implicit).

    Implicit options also hold ``kernel_scalars``, the scalar arguments of the CPU kernel
    :func:`mlocore._kernels.implicit.implicit_hypergrad` (from ``solve_lower`` to ``eta``),
    and ``kernel_types``, the Python types of all its per-call arguments ``(x, y, v0,
    *kernel_scalars, counts)`` when the arrays are validated ones (``np.ndarray``).
    """


_MEMO: dict = {}
_MEMO_SIZE = 256


def hypergrad_options(method, dy, tol, atol, maxiter, v0_given, eta, lower_solved,
                      lower_method, lower_tol, lower_maxiter, lower_step, T, K, step, fd_step):
    """Validate the options of a bilevel hypergradient once, for either backend: an option
    that the method would ignore is a TypeError (:func:`reject_unused`), a bad value a
    ValueError or TypeError naming it. Returns :class:`HypergradOptions` (shared between
    calls with the same options: callers must not modify it).

    Validated options are memoized by value *and type* (``tol=True`` is not ``tol=1``), so
    that repeated calls on small problems do not pay for validation again (about 0.6 us a
    call on a hit).
    """
    values = (method, dy, tol, atol, maxiter, v0_given, eta, lower_solved, lower_method,
              lower_tol, lower_maxiter, lower_step, T, K, step, fd_step)
    key = (values, tuple(map(type, values)))
    try:
        hit = _MEMO.get(key)
    except TypeError:  # an unhashable option: validate (and fail) without the memo
        return _hypergrad_options(*values)
    if hit is None:
        hit = _hypergrad_options(*values)
        if len(_MEMO) >= _MEMO_SIZE:
            _MEMO.clear()
        _MEMO[key] = hit
    return hit


def _hypergrad_options(method, dy, tol, atol, maxiter, v0_given, eta, lower_solved,
                       lower_method, lower_tol, lower_maxiter, lower_step, T, K, step,
                       fd_step):
    method = "cg" if method is None else method
    check_choice("method", method, HYPERGRAD_METHODS)
    unrolled = method in UNROLLED_METHODS
    reject_unused(method, fd_step=fd_step is not None, K=K is not None and not unrolled,
                  step=step is not None and not unrolled, v0=v0_given and unrolled,
                  eta=eta is not None and method != "neumann",
                  maxiter=maxiter is not None and unrolled,
                  lower_solved=bool(lower_solved) and unrolled,
                  lower_tol=lower_tol is not None and unrolled,
                  lower_maxiter=lower_maxiter is not None and unrolled,
                  lower_step=lower_step is not None and unrolled,
                  lower_method=lower_method != "newton-cg" and unrolled)
    opts = HypergradOptions(method=method, unrolled=unrolled,
                            tol=check_positive("tol", tol, allow_zero=True),
                            atol=check_positive("atol", atol, allow_zero=True))
    if unrolled:
        opts.T, opts.K, opts.beta = unrolled_steps(T, K, step)
        return opts
    opts.lower = LowerOptions(lower_method, min(opts.tol, 1e-10) if lower_tol is None
                              else lower_tol, 1000 if lower_maxiter is None else lower_maxiter,
                              lower_step)
    opts.solve_lower = not lower_solved
    opts.maxiter = default_linear_maxiter(method, dy) if maxiter is None else \
        check_int("maxiter", maxiter, 0)
    opts.eta = -1.0 if eta is None else check_positive("eta", eta)
    low = opts.lower
    opts.kernel_scalars = (opts.solve_lower, low.code, low.tol, low.maxiter, low.step,
                           LINEAR_SOLVERS[method], opts.tol, opts.atol, opts.maxiter, opts.eta)
    opts.kernel_types = ((np.ndarray,) * 3 + tuple(map(type, opts.kernel_scalars))
                         + (np.ndarray,))
    return opts
