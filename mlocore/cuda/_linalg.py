"""Device vector kernels and matrix-free linear solvers of the CUDA backend ("one large
problem" mode: every vector stays on the device for the whole solve).

What runs where
---------------
* Vector updates are fused per solver step (``x += alpha p; r -= alpha q`` and the partial
  sums of ``r . r`` in one launch), with grid-stride loops so that any grid covers any size.
* Reductions (dot products, sums of absolute values) are a block reduction in shared memory
  (one partial sum per block) plus, when the grid has more than one block, a second one-block
  pass that sums the partials. Results land in a small device array of *scalars*; the host
  reads that array back once per iteration for the convergence test, and every read is
  counted as a device -> host transfer (:class:`mlocore.cuda._device.Transfers`).
* Operators are device callbacks ``matvec(p, out, *args)`` that write ``A p`` into the device
  array ``out`` (launching kernels of their own), or a dense matrix on the device.

The solvers reproduce the CPU kernels of :mod:`mlocore._kernels.linalg` step for step: the same
stopping rule ``|b - A x| <= max(rtol |b|, atol)``, the same info codes (0 converged, ``> 0``
maxiter reached, -1 breakdown, -2 negative curvature, -3 Neumann divergence), the same iterate
sequence (docs/mathematics.md section 1: CG returning x_{i+1}; the Neumann series as
Richardson iteration). Only the order of summation inside dot products differs (a tree
instead of BLAS), so iterates agree to rounding, not bit for bit.

Kernels take float64 arrays only and never allocate, raise or call CPU code: they are valid
for a real GPU, not just for numba's simulator.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float64
from scipy.optimize import OptimizeResult

from .._callbacks import CallbackError
from .._config import LIPSCHITZ_SAFETY, POWER_ITERS
from .._kernels.linalg import INFO_BREAKDOWN, INFO_DIVERGED, INFO_NEGATIVE_CURVATURE
from .._results import linear_info_message
from .._validation import check_int, check_positive
from ._device import Transfers, is_device_array, simulator_enabled, to_device, to_host

__all__ = ["THREADS_PER_BLOCK", "MAX_BLOCKS", "grid_for", "DeviceOperator", "Scalars",
           "copy", "fill", "axpy_into", "scale_into", "difference_quotient",
           "start_vector", "empty", "zeros", "cg_device", "neumann_device",
           "power_iteration_device", "cg", "neumann"]

#: Threads per block of every kernel; the shared-memory reduction buffers have this size, so
#: it is a compile-time constant (a power of two). The simulator runs one Python thread per
#: simulated thread and its ``syncthreads`` costs milliseconds: it gets small blocks.
THREADS_PER_BLOCK = 4 if simulator_enabled() else 256
#: Most blocks of one launch (grid-stride loops cover larger arrays). Read at every launch:
#: tests patch it to exercise the second reduction pass under the simulator.
MAX_BLOCKS = 1 if simulator_enabled() else 1024

# slots of the scalars array (one device array per solve, read back as a whole)
S_BB = 0          #: b . b
S_RR = 1          #: r . r (after the step)
S_PAP = 2         #: p . A p
S_X0ABS = 3       #: sum |x0| (is the warm start zero?)
S_VW = 4          #: power iteration: v . A v
S_WW = 5          #: power iteration: |A v|^2
S_LAM = 6         #: power iteration: the committed eigenvalue estimate
S_STOP = 7        #: power iteration: 1 once |A v| was zero or not finite
S_AUX = 8         #: free slot for callers (norms of the lower solvers, finiteness checks)
S_AUX2 = 9
N_SCALARS = 10

_TPB = THREADS_PER_BLOCK
_DOT = 0
_ABS_SUM = 1
_SUM = 2


def grid_for(n: int) -> int:
    """Blocks of a launch over n entries: enough for one entry per thread, at most
    :data:`MAX_BLOCKS` (grid-stride loops do the rest)."""
    return max(1, min((int(n) + _TPB - 1) // _TPB, int(MAX_BLOCKS)))


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------
@cuda.jit(device=True)
def _block_sum_store(acc, out, index):
    """Sum ``acc`` over the threads of the block (shared-memory tree); thread 0 stores it in
    ``out[index]``. Every thread of the block must call it (it synchronizes)."""
    buf = cuda.shared.array(_TPB, float64)
    t = cuda.threadIdx.x
    buf[t] = acc
    cuda.syncthreads()
    half = _TPB // 2
    while half > 0:
        if t < half:
            buf[t] += buf[t + half]
        cuda.syncthreads()
        half //= 2
    if t == 0:
        out[index] = buf[0]


@cuda.jit
def _reduce_kernel(a, b, kind, out, offset):
    """Per-block partial of ``a . b`` (kind 0), ``sum |a|`` (kind 1) or ``sum a`` (kind 2)
    into ``out[offset + blockIdx]``."""
    acc = 0.0
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    if kind == _DOT:
        for i in range(start, a.shape[0], stride):
            acc += a[i] * b[i]
    elif kind == _ABS_SUM:
        for i in range(start, a.shape[0], stride):
            acc += abs(a[i])
    else:
        for i in range(start, a.shape[0], stride):
            acc += a[i]
    _block_sum_store(acc, out, offset + cuda.blockIdx.x)


@cuda.jit
def _sum_partials_kernel(partials, n_partials, out, index):
    """Second pass (one block): ``out[index] = sum(partials[:n_partials])``."""
    acc = 0.0
    for i in range(cuda.threadIdx.x, n_partials, cuda.blockDim.x):
        acc += partials[i]
    _block_sum_store(acc, out, index)


@cuda.jit
def _step_kernel(x, r, p, q, alpha, divide_by_curvature, scalars, out, offset):
    """Fused solver step: ``x += a p; r -= a q`` and the block partials of ``r . r``.

    ``a = alpha`` (Neumann/Richardson), or with ``divide_by_curvature`` the CG step
    ``a = alpha / scalars[S_PAP]`` (alpha = r.z) when the curvature p.Ap is finite and > 0,
    else ``a = 0``: x and r are then left unchanged, as the CPU kernel returns x before the
    update on breakdown or negative curvature.
    """
    a = alpha
    if divide_by_curvature:
        pap = scalars[S_PAP]
        if pap > 0.0 and not math.isinf(pap):
            a = alpha / pap
        else:
            a = 0.0
    acc = 0.0
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, x.shape[0], stride):
        x[i] += a * p[i]
        ri = r[i] - a * q[i]
        r[i] = ri
        acc += ri * ri
    _block_sum_store(acc, out, offset + cuda.blockIdx.x)


@cuda.jit
def _direction_kernel(p, r, beta):
    """CG direction ``p = r + beta p``."""
    for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        p[i] = r[i] + beta * p[i]


@cuda.jit
def _axpy_into_kernel(out, a, alpha, b):
    """``out = a + alpha b`` (out may alias a or b)."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = a[i] + alpha * b[i]


