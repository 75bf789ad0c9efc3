"""Deterministic bilevel optimization: :func:`minimize_bilevel` and :class:`HyperObjective`."""
from __future__ import annotations

import time

import numpy as np
from scipy.optimize import OptimizeResult

from ._callbacks import CallbackError, call_kernel
from ._hypergrad import (LowerOptions, _check_problem, _compiled, default_linear_maxiter,
                         implicit_call, unrolled_call)
from ._kernels import lower as _low
from ._kernels.oracles import UPPER_GRAD, UPPER_VALUE
from ._multilevel import (MULTILEVEL_MODES, LevelFailure, MultilevelEngine, as_joint,
                          unrolled_multilevel_hypergrad)
from ._problem import MultilevelProblem
from ._results import counts_dict, new_counts, status_message
from ._validation import (as_vector, check_backend, check_choice, check_cpu_output,
                          check_int, check_positive)

__all__ = ["minimize_bilevel", "minimize_deterministic", "minimize_multilevel", "HyperObjective", "BILEVEL_METHODS"]

BILEVEL_METHODS = ("aid", "itd", "alternating")
_ARMIJO = 1e-4
_MAX_BACKTRACK = 40


class _Driver:
    """State shared by the methods: compiled problem, warm starts, counters."""

    def __init__(self, problem, x, y, lower, tol_lin, lin_maxiter, T, K, inner_step):
        self.problem = problem
        self.comp = _compiled(problem, x, y)
        self.counts = new_counts()
        self.lower = lower
        self.tol_lin = tol_lin
        self.lin_maxiter = lin_maxiter
        self.T, self.K = T, K
        self.inner_step = inner_step
        self.y = y
        self.v = np.zeros(problem.dy)
        self.nfev = 0

    def solve_lower(self, x, y0, method=None, maxiter=None, tol=None, step=None):
        lo = self.comp.lower
        m = self.lower.code if method is None else method
        y, status, nit, gnorm, _ = call_kernel(
            _low.solve_lower_kernel, lo.fns, lo.kargs, lo.has_hvp, x, y0, m,
            self.lower.tol if tol is None else tol,
            self.lower.maxiter if maxiter is None else maxiter,
            self.lower.step if step is None else step, self.counts)
        return y, int(status), gnorm

    def upper_value(self, x, y):
        up = self.comp.upper
        self.counts[UPPER_VALUE] += 1
        self.nfev += 1
        return float(up.value(np.concatenate([x, y]), *up.args))

    def upper_grad(self, x, y):
        up = self.comp.upper
        self.counts[UPPER_GRAD] += 1
        return up.grad(np.concatenate([x, y]), *up.args)

    def F(self, x, y0):
        """F(x) = f(x, y*(x)) with a warm-started lower solve; returns (F, y, status)."""
        y, status, _ = self.solve_lower(x, y0)
        if status not in (_low.OK, _low.MAXITER):
            return np.nan, y, status
        return self.upper_value(x, y), y, status

    def direction(self, method, x):
        """The (hyper)gradient of the method at x; updates the warm starts."""
        if method == "aid":
            res = implicit_call(self.comp, "cg", x, self.y, self.v, True, self.lower,
                                self.tol_lin, 0.0, self.lin_maxiter, -1.0, self.counts)
            self.y, self.v = res.y, res.v
            return res.grad, res.status, res.message, res.fun
        if method == "itd":
            res = unrolled_call(self.comp, "itd-reverse", x, self.y, self.T, self.K,
                                self.inner_step, self.counts)
            self.y = res.y
            return res.grad, res.status, res.message, res.fun
        # alternating: T inner gradient steps, then the partial gradient grad_x f (no
        # implicit term): the baseline that ignores how y* moves with x
        y, status, _ = self.solve_lower(x, self.y, method=_low.GD, maxiter=self.T, tol=0.0,
                                        step=self.inner_step)
        self.y = y
        if status not in (_low.OK, _low.MAXITER):
            return np.full(x.shape[0], np.nan), status, status_message(status), np.nan
        g = self.upper_grad(x, y)[: x.shape[0]]
        return g, 0 if np.all(np.isfinite(g)) else 6, "", np.nan


