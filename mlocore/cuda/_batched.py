"""Many small bilevel problems at once: one CUDA thread block per problem, one launch.

A *batch* is ``n_problems`` independent bilevel problems of the same shape (dx, dy) and the
same objective functions, differing only in their data (a grid of hyperparameters, many
tasks, ...). :func:`batched_hypergrad` computes every problem's implicit hypergradient
(docs/mathematics.md section 1)

    grad F = grad_x f - H_xy v,      H_yy v = grad_y f,      at (x, y*(x))

in ONE kernel launch; :func:`batched_minimize` runs whole gradient-descent loops on x, one per
problem, in one launch (both with the joint callbacks only: the batched kernels take no block
oracles). Block ``b`` handles problem ``b``; its threads split the components of
every vector among themselves (thread ``t`` owns the components ``t, t + T, t + 2T, ...`` of
every vector, T = threads per block), dot products are shared-memory tree reductions across
the block, and all vectors of a problem live in the block's (dynamic) shared memory.

Callback convention
-------------------
Callbacks are ``numba.cuda.jit(device=True)`` functions (never CPU ``@njit`` ones). Each one
computes ONE component, so that the threads of a block can share the work:

``grad(i, z, data) -> float64``
    Component ``i`` (``0 <= i < dx + dy``) of the gradient, over the JOINT vector
    ``z = concat(x, y)``, of the objective of one problem. Indices ``i < dx`` are the x-block,
    ``i >= dx`` the y-block.
``hvp(i, z, v, data) -> float64``
    Component ``i`` of ``H(z) v``, H the Hessian over the joint vector. The solver only ever
    asks for ``v = (0, p)`` (x-block zero): ``i >= dx`` gives ``(H_yy p)_{i-dx}``, ``i < dx``
    gives ``(H_xy p)_i``.
``value(z, data) -> float64`` (optional, upper level only)
    The objective value; computed by one thread, reported as ``fun``.

``z`` and ``v`` are 1-D float64 arrays of length dx + dy (the problem's vectors, in shared
memory; READ ONLY: a callback must not write to them). ``data`` is the problem's row of a
2-D float64 array of per-problem parameters, shape ``(n_problems, n_data)``: each row holds
that problem's matrices and vectors flattened, in a layout the caller chooses and the
callbacks decode (see :mod:`mlocore.problems.cuda_batched` for an example). The upper and the
lower objective each have their own data array (their ``n_data`` may differ). A callback may
be called for any component in any order, by any thread, any number of times: it must be a
pure function of its arguments. It must be valid device code: no Python objects, no
exceptions, no allocation other than ``cuda.local.array`` of constant size.

Algorithms (all matching mlocore's CPU kernels step by step, so that results agree to
round-off: the reductions sum in a different order)
---------------------------------------------------------------------------------------
* Lower level: Newton-CG with a backtracking search on the gradient norm, exactly the CPU
  ``solve_lower(method="newton-cg")`` (:mod:`mlocore._kernels.lower`): stop when
  ``|grad_y g| <= max(lower_tol, 1e-13 |grad_y g(x, y0)|)``; Newton step by CG on
  ``H_yy d = -grad_y g`` with relative tolerance ``min(0.5, sqrt(|grad_y g|))`` and at most
  ``2 dy + 20`` iterations; negative curvature stops with status 3. It is the solver that also
  handles strongly convex non-quadratic lower objectives (a plain CG on the gradient would
  only be exact for quadratics).
* Adjoint: CG on ``H_yy v = grad_y f`` (:func:`mlocore._kernels.linalg.cg_core`, no
  preconditioner): stop when ``|r| <= max(tol |grad_y f|, atol)``; info 0 converged, ``> 0``
  maxiter reached, -1 breakdown (``p^T H p == 0`` or not finite), -2 negative curvature.
* Cross term: one joint hvp with direction ``(0, v)``, whose x-block is ``H_xy v``.

Statuses are the CPU ones (:data:`mlocore._results.STATUS_MESSAGES`): 0 converged, 1 lower
maxiter (the hypergradient is still computed, from the inexact y), 2 non-finite lower
iterate, 3 lower Hessian not positive definite, 4 lower line search failed, 5 adjoint linear
solve failed (``info != 0``), 6 non-finite hypergradient; :func:`batched_minimize` adds 10
(maxiter reached before ``gtol``).

Failure isolation: each block decides everything from its own reductions, so one problem's
failure never changes another's result. A failed problem's row is flagged
(``success[b] == False``, ``status[b]``, ``info[b]``) and NaN-free: y and v are its last
finite iterates, and its ``grad`` row is 0 where no finite hypergradient exists (lower-level
failures 2-4, or status 6). A zero row is NOT a stationarity certificate: always read
``success``. ``fun`` is NaN only where no ``upper_value`` was given (as on the CPU).

Launch and memory: a grid of exactly ``n_problems`` blocks of ``threads`` threads (a power
of two, at most 256: the kernels' register use; default max(dx, dy) rounded up, clamped to
[32, 256]); each block uses
``8 (2 threads + 2 (dx + dy) + 8 dy + 2 dx)`` bytes of dynamic shared memory
(:func:`batched_shared_bytes`), at most 48 KiB (checked before launch): this mode is for
small problems (dy up to a few hundred). A reduction costs log2(threads) barriers (two
alternating buffers, see :func:`_block_sum`); a CG iteration one hvp sweep and two
reductions.

Real-GPU constraints honoured here: every ``cuda.syncthreads()`` is reached by all threads of
a block (every branch depends only on block-uniform values: reductions, the block index,
scalar arguments), no allocation in kernels (one dynamic shared array sized at launch), float64
throughout, explicit grids. Device functions cannot be kernel arguments, so kernels are built
by a factory that closes over the callbacks and cached per tuple of callbacks.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
from numba import cuda, float64, int64
from scipy.optimize import OptimizeResult

from .._problem import parse_bilevel_dims
from .._results import STATUS_MESSAGES, linear_info_message
from .._validation import check_int, check_positive
from . import _linalg as dl
from ._device import Transfers, is_device_array, require_cuda, to_device, to_host

__all__ = ["BatchedBilevelProblem", "batched_hypergrad", "batched_minimize",
           "batched_shared_bytes"]

# statuses (same codes as mlocore._kernels.lower / implicit)
OK = 0
LOWER_MAXITER = 1
NONFINITE = 2
INDEFINITE = 3
LINESEARCH = 4
LINEAR_FAILED = 5
NONFINITE_RESULT = 6
MAXITER = 10  # batched_minimize: gtol not reached within maxiter

INFO_BREAKDOWN = -1
INFO_NEGATIVE_CURVATURE = -2

ROUNDOFF_FLOOR = 1e-13        #: lower solver's relative floor (as mlocore._kernels.lower)
LINESEARCH_HALVINGS = 40      #: backtracking steps of the Newton line search (as the CPU)
SHARED_LIMIT_BYTES = 48 * 1024  #: dynamic shared memory without an opt-in (every GPU)
#: Most threads per block. The kernels hold the whole Newton-CG / CG state in registers (ptxas,
#: sm_80, with the library's quadratic callbacks: 144 registers per thread for the
#: hypergradient kernel, 168 for the minimizer), and a block has at most 65536 registers:
#: 512 or 1024 threads fail to launch on a real GPU ("too many resources requested for
#: launch"; the simulator has no such limit). 256 threads fit at any register count (at most
#: 255 per thread).
MAX_THREADS = 256

# columns of the per-problem statistics arrays written by the kernels
_I_STATUS, _I_LOWER_STATUS, _I_INFO, _I_NIT, _I_LOWER_NIT, _I_CG_NIT, _N_INT = 0, 1, 2, 3, 4, 5, 6
_F_LOWER_GNORM, _F_RESIDUAL, _F_FUN, _N_FLOAT = 0, 1, 2, 3

_DOUBLE_MAX = 1.7976931348623157e308


# ---------------------------------------------------------------------------------------
# Block-level helpers (independent of the callbacks). All threads of the block must call
# them together: they contain cuda.syncthreads().
# ---------------------------------------------------------------------------------------
@cuda.jit(device=True)
def _finite(a):
    """True for a finite float (NaN and +-inf fail the comparison)."""
    return abs(a) <= _DOUBLE_MAX


@cuda.jit(device=True)
def _larger(a, b):
    """Python's max(a, b) (the first unless the second is larger); the builtin ``max`` of
    two scalars does not type on the CUDA target of numba 0.68."""
    return b if b > a else a


@cuda.jit(device=True)
def _smaller(a, b):
    """Python's min(a, b), see :func:`_larger`."""
    return b if b < a else a


