"""Optimization entry points: :func:`minimize_bilevel`, :func:`minimize_multilevel` and
:class:`HyperObjective`, with their CPU drivers; device problems and ``backend="cuda"``
go to :mod:`mlocore.cuda`, stochastic methods to the stochastic drivers."""
from __future__ import annotations

import numpy as np
from scipy.optimize import OptimizeResult

from ._callbacks import CallbackError, call_bound
from ._descent import (BILEVEL_METHODS, HyperObjectiveBase, descent_loop, descent_options,
                       driver_closures, multilevel_descent, multilevel_descent_options)
from ._hypergrad import _check_problem, _compiled, implicit_call, unrolled_call
from ._kernels import lower as _low
from ._kernels.oracles import UPPER_GRAD, UPPER_VALUE
from ._multilevel import (_COUNT_NAMES, MULTILEVEL_MODES, MultilevelEngine, as_joint,
                          calls_dict, unrolled_multilevel_hypergrad)
from ._options import LowerOptions
from ._problem import MultilevelProblem
from ._results import counts_dict, level_calls, new_counts, status_message
from .stochastic import STOCHASTIC_METHODS, minimize_stochastic
from ._validation import as_vector, check_backend, check_choice, check_cpu_output
from .cuda._drivers import DeviceHyperObjective
from .cuda._drivers import minimize_multilevel as _minimize_multilevel_cuda
from .cuda._minimize import minimize_bilevel as _minimize_cuda

__all__ = ["minimize_bilevel", "minimize_deterministic", "minimize_multilevel", "HyperObjective", "BILEVEL_METHODS"]



def _solve_lower(comp, x, y0, method, tol, maxiter, step, counts):
    """The compiled lower solve from y0; returns ``(y, status, |grad_y g|)``."""
    lo = comp.lower
    y, status, nit, gnorm, _ = call_bound(
        lo.bound_kernels, None, _low.solve_lower_kernel,
        lambda: (lo.fns, lo.kargs, lo.flags), x, y0, method, tol, maxiter, step, counts)
    return y, int(status), gnorm


def _upper_value(comp, x, y, counts):
    """``f(x, y)`` by the compiled value callback (counted)."""
    up = comp.upper
    counts[UPPER_VALUE] += 1
    return float(up.value(np.concatenate([x, y]), *up.args))