def minimize_bilevel(problem, x0, y0, method="aid", **options):
    """Minimize ``F(x) = f(x, y*(x))``: deterministic or stochastic bilevel methods.

    Parameters
    ----------
    problem : BilevelProblem
        Bounds, a :class:`mlocore.Ball` or a projection on x are honoured by projected steps.
    x0, y0 : array_like
        Starting points.
    method : str
        Deterministic (full-batch, options of :func:`mlocore._minimize.minimize_deterministic`):
        "aid", "itd", "alternating". Stochastic (ALGORITHMS.md section 4; options of
        :func:`mlocore._stochastic.minimize_stochastic`): "alternating", "bsa", "stocbio",
        "ttsa", "stable", "sustain", "mrbo", "vrbo", "soba", "saba", "hessian-free",
        "penalty", "primal-dual"; "aid" and "alternating" run their stochastic forms when
        ``batch_size`` is given.
    **options
        Options of the chosen method; an option the method does not use raises TypeError.
        Every method takes ``backend`` ("cpu" or "cuda"; device problems of
        :mod:`mlocore.cuda` run on the GPU) and ``output`` ("numpy", or "device" to leave
        a device problem's vectors on the GPU).

    Stochastic options
    ------------------
    maxiter : int
        Upper iterations (default 1000). Each method runs a compiled loop of ``eval_every``
        iterations between checkpoints.
    batch_size, upper_batch_size : int
        Minibatch sizes of the lower and upper objectives (default ``min(64, n_samples)``;
        ``upper_batch_size`` defaults to ``batch_size``). A batch size equal to n_samples is
        the full batch, in order: the run is then that of the deterministic algorithm.
    sampler : {"uniform", "batches"}
        Uniform sampling with replacement, or fixed contiguous minibatches of one shuffled
        order visited in a random order each epoch (SABA's and VRBO's default).
    step, inner_step : float or Schedule
        Upper step alpha_k and lower step beta_k. A number is the initial step of the
        method's default decay; default initial steps ``0.5 / L_F`` and ``1 / L_g`` from
        full-batch power iterations at (x0, y0).
    inner_steps, neumann_terms, neumann_step
        T lower steps per upper step; Q Neumann terms (or CG iterations for "aid");
        the Neumann step eta (default ``1 / L_g``).
    seed : int
        Seeds the samplers and every random draw: same seed, same result bit for bit. By
        default a fresh seed, reported as ``result.seed``.
    eval_every : int
        Iterations between checkpoints (default ``maxiter // 20``).
    reference : object, optional
        Anything with ``F(x)``, ``hypergrad(x)`` and/or ``x_star`` (the problem library's
        problems): evaluated at checkpoints outside the timed loop into ``history``
        (``F``, ``grad_norm_sq``, ``dist_to_x_star``; ``grad_mapping_sq``, ``|x - P(x - grad F)|^2``, with constraints).
    tol : float, optional
        Stop at a checkpoint where the reference ``|grad F|^2 <= tol`` (with constraints,
        the projected-gradient mapping ``|x - P(x - grad F)|^2 <= tol``).
    callback : callable, optional
        ``callback(intermediate_result)`` at checkpoints; ``StopIteration`` stops.
    backtrack : int
        Divergence (a non-finite iterate, or ``|(x, y)|`` above ``1e3 (1 + |(x0, y0)|)`` and
        growing fourfold between checkpoints) halves every step that was *not* given (the
        Lipschitz defaults, whose estimates at (x0, y0) can be too optimistic elsewhere) and
        resumes from the last checkpoint, at most ``backtrack`` times (default 8; 0 turns
        it off). Steps the user gave are never changed. After that, status 13 with the
        last checkpoint's iterate.

    Returns
    -------
    scipy.optimize.OptimizeResult
        Deterministic: see :func:`minimize_deterministic`. Stochastic: ``x``, ``y``, ``fun``
        and ``jac`` (reference F and grad F at x, when a reference is given), ``nit``,
        ``success``, ``status``, ``message``, ``seed``, ``oracle_calls`` and
        ``oracle_samples`` (per oracle kind), ``history`` (arrays per checkpoint:
        ``iteration``, ``time``, ``oracle_calls``, ``samples`` and the reference values),
        ``steps`` (the final schedules), ``step_reductions`` (halvings after divergence),
        ``time`` (seconds in the compiled loops, wasted ones included).
    """
    from .stochastic import STOCHASTIC_METHODS, minimize_stochastic
    stochastic = method not in BILEVEL_METHODS or (
        method in ("aid", "alternating") and options.get("batch_size") is not None)
    if stochastic:
        check_choice("method", method, tuple(dict.fromkeys(BILEVEL_METHODS
                                                           + STOCHASTIC_METHODS)))
        return minimize_stochastic(problem, x0, y0, method, **options)
    if "batch_size" in options and options["batch_size"] is None:
        del options["batch_size"]
    return minimize_deterministic(problem, x0, y0, method, **options)