@cuda.jit
def _difference_quotient_kernel(out, a, b, denom):
    """``out = (a - b) / denom`` (central differences)."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = (a[i] - b[i]) / denom


@cuda.jit
def _scale_into_kernel(out, alpha, a):
    """``out = alpha a``."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = alpha * a[i]


@cuda.jit
def _copy_kernel(src, dst):
    for i in range(cuda.grid(1), dst.shape[0], cuda.gridsize(1)):
        dst[i] = src[i]


@cuda.jit
def _fill_kernel(a, value):
    for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        a[i] = value


@cuda.jit
def _dense_matvec_kernel(A, p, out):
    """``out = A p`` for a dense row-major A, one row per thread."""
    n = A.shape[1]
    for i in range(cuda.grid(1), A.shape[0], cuda.gridsize(1)):
        s = 0.0
        for j in range(n):
            s += A[i, j] * p[j]
        out[i] = s


@cuda.jit
def _power_start_kernel(v):
    """The CPU power iteration's deterministic low-discrepancy start vector (unnormalized)."""
    for i in range(cuda.grid(1), v.shape[0], cuda.gridsize(1)):
        t = i * 0.6180339887498949 + 0.3183098861837907
        v[i] = t - math.floor(t) - 0.5 + 1e-3


@cuda.jit
def _scale_inv_sqrt_kernel(v, src, scalars, slot):
    """``v = src / sqrt(scalars[slot])`` unless the power iteration has stopped."""
    if scalars[S_STOP] != 0.0:
        return
    norm = math.sqrt(scalars[slot])
    for i in range(cuda.grid(1), v.shape[0], cuda.gridsize(1)):
        v[i] = src[i] / norm