@cuda.jit(device=True)
def _block_sum(partial, red, parity, tid, nthreads):
    """Sum over the block of each thread's ``partial``: a shared-memory tree reduction.

    ``red`` holds two buffers of ``nthreads`` (a power of two) entries, used alternately
    (``parity[0]``, a per-thread counter that every thread advances identically): reduction
    k + 2 writes the buffer that reduction k read only after every thread has passed the
    first barrier of reduction k + 1, so no barrier is needed after reading the total. The
    last tree level is read by every thread (``buf[0] + buf[1]``) instead of being written
    and synchronized. Cost: log2(nthreads) barriers. Every thread gets the same total, bit
    for bit (same operands, same order).
    """
    if nthreads == 1:
        return partial
    base = parity[0] * nthreads
    parity[0] = 1 - parity[0]
    red[base + tid] = partial
    cuda.syncthreads()
    stride = nthreads // 2
    while stride > 1:
        if tid < stride:
            red[base + tid] += red[base + tid + stride]
        cuda.syncthreads()
        stride //= 2
    return red[base] + red[base + 1]


@cuda.jit(device=True)
def _block_dot(a, b, red, parity, tid, nthreads):
    """a . b over the block (thread t reads only the components it owns)."""
    s = 0.0
    for j in range(tid, a.shape[0], nthreads):
        s += a[j] * b[j]
    return _block_sum(s, red, parity, tid, nthreads)


@cuda.jit(device=True)
def _block_abs_sum(a, red, parity, tid, nthreads):
    """sum |a_j| over the block: 0 exactly when a == 0 (no underflow, unlike a . a)."""
    s = 0.0
    for j in range(tid, a.shape[0], nthreads):
        s += abs(a[j])
    return _block_sum(s, red, parity, tid, nthreads)


# ---------------------------------------------------------------------------------------
# Kernel factory: everything that calls the user's device functions.
# ---------------------------------------------------------------------------------------
@cuda.jit(device=True)
def _no_value(z, data):
    return math.nan


class _Workspace:
    """Offsets of the vectors in a block's dynamic shared memory (float64 units)."""

    @staticmethod
    def size(dx, dy, nthreads):
        # red (2 T) + z, dirv (n each) + g, d, r, q, ysave, gtry, b, v (dy each) + fx, hg (dx)
        n = dx + dy
        return 2 * nthreads + 2 * n + 8 * dy + 2 * dx


def batched_shared_bytes(dims, threads):
    """Bytes of dynamic shared memory one block uses for problems of shape ``dims``."""
    dx, dy = dims
    return 8 * _Workspace.size(int(dx), int(dy), int(threads))