class _Driver:
    """State shared by the methods: compiled problem, warm starts, counters."""

    def __init__(self, problem, x, y, lower, tol_lin, lin_maxiter, T, K, inner_step):
        self.problem = problem
        self.comp = _compiled(problem, x, y)
        self.counts = new_counts()
        self.lower = lower
        self.tol_lin = tol_lin
        self.atol_lin = 0.0
        self.lin_maxiter = lin_maxiter
        self.T, self.K = T, K
        self.inner_step = inner_step
        self.y = y
        self.v = np.zeros(problem.dy)
        self.nfev = 0
        self.solved = None  # (x bytes, y, F, lower options) of the last F evaluation

    def solve_lower(self, x, y0, method=None, maxiter=None, tol=None, step=None):
        return _solve_lower(self.comp, x, y0, self.lower.code if method is None else method,
                            self.lower.tol if tol is None else tol,
                            self.lower.maxiter if maxiter is None else maxiter,
                            self.lower.step if step is None else step, self.counts)

    def upper_value(self, x, y):
        self.nfev += 1
        return _upper_value(self.comp, x, y, self.counts)

    def upper_grad(self, x, y):
        up = self.comp.upper
        self.counts[UPPER_GRAD] += 1
        return up.grad(np.concatenate([x, y]), *up.args)

    def F(self, x, y0):
        """F(x) = f(x, y*(x)) with a warm-started lower solve; returns (F, y, status)."""
        y, status, _ = self.solve_lower(x, y0)
        if status not in (_low.OK, _low.MAXITER):
            return np.nan, y, status
        f = self.upper_value(x, y)
        self.solved = (x.tobytes(), y, f, self.lower) if status == _low.OK else None
        return f, y, status

    def solved_at(self, x):
        """``(y, F)`` from the last F evaluation if it was at x, its lower solve converged,
        and the lower options are still those it used (then the lower solve of the
        hypergradient at x would stop at once, at the same y), else None."""
        known = self.solved
        if known is None or known[3] != self.lower or known[0] != x.tobytes():
            return None
        return known[1], known[2]

    def direction(self, method, x):
        """The (hyper)gradient of the method at x; updates the warm starts."""
        if method == "aid":
            known = self.solved_at(x)
            if known is None:
                res = implicit_call(self.comp, "cg", x, self.y, self.v, True, self.lower,
                                    self.tol_lin, self.atol_lin, self.lin_maxiter, -1.0,
                                    self.counts)
                fun = res.fun
            else:  # a line-search trial solved the lower level at x: reuse y and F
                y, fun = known
                res = implicit_call(self.comp, "cg", x, y, self.v, False, self.lower,
                                    self.tol_lin, self.atol_lin, self.lin_maxiter, -1.0,
                                    self.counts, value=False)
            self.y, self.v = res.y, res.v
            return res.grad, res.status, res.message, fun
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
        "aid", "itd", "alternating". Stochastic (docs/mathematics.md section 4; options of
        :func:`mlocore.stochastic.minimize_stochastic`): "alternating", "bsa", "stocbio",
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
    step, inner_step : float or Schedule, or step="auto"
        Upper step alpha_k and lower step beta_k. A number is the initial step of the
        method's default decay; default initial steps ``0.5 / L_F`` and ``1 / L_g`` from
        full-batch power iterations at (x0, y0). ``step="auto"``: a counted search first
        runs the 3 x 3 grid (1/3, 1, 3) x the default initial upper and lower steps (the
        upper ones only when ``inner_step`` is given) for ``ceil(0.1 maxiter)`` iterations
        each, from (x0, y0) with the same seed, scores each trial by ``reference.F`` at its
        returned x (when the reference has F) or else by the full-batch ``F(x) = f(x,
        y*(x))`` (a lower solve, then the upper value callback on all samples); when the
        smallest upper factor wins, one more trial with a 3x smaller upper step; then the
        best pair runs for maxiter, its steps halved on divergence as the defaults are.
        Its grid, scores, oracle calls, samples and time are in
        ``result.step_search``; the result's counts, ``time`` and history include them.
    inner_steps, neumann_terms, neumann_step
        T lower steps per upper step; Q Neumann terms (or CG iterations for "aid",
        default 1); the Neumann step eta (default ``1 / L_g``).
    average : float or bool, optional
        Tail averaging (Polyak & Juditsky 1992): ``result.x, result.y`` are the means of
        the iterates over the last ``average`` fraction of the iterations (True: 0.5).
        Default: 0.5, except 0 (the last iterate) for "saba" and "vrbo", which converge
        without a noise ball. ``result.x_last, result.y_last`` are the last iterates.
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
        ``time`` (seconds in the compiled loops, wasted ones included), ``x_last`` and
        ``y_last``, ``average`` (``fraction`` and ``iterations`` averaged), and with
        ``step="auto"`` ``step_search``. ``fun`` and ``jac`` are taken at the returned x;
        the history follows the iterates.
    """
    stochastic = method not in BILEVEL_METHODS or (
        method in ("aid", "alternating") and options.get("batch_size") is not None)
    if stochastic:
        check_choice("method", method, tuple(dict.fromkeys(BILEVEL_METHODS
                                                           + STOCHASTIC_METHODS)))
        return minimize_stochastic(problem, x0, y0, method, **options)
    if "batch_size" in options and options["batch_size"] is None:
        del options["batch_size"]
    return minimize_deterministic(problem, x0, y0, method, **options)


def minimize_deterministic(problem, x0, y0, method="aid", *, step=None, maxiter=100, tol=1e-6,
                     callback=None, lower_method="newton-cg", lower_tol=1e-10,
                     lower_maxiter=1000, lower_step=None, lin_tol=1e-10, lin_maxiter=None,
                     T=100, K=None, inner_step=None, outer="lbfgs", backend=None,
                     output="numpy"):
    """Minimize ``F(x) = f(x, y*(x))`` by a projected outer loop on the hypergradient
    (L-BFGS by default, see ``outer``).

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
        Fixed upper step (projected gradient steps, whatever ``outer``). Default: the steps
        of ``outer`` with a backtracking (Armijo) line search on F, which needs
        ``upper.value`` (each trial solves the lower level, warm-started).
    outer : {"lbfgs", "bb", "gd"}
        Outer loop when ``step`` is None. "lbfgs" (default): projected L-BFGS on the
        hypergradient (two-loop recursion, memory 10; Nocedal & Wright 2006, Algorithm
        7.4), the variables that the projection moves taking scaled gradient steps
        (two-metric projection, Bertsekas 1982); for "aid" the lower and linear tolerances
        follow the projected-gradient norm pg: loose far from a stationary point, and
        near the end ``|grad_y g| <= 0.001 pg`` and a linear residual at most ``0.01 pg``
        (absolute), below ``lower_tol`` and ``lin_tol`` where pg is that small (floors
        1e-13 and ``1e-14 |grad_y f|``), so that the hypergradient stays accurate to the
        stopping test; the hypergradient at an accepted step reuses the lower solution
        (and F) that the line search computed there. "bb": projected gradient with
        Barzilai-Borwein trial steps. "gd": projected gradient with Armijo steps. Both keep
        the inner tolerances fixed.
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
        ``oracle_calls``, ``history`` (per-iteration ``fun``, ``grad_norm``, ``time``, and
        the cumulative ``oracle_calls``, ``upper_calls`` and ``lower_calls``: all oracle
        calls, those of the upper and of the lower objective, block callbacks included).
    """
    if getattr(problem, "on_device", False) or \
            check_backend(backend, "minimize_bilevel") == "cuda":  # DeviceBilevelProblem
        return _minimize_cuda(problem, x0, y0, method, step=step, maxiter=maxiter, tol=tol,
                              callback=callback, lower_method=lower_method,
                              lower_tol=lower_tol, lower_maxiter=lower_maxiter,
                              lower_step=lower_step, lin_tol=lin_tol, lin_maxiter=lin_maxiter,
                              T=T, K=K, inner_step=inner_step, outer=outer,
                              backend=backend, output=output)
    check_cpu_output(output)
    _check_problem(problem)
    check_choice("method", method, BILEVEL_METHODS)
    x = problem.project(as_vector("x0", x0, problem.dx))
    y = as_vector("y0", y0, problem.dy)
    maxiter, tol, step, lin_tol, lin_maxiter, T, K, inner_step, outer = descent_options(
        problem, maxiter=maxiter, tol=tol, step=step, callback=callback, lin_tol=lin_tol,
        lin_maxiter=lin_maxiter, T=T, K=K, inner_step=inner_step, outer=outer)
    lower = LowerOptions(lower_method, lower_tol, lower_maxiter, lower_step)

    drv = _Driver(problem, x, y, lower, lin_tol, lin_maxiter, T, K, inner_step)
    F_eval, commit, direction, inner = driver_closures(drv, method)

    x, fun, grad, nit, status, detail, history = descent_loop(
        problem.project, x, direction, F_eval, commit, step, maxiter, tol, callback,
        lambda: {"y": drv.y.copy()}, calls=lambda: int(drv.counts.sum()), outer=outer,
        inner=inner, record=lambda: level_calls(drv.counts))
    if problem.upper.value is not None and (step is not None or status != 0):
        fun, drv.y, _ = drv.F(x, drv.y)  # F at the returned x, lower level solved
    return OptimizeResult(
        x=x, fun=fun, jac=grad, nit=nit, nfev=drv.nfev, success=status == 0, status=status,
        message=status_message(status, detail), y=drv.y, v=drv.v if method == "aid" else None,
        oracle_calls=counts_dict(drv.counts), method=method, history=history)


def minimize_multilevel(problem, x0s, method="exact", *, step=None, maxiter=100, tol=1e-6,
                        callback=None, lin_tol=1e-10, lower_tol=1e-10, lower_maxiter=100,
                        T=50, inner_step=None, fd_step=None, outer="lbfgs", backend=None,
                        output="numpy"):
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
        Fixed step alpha (Theorem 4.1 needs ``alpha (1 - L alpha / 2) > 0``). Default: the
        steps of ``outer`` with an Armijo search on F (needs level 1's value callback).
    outer : {"lbfgs", "bb", "gd"}
        As :func:`minimize_bilevel`: projected L-BFGS on the hypergradient (default;
        Nocedal & Wright 2006, Algorithm 7.4), Barzilai-Borwein or Armijo gradient steps.
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
        return _minimize_multilevel_cuda(
            problem, x0s, method, step=step, maxiter=maxiter, tol=tol, callback=callback,
            lin_tol=lin_tol, lower_tol=lower_tol, lower_maxiter=lower_maxiter, T=T,
            inner_step=inner_step, fd_step=fd_step, outer=outer, backend=backend,
            output=output)
    check_cpu_output(output)
    if not isinstance(problem, MultilevelProblem):
        raise TypeError(f"problem must be an mlocore.MultilevelProblem, got "
                        f"{type(problem).__name__}")
    check_choice("method", method, MULTILEVEL_MODES + ("itd",))
    maxiter, tol, step, lin_tol, lower_tol, lower_maxiter, outer = multilevel_descent_options(
        problem, maxiter=maxiter, tol=tol, step=step, callback=callback, lin_tol=lin_tol,
        lower_tol=lower_tol, lower_maxiter=lower_maxiter, outer=outer)
    z = as_joint(problem, x0s, "x0s")
    d1 = problem.dims[0]
    z[:d1] = problem.project(z[:d1])
    eng = MultilevelEngine(problem, "truncated" if method == "itd" else method, lin_tol,
                           lower_tol, lower_maxiter, fd_step)
    if not getattr(problem, "_checked", False):
        eng.check_at(z)
        problem._checked = True
    run = _CpuMultilevelRun(problem, eng, T, fd_step)
    x1, fun, grad, nit, status, detail, history, zz = multilevel_descent(
        run, z, z[:d1].copy(), method, step, maxiter, tol, callback, inner_step, outer)
    calls = eng.counts + run.unrolled_counts
    return OptimizeResult(
        x=x1, xs=[zz[problem.block(k)].copy() for k in range(1, problem.n + 1)], z=zz,
        fun=fun, jac=grad, nit=nit, success=status == 0, status=status,
        message=status_message(status, detail), method=method,
        oracle_calls=calls_dict(calls, [bool(c.level_blocks) for c in eng.comp]),
        history=history)


class _CpuMultilevelRun:
    """:func:`~mlocore._descent.multilevel_descent`'s hooks on the CPU (NumPy joint vectors)."""

    def __init__(self, problem, eng, T, fd_step):
        self.problem, self.eng, self.T, self.fd_step = problem, eng, T, fd_step
        self.unrolled_counts = np.zeros_like(eng.counts)

    def with_x(self, z, x1):
        zz = z.copy()
        zz[:self.problem.dims[0]] = x1
        return zz

    def host(self, a):
        return a

    def blocks(self, z):
        return [z[self.problem.block(k)].copy() for k in range(1, self.problem.n + 1)]

    def unrolled(self, z, steps, value_only):
        res = unrolled_multilevel_hypergrad(self.problem, z, T=self.T, steps=steps,
                                            fd_step=self.fd_step, value_only=value_only)
        self.unrolled_counts[:] += _counts_array(res.oracle_calls)
        used = [float(b) for b in res.step] if res.success else None
        return (res.grad, res.z, res.fun, 0 if res.success else res.status, res.message,
                used)

    def calls(self):
        return int(self.eng.counts.sum() + self.unrolled_counts.sum())


