"""Result objects and the one table of status messages (as scipy's ``_status_message``)."""
from __future__ import annotations

import numpy as np
from scipy.optimize import OptimizeResult

from ._kernels.implicit import LINEAR_FAILED
from ._kernels.oracles import COUNTER_NAMES, N_COUNTERS

#: status code -> message. Codes 0-6 come from kernels; 10+ from the Python drivers.
STATUS_MESSAGES = {
    0: "Converged.",
    1: "The lower-level solver reached maxiter before |grad_y g| <= lower_tol.",
    2: "A non-finite value appeared in the lower-level iterates: a callback returned NaN/inf "
       "or the step size is too large for this problem.",
    3: "The lower-level Hessian H_yy is not positive definite at the current point "
       "(negative or zero curvature): g(x, .) must be strongly convex.",
    4: "The lower-level Newton-CG line search could not decrease |grad_y g|: lower_tol is "
       "below what round-off allows, or the Hessian callback is inconsistent with grad.",
    5: "A linear solve with the lower-level Hessian failed.",
    6: "The hypergradient is not finite: a callback returned NaN/inf.",
    10: "Maximum number of iterations reached before the tolerance.",
    11: "The line search on F found no decrease: the hypergradient is inaccurate (tighten "
        "tol / lower_tol) or the step is too large.",
    12: "The upper-level objective became non-finite.",
    13: "The stochastic iterates diverged (non-finite, or growing without bound): the step "
        "sizes are too large for this problem.",
    20: "Ran the requested maxiter iterations (stochastic methods run a fixed budget unless "
        "tol and a reference are given).",
    99: "Stopped by the callback (StopIteration).",
}

LINEAR_INFO_MESSAGES = {
    0: "converged",
    -1: "breakdown: p^T A p == 0 or a non-finite value (singular operator or NaN)",
    -2: "negative curvature p^T A p < 0: the operator is not positive definite",
    -3: "diverged: the Neumann step eta is too large for this operator (need eta < 2/L)",
    -4: "Cholesky failed: the operator is not positive definite",
}


def linear_info_message(info: int) -> str:
    if info > 0:
        return f"not converged: maxiter reached (info = {info})"
    return LINEAR_INFO_MESSAGES.get(int(info), f"unknown info {info}")


def status_message(status: int, detail: str = "") -> str:
    if not detail and type(status) is int and status in STATUS_MESSAGES:
        return STATUS_MESSAGES[status]
    msg = STATUS_MESSAGES.get(int(status), f"Unknown status {status}.")
    return " ".join(f"{msg} {detail}".split())


_NO_COUNTS = np.zeros(N_COUNTERS, dtype=np.int64)


def new_counts() -> np.ndarray:
    return _NO_COUNTS.copy()


def counts_dict(counts: np.ndarray) -> dict:
    return _calls_dict(counts.tolist())


def level_calls(counts: np.ndarray) -> dict:
    """``{"upper_calls", "lower_calls"}``: the oracle calls of each level in ``counts``."""
    up = sum(int(c) for name, c in zip(COUNTER_NAMES, counts) if name.startswith("upper"))
    return {"upper_calls": up, "lower_calls": int(counts[:N_COUNTERS].sum()) - up}


class HypergradResult(OptimizeResult):
    """Result of :func:`mlocore.hypergrad` (a ``scipy.optimize.OptimizeResult``).

    Attributes
    ----------
    grad : ndarray
        The hypergradient of F at x (NaN-free when ``success``; see ``message`` otherwise).
    x, y : ndarray
        The upper point and the lower solution used (for ITD, the last iterate y_T).
    v : ndarray or None
        The adjoint, solution of ``H_yy v = grad_y f`` (implicit methods); for reverse ITD
        the implicit adjoint of the unrolled loop; None for forward ITD (see ``jacobian``).
    fun : float
        f(x, y) when the upper objective has a ``value`` callback, else NaN.
    method, success, status, message
        As scipy.
    nit : int
        Iterations of the linear solver (implicit) or unrolled steps T (ITD).
    lower_nit, lower_grad_norm : int, float
        Lower-level solver iterations and the final ``|grad_y g|``. For n levels, arrays
        over the levels (see :func:`mlocore.hypergrad`), with ``lower_solves``.
    oracle_calls : dict
        Counts per callback (``upper_grad``, ``lower_grad``, ``lower_hvp``, ...);
        ``ngrad`` and ``nhvp`` are totals.
    """


def implicit_result(method, *, grad, x, y, v, fun, status, lower_status, lower_nit,
                    lower_grad_norm, info, nit, residual, eta, solved_lower):
    """The :class:`HypergradResult` of an implicit hypergradient (both backends): the
    message names the lower solve's and the linear solve's outcome."""
    return implicit_result_from(method, x, (grad, y, v, fun, status, lower_status, lower_nit,
                                            lower_grad_norm, info, nit, residual, eta),
                                solved_lower)


def implicit_result_from(method, x, out, solved_lower, counts=None):
    """:func:`implicit_result` from the output tuple of the implicit kernel, ``(grad, y, v,
    fun, status, lower_status, lower_nit, lower_gnorm, lin_info, lin_nit,
    lin_residual, eta)``; with ``counts``, also the fields of :func:`add_counts`."""
    grad, y, v, fun, status, lower_status, lower_nit, lower_gnorm, info, nit, res, eta = out
    detail = ""
    if solved_lower:
        detail = f"Lower level: |grad_y g| = {lower_gnorm:.3e} after {lower_nit} iterations."
    if status == LINEAR_FAILED:
        detail += (f" Linear solve ({method}): {linear_info_message(info)}, "
                   f"residual {res:.3e}.")
    return HypergradResult(
        grad=grad, x=x, y=y, v=v, fun=fun, method=method, success=status == 0,
        status=int(status), message=status_message(status, detail), nit=int(nit),
        lin_info=int(info), lin_residual=float(res), lower_nit=int(lower_nit),
        lower_grad_norm=float(lower_gnorm), lower_status=int(lower_status),
        eta=float(eta) if method == "neumann" else None,
        **({} if counts is None else count_fields(counts)))


def _calls_dict(c):
    """``dict(zip(COUNTER_NAMES, c))`` written out (a dict display is about twice as fast
    on these eleven counters)."""
    return {"upper_grad": c[0], "upper_value": c[1], "upper_hvp": c[2], "lower_grad": c[3],
            "lower_hvp": c[4], "lower_value": c[5], "upper_grad_x": c[6],
            "upper_grad_y": c[7], "lower_grad_y": c[8], "lower_hvp_yy": c[9],
            "lower_hvp_xy": c[10]}


if tuple(_calls_dict(range(N_COUNTERS))) != COUNTER_NAMES:  # pragma: no cover
    raise ImportError("_results._calls_dict is out of date with the counters' names")


def count_fields(counts):
    """The fields that :func:`add_counts` sets, as a dict."""
    c = _calls_dict(counts.tolist())
    return {"oracle_calls": c,
            "ngrad": (c["upper_grad"] + c["lower_grad"] + c["upper_grad_x"]
                      + c["upper_grad_y"] + c["lower_grad_y"]),
            "nhvp": c["upper_hvp"] + c["lower_hvp"] + c["lower_hvp_yy"] + c["lower_hvp_xy"]}


def add_counts(out, counts):
    """Set a hypergradient result's ``oracle_calls``, ``ngrad`` (gradient calls, blocks
    included) and ``nhvp`` (Hessian-vector products, blocks included) from ``counts``
    (shared by the CPU and device backends); returns out."""
    out.update(count_fields(counts))
    return out