def _build_kernels(upper_grad, lower_grad, lower_hvp, upper_value):
    """Compile-on-first-launch kernels closing over one tuple of device callbacks."""
    has_value = upper_value is not None
    value_fn = upper_value if has_value else _no_value

    @cuda.jit(device=True)
    def hess_yy(z, dirv, dx, ldata, q, tid, nthreads):
        """q = H_yy p, with p the y-block of dirv (its x-block is zero).

        q[j] is written by its owner thread, which is the only one to read it next (CG's
        updates and dot products go by owner), so no barrier is needed after the loop; the
        next write to p or z comes after a reduction's barriers.
        """
        cuda.syncthreads()  # z and p complete before anyone reads them
        for j in range(tid, q.shape[0], nthreads):
            q[j] = lower_hvp(dx + j, z, dirv, ldata)

    @cuda.jit(device=True)
    def block_cg(z, dirv, dx, ldata, b, x, warm, rtol, atol, maxiter, r, q, red, parity,
                 tid, nthreads):
        """CG on H_yy x = b (mlocore._kernels.linalg.cg_core without preconditioner).

        ``warm``: start from the x given when it is nonzero (else from 0). The search
        direction p is the y-block of ``dirv``. Returns ``(info, nit, residual_norm)``.
        """
        dy = b.shape[0]
        p = dirv[dx:]
        x_nonzero = False
        if warm:
            x_nonzero = _block_abs_sum(x, red, parity, tid, nthreads) != 0.0
        if x_nonzero:
            for j in range(tid, dy, nthreads):
                p[j] = x[j]
            hess_yy(z, dirv, dx, ldata, q, tid, nthreads)
            for j in range(tid, dy, nthreads):
                r[j] = b[j] - q[j]
        else:
            for j in range(tid, dy, nthreads):
                x[j] = 0.0
                r[j] = b[j]
        bnorm = math.sqrt(_block_dot(b, b, red, parity, tid, nthreads))
        tol = _larger(rtol * bnorm, atol)
        rr = _block_dot(r, r, red, parity, tid, nthreads)
        rnorm = math.sqrt(rr)
        if not _finite(rnorm):
            return INFO_BREAKDOWN, 0, rnorm
        if rnorm <= tol:
            return 0, 0, rnorm
        rz = rr
        for j in range(tid, dy, nthreads):
            p[j] = r[j]
        for k in range(maxiter):
            hess_yy(z, dirv, dx, ldata, q, tid, nthreads)
            pap = _block_dot(p, q, red, parity, tid, nthreads)
            if not _finite(pap):
                return INFO_BREAKDOWN, k, rnorm
            if pap <= 0.0:
                if pap < 0.0:
                    return INFO_NEGATIVE_CURVATURE, k, rnorm
                return INFO_BREAKDOWN, k, rnorm
            alpha = rz / pap
            for j in range(tid, dy, nthreads):
                x[j] += alpha * p[j]
                r[j] -= alpha * q[j]
            rr = _block_dot(r, r, red, parity, tid, nthreads)
            rnorm = math.sqrt(rr)
            if rnorm <= tol:
                return 0, k + 1, rnorm
            if not (rr > 0.0):
                return INFO_BREAKDOWN, k + 1, rnorm
            beta = rr / rz
            for j in range(tid, dy, nthreads):  # p is read by hess_yy after its sync
                p[j] = r[j] + beta * p[j]
            rz = rr
        return _larger(maxiter, 1), maxiter, rnorm

    @cuda.jit(device=True)
    def lower_gradient_norm(z, dx, ldata, out, red, parity, tid, nthreads):
        """out = grad_y g(z) (the y-block of the lower gradient); returns |out|."""
        cuda.syncthreads()  # z complete
        for j in range(tid, out.shape[0], nthreads):
            out[j] = lower_grad(dx + j, z, ldata)
        return math.sqrt(_block_dot(out, out, red, parity, tid, nthreads))

    @cuda.jit(device=True)
    def newton_cg(z, dirv, dx, ldata, tol, maxiter, g, d, r, q, ysave, gtry, red, parity,
                  tid, nthreads):
        """Newton-CG on g(x, .) from the y in z (mlocore._kernels.lower, NEWTON_CG).

        Returns ``(status, nit, grad_norm, info)``, info of the last Newton-step CG.
        """
        dy = g.shape[0]
        y = z[dx:]
        gnorm = lower_gradient_norm(z, dx, ldata, g, red, parity, tid, nthreads)
        if not _finite(gnorm):
            return NONFINITE, 0, gnorm, 0
        tol = _larger(tol, ROUNDOFF_FLOOR * gnorm)
        if gnorm <= tol:
            return OK, 0, gnorm, 0
        info = 0
        budget = 2 * dy + 20  # mlocore._kernels.lower.newton_cg_budget
        for k in range(maxiter):
            forcing = _smaller(0.5, math.sqrt(gnorm))
            for j in range(tid, dy, nthreads):
                gtry[j] = -g[j]  # gtry doubles as the right-hand side -g
            info, _nit, _res = block_cg(z, dirv, dx, ldata, gtry, d, False, forcing, 0.0,
                                        budget, r, q, red, parity, tid, nthreads)
            if info == INFO_NEGATIVE_CURVATURE:
                return INDEFINITE, k, gnorm, info
            if info == INFO_BREAKDOWN:
                if _block_abs_sum(d, red, parity, tid, nthreads) == 0.0:
                    for j in range(tid, dy, nthreads):  # zero curvature along g
                        d[j] = -g[j]
            for j in range(tid, dy, nthreads):
                ysave[j] = y[j]
            t = 1.0
            accepted = False
            gn_try = gnorm
            for _ in range(LINESEARCH_HALVINGS):
                cuda.syncthreads()  # every thread is done reading z (previous gradient)
                for j in range(tid, dy, nthreads):
                    y[j] = ysave[j] + t * d[j]
                gn_try = lower_gradient_norm(z, dx, ldata, gtry, red, parity, tid, nthreads)
                if _finite(gn_try) and gn_try <= (1.0 - 1e-4 * t) * gnorm:
                    accepted = True
                    break
                t *= 0.5
            if not accepted:
                cuda.syncthreads()
                for j in range(tid, dy, nthreads):
                    y[j] = ysave[j]
                cuda.syncthreads()
                # CG stopped at its budget: retry with 4x, up to 20 (dy + 10)
                # (mlocore._kernels.lower.newton_cg_retry_budget)
                if info > 0 and budget < 20 * (dy + 10) and k + 1 < maxiter:
                    budget = _smaller(4 * budget, 20 * (dy + 10))
                    continue
                return LINESEARCH, k, gnorm, info
            for j in range(tid, dy, nthreads):
                g[j] = gtry[j]
            gnorm = gn_try
            if gnorm <= tol:
                return OK, k + 1, gnorm, info
        return LOWER_MAXITER, maxiter, gnorm, info

    @cuda.jit(device=True)
    def hypergrad_block(z, dirv, dx, udata, ldata, solve_lower, lower_tol, lower_maxiter,
                        rtol, atol, maxiter, warm_v, v, hg, fx, b, g, d, r, q, ysave, gtry,
                        red, parity, tid, nthreads):
        """One problem's hypergradient into hg (mlocore._kernels.implicit, CG solver).

        z holds (x, y0) on entry and (x, y) on exit; v the adjoint (warm start when
        ``warm_v``). Returns ``(status, lower_status, lower_nit, lower_gnorm, info, nit,
        residual)``.
        """
        dy = v.shape[0]
        lower_status = OK
        lower_nit = 0
        lower_gnorm = math.nan
        info = 0
        if solve_lower:
            lower_status, lower_nit, lower_gnorm, info = newton_cg(
                z, dirv, dx, ldata, lower_tol, lower_maxiter, g, d, r, q, ysave, gtry, red,
                parity, tid, nthreads)
        if lower_status != OK and lower_status != LOWER_MAXITER:
            for i in range(tid, dx, nthreads):
                hg[i] = 0.0
            cuda.syncthreads()
            return lower_status, lower_status, lower_nit, lower_gnorm, info, 0, math.nan
        cuda.syncthreads()  # z final
        for i in range(tid, dx, nthreads):  # loops by owner: no sync needed before CG
            fx[i] = upper_grad(i, z, udata)
        for j in range(tid, dy, nthreads):
            b[j] = upper_grad(dx + j, z, udata)
        info, nit, residual = block_cg(z, dirv, dx, ldata, b, v, warm_v, rtol, atol, maxiter,
                                       r, q, red, parity, tid, nthreads)
        cuda.syncthreads()  # everyone is done reading dirv
        for j in range(tid, dy, nthreads):
            dirv[dx + j] = v[j]
        cuda.syncthreads()
        for i in range(tid, dx, nthreads):
            hg[i] = fx[i] - lower_hvp(i, z, dirv, ldata)
        status = lower_status
        if info != 0:
            status = LINEAR_FAILED
        if not _finite(_block_abs_sum(hg, red, parity, tid, nthreads)):
            if status == OK or status == LOWER_MAXITER:
                status = NONFINITE_RESULT
            for i in range(tid, dx, nthreads):
                hg[i] = 0.0
        for j in range(tid, dy, nthreads):  # a breakdown on NaN leaves a finite iterate,
            if not _finite(v[j]):           # but keep the NaN-free promise regardless
                v[j] = 0.0
        cuda.syncthreads()
        return status, lower_status, lower_nit, lower_gnorm, info, nit, residual

    @cuda.jit(device=True)
    def carve(sh, dx, dy, nthreads):
        """Views of the block's shared memory (layout of _Workspace.size)."""
        n = dx + dy
        o = 0
        red = sh[o:o + 2 * nthreads]
        o += 2 * nthreads
        z = sh[o:o + n]
        o += n
        dirv = sh[o:o + n]
        o += n
        g = sh[o:o + dy]
        o += dy
        d = sh[o:o + dy]
        o += dy
        r = sh[o:o + dy]
        o += dy
        q = sh[o:o + dy]
        o += dy
        ysave = sh[o:o + dy]
        o += dy
        gtry = sh[o:o + dy]
        o += dy
        b = sh[o:o + dy]
        o += dy
        v = sh[o:o + dy]
        o += dy
        fx = sh[o:o + dx]
        o += dx
        hg = sh[o:o + dx]
        return red, z, dirv, g, d, r, q, ysave, gtry, b, v, fx, hg

    @cuda.jit(device=True)
    def load_problem(x, y0, v0, use_v0, pb, z, dirv, v, dx, dy, tid, nthreads):
        """z = (x[pb], y0[pb]), dirv's x-block = 0, v = v0[pb] or 0."""
        for i in range(tid, dx, nthreads):
            z[i] = x[pb, i]
            dirv[i] = 0.0
        for j in range(tid, dy, nthreads):
            z[dx + j] = y0[pb, j]
            v[j] = v0[pb, j] if use_v0 else 0.0
        cuda.syncthreads()

    @cuda.jit(device=True)
    def store_common(pb, z, v, dx, dy, udata, out_y, out_v, out_f, out_i, tid, nthreads,
                     lgnorm, residual, status, lstatus, info, nit, lower_nit, cg_nit):
        """y, v and (thread 0) f(x, y) and the statistics of problem pb to global memory."""
        for j in range(tid, dy, nthreads):
            out_y[pb, j] = z[dx + j]
            out_v[pb, j] = v[j]
        if tid == 0:
            out_f[pb, _F_FUN] = value_fn(z, udata) if has_value else math.nan
            out_f[pb, _F_LOWER_GNORM] = lgnorm
            out_f[pb, _F_RESIDUAL] = residual
            out_i[pb, _I_STATUS] = status
            out_i[pb, _I_LOWER_STATUS] = lstatus
            out_i[pb, _I_INFO] = info
            out_i[pb, _I_NIT] = nit
            out_i[pb, _I_LOWER_NIT] = lower_nit
            out_i[pb, _I_CG_NIT] = cg_nit

    @cuda.jit
    def hypergrad_kernel(x, y0, v0, use_v0, udata_all, ldata_all, solve_lower, lower_tol,
                         lower_maxiter, rtol, atol, maxiter, out_grad, out_y, out_v, out_f,
                         out_i):
        sh = cuda.shared.array(0, float64)
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        pb = cuda.blockIdx.x
        dx = x.shape[1]
        dy = y0.shape[1]
        red, z, dirv, g, d, r, q, ysave, gtry, b, v, fx, hg = carve(sh, dx, dy, nthreads)
        parity = cuda.local.array(1, int64)  # reduction buffer in use (see _block_sum)
        parity[0] = 0
        if pb < x.shape[0]:  # uniform over the block (the grid is exactly n_problems)
            udata = udata_all[pb]
            ldata = ldata_all[pb]
            load_problem(x, y0, v0, use_v0, pb, z, dirv, v, dx, dy, tid, nthreads)
            status, lstatus, lnit, lgnorm, info, nit, residual = hypergrad_block(
                z, dirv, dx, udata, ldata, solve_lower, lower_tol, lower_maxiter, rtol, atol,
                maxiter, use_v0, v, hg, fx, b, g, d, r, q, ysave, gtry, red, parity, tid, nthreads)
            for i in range(tid, dx, nthreads):
                out_grad[pb, i] = hg[i]
            store_common(pb, z, v, dx, dy, udata, out_y, out_v, out_f, out_i, tid, nthreads,
                         lgnorm, residual, status, lstatus, info, nit, lnit, nit)

    @cuda.jit
    def minimize_kernel(x0, y0, v0, use_v0, udata_all, ldata_all, step, maxiter, gtol,
                        lower_tol, lower_maxiter, rtol, atol, cg_maxiter, out_x, out_grad,
                        out_y, out_v, out_f, out_i):
        sh = cuda.shared.array(0, float64)
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        pb = cuda.blockIdx.x
        dx = x0.shape[1]
        dy = y0.shape[1]
        red, z, dirv, g, d, r, q, ysave, gtry, b, v, fx, hg = carve(sh, dx, dy, nthreads)
        parity = cuda.local.array(1, int64)  # reduction buffer in use (see _block_sum)
        parity[0] = 0
        if pb < x0.shape[0]:  # uniform over the block
            udata = udata_all[pb]
            ldata = ldata_all[pb]
            load_problem(x0, y0, v0, use_v0, pb, z, dirv, v, dx, dy, tid, nthreads)
            status = MAXITER
            lstatus = OK
            info = 0
            lgnorm = math.nan
            residual = math.nan
            total_cg = 0
            total_lower = 0
            warm_v = use_v0
            it = 0
            gnorm = math.nan
            while True:
                hstatus, lstatus, lnit, lgnorm, info, nit, residual = hypergrad_block(
                    z, dirv, dx, udata, ldata, True, lower_tol, lower_maxiter, rtol, atol,
                    cg_maxiter, warm_v, v, hg, fx, b, g, d, r, q, ysave, gtry, red, parity,
                    tid, nthreads)
                warm_v = True  # later calls start CG from the previous v (and y)
                total_cg += nit
                total_lower += lnit
                if hstatus != OK:
                    status = hstatus
                    break
                gnorm = math.sqrt(_block_dot(hg, hg, red, parity, tid, nthreads))
                if gnorm <= gtol:
                    status = OK
                    break
                if it >= maxiter:
                    status = MAXITER
                    break
                for i in range(tid, dx, nthreads):  # hg and z[:dx] have the same owner
                    z[i] -= step * hg[i]
                it += 1
            for i in range(tid, dx, nthreads):
                out_x[pb, i] = z[i]
                out_grad[pb, i] = hg[i]
            store_common(pb, z, v, dx, dy, udata, out_y, out_v, out_f, out_i, tid, nthreads,
                         lgnorm, residual, status, lstatus, info, it, total_lower, total_cg)

    return hypergrad_kernel, minimize_kernel