def _counts_array(calls):
    return np.array([[c.get(name, 0) for name in _COUNT_NAMES] for c in calls.values()],
                    dtype=np.int64)


class HyperObjective(HyperObjectiveBase):
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
        Hypergradients computed.
    nsolves : int
        Lower-level solves (a hypergradient at an x where :meth:`fun` solved the lower
        level reuses that solve).
    oracle_calls : dict
        Accumulated over all calls.
    last : HypergradResult
        The last hypergradient result (check ``last.success``).

    Notes
    -----
    ``fun`` and ``jac`` are F and grad F separately (``scipy.optimize.minimize(fobj.fun, x0,
    jac=fobj.jac)``): at the same x they share one lower solve, and a gradient already
    computed at x (or F) is returned without new oracle calls.

    A call whose lower solve or linear solve fails raises ``RuntimeError`` with the solver's
    message rather than handing scipy a NaN.
    """

    def __new__(cls, problem, y0, method="cg", *, tol=1e-10, lower_method="newton-cg",
                lower_tol=None, lower_maxiter=1000, maxiter=None, backend=None):
        if cls is HyperObjective and (getattr(problem, "on_device", False) or check_backend(
                backend, "HyperObjective") == "cuda"):  # y, v warm on the device
            # a DeviceHyperObjective is a HyperObjective (registered below); Python does
            # not run __init__ again on it
            return DeviceHyperObjective(problem, y0, method, tol=tol,
                                        lower_method=lower_method, lower_tol=lower_tol,
                                        lower_maxiter=lower_maxiter, maxiter=maxiter,
                                        backend=backend)
        return super().__new__(cls)

    def __init__(self, problem, y0, method="cg", *, tol=1e-10, lower_method="newton-cg",
                 lower_tol=None, lower_maxiter=1000, maxiter=None, backend=None):
        _check_problem(problem)
        self._set_options(problem, method, tol, lower_method, lower_tol, lower_maxiter,
                          maxiter)
        self.y = as_vector("y0", y0, problem.dy)
        self.v = np.zeros(problem.dy)
        self._counts = new_counts()
        self._comp = None
        self.nsolves = 0
        # (x bytes, F, grad or None, whether the lower solve at x converged) of the last x
        self._point = None

    def _prepare(self, x):
        x = as_vector("x", x, self.problem.dx)
        if self._comp is None:
            self._comp = _compiled(self.problem, x, self.y)
        known = self._point
        return x, (known if known is not None and known[0] == x.tobytes() else None)

    def __call__(self, x):
        x, known = self._prepare(x)
        # fun(x) solved the lower level at x (and converged): reuse that solve
        if known is not None and known[3] and known[2] is None:
            res = implicit_call(self._comp, self.method, x, self.y, self.v, False,
                                self.lower, self.tol, 0.0, self.maxiter, -1.0, self._counts,
                                value=False)
            res.fun = known[1]
        else:
            self.nsolves += 1
            res = implicit_call(self._comp, self.method, x, self.y, self.v, True,
                                self.lower, self.tol, 0.0, self.maxiter, -1.0, self._counts)
        out = self._accept(res)
        self.y, self.v = res.y, res.v
        self._point = (x.tobytes(), out[0], out[1], res.lower_status == _low.OK)
        return out

    def fun(self, x):
        """F(x) alone: a lower solve (warm-started) and the upper value, or the value
        already known at x; a later :meth:`jac` or call at x reuses that solve."""
        x, known = self._prepare(x)
        if known is not None:
            return known[1]
        self.nsolves += 1
        y, status, gnorm = _solve_lower(self._comp, x, self.y, self.lower.code,
                                        self.lower.tol, self.lower.maxiter, self.lower.step,
                                        self._counts)
        if status not in (_low.OK, _low.MAXITER):
            raise RuntimeError(f"lower solve at x failed: {status_message(status)}")
        f = _upper_value(self._comp, x, y, self._counts)
        if not np.isfinite(f):
            raise CallbackError(f"F(x) = {f} at x; expected a finite value "
                                f"(lower solve |grad_y g| = {gnorm:.3e})")
        self.y = y
        self._point = (x.tobytes(), f, None, status == _low.OK)
        return f

    def jac(self, x):
        """grad F(x): the hypergradient already known at x, or one that reuses the lower
        solve of :meth:`fun` at x (else a full call)."""
        _, known = self._prepare(x)
        if known is not None and known[2] is not None:
            return known[2].copy()
        return self(x)[1]


HyperObjective.register(DeviceHyperObjective)
