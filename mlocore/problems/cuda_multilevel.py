"""Device callbacks of the multilevel problem library (CUDA backend, "one large problem" mode).

The n-level quadratics of :mod:`mlocore.problems.multilevel`, whose levels are
``f_k(z) = z.P_k z / 2 + q_k.z`` over the joint vector ``z = concat(x_1, ..., x_n)`` (the CPU
callbacks ``quadform_grad/hvp/value``), as :class:`mlocore.cuda.DeviceObjective` callbacks::

    quadform_grad_device(z, out, P, q)     out <- P z + q
    quadform_hvp_device(z, v, out, P, q)   out <- P v
    quadform_value_device(z, P, q)         z.P z / 2 + q.z

One thread per output entry, a dense row of P each (sizes are small: these are test and
benchmark problems; ALGORITHMS.md section 3, correctness oracle (a)). Builders put every
``(P_k, q_k)`` on the device once (counted in the problem's ``transfers``):

    nlevel_quadratic_device_problem(q)      # q = make_nlevel_quadratic(...)
    trilevel_quadratic_device_problem(tq)   # tq = make_trilevel_quadratic(...)

and, so that the best-response curvature of mode "exact" is exercised on the device, the
log-cosh plus quadratic levels of :func:`make_nonquadratic_trilevel` (CPU callbacks
``logcosh_quad_grad/hvp/value``, args ``(G, b, c, P, q)``)::

    logcosh_quad_grad_device(z, out, G, b, c, P, q)   out <- G^T (c tanh(G z + b)) + P z + q
    logcosh_quad_hvp_device(z, v, out, G, b, c, P, q) out <- G^T (c sech^2(G z + b) G v) + P v
    logcosh_quad_value_device(z, G, b, c, P, q)
    nonquadratic_trilevel_device_problem(nt)  # nt = make_nonquadratic_trilevel(...)

There is no device ``tvp``: the device engine takes third-order products by central
differences of hvp.

The closed forms (``q.hypergrad``, ``q.best_response``, ``q.x_star``, ...) stay on the host
objects. The trilevel quadratic's device problem uses its level matrices
(:meth:`TrilevelQuadratic.level_matrices`), the same functions as its CPU callbacks.
"""
from __future__ import annotations

import math

from numba import cuda

from ..cuda import _linalg as dl
from ..cuda._multilevel import DeviceMultilevelProblem
from ..cuda._problem import DeviceObjective
from .cuda_callbacks import _reduce_to_host
from .multilevel import NLevelQuadratic, NonquadraticTrilevel, TrilevelQuadratic

__all__ = ["quadform_grad_device", "quadform_hvp_device", "quadform_value_device",
           "nlevel_quadratic_device_problem", "trilevel_quadratic_device_problem",
           "logcosh_quad_grad_device", "logcosh_quad_hvp_device", "logcosh_quad_value_device",
           "nonquadratic_trilevel_device_problem"]

_TPB = dl.THREADS_PER_BLOCK


@cuda.jit
def _quadform_affine_kernel(z, P, q, lin, out):
    """``out = P z + lin q``, one thread per row (row-order summation)."""
    N = P.shape[1]
    for i in range(cuda.grid(1), P.shape[0], cuda.gridsize(1)):
        s = 0.0
        for j in range(N):
            s += P[i, j] * z[j]
        out[i] = s + lin * q[i]


@cuda.jit
def _quadform_value_terms_kernel(z, P, q, terms):
    """``terms[i] = z_i ((P z)_i / 2 + q_i)``: their sum is ``z.P z / 2 + q.z``."""
    N = P.shape[1]
    for i in range(cuda.grid(1), P.shape[0], cuda.gridsize(1)):
        s = 0.0
        for j in range(N):
            s += P[i, j] * z[j]
        terms[i] = z[i] * (0.5 * s + q[i])


def _launch(kernel, n, *args):
    kernel[dl.grid_for(n), _TPB](*args)


def quadform_grad_device(z, out, P, q):
    """Device callback ``out <- P z + q`` (P symmetric, shape (N, N); q shape (N,))."""
    _launch(_quadform_affine_kernel, z.shape[0], z, P, q, 1.0, out)


def quadform_hvp_device(z, v, out, P, q):
    """Device callback ``out <- P v``."""
    _launch(_quadform_affine_kernel, v.shape[0], v, P, q, 0.0, out)


def quadform_value_device(z, P, q):
    """``z.P z / 2 + q.z``: a device reduction and one scalar read back (not counted, as
    every value callback of :mod:`mlocore.problems.cuda_callbacks`)."""
    terms = dl.empty(z.shape[0])
    _launch(_quadform_value_terms_kernel, z.shape[0], z, P, q, terms)
    return _reduce_to_host(terms)


def _quadratic_levels(P, q, dims):
    levels = [DeviceObjective(quadform_grad_device, hvp=quadform_hvp_device,
                              value=quadform_value_device, args=(Pk, qk))
              for Pk, qk in zip(P, q)]
    return DeviceMultilevelProblem(levels, dims)


def nlevel_quadratic_device_problem(q):
    """The device version of ``q.problem`` for an n-level quadratic.

    Parameters
    ----------
    q : NLevelQuadratic
        From :func:`mlocore.problems.make_nlevel_quadratic` (or built from matrices).

    Returns
    -------
    DeviceMultilevelProblem
        Levels ``f_k = z.P_k z / 2 + q_k.z`` with grad, hvp and value callbacks; the 2n arrays
        are copied to the device once (``problem.transfers["h2d"] == 2 n``).
    """
    if not isinstance(q, NLevelQuadratic):
        raise TypeError("nlevel_quadratic_device_problem expects an NLevelQuadratic (from "
                        f"make_nlevel_quadratic), got {type(q).__name__}")
    return _quadratic_levels(q.P, q.q, q.dims)