# ---------------------------------------------------------------------------------------
# Python side: problem, validation, launch, results.
# ---------------------------------------------------------------------------------------
def _is_device_function(fn) -> bool:
    """A ``numba.cuda.jit(device=True)`` dispatcher (real or simulated)."""
    if getattr(fn, "_mlocore_device", False):
        return True
    targetoptions = getattr(fn, "targetoptions", None)
    if isinstance(targetoptions, dict) and targetoptions.get("device"):
        return True
    return bool(getattr(fn, "_device", False))  # the simulator's FakeCUDAKernel


class BatchedBilevelProblem:
    """``n_problems`` bilevel problems of one shape, for :func:`batched_hypergrad`.

    Parameters
    ----------
    upper_grad : device function ``(i, z, data) -> float64``
        Component i of grad f over ``z = concat(x, y)`` (module docstring, "Callback
        convention").
    lower_grad : device function ``(i, z, data) -> float64``
        Component i of grad g over z (only the y-block, ``i >= dx``, is ever asked for).
    lower_hvp : device function ``(i, z, v, data) -> float64``
        Component i of ``H_g(z) v`` (asked with ``v = (0, p)``).
    dims : (int, int)
        ``(dx, dy)``, the same for every problem of a batch.
    upper_hvp : device function, optional
        Accepted for symmetry with the CPU API; not used by the hypergradient (only
        ``grad f`` enters it).
    upper_value : device function ``(z, data) -> float64``, optional
        Reported as ``fun``.

    Notes
    -----
    Assumes every problem's lower objective g(x, .) is strongly convex near the iterates
    (docs/mathematics.md section 1): negative curvature is detected and reported (status 3 or
    info -2), never divided by.
    """

    def __init__(self, upper_grad, lower_grad, lower_hvp, dims, upper_hvp=None,
                 upper_value=None):
        for name, fn, required in (("upper_grad", upper_grad, True),
                                   ("lower_grad", lower_grad, True),
                                   ("lower_hvp", lower_hvp, True),
                                   ("upper_hvp", upper_hvp, False),
                                   ("upper_value", upper_value, False)):
            if fn is None and not required:
                continue
            if not _is_device_function(fn):
                raise TypeError(
                    f"BatchedBilevelProblem: {name} must be a numba.cuda.jit(device=True) "
                    f"function, got {fn!r} ({type(fn).__name__}); CPU @njit functions cannot "
                    "be called from CUDA kernels")
        self.upper_grad, self.lower_grad, self.lower_hvp = upper_grad, lower_grad, lower_hvp
        self.upper_hvp, self.upper_value = upper_hvp, upper_value
        self.dx, self.dy = parse_bilevel_dims(dims)

    @property
    def dims(self):
        return (self.dx, self.dy)

    def __repr__(self):
        names = ", ".join(getattr(f, "__name__", repr(f)) for f in
                          (self.upper_grad, self.lower_grad, self.lower_hvp))
        return f"BatchedBilevelProblem({names}, dims=({self.dx}, {self.dy}))"