def driver_closures(drv, method):
    """:func:`descent_loop`'s ``F_eval``, ``commit`` and ``direction`` for a bilevel driver
    (CPU or CUDA) with ``F(x, y) -> (f, y_new, lower_status)``, ``direction(method, x)`` and
    the warm lower iterate ``y``, which an accepted step replaces."""
    def F_eval(x_new):
        f, y_new, lstatus = drv.F(x_new, drv.y)
        ok = lstatus in (_low.OK, _low.MAXITER)
        return f, y_new, 0 if ok else lstatus, "" if ok else status_message(lstatus)

    def commit(y_new):
        drv.y = y_new

    def direction(x_now):
        return drv.direction(method, x_now)

    return F_eval, commit, direction


def descent_options(problem, *, maxiter, tol, step, callback, lin_tol, lin_maxiter, T, K,
                    inner_step):
    """Validate the options of the deterministic bilevel descent (CPU and CUDA drivers);
    returns ``(maxiter, tol, step, lin_tol, lin_maxiter, T, K, inner_step)``."""
    maxiter = check_int("maxiter", maxiter, 0)
    tol = check_positive("tol", tol, allow_zero=True)
    if step is not None:
        step = check_positive("step", step)
    elif problem.upper.value is None:
        raise ValueError("step=None uses a backtracking line search on F, which needs the "
                         "upper objective's value callback; pass a fixed step=... instead")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    lin_tol = check_positive("lin_tol", lin_tol, allow_zero=True)
    lin_maxiter = 10 * problem.dy if lin_maxiter is None else check_int("lin_maxiter",
                                                                         lin_maxiter, 0)
    T = check_int("T", T, 1)
    K = T if K is None else check_int("K", K, 1)
    if K > T:
        raise ValueError(f"K must be <= T = {T}, got K={K}")
    inner_step = -1.0 if inner_step is None else check_positive("inner_step", inner_step)
    return maxiter, tol, step, lin_tol, lin_maxiter, T, K, inner_step