@cuda.jit
def _power_commit_kernel(scalars):
    """One thread: ``lam = v.Av`` unless stopped; stop once ``|Av|`` is zero or not finite
    (the CPU power iteration's early return)."""
    if cuda.grid(1) != 0 or scalars[S_STOP] != 0.0:
        return
    scalars[S_LAM] = scalars[S_VW]
    ww = scalars[S_WW]
    if ww == 0.0 or math.isnan(ww) or math.isinf(ww):
        scalars[S_STOP] = 1.0


# ---------------------------------------------------------------------------------------
# Host-side launch helpers (the only way the rest of the backend touches vectors)
# ---------------------------------------------------------------------------------------
def _launch_1d(kernel, n, *args):
    kernel[grid_for(n), _TPB](*args)


def copy(src, dst):
    """``dst[:] = src`` on the device."""
    _launch_1d(_copy_kernel, dst.shape[0], src, dst)


def fill(a, value):
    """``a[:] = value`` on the device."""
    _launch_1d(_fill_kernel, a.shape[0], a, float(value))


def axpy_into(out, a, alpha, b):
    """``out = a + alpha b`` on the device (out may alias a or b)."""
    _launch_1d(_axpy_into_kernel, out.shape[0], out, a, float(alpha), b)


def scale_into(out, alpha, a):
    """``out = alpha a`` on the device."""
    _launch_1d(_scale_into_kernel, out.shape[0], out, float(alpha), a)


def difference_quotient(out, a, b, denom):
    """``out = (a - b) / denom`` on the device."""
    _launch_1d(_difference_quotient_kernel, out.shape[0], out, a, b, float(denom))


def start_vector(n):
    """The power iteration's deterministic start vector (unnormalized, no zero entry
    pattern), made on the device."""
    v = empty(n)
    _launch_1d(_power_start_kernel, n, v)
    return v


def empty(n):
    """An uninitialized float64 device vector (an allocation, not a transfer)."""
    return cuda.device_array(int(n), dtype=np.float64)


def zeros(n):
    out = empty(n)
    fill(out, 0.0)
    return out


class Scalars:
    """The small device array the reductions write into, and its counted read-back.

    ``partials`` holds one partial sum per block for the second reduction pass.
    """

    def __init__(self, counter: Transfers):
        self.device = zeros(N_SCALARS)
        self.partials = empty(max(int(MAX_BLOCKS), 1))
        self.counter = counter

    def _finish(self, blocks, slot):
        if blocks > 1:
            _sum_partials_kernel[1, _TPB](self.partials, blocks, self.device, slot)

    def _target(self, blocks, slot):
        if self.partials.shape[0] < blocks:  # MAX_BLOCKS was raised after construction
            self.partials = empty(blocks)
        return (self.partials, 0) if blocks > 1 else (self.device, slot)

    def _reduce(self, a, b, kind, slot):
        blocks = grid_for(a.shape[0])
        out, offset = self._target(blocks, slot)
        _reduce_kernel[blocks, _TPB](a, b, kind, out, offset)
        self._finish(blocks, slot)

    def dot(self, a, b, slot):
        """``scalars[slot] = a . b`` (on the device)."""
        self._reduce(a, b, _DOT, slot)

    def abs_sum(self, a, slot):
        """``scalars[slot] = sum |a|`` (on the device)."""
        self._reduce(a, a, _ABS_SUM, slot)

    def sum(self, a, slot):
        """``scalars[slot] = sum a`` (on the device)."""
        self._reduce(a, a, _SUM, slot)

    def step(self, x, r, p, q, alpha, divide_by_curvature=False):
        """Fused ``x += a p; r -= a q`` and ``scalars[S_RR] = r . r`` (see _step_kernel)."""
        blocks = grid_for(x.shape[0])
        out, offset = self._target(blocks, S_RR)
        _step_kernel[blocks, _TPB](x, r, p, q, float(alpha), bool(divide_by_curvature),
                                   self.device, out, offset)
        self._finish(blocks, S_RR)

    def read(self) -> np.ndarray:
        """All scalars on the host (one counted device -> host copy)."""
        return to_host(self.device, self.counter)