def trilevel_quadratic_device_problem(tq):
    """The device version of ``tq.problem`` for the trilevel quadratic of Giovannelli, Kent &
    Vicente (ALGORITHMS.md section 3).

    Parameters
    ----------
    tq : TrilevelQuadratic
        From :func:`mlocore.problems.make_trilevel_quadratic`.

    Returns
    -------
    DeviceMultilevelProblem
        ``dims = (dim, dim, dim)``; the levels are the quadratic forms of
        ``tq.level_matrices()`` (6 arrays copied to the device once). Closed forms:
        ``grad F(x) = c + 7 x`` (``tq.hypergrad``).
    """
    if not isinstance(tq, TrilevelQuadratic):
        raise TypeError("trilevel_quadratic_device_problem expects a TrilevelQuadratic (from "
                        f"make_trilevel_quadratic), got {type(tq).__name__}")
    mats = tq.level_matrices()
    return _quadratic_levels([m[0] for m in mats], [m[1] for m in mats], (tq.dim,) * 3)


# ---------------------------------------------------------------------------------------
# Log-cosh plus quadratic levels: sum_m c_m log cosh(G_m.z + b_m) + z.P z / 2 + q.z
# ---------------------------------------------------------------------------------------
@cuda.jit
def _logcosh_weights_kernel(z, v, G, b, c, second, r):
    """``r_m = c_m tanh(s_m)`` (second=False) or ``c_m (1 - tanh(s_m)^2) (G v)_m``, with
    ``s = G z + b``; one thread per row of G."""
    N = G.shape[1]
    for m in range(cuda.grid(1), G.shape[0], cuda.gridsize(1)):
        s = b[m]
        for j in range(N):
            s += G[m, j] * z[j]
        t = math.tanh(s)
        if second:
            gv = 0.0
            for j in range(N):
                gv += G[m, j] * v[j]
            r[m] = c[m] * (1.0 - t * t) * gv
        else:
            r[m] = c[m] * t


@cuda.jit
def _logcosh_combine_kernel(z, G, r, P, q, lin, out):
    """``out = G^T r + P z + lin q``, one thread per entry."""
    M = G.shape[0]
    N = P.shape[1]
    for i in range(cuda.grid(1), P.shape[0], cuda.gridsize(1)):
        s = 0.0
        for m in range(M):
            s += G[m, i] * r[m]
        p = 0.0
        for j in range(N):
            p += P[i, j] * z[j]
        out[i] = s + p + lin * q[i]


@cuda.jit
def _logcosh_value_terms_kernel(z, G, b, c, P, q, terms):
    """Per-entry terms whose sum is the value: ``c_i log cosh(s_i)`` for the rows of G
    (``i < M``) plus ``z_i ((P z)_i / 2 + q_i)``; terms has length ``max(M, N)``."""
    M = G.shape[0]
    N = P.shape[1]
    for i in range(cuda.grid(1), terms.shape[0], cuda.gridsize(1)):
        acc = 0.0
        if i < M:
            s = b[i]
            for j in range(N):
                s += G[i, j] * z[j]
            a = abs(s)
            acc += c[i] * (a + math.log1p(math.exp(-2.0 * a)) - math.log(2.0))
        if i < N:
            p = 0.0
            for j in range(N):
                p += P[i, j] * z[j]
            acc += z[i] * (0.5 * p + q[i])
        terms[i] = acc


def logcosh_quad_grad_device(z, out, G, b, c, P, q):
    """Device callback ``out <- G^T (c * tanh(G z + b)) + P z + q``."""
    r = dl.empty(G.shape[0])
    _launch(_logcosh_weights_kernel, G.shape[0], z, z, G, b, c, False, r)
    _launch(_logcosh_combine_kernel, z.shape[0], z, G, r, P, q, 1.0, out)


def logcosh_quad_hvp_device(z, v, out, G, b, c, P, q):
    """Device callback ``out <- G^T (c * sech^2(G z + b) * G v) + P v``."""
    r = dl.empty(G.shape[0])
    _launch(_logcosh_weights_kernel, G.shape[0], z, v, G, b, c, True, r)
    _launch(_logcosh_combine_kernel, v.shape[0], v, G, r, P, q, 0.0, out)


def logcosh_quad_value_device(z, G, b, c, P, q):
    """``sum_m c_m log cosh(G_m.z + b_m) + z.P z / 2 + q.z`` (one uncounted read-back)."""
    n_terms = max(G.shape[0], z.shape[0])
    terms = dl.empty(n_terms)
    _launch(_logcosh_value_terms_kernel, n_terms, z, G, b, c, P, q, terms)
    return _reduce_to_host(terms)


def nonquadratic_trilevel_device_problem(nt):
    """The device version of ``nt.problem`` for the log-cosh trilevel problem.

    Parameters
    ----------
    nt : NonquadraticTrilevel
        From :func:`mlocore.problems.make_nonquadratic_trilevel`; its innermost best response
        is nonlinear, so the curvature terms of ALGORITHMS.md section 3 matter.

    Returns
    -------
    DeviceMultilevelProblem
        Levels with grad, hvp and value callbacks (no tvp: the device engine differences
        hvp); the 15 arrays of ``nt.params`` are copied to the device once.
    """
    if not isinstance(nt, NonquadraticTrilevel):
        raise TypeError("nonquadratic_trilevel_device_problem expects a NonquadraticTrilevel "
                        f"(from make_nonquadratic_trilevel), got {type(nt).__name__}")
    levels = [DeviceObjective(logcosh_quad_grad_device, hvp=logcosh_quad_hvp_device,
                              value=logcosh_quad_value_device, args=params)
              for params in nt.params]
    return DeviceMultilevelProblem(levels, nt.dims)