def minimize_deterministic(problem, x0, y0, method="aid", *, step=None, maxiter=100, tol=1e-6,
                     callback=None, lower_method="newton-cg", lower_tol=1e-10,
                     lower_maxiter=1000, lower_step=None, lin_tol=1e-10, lin_maxiter=None,
                     T=100, K=None, inner_step=None, backend=None, output="numpy"):
    """Minimize ``F(x) = f(x, y*(x))`` by projected (hyper)gradient steps.

    Parameters
    ----------
    problem : BilevelProblem
        Bounds or a projection on x are honoured by projected steps.
    x0, y0 : array_like
        Starting points; y is warm-started from one iteration to the next.
    method : {"aid", "itd", "alternating"}
        "aid" (AID-BiO, Ji et al. 2021): lower level solved warm-started to ``lower_tol``,
        adjoint by CG warm-started from the previous v. "itd": reverse-mode unrolled
        differentiation through T inner gradient steps (truncated to the last K) warm-started
        from the previous y_T. "alternating": T inner gradient steps, then a step along
        ``grad_x f`` only (ignores the implicit term; the baseline).
    step : float, optional
        Fixed upper step. Default: Barzilai-Borwein trial steps with a backtracking (Armijo)
        line search on F, which needs ``upper.value`` (each trial solves the lower level,
        warm-started).
    maxiter : int
        Upper iterations.
    tol : float
        Stop when the projected-gradient mapping ``|x - P(x - grad)|`` is below tol
        (``|grad|`` without constraints).
    callback : callable, optional
        ``callback(intermediate_result)`` after each iteration with an ``OptimizeResult``
        (x, fun, jac, nit, y); raising ``StopIteration`` stops (status 99), as in scipy.
    lower_method, lower_tol, lower_maxiter, lower_step
        Lower solver options (see :func:`mlocore.solve_lower`).
    lin_tol, lin_maxiter
        CG options of "aid".
    T, K, inner_step
        Inner steps, truncation and inner step of "itd" and "alternating"
        (default inner step 1/L from power iteration).

    Returns
    -------
    scipy.optimize.OptimizeResult
        ``x``, ``fun`` (F(x) when ``upper.value`` exists), ``jac`` (last hypergradient),
        ``nit``, ``nfev``, ``success``, ``status``, ``message``, ``y`` (lower solution),
        ``oracle_calls``, ``history`` (per-iteration ``fun``, ``grad_norm``, ``time``).
    """
    if getattr(problem, "on_device", False) or \
            check_backend(backend, "minimize_bilevel") == "cuda":  # DeviceBilevelProblem
        from .cuda._minimize import minimize_bilevel as _minimize_cuda
        return _minimize_cuda(problem, x0, y0, method, step=step, maxiter=maxiter, tol=tol,
                              callback=callback, lower_method=lower_method,
                              lower_tol=lower_tol, lower_maxiter=lower_maxiter,
                              lower_step=lower_step, lin_tol=lin_tol, lin_maxiter=lin_maxiter,
                              T=T, K=K, inner_step=inner_step, backend=backend,
                              output=output)
    check_cpu_output(output)
    _check_problem(problem)
    check_choice("method", method, BILEVEL_METHODS)
    x = problem.project(as_vector("x0", x0, problem.dx))
    y = as_vector("y0", y0, problem.dy)
    maxiter, tol, step, lin_tol, lin_maxiter, T, K, inner_step = descent_options(
        problem, maxiter=maxiter, tol=tol, step=step, callback=callback, lin_tol=lin_tol,
        lin_maxiter=lin_maxiter, T=T, K=K, inner_step=inner_step)
    lower = LowerOptions(lower_method, lower_tol, lower_maxiter, lower_step)

    drv = _Driver(problem, x, y, lower, lin_tol, lin_maxiter, T, K, inner_step)
    F_eval, commit, direction = driver_closures(drv, method)

    x, fun, grad, nit, status, detail, history = descent_loop(
        problem.project, x, direction, F_eval, commit, step, maxiter, tol, callback,
        lambda: {"y": drv.y.copy()}, calls=lambda: int(drv.counts.sum()))
    if problem.upper.value is not None and (step is not None or status != 0):
        fun, drv.y, _ = drv.F(x, drv.y)  # F at the returned x, lower level solved
    return OptimizeResult(
        x=x, fun=fun, jac=grad, nit=nit, nfev=drv.nfev, success=status == 0, status=status,
        message=status_message(status, detail), y=drv.y, v=drv.v if method == "aid" else None,
        oracle_calls=counts_dict(drv.counts), method=method, history=history)


def multilevel_descent_options(problem, *, maxiter, tol, step, callback, lin_tol, lower_tol,
                               lower_maxiter):
    """Validate the options of the multilevel descent (CPU and CUDA drivers); returns
    ``(maxiter, tol, step, lin_tol, lower_tol, lower_maxiter)``."""
    maxiter = check_int("maxiter", maxiter, 0)
    tol = check_positive("tol", tol, allow_zero=True)
    if step is not None:
        step = check_positive("step", step)
    elif problem.levels[0].value is None:
        raise ValueError("step=None uses a backtracking line search on F, which needs level "
                         "1's value callback; pass a fixed step=... instead")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    lin_tol = check_positive("lin_tol", lin_tol, allow_zero=True)
    lower_tol = check_positive("lower_tol", lower_tol, allow_zero=True)
    lower_maxiter = check_int("lower_maxiter", lower_maxiter, 0)
    return maxiter, tol, step, lin_tol, lower_tol, lower_maxiter