# ---------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------
def dense_matvec(p, out, A):
    """Device callback ``out = A p`` for a dense device matrix A."""
    _launch_1d(_dense_matvec_kernel, A.shape[0], A, p, out)


class DeviceOperator:
    """A square linear operator on device vectors: ``apply(p, out)`` writes ``A p`` in out.

    Parameters
    ----------
    matvec : callable
        ``matvec(p, out, *args)``, a device callback (launches kernels, returns nothing).
    n : int
        The size.
    args : tuple
        Passed after ``(p, out)``.
    name : str
        Named in errors raised by the callback.
    """

    def __init__(self, matvec, n, args=(), name="matvec"):
        self.matvec, self.n, self.args, self.name = matvec, int(n), tuple(args), name
        self.n_matvec = 0

    def apply(self, p, out):
        self.n_matvec += 1
        try:
            self.matvec(p, out, *self.args)
        except Exception as exc:
            raise CallbackError(f"callback {self.name} raised {type(exc).__name__}: {exc}") \
                from exc


def as_operator(matvec, n, args=()):
    """``matvec`` itself when it is a :class:`DeviceOperator` (or has its ``apply`` /
    ``n_matvec``), else a DeviceOperator around the callback ``matvec(p, out, *args)``."""
    if hasattr(matvec, "apply") and hasattr(matvec, "n_matvec"):
        return matvec
    return DeviceOperator(matvec, n, args)


# ---------------------------------------------------------------------------------------
# Solvers on device vectors (no validation: callers pass float64 device vectors of size n)
# ---------------------------------------------------------------------------------------
def _initial_residual(op, b, x0, scalars):
    """``(x, r, bnorm, rr)``: x a copy of x0 (zeros when None), ``r = b - A x`` (a copy of
    b when x0 is zero, as the CPU kernels: no product). One or two counted read-backs."""
    n = b.shape[0]
    x = empty(n)
    nonzero_start = False
    if x0 is None:
        fill(x, 0.0)
    else:
        copy(x0, x)
        scalars.abs_sum(x0, S_X0ABS)
        nonzero_start = scalars.read()[S_X0ABS] != 0.0
    r = empty(n)
    if nonzero_start:
        op.apply(x, r)
        axpy_into(r, b, -1.0, r)
    else:
        copy(b, r)
    scalars.dot(b, b, S_BB)
    scalars.dot(r, r, S_RR)
    s = scalars.read()
    return x, r, math.sqrt(s[S_BB]), s[S_RR]