_KERNELS: dict = {}


def _kernels_for(problem):
    """(hypergrad_kernel, minimize_kernel) for the problem's callbacks (cached)."""
    key = (problem.upper_grad, problem.lower_grad, problem.lower_hvp, problem.upper_value)
    kernels = _KERNELS.get(key)
    if kernels is None:
        kernels = _KERNELS[key] = _build_kernels(*key)
    return kernels


def _default_threads(dx, dy):
    """Smallest power of two >= max(dx, dy), clamped to [32, 256] (one warp at least)."""
    need = max(dx, dy, 32)
    return min(256, 1 << (need - 1).bit_length())


def _check_threads(threads, dims):
    dx, dy = dims
    if threads is None:
        threads = _default_threads(dx, dy)
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) \
            or threads < 1 or threads > MAX_THREADS or threads & (threads - 1):
        raise ValueError(f"threads must be a power of two between 1 and {MAX_THREADS} (the "
                         f"block reductions need it), got {threads!r}")
    nbytes = batched_shared_bytes(dims, threads)
    if nbytes > SHARED_LIMIT_BYTES:
        raise ValueError(
            f"problems of shape (dx, dy) = ({dx}, {dy}) with {threads} threads per block need "
            f"{nbytes} bytes of shared memory per block, more than the {SHARED_LIMIT_BYTES} "
            "available without an opt-in; the batched mode is for small problems (use fewer "
            "threads, or the one-large-problem CUDA mode)")
    return int(threads)