def minimize_multilevel(problem, x0s, method="exact", *, step=None, maxiter=100, tol=1e-6,
                        callback=None, lin_tol=1e-10, lower_tol=1e-10, lower_maxiter=100,
                        T=50, inner_step=None, fd_step=None, backend=None, output="numpy"):
    """The multilevel gradient method of Gu & Chen (2024), Algorithm 1 and Theorem 4.1.

    Repeat: solve levels n..2 for the current x_1 (warm-started from the previous solution),
    then ``x_1 <- P(x_1 - alpha grad F(x_1))`` with the hypergradient of the chosen mode.

    Parameters
    ----------
    problem : MultilevelProblem
    x0s : list of arrays
        Starting points of all levels (levels 2..n are warm starts).
    method : {"exact", "fd", "truncated", "itd"}
        Hypergradient mode (see :func:`mlocore.hypergrad`); "itd" is the unrolled baseline
        of Sato et al. (2021): T gradient steps per lower level (T and ``inner_step`` may be
        per-level sequences), warm-started from the previous outer iteration, and steps on
        the unrolled approximation of F.
    step : float, optional
        Fixed step alpha (Theorem 4.1 needs ``alpha (1 - L alpha / 2) > 0``). Default:
        Barzilai-Borwein steps with an Armijo search on F (needs level 1's value callback).
    maxiter, tol, callback
        As :func:`minimize_bilevel`.
    lin_tol, lower_tol, lower_maxiter, fd_step
        Tolerance of the reduced-Hessian CG solves, of the lower-level solves (gradient norm
        of each reduced objective), their iteration limit, and the finite-difference step.

    Returns
    -------
    scipy.optimize.OptimizeResult
        ``x`` (x_1), ``xs`` (every level's solution at x), ``fun``, ``jac``, ``nit``,
        ``success``, ``status``, ``message``, ``oracle_calls`` per level and ``history``
        (per iteration: ``fun``, ``grad_norm``, ``time``, cumulative ``oracle_calls``).
    """
    if getattr(problem, "device_multilevel", False) or \
            check_backend(backend, "minimize_multilevel") == "cuda":  # DeviceMultilevelProblem
        from .cuda._drivers import minimize_multilevel as _minimize_multilevel_cuda
        return _minimize_multilevel_cuda(
            problem, x0s, method, step=step, maxiter=maxiter, tol=tol, callback=callback,
            lin_tol=lin_tol, lower_tol=lower_tol, lower_maxiter=lower_maxiter, T=T,
            inner_step=inner_step, fd_step=fd_step, backend=backend, output=output)
    check_cpu_output(output)
    if not isinstance(problem, MultilevelProblem):
        raise TypeError(f"problem must be an mlocore.MultilevelProblem, got "
                        f"{type(problem).__name__}")
    check_choice("method", method, MULTILEVEL_MODES + ("itd",))
    maxiter, tol, step, lin_tol, lower_tol, lower_maxiter = multilevel_descent_options(
        problem, maxiter=maxiter, tol=tol, step=step, callback=callback, lin_tol=lin_tol,
        lower_tol=lower_tol, lower_maxiter=lower_maxiter)
    z = as_joint(problem, x0s, "x0s")
    d1 = problem.dims[0]
    z[:d1] = problem.project(z[:d1])
    eng = MultilevelEngine(problem, "truncated" if method == "itd" else method, lin_tol,
                           lower_tol, lower_maxiter, fd_step)
    if not getattr(problem, "_checked", False):
        eng.check_at(z)
        problem._checked = True
    state = {"z": z}
    unrolled_counts = np.zeros_like(eng.counts)

    def solved(x1):
        zz = state["z"].copy()
        zz[:d1] = x1
        return eng.solve_from(zz, 1)

    # the unrolled approximation F~ must stay one function during a run: its inner steps are
    # fixed at the first call (power iteration there, unless inner_step is given)
    inner = {"steps": inner_step}

    def unrolled(x1, value_only=False):
        zz = state["z"].copy()
        zz[:d1] = x1
        res = unrolled_multilevel_hypergrad(problem, zz, T=T, steps=inner["steps"],
                                            fd_step=fd_step, value_only=value_only)
        unrolled_counts[:] += _counts_array(res.oracle_calls)
        if inner["steps"] is None and res.success:
            inner["steps"] = [float(b) for b in res.step]
        return res

    def F_eval(x1):
        if method == "itd":
            res = unrolled(x1, value_only=True)
            return res.fun, res.z, 0 if res.success else res.status, res.message
        try:
            zz = solved(x1)
        except LevelFailure as fail:
            return np.nan, None, fail.status, fail.detail
        return eng.value(1, zz), zz, 0, ""

    def commit(zz):
        state["z"] = zz

    def direction(x1):
        if method == "itd":
            # the starts of the inner loops stay fixed within an iteration so that F~ and its
            # gradient, and the line search's trial values, describe one function; they move
            # to the unrolled outputs when a step is taken (commit, or here for fixed steps)
            res = unrolled(x1)
            if res.success and step is not None:
                state["z"] = res.z
            return res.grad, res.status, res.message, res.fun
        try:
            zz = solved(x1)
            state["z"] = zz
            return eng.grad_reduced(1, zz)[:d1], 0, "", eng.value(1, zz)
        except LevelFailure as fail:
            return np.full(d1, np.nan), fail.status, fail.detail, np.nan

    def extra():
        zz = state["z"]
        return {"xs": [zz[problem.block(k)].copy() for k in range(1, problem.n + 1)]}

    x1, fun, grad, nit, status, detail, history = descent_loop(
        problem.project, z[:d1].copy(), direction, F_eval, commit, step, maxiter, tol,
        callback, extra, calls=lambda: int(eng.counts.sum() + unrolled_counts.sum()))
    if status != 0 or step is not None:
        fun, zz, fstatus, fdetail = F_eval(x1)  # F at the returned x_1
        if zz is not None:
            state["z"] = zz
    zz = state["z"]
    calls = eng.counts + unrolled_counts
    return OptimizeResult(
        x=x1, xs=[zz[problem.block(k)].copy() for k in range(1, problem.n + 1)], z=zz,
        fun=fun, jac=grad, nit=nit, success=status == 0, status=status,
        message=status_message(status, detail), method=method,
        oracle_calls={f"level{k}": dict(zip(("grad", "hvp", "tvp", "value"),
                                            map(int, row)))
                      for k, row in enumerate(calls, 1)}, history=history)