def cg_device(matvec, b, x0, rtol, atol, maxiter, args=(), counter=None):
    """Conjugate gradient on the device, the CPU ``cg_core`` step for step.

    Parameters
    ----------
    matvec : callable or DeviceOperator
        ``matvec(p, out, *args)`` writing ``A p`` into the device array ``out``; A symmetric
        positive definite (docs/mathematics.md section 1; curvature ``p^T A p <= 0`` is reported,
        never divided by).
    b, x0 : device arrays, shape (n,)
        Right-hand side and warm start (``x0=None``: zeros). Neither is modified.
    rtol, atol, maxiter
        Stop when ``|b - A x| <= max(rtol |b|, atol)`` or after maxiter iterations.
    counter : Transfers
        Counts the read-backs: one or two before the loop, one per iteration (the scalars
        ``p.Ap`` and ``r.r`` together); no vector leaves the device.

    Returns
    -------
    x : device array
    info : int
        0 converged, ``max(maxiter, 1)`` when maxiter was reached, -1 breakdown (``p.Ap == 0``
        or not finite, or ``r.r`` not > 0), -2 negative curvature.
    nit : int
    residual_norm : float
    n_matvec : int
    """
    counter = Transfers() if counter is None else counter
    op = as_operator(matvec, b.shape[0], args)
    start = op.n_matvec
    scalars = Scalars(counter)
    x, r, bnorm, rz = _initial_residual(op, b, x0, scalars)
    rnorm = math.sqrt(rz)
    tol = max(rtol * bnorm, atol)

    def nmv():
        return op.n_matvec - start

    if not math.isfinite(rnorm):
        return x, INFO_BREAKDOWN, 0, rnorm, nmv()
    if rnorm <= tol:
        return x, 0, 0, rnorm, nmv()
    if not rz > 0.0:
        return x, INFO_BREAKDOWN, 0, rnorm, nmv()
    n = b.shape[0]
    p = empty(n)
    copy(r, p)
    Ap = empty(n)
    for k in range(maxiter):
        op.apply(p, Ap)
        scalars.dot(p, Ap, S_PAP)
        scalars.step(x, r, p, Ap, rz, divide_by_curvature=True)
        s = scalars.read()
        pAp = s[S_PAP]
        if not math.isfinite(pAp):
            return x, INFO_BREAKDOWN, k, rnorm, nmv()
        if pAp <= 0.0:
            info = INFO_NEGATIVE_CURVATURE if pAp < 0.0 else INFO_BREAKDOWN
            return x, info, k, rnorm, nmv()
        rr = s[S_RR]
        rnorm = math.sqrt(rr)
        if rnorm <= tol:
            return x, 0, k + 1, rnorm, nmv()
        if not rr > 0.0:
            return x, INFO_BREAKDOWN, k + 1, rnorm, nmv()
        _launch_1d(_direction_kernel, n, p, r, rr / rz)
        rz = rr
    return x, max(maxiter, 1), maxiter, rnorm, nmv()




def neumann_device(matvec, b, x0, eta, rtol, atol, maxiter, args=(), counter=None):
    """Truncated Neumann series ``eta sum_q (I - eta A)^q b`` as Richardson iteration
    ``x <- x + eta (b - A x)`` on the device, the CPU ``neumann_core`` step for step.

    Assumes ``0 < eta < 2 / lambda_max(A)`` (docs/mathematics.md section 1; ``eta <= 1/L`` is the
    usual choice); a residual that grows beyond ``1e4 max(|r_0|, |b|)`` or turns non-finite
    stops with info -3. From ``x0 = 0`` (or None), k iterations give exactly the series
    truncated after k terms. Parameters, returns and read-backs as :func:`cg_device` (one
    read-back per iteration: ``r.r``).
    """
    counter = Transfers() if counter is None else counter
    op = as_operator(matvec, b.shape[0], args)
    start = op.n_matvec
    scalars = Scalars(counter)
    x, r, bnorm, rr = _initial_residual(op, b, x0, scalars)
    rnorm = math.sqrt(rr)
    tol = max(rtol * bnorm, atol)
    r0 = max(rnorm, bnorm)
    Ar = empty(b.shape[0])
    for k in range(maxiter):
        if rnorm <= tol:
            return x, 0, k, rnorm, op.n_matvec - start
        op.apply(r, Ar)
        scalars.step(x, r, r, Ar, eta)
        rnorm = math.sqrt(scalars.read()[S_RR])
        if not math.isfinite(rnorm) or rnorm > 1e4 * r0:
            return x, INFO_DIVERGED, k + 1, rnorm, op.n_matvec - start
    info = 0 if rnorm <= tol else max(maxiter, 1)
    return x, info, maxiter, rnorm, op.n_matvec - start