def _n_rows(name, a):
    shape = tuple(a.shape) if (is_device_array(a) or hasattr(a, "shape")) \
        else np.shape(np.asarray(a))
    if len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D array (one row per problem), got shape "
                         f"{shape}")
    return shape


def _check_problem(where, problem):
    if not isinstance(problem, BatchedBilevelProblem):
        raise TypeError(f"{where}: problem must be a BatchedBilevelProblem (device-function "
                        f"callbacks), got {type(problem).__name__}")
    return problem.dims


def _batch_inputs(where, problem, x, y0, upper_data, lower_data, v0, counter):
    """Validated device copies (or device originals) of the inputs of one launch."""
    dx, dy = problem.dims
    n_problems = _n_rows("x", x)[0]
    if n_problems < 1:
        raise ValueError(f"{where}: x must hold at least one problem (one row per problem), "
                         f"got shape {_n_rows('x', x)}")
    shapes = {"x": (n_problems, dx), "y0": (n_problems, dy)}
    for name, a in (("upper_data", upper_data), ("lower_data", lower_data)):
        rows, cols = _n_rows(name, a)
        if rows != n_problems or cols < 1:
            raise ValueError(f"{name} must have shape ({n_problems}, n_data >= 1): one row of "
                             f"parameters per problem (x has {n_problems} rows), got shape "
                             f"{(rows, cols)}")
        shapes[name] = (rows, cols)
    d_x = to_device("x", x, counter, shapes["x"])
    d_y0 = to_device("y0", y0, counter, shapes["y0"])
    d_up = to_device("upper_data", upper_data, counter, shapes["upper_data"])
    d_lo = to_device("lower_data", lower_data, counter, shapes["lower_data"])
    if v0 is None:
        d_v0, use_v0 = d_y0, False  # a placeholder of the right type, never read
    else:
        d_v0, use_v0 = to_device("v0", v0, counter, (n_problems, dy)), True
    return n_problems, d_x, d_y0, d_up, d_lo, d_v0, use_v0


def _solver_options(dy, tol, atol, maxiter, lower_tol, lower_maxiter):
    tol = check_positive("tol", tol, allow_zero=True)
    atol = check_positive("atol", atol, allow_zero=True)
    maxiter = 10 * dy if maxiter is None else check_int("maxiter", maxiter)
    lower_tol = min(tol, 1e-10) if lower_tol is None else check_positive("lower_tol", lower_tol, allow_zero=True)
    lower_maxiter = check_int("lower_maxiter", lower_maxiter)
    return tol, atol, maxiter, lower_tol, lower_maxiter