def _counts_array(calls):
    return np.array([[c["grad"], c["hvp"], c["tvp"], c["value"]] for c in calls.values()],
                    dtype=np.int64)


def descent_loop(project, x, direction, F_eval, commit, step, maxiter, tol, callback,
                 extra, calls=None):
    """Projected (hyper)gradient descent shared by the bilevel and multilevel drivers.

    ``direction(x) -> (grad, status, detail, F or nan)`` updates the caller's warm starts;
    ``F_eval(x) -> (F, state, status, detail)`` evaluates F exactly (lower levels solved) and
    ``commit(state)`` keeps the state of an accepted trial point. ``step=None``: Barzilai-
    Borwein trial steps with an Armijo backtracking search on F (accepting changes within
    round-off of F); otherwise fixed steps. Stops when ``|x - P(x - grad)| <= tol``.
    ``calls()``, if given, returns the cumulative oracle count recorded in the history.
    Returns ``(x, fun, grad, nit, status, detail, history)``.
    """
    history = {"fun": [], "grad_norm": [], "time": []}
    if calls is not None:
        history["oracle_calls"] = []
    t0 = time.perf_counter()
    fun = np.nan
    if step is None:  # the line search compares exact values of F
        fun, state, fstatus, detail = F_eval(x)
        if fstatus != 0:
            return x, fun, None, 0, fstatus, "At x0: " + detail, _arrays(history)
        commit(state)
    trial = 1.0 if step is None else step
    prev = None
    status, detail, grad, nit = 10, "", None, 0
    for it in range(maxiter + 1):
        grad, gstatus, gmsg, fun_here = direction(x)
        if step is not None:
            fun = fun_here
        if gstatus != 0 and (gstatus != _low.MAXITER or not np.all(np.isfinite(grad))):
            status, detail = gstatus, gmsg
            break
        pg_norm = float(np.linalg.norm(x - project(x - grad)))
        _record(history, fun, pg_norm, t0)
        if calls is not None:
            history["oracle_calls"].append(calls())
        if it > 0 and callback is not None:
            inter = OptimizeResult(x=x.copy(), fun=fun, jac=grad.copy(), nit=nit, **extra())
            try:
                callback(inter)
            except StopIteration:
                status = 99
                break
        if pg_norm <= tol:
            status = 0
            break
        if it == maxiter:
            break
        if step is not None:
            x = project(x - step * grad)
        else:
            if prev is not None:  # Barzilai-Borwein trial step from the last two iterates
                s_k, g_k = x - prev[0], grad - prev[1]
                sy = s_k @ g_k
                trial = (s_k @ s_k) / sy if sy > 0 else 2.0 * trial
            prev = (x.copy(), grad.copy())
            accepted = False
            slack = 4.0 * np.finfo(float).eps * abs(fun)  # F is only known to round-off
            for _ in range(_MAX_BACKTRACK):
                x_try = project(x - trial * grad)
                f_try, state, fstatus, _ = F_eval(x_try)
                if fstatus == 0 and np.isfinite(f_try) and \
                        f_try <= fun + _ARMIJO * (grad @ (x_try - x)) + slack:
                    accepted = True
                    break
                trial *= 0.5
            if not accepted:
                status = 11
                break
            x, fun = x_try, f_try
            commit(state)
        nit += 1
        if not np.all(np.isfinite(x)):
            status = 12
            break
    return x, fun, grad, nit, status, detail, _arrays(history)