def power_iteration_device(matvec, n, iters=POWER_ITERS, args=(), counter=None):
    """Rayleigh-quotient estimate of lambda_max of a symmetric PSD operator, on the device.

    The CPU ``power_iteration``'s start vector and steps (the estimate approaches lambda_max
    from below). The loop runs without read-backs: once ``|A v|`` is zero or not finite the
    estimate is frozen on the device (the CPU returns early there; here the remaining products
    still run, and are counted). One counted read-back at the end.

    Returns
    -------
    (estimate, n_matvec)
    """
    counter = Transfers() if counter is None else counter
    op = as_operator(matvec, n, args)
    start = op.n_matvec
    scalars = Scalars(counter)
    v = start_vector(n)
    w = empty(n)
    scalars.dot(v, v, S_AUX)
    _launch_1d(_scale_inv_sqrt_kernel, n, v, v, scalars.device, S_AUX)
    for _ in range(iters):
        op.apply(v, w)
        scalars.dot(v, w, S_VW)
        scalars.dot(w, w, S_WW)
        _power_commit_kernel[1, 1](scalars.device)
        _launch_1d(_scale_inv_sqrt_kernel, n, v, w, scalars.device, S_WW)
    return float(scalars.read()[S_LAM]), op.n_matvec - start


# ---------------------------------------------------------------------------------------
# Public entry points (mlocore.linalg.cg / neumann with backend="cuda")
# ---------------------------------------------------------------------------------------
OUTPUTS = ("numpy", "device")