def _failure_summary(status, info, n_done_label="converged"):
    """One message for the whole batch: how many succeeded, which failed and why."""
    n = status.shape[0]
    failed = np.flatnonzero(status != OK)
    if failed.size == 0:
        return f"All {n} problems {n_done_label}."
    parts = []
    for code in np.unique(status[failed]):
        which = np.flatnonzero(status == code)
        msg = STATUS_MESSAGES.get(int(code), f"Unknown status {code}.")
        shown = ", ".join(str(int(i)) for i in which[:20]) + (", ..." if which.size > 20 else "")
        detail = ""
        codes = np.unique(info[which])
        if np.any(codes != 0):
            detail = " CG: " + "; ".join(
                f"{linear_info_message(int(c))} (problems "
                f"{', '.join(str(int(i)) for i in which[info[which] == c][:20])})"
                for c in codes if c != 0) + "."
        parts.append(f"status {int(code)} for problem{'s' if which.size > 1 else ''} "
                     f"[{shown}]: {msg}{detail}")
    return (f"{n - failed.size} of {n} problems {n_done_label}; {failed.size} did not "
            "(success False). " + " ".join(parts))


def _launch(kernel, n_problems, threads, dims, args):
    nbytes = batched_shared_bytes(dims, threads)
    kernel[n_problems, threads, 0, nbytes](*args)
    cuda.synchronize()


def _stats_to_result(out, d_f, d_i, counter, status_ok_label):
    stats_f = to_host(d_f, counter)
    stats_i = to_host(d_i, counter)
    status = stats_i[:, _I_STATUS].copy()
    info = stats_i[:, _I_INFO].copy()
    out.update(
        fun=stats_f[:, _F_FUN].copy(),
        success=status == OK,
        status=status,
        info=info,
        lower_status=stats_i[:, _I_LOWER_STATUS].copy(),
        nit=stats_i[:, _I_NIT].copy(),
        lower_nit=stats_i[:, _I_LOWER_NIT].copy(),
        cg_nit=stats_i[:, _I_CG_NIT].copy(),
        lower_grad_norm=stats_f[:, _F_LOWER_GNORM].copy(),
        lin_residual=stats_f[:, _F_RESIDUAL].copy(),
        message=_failure_summary(status, info, status_ok_label),
    )
    return out


def batched_hypergrad(problem, x, y0, upper_data, lower_data, *, tol=1e-10, atol=0.0,
                      maxiter=None, v0=None, lower_solved=False, lower_tol=None,
                      lower_maxiter=1000, threads=None, output="numpy"):
    """Hypergradients of ``n_problems`` bilevel problems in one kernel launch.

    Block b: Newton-CG on ``g_b(x_b, .)`` from ``y0_b``, then CG on ``H_yy v = grad_y f_b``,
    then ``grad_b = grad_x f_b - H_xy v`` (docs/mathematics.md section 1; the algorithms and
    stopping rules of the CPU ``mlocore.hypergrad(method="cg")``, see the module docstring).

    Parameters
    ----------
    problem : BatchedBilevelProblem
    x : array, shape (n_problems, dx)
        Upper variables, one row per problem (NumPy, or a device array used in place).
    y0 : array, shape (n_problems, dy)
        Warm starts of the lower solves (the solutions themselves with ``lower_solved``).
    upper_data, lower_data : array, shape (n_problems, n_data_upper / n_data_lower)
        Per-problem parameters handed (row b) to the upper / lower callbacks.
    tol, atol : float
        CG stops when ``|grad_y f - H_yy v| <= max(tol |grad_y f|, atol)``.
    maxiter : int, optional
        CG iterations (default ``10 dy``, as the CPU).
    v0 : array, shape (n_problems, dy), optional
        Warm starts of the adjoints.
    lower_solved : bool
        y0 already holds the lower solutions: skip the lower solve.
    lower_tol, lower_maxiter
        Newton-CG stops at ``|grad_y g| <= max(lower_tol, 1e-13 |grad_y g(x, y0)|)``
        (default ``min(tol, 1e-10)``) or after lower_maxiter Newton steps.
    threads : int, optional
        Threads per block, a power of two, at most 256 (:data:`MAX_THREADS`; default:
        max(dx, dy) rounded up, in [32, 256]).
    output : "numpy" or "device"
        Where ``grad``, ``y``, ``v`` are returned. The per-problem statistics (status, ...)
        always come back to the host (they make ``message``).

    Returns
    -------
    scipy.optimize.OptimizeResult
        Per-problem arrays ``grad`` (n_problems, dx), ``y``, ``v`` (n_problems, dy),
        ``fun``, ``success`` (bool), ``status``, ``info`` (the adjoint CG's info code; when
        the lower solve failed, the last Newton-step CG's: -2 with status 3),
        ``lower_status``, ``nit`` (adjoint CG iterations), ``lower_nit`` (Newton steps),
        ``lower_grad_norm``, ``lin_residual``; and ``message`` (which problems failed and
        why), ``transfers`` (host <-> device copies: each host input once, each output
        once), ``n_problems``, ``threads``.

    Raises
    ------
    TypeError, ValueError
        Bad problem, shapes, dtypes, non-finite host inputs or options (the message says
        what was received and what was expected).
    mlocore.cuda.CudaUnavailableError
        No GPU and no simulator.

    Notes
    -----
    Input arrays are never modified (device inputs are only read). Non-finite values in
    device inputs cannot be checked without a copy: they surface as flagged problems.
    """
    require_cuda("batched_hypergrad")
    dx, dy = _check_problem("batched_hypergrad", problem)
    tol, atol, maxiter, lower_tol, lower_maxiter = _solver_options(
        dy, tol, atol, maxiter, lower_tol, lower_maxiter)
    output = dl.check_output(output, "cuda")
    if not isinstance(lower_solved, (bool, np.bool_)):
        raise TypeError(f"lower_solved must be a bool, got {lower_solved!r}")
    counter = Transfers()
    n_problems, d_x, d_y0, d_up, d_lo, d_v0, use_v0 = _batch_inputs(
        "batched_hypergrad", problem, x, y0, upper_data, lower_data, v0, counter)
    threads = _check_threads(threads, problem.dims)
    d_grad = cuda.device_array((n_problems, dx), dtype=np.float64)
    d_y = cuda.device_array((n_problems, dy), dtype=np.float64)
    d_v = cuda.device_array((n_problems, dy), dtype=np.float64)
    d_f = cuda.device_array((n_problems, _N_FLOAT), dtype=np.float64)
    d_i = cuda.device_array((n_problems, _N_INT), dtype=np.int64)
    kernel = _kernels_for(problem)[0]
    _launch(kernel, n_problems, threads, problem.dims,
            (d_x, d_y0, d_v0, use_v0, d_up, d_lo, not lower_solved, lower_tol, lower_maxiter,
             tol, atol, maxiter, d_grad, d_y, d_v, d_f, d_i))
    out = OptimizeResult(n_problems=n_problems, threads=threads)
    if output == "numpy":
        out.update(grad=to_host(d_grad, counter), y=to_host(d_y, counter),
                   v=to_host(d_v, counter))
    else:
        out.update(grad=d_grad, y=d_y, v=d_v)
    _stats_to_result(out, d_f, d_i, counter, "converged")
    out.transfers = counter.as_dict()
    return out