def _arrays(history):
    return {k: np.asarray(v) for k, v in history.items()}


def _record(history, fun, pg_norm, t0):
    history["fun"].append(fun)
    history["grad_norm"].append(pg_norm)
    history["time"].append(time.perf_counter() - t0)


class HyperObjective:
    """``x -> (F(x), grad F(x))`` for ``scipy.optimize.minimize(..., jac=True)``.

    The lower solution y and the adjoint v are warm-started from the previous call, so a
    quasi-Newton run (L-BFGS-B with bounds, say) pays for short inner solves only.

    Parameters
    ----------
    problem : BilevelProblem
        Its upper objective needs a ``value`` callback.
    y0 : array_like
        Initial lower point.
    method : {"cg", "direct", "neumann"}
        Implicit hypergradient method (see :func:`mlocore.hypergrad`).
    tol, lower_method, lower_tol, lower_maxiter, maxiter
        Options of :func:`mlocore.hypergrad`.

    Attributes
    ----------
    y, v : ndarray
        Current warm starts (the lower solution at the last x).
    ncalls : int
    oracle_calls : dict
        Accumulated over all calls.
    last : HypergradResult
        The last hypergradient result (check ``last.success``).

    Notes
    -----
    A call whose lower solve or linear solve fails raises ``RuntimeError`` with the solver's
    message rather than handing scipy a NaN.
    """

    def __init__(self, problem, y0, method="cg", *, tol=1e-10, lower_method="newton-cg",
                 lower_tol=None, lower_maxiter=1000, maxiter=None, backend=None):
        if getattr(problem, "on_device", False) or \
                check_backend(backend, "HyperObjective") == "cuda":  # DeviceBilevelProblem
            from .cuda._drivers import DeviceHyperObjective  # y, v warm on the device
            self.__class__ = DeviceHyperObjective
            DeviceHyperObjective.__init__(self, problem, y0, method, tol=tol,
                                          lower_method=lower_method, lower_tol=lower_tol,
                                          lower_maxiter=lower_maxiter, maxiter=maxiter,
                                          backend=backend)
            return
        _check_problem(problem)
        check_choice("method", method, ("cg", "direct", "neumann"))
        if problem.upper.value is None:
            raise ValueError("HyperObjective needs the upper objective's value callback")
        self.problem = problem
        self.method = method
        self.y = as_vector("y0", y0, problem.dy)
        self.v = np.zeros(problem.dy)
        self.tol = check_positive("tol", tol, allow_zero=True)
        self.lower = LowerOptions(lower_method,
                                  min(self.tol, 1e-10) if lower_tol is None else lower_tol,
                                  lower_maxiter, None)
        self.maxiter = default_linear_maxiter(method, problem.dy) if maxiter is None else \
            check_int("maxiter", maxiter, 0)
        self._counts = new_counts()
        self.ncalls = 0
        self.last = None
        self._comp = None

    @property
    def oracle_calls(self):
        return counts_dict(self._counts)

    def __call__(self, x):
        x = as_vector("x", x, self.problem.dx)
        if self._comp is None:
            self._comp = _compiled(self.problem, x, self.y)
        res = implicit_call(self._comp, self.method, x, self.y, self.v, True, self.lower,
                            self.tol, 0.0, self.maxiter, -1.0, self._counts)
        self.ncalls += 1
        self.last = res
        if not res.success and res.status != _low.MAXITER:
            raise RuntimeError(f"hypergradient at x failed: {res.message}")
        if not (np.isfinite(res.fun) and np.all(np.isfinite(res.grad))):
            raise CallbackError(f"F or its hypergradient is not finite at x: {res.message}")
        self.y, self.v = res.y, res.v
        return float(res.fun), res.grad.copy()
