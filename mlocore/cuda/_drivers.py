"""Optimization drivers of the CUDA backend ("one large problem" mode): the device versions of
:class:`mlocore.HyperObjective` (for ``scipy.optimize.minimize(..., jac=True)``) and of
:func:`mlocore.minimize_multilevel`.

Both keep the upper iterate on the host (it is small: scipy, or the CPU's
:func:`mlocore._descent.descent_loop`, drives it) and everything else on the device: the
lower solution and adjoint of a bilevel problem, the joint vector of all levels of a
multilevel one, warm-started from one call (one iteration, one line-search trial) to the
next. Per call or iteration only x goes to the device and the (hyper)gradient, of size dx,
comes back, plus the scalars of every stopping test; all copies are counted
(``transfers``).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import OptimizeResult

from .._kernels.oracles import UPPER_GRAD, UPPER_HVP, UPPER_VALUE
from .._descent import HyperObjectiveBase, multilevel_descent, multilevel_descent_options
from .._multilevel import MULTILEVEL_MODES
from .._results import status_message
from .._validation import as_vector, check_choice, check_positive
from . import _linalg as dl
from ._device import to_device, to_host
from ._implicit import _Session, _implicit, check_problem_backend
from ._multilevel import (DeviceMultilevelEngine, DeviceUnrolledEngine, _as_joint, _copy,
                          check_multilevel_backend, unrolled_core, unrolled_options)

__all__ = ["DeviceHyperObjective", "minimize_multilevel"]

class DeviceHyperObjective(HyperObjectiveBase):
    """:class:`mlocore.HyperObjective` for a :class:`~mlocore.cuda.DeviceBilevelProblem`:
    ``x -> (F(x), grad F(x))`` for ``scipy.optimize.minimize(..., jac=True)``, with the lower
    solution y and the adjoint v warm-started *on the device* from one call to the next.

    ``mlocore.HyperObjective(device_problem, y0, ...)`` (or ``backend="cuda"``) builds one; it
    is a HyperObjective (``isinstance`` holds) with the same options, calls and errors.

    Parameters
    ----------
    problem : DeviceBilevelProblem
        Its upper objective needs a ``value`` callback. Its bounds or projection, if any, are
        not used here (as on the CPU): pass ``bounds`` to ``scipy.optimize.minimize``.
    y0 : array_like or device array, shape (dy,)
        Initial lower point: a host array is copied once (counted), a device array is used
        in place and never modified.
    method : {"cg", "direct", "neumann"}
        Implicit hypergradient method (``mlocore.hypergrad``), all on the device.
    tol, lower_method, lower_tol, lower_maxiter, maxiter, backend
        As :class:`mlocore.HyperObjective` (backend None or "cuda").

    Attributes
    ----------
    y, v : ndarray
        Host copies (each access one counted read-back) of the current warm starts;
        ``y_device`` and ``v_device`` are the device vectors themselves (``v_device`` is None,
        meaning zeros, before the first call).
    ncalls, oracle_calls, last
        As the CPU's; ``last.grad`` is a host array, ``last.y`` and ``last.v`` device arrays.
    transfers : dict
        Every host <-> device copy of all calls so far (y0, each x, the scalars of every
        stopping test, each hypergradient).

    Notes
    -----
    Each call copies x to the device (dx values) and reads back the hypergradient (dx values)
    and F (the value callback's own read-back); y and v never leave the device.
    """

    def __init__(self, problem, y0, method="cg", *, tol=1e-10, lower_method="newton-cg",
                 lower_tol=None, lower_maxiter=1000, maxiter=None, backend=None):
        check_problem_backend(problem, backend, "HyperObjective")
        self._set_options(problem, method, tol, lower_method, lower_tol, lower_maxiter,
                          maxiter)
        self._sess = _Session(problem)
        self.y_device = to_device("y0", y0, self._sess.counter, problem.dy)
        self.v_device = None
        self._counts = self._sess.counts

    @property
    def y(self):
        """The current lower point, as a NumPy copy (one counted read-back)."""
        return to_host(self.y_device, self._sess.counter)

    @property
    def v(self):
        """The current adjoint warm start, as a NumPy copy (zeros before the first call)."""
        if self.v_device is None:
            return np.zeros(self.problem.dy)
        return to_host(self.v_device, self._sess.counter)

    @property
    def transfers(self) -> dict:
        return self._sess.counter.as_dict()

    def __call__(self, x):
        sess = self._sess
        x = as_vector("x", x, self.problem.dx)
        xd = to_device("x", x, sess.counter, sess.dx)
        z = sess.joint(xd, self.y_device)
        sess.check_once(z)
        res = _implicit(sess, self.method, x, xd, z, self.v_device, True, self.lower,
                        self.tol, 0.0, self.maxiter, -1.0, "device")
        res.grad = to_host(res.grad, sess.counter)
        res.transfers = sess.counter.as_dict()
        out = self._accept(res)
        self.y_device, self.v_device = res.y, res.v
        return out


def minimize_multilevel(problem, x0s, method="exact", *, step=None, maxiter=100, tol=1e-6,
                        callback=None, lin_tol=1e-10, lower_tol=1e-10, lower_maxiter=100,
                        T=50, inner_step=None, fd_step=None, outer="lbfgs", backend=None,
                        output="numpy"):
    """:func:`mlocore.minimize_multilevel` for a :class:`~mlocore.cuda.DeviceMultilevelProblem`:
    the multilevel gradient method of Gu & Chen (2024, Algorithm 1) with the device
    hypergradient (:class:`~mlocore.cuda._multilevel.DeviceMultilevelEngine`; for "itd",
    :class:`~mlocore.cuda._multilevel.DeviceUnrolledEngine`).

    The CPU's loop (:func:`mlocore._descent.descent_loop`: fixed steps, or the steps of
    ``outer``, L-BFGS by default, with an Armijo search on F) with x_1 on the host; the
    joint vector of all levels stays on the device, the levels n..2 re-solved warm-started
    from the previous iteration's (or accepted trial's) solution, as on the CPU. Same
    iterations and iterates as the CPU to rounding.

    Parameters
    ----------
    problem : DeviceMultilevelProblem
        Its bounds, :class:`mlocore.Ball` or projection on x_1 are honoured by projected
        steps ``x_1 <- P(x_1 - step grad)`` computed on the host (a user ``project`` is a host
        function of x_1), as on the CPU: the start's x_1 is projected first, and the stopping
        test and ``history["grad_norm"]`` use the projected-gradient mapping.
    x0s : list of n arrays, or one joint vector of length ``sum(dims)``
        Host or device; never modified (host arrays are copied once each, counted).
    method : {"exact", "truncated", "fd", "itd"}
        Hypergradient mode; "itd" is the unrolled baseline of Sato et al. (2021) on the
        device (:class:`~mlocore.cuda._multilevel.DeviceUnrolledEngine`): T gradient steps
        per lower level from the previous iteration's unrolled outputs, steps on the unrolled
        approximation of F, its inner steps fixed at the first call (power iteration there
        unless ``inner_step`` is given), as on the CPU.
    step, maxiter, tol, callback, lin_tol, lower_tol, lower_maxiter, fd_step, outer
        As :func:`mlocore.minimize_multilevel` (``callback`` gets host copies of every
        level's block in ``xs``, counted).
    T, inner_step
        "itd" only (ints / steps, or per-level sequences for levels 2..n; validated with the
        CPU's errors); ignored by the other modes, as on the CPU.
    backend : {None, "cuda"}
    output : {"numpy", "device"}
        Type of ``res.z`` and ``res.xs``.

    Returns
    -------
    scipy.optimize.OptimizeResult
        The CPU's fields (``x``, ``xs``, ``z``, ``fun``, ``jac``, ``nit``, ``success``,
        ``status``, ``message``, ``method``, ``oracle_calls`` per level, ``history``) plus
        ``transfers``. Third-order products are differences of two level-n hvps on the
        device (no ``tvp`` callback): ``oracle_calls`` (and ``history["oracle_calls"]``)
        count them as hvps.
    """
    where = "minimize_multilevel"
    check_multilevel_backend(problem, backend, where)
    check_choice("method", method, MULTILEVEL_MODES + ("itd",))
    dl.check_output(output, "cuda")
    maxiter, tol, step, lin_tol, lower_tol, lower_maxiter, outer = multilevel_descent_options(
        problem, maxiter=maxiter, tol=tol, step=step, callback=callback, lin_tol=lin_tol,
        lower_tol=lower_tol, lower_maxiter=lower_maxiter, outer=outer)
    if fd_step is not None:
        fd_step = check_positive("fd_step", fd_step)
    eng = DeviceMultilevelEngine(problem, "truncated" if method == "itd" else method, lin_tol,
                                 lower_tol, lower_maxiter, fd_step)
    sh = eng.sh
    d1 = problem.dims[0]
    z = _as_joint(problem, x0s, sh.counter, "x0s")  # a new vector, owned by this run
    run = _DeviceMultilevelRun(problem, eng, T, fd_step)
    x1 = to_host(z[:d1], sh.counter)
    if problem.constrained:  # x_1 projected on the host before the check, as on the CPU
        x1 = problem.project(x1)
        dl.copy(run.x_device(x1), z[:d1])
    if not problem._checked:
        eng.check_at(z)
        problem._checked = True
    if method == "itd":  # validated here (the CPU does at its first unrolled call)
        unrolled_options(problem.n, T, inner_step)
    x1, fun, grad, nit, status, detail, history, zz = multilevel_descent(
        run, z, x1, method, step, maxiter, tol, callback, inner_step, outer)
    if output == "numpy":
        zz = to_host(zz, sh.counter)
        xs = [zz[problem.block(k)].copy() for k in range(1, problem.n + 1)]
    else:
        xs = [_copy(zz[problem.block(k)]) for k in range(1, problem.n + 1)]
    return OptimizeResult(
        x=x1, xs=xs, z=zz, fun=fun, jac=grad, nit=nit, success=status == 0, status=status,
        message=status_message(status, detail), method=method,
        oracle_calls=eng.oracle_calls(), history=history, transfers=sh.counter.as_dict())


class _DeviceMultilevelRun:
    """:func:`~mlocore._descent.multilevel_descent`'s hooks on the device: the joint vector
    of all levels stays there; x_1 is a host array, copied (and counted) once per new point."""

    def __init__(self, problem, eng, T, fd_step):
        self.problem, self.eng, self.T, self.fd_step = problem, eng, T, fd_step
        self.sh = eng.sh
        self._x_host = self._x_dev = None

    def x_device(self, x1):
        if self._x_host is None or not np.array_equal(x1, self._x_host):
            self._x_host = np.array(x1, dtype=np.float64)
            self._x_dev = to_device("x", self._x_host, self.sh.counter, self.problem.dims[0])
        return self._x_dev

    def with_x(self, z, x1):
        zz = _copy(z)
        dl.copy(self.x_device(x1), zz[:self.problem.dims[0]])
        return zz

    def host(self, a):
        return to_host(a, self.sh.counter)

    def blocks(self, z):
        zh = to_host(z, self.sh.counter)
        return [zh[self.problem.block(k)].copy() for k in range(1, self.problem.n + 1)]

    def unrolled(self, z, steps, value_only):
        """The CPU's unrolled_multilevel_hypergrad at z on the device, counted in this run's
        oracles and transfers."""
        Ts, betas = unrolled_options(self.problem.n, self.T, steps)
        ueng = DeviceUnrolledEngine(self.problem, Ts, betas, z, self.fd_step, shared=self.sh)
        grad, zz, fun, status, detail = unrolled_core(ueng, z, value_only)
        grad = None if value_only else to_host(grad, self.sh.counter)
        return (grad, zz, fun, status, status_message(status, detail),
                [float(b) for b in betas[2:]])

    def calls(self):
        return int(sum(int(c[UPPER_GRAD] + c[UPPER_HVP] + c[UPPER_VALUE])
                       for c in self.sh.counts))