def batched_minimize(problem, x0, y0, upper_data, lower_data, *, step, maxiter=100,
                     gtol=1e-6, tol=1e-10, atol=0.0, cg_maxiter=None, v0=None,
                     lower_tol=None, lower_maxiter=1000, threads=None, output="numpy"):
    """Gradient descent on x for ``n_problems`` bilevel problems, all in one launch.

    Per block: ``x_{k+1} = x_k - step * grad F(x_k)`` with the hypergradient of
    :func:`batched_hypergrad` (Newton-CG lower solve warm-started from the previous y, CG
    adjoint warm-started from the previous v), until ``|grad F(x_k)| <= gtol`` or maxiter
    steps. No projection (unconstrained x). With ``0 < step < 2 / L_F`` (L_F the Lipschitz
    constant of grad F) F decreases monotonically (docs/mathematics.md section 3, Theorem 4.1 with
    n = 2); the step is the caller's: nothing here estimates L_F.

    Parameters
    ----------
    problem, y0, upper_data, lower_data, threads, output, lower_tol, lower_maxiter, v0
        As :func:`batched_hypergrad`.
    x0 : array, shape (n_problems, dx)
        Starting points.
    step : float
        The upper step size (> 0), the same for every problem.
    maxiter : int
        Upper iterations per problem.
    gtol : float
        Stop a problem when ``|grad F| <= gtol``.
    tol, atol, cg_maxiter
        The adjoint CG of every hypergradient (``cg_maxiter`` default ``10 dy``).

    Returns
    -------
    scipy.optimize.OptimizeResult
        Per-problem ``x``, ``jac`` (= ``grad``, the hypergradient at x), ``y``, ``v``,
        ``fun`` (f(x, y) with an upper_value), ``success`` (``|grad F| <= gtol`` reached),
        ``status`` (0; 10 maxiter; 1-6 a failed hypergradient, which stops that problem at
        the x where it failed), ``info``, ``nit`` (upper steps), ``lower_nit`` and
        ``cg_nit`` (totals over the run), ``message``, ``transfers``.
    """
    require_cuda("batched_minimize")
    dx, dy = _check_problem("batched_minimize", problem)
    tol, atol, cg_maxiter, lower_tol, lower_maxiter = _solver_options(
        dy, tol, atol, cg_maxiter, lower_tol, lower_maxiter)
    step = check_positive("step", step)
    maxiter = check_int("maxiter", maxiter)
    gtol = check_positive("gtol", gtol, allow_zero=True)
    output = dl.check_output(output, "cuda")
    counter = Transfers()
    n_problems, d_x0, d_y0, d_up, d_lo, d_v0, use_v0 = _batch_inputs(
        "batched_minimize", problem, x0, y0, upper_data, lower_data, v0, counter)
    threads = _check_threads(threads, problem.dims)
    d_x = cuda.device_array((n_problems, dx), dtype=np.float64)
    d_grad = cuda.device_array((n_problems, dx), dtype=np.float64)
    d_y = cuda.device_array((n_problems, dy), dtype=np.float64)
    d_v = cuda.device_array((n_problems, dy), dtype=np.float64)
    d_f = cuda.device_array((n_problems, _N_FLOAT), dtype=np.float64)
    d_i = cuda.device_array((n_problems, _N_INT), dtype=np.int64)
    kernel = _kernels_for(problem)[1]
    _launch(kernel, n_problems, threads, problem.dims,
            (d_x0, d_y0, d_v0, use_v0, d_up, d_lo, step, maxiter, gtol, lower_tol,
             lower_maxiter, tol, atol, cg_maxiter, d_x, d_grad, d_y, d_v, d_f, d_i))
    out = OptimizeResult(n_problems=n_problems, threads=threads)
    if output == "numpy":
        out.update(x=to_host(d_x, counter), grad=to_host(d_grad, counter),
                   y=to_host(d_y, counter), v=to_host(d_v, counter))
    else:
        out.update(x=d_x, grad=d_grad, y=d_y, v=d_v)
    out.jac = out.grad
    _stats_to_result(out, d_f, d_i, counter, "reached |grad F| <= gtol")
    out.transfers = counter.as_dict()
    return out