def check_output(output, backend):
    """Validate ``output`` ("numpy" or "device"); "device" needs the CUDA backend."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be 'numpy' or 'device', got {output!r}")
    if output == "device" and backend != "cuda":
        raise ValueError("output='device' returns a CUDA device array and needs "
                         f"backend='cuda', got backend={backend!r}")
    return output


def device_args(args, counter, role):
    """Callback ``args`` for the device: host arrays copied once (counted), device arrays used
    in place, Python and NumPy scalars passed as they are."""
    if isinstance(args, list):
        args = tuple(args)
    elif not isinstance(args, tuple):
        args = (args,)
    out = []
    for i, a in enumerate(args):
        if is_device_array(a) or isinstance(a, np.ndarray):
            out.append(to_device(f"{role} args[{i}]", a, counter))
        elif isinstance(a, (bool, int, float, np.number)):
            out.append(a)
        else:
            raise TypeError(f"{role} args[{i}] must be an array (host or device) or a scalar "
                            f"for the CUDA backend, got {type(a).__name__}")
    return tuple(out)


def _device_vector(name, a, counter, n=None):
    d = to_device(name, a, counter, n)
    if len(d.shape) != 1:
        raise ValueError(f"{name} must be 1-D, got shape={tuple(d.shape)}")
    return d


def make_operator(A, args, n, counter):
    """A :class:`DeviceOperator` from a dense matrix (host: validated and copied once,
    counted; device: used in place) or a device callback ``matvec(p, out, *args)``."""
    if is_device_array(A) or isinstance(A, np.ndarray) or \
            (isinstance(A, (list, tuple)) and not callable(A)):
        if not is_device_array(A):
            M = np.asarray(A)
            if M.ndim != 2 or M.shape[0] != M.shape[1]:
                raise ValueError(f"expected a square matrix, but got shape={M.shape}")
        Ad = to_device("A", A, counter)
        if len(Ad.shape) != 2 or Ad.shape[0] != Ad.shape[1]:
            raise ValueError(f"expected a square matrix, but got shape={tuple(Ad.shape)}")
        if Ad.shape[0] != n:
            raise ValueError(f"A has shape {tuple(Ad.shape)} but b has shape ({n},)")
        return DeviceOperator(dense_matvec, n, (Ad,), name="A")
    if callable(A) and not hasattr(A, "tocsr") and not hasattr(A, "matvec"):
        return DeviceOperator(A, n, device_args(args, counter, "matvec"),
                              name=getattr(A, "__name__", "matvec"))
    raise TypeError("with backend='cuda', A must be a dense 2-D array (host or device) or a "
                    "device callback matvec(p, out, *args) writing A p into out; got "
                    f"{type(A).__name__} (LinearOperators and sparse matrices run on the CPU "
                    "only)")


def _prepare(where, A, b, x0, args, rtol, atol, maxiter, M, callback, default_maxiter):
    for name, value in (("M", M), ("callback", callback)):
        if value is not None:
            raise NotImplementedError(f"{where}: {name} is not supported with "
                                      "backend='cuda' yet; use backend='cpu'")
    counter = Transfers()
    b = _device_vector("b", b, counter)
    n = b.shape[0]
    op = make_operator(A, args, n, counter)
    x0 = None if x0 is None else _device_vector("x0", x0, counter, n)
    rtol = check_positive("rtol", rtol, allow_zero=True)
    atol = check_positive("atol", atol, allow_zero=True)
    maxiter = default_maxiter(n) if maxiter is None else check_int("maxiter", maxiter, 0)
    return counter, op, b, x0, rtol, atol, maxiter


def _finish(x, info, nit, res, nmv, full_output, output, counter, extra=None):
    if output == "numpy":
        x = to_host(x, counter)
    if not full_output:
        return x, int(info)
    out = OptimizeResult(x=x, info=int(info), success=info == 0, nit=int(nit),
                         residual_norm=float(res), n_matvec=int(nmv),
                         message=linear_info_message(int(info)), transfers=counter.as_dict())
    if extra:
        out.update(extra)
    return x, int(info), out


def cg(A, b, x0=None, *, rtol=1e-5, atol=0.0, maxiter=None, M=None, callback=None, args=(),
       full_output=False, output="numpy"):
    """:func:`mlocore.linalg.cg` with ``backend="cuda"`` (see there for the parameters).

    ``A``: a dense matrix (host or device) or a device callback ``matvec(p, out, *args)``;
    ``b``, ``x0``: host or device vectors (host ones copied once, counted). ``output``:
    "numpy" (default) or "device" for x. With ``full_output`` the result also has
    ``transfers`` (host <-> device copies of this call, scalar read-backs included).
    """
    check_output(output, "cuda")
    counter, op, b, x0, rtol, atol, maxiter = _prepare(
        "mlocore.linalg.cg", A, b, x0, args, rtol, atol, maxiter, M, callback,
        lambda n: 10 * n)
    x, info, nit, res, nmv = cg_device(op, b, x0, rtol, atol, maxiter, counter=counter)
    return _finish(x, info, nit, res, nmv, full_output, output, counter)


def neumann(A, b, x0=None, *, eta=None, rtol=1e-5, atol=0.0, maxiter=None, callback=None,
            args=(), full_output=False, output="numpy"):
    """:func:`mlocore.linalg.neumann` with ``backend="cuda"`` (parameters as there, A, b, x0
    and output as :func:`cg`). The default step ``eta = 1 / (1.05 L)`` takes L from a device
    power iteration."""
    check_output(output, "cuda")
    counter, op, b, x0, rtol, atol, maxiter = _prepare(
        "mlocore.linalg.neumann", A, b, x0, args, rtol, atol, maxiter, None, callback,
        lambda n: max(100 * n, 10_000))
    n = b.shape[0]
    if eta is None:
        lam, nmv_power = power_iteration_device(op, n, POWER_ITERS, counter=counter)
        if not lam > 0:
            return _finish(zeros(n), INFO_NEGATIVE_CURVATURE, 0, np.nan, nmv_power,
                           full_output, output, counter, {"eta": np.nan})
        eta = 1.0 / (LIPSCHITZ_SAFETY * lam)
    else:
        eta = check_positive("eta", eta)
    x, info, nit, res, nmv = neumann_device(op, b, x0, eta, rtol, atol, maxiter,
                                            counter=counter)
    return _finish(x, info, nit, res, nmv, full_output, output, counter, {"eta": eta})
