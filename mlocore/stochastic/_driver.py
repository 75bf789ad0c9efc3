"""The driver of the stochastic methods, one for both backends: it validates the options,
builds the run on the CPU (here) or on the device (:mod:`mlocore.stochastic._device`),
runs the checkpoint loop (history, callback, ``tol``, step halvings and rewinds after a
divergence) and returns the result.

A backend's run supplies only what differs: its Lipschitz estimates for the default steps,
``advance(k, n)`` (n iterations of the method's loop from iteration k, then the divergence
test's norm), the saved state (a :class:`~mlocore.stochastic._spec.Rewind`) and the final
iterates. On the CPU the method's compiled loop (``spec.kernel``) runs ``eval_every``
iterations at a time; between calls (outside the timed region) the driver records the
history and calls the user's callback. The random state lives in arrays that persist
between calls, so the iterates do not depend on ``eval_every``.
"""
from __future__ import annotations

import copy
import dataclasses
import time
import warnings

import numpy as np
from scipy.optimize import OptimizeResult

from .._callbacks import (VEC, CallbackError, FnTuple, KeyedArgs, call_kernel, compile_callback,
                         placeholder)
from .._config import LIPSCHITZ_SAFETY
from .._hypergrad import _compiled, hypergrad, solve_lower
from .._kernels.oracles import N_COUNTERS
from .._problem import Ball, BilevelProblem
from .._results import status_message
from .._validation import as_vector, check_backend, check_choice, check_cpu_output, check_int
from ..cuda._session import check_problem_backend
from . import _device
from . import _sampling as _sk
from ._spec import (AUTO_FACTORS, AUTO_FRACTION, AUTO_STEP_OUT, DEFAULT_BATCH, SAMPLERS,
                    Context, Schedule, _divergence_detail, _norm, _record_checkpoint,
                    _reference_values, Rewind, _run_summary, _stop_at_checkpoint,
                    check_auto_steps, default_steps, parse_average, parse_run_options,
                    power_on_differences)

__all__ = ["minimize", "estimate_lipschitz", "check_sampled_callbacks"]


def _level_sampling(obj, role, batch_size, sampler, rng):
    """Sampler arrays ``(state, perm, order, buf)`` for one level."""
    n = obj.n_samples
    if n is None:  # deterministic objective: one "sample", callbacks get no idx
        bs, n = 1, 1
    else:
        bs = min(DEFAULT_BATCH, n) if batch_size is None else batch_size
        if bs > n:
            raise ValueError(f"{role}_batch_size = {bs} exceeds the {role} objective's "
                             f"n_samples = {n}; expected 1 <= batch size <= n_samples")
    kind = SAMPLERS[sampler]
    if bs == n:  # a full batch is the full batch, in order (reproduces deterministic runs)
        kind = _sk.BATCHES
        perm = np.arange(n, dtype=np.int64)
    elif kind == _sk.BATCHES:
        perm = rng.permutation(n).astype(np.int64)
    else:
        perm = np.arange(n, dtype=np.int64)
    nb = -(-n // bs)
    state = np.array([kind, bs, n, nb], dtype=np.int64)  # position nb: shuffle on first draw
    order = np.arange(nb, dtype=np.int64)
    buf = np.zeros(bs, dtype=np.int64)
    return (state, perm, order, buf), n, bs


def check_sampled_callbacks(obj, comp, z, dx=None):
    """Check idx-taking callbacks once at z: vector shapes for batches of several sizes, and
    that they return the *mean* over the samples in idx (the estimators assume it); with
    ``dx``, also each block oracle against the joint callback on one minibatch.

    Raises CallbackError for wrong shapes, a sum/other aggregate or a block that disagrees
    with the joint callback; warns when two disjoint batches give bit-identical gradients
    (a callback that ignores idx).
    """
    n = obj.n_samples
    if n is None:
        return
    raw = comp.args[1:]
    role = comp.role
    half = max(1, n // 2)
    parts = [np.arange(half, dtype=np.int64), np.arange(half, n, dtype=np.int64)]
    if n == 1:
        parts = [parts[0]]
    full = np.arange(n, dtype=np.int64)
    grads = []
    for idx in parts + [full, np.zeros(1, dtype=np.int64)]:
        try:
            g = comp.grad(z.copy(), idx, *raw)
        except Exception as exc:
            raise CallbackError(f"callback {role}.grad raised {type(exc).__name__}: {exc} "
                                f"when called with a batch of {idx.shape[0]} indices") from exc
        if not isinstance(g, np.ndarray) or g.shape != z.shape:
            raise CallbackError(f"callback {role}.grad returned shape "
                                f"{getattr(g, 'shape', type(g).__name__)} for a batch of "
                                f"{idx.shape[0]} indices; expected {z.shape}, the shape of z "
                                "(whatever the number of indices)")
        if not np.all(np.isfinite(g)):
            raise CallbackError(f"callback {role}.grad returned non-finite values for a batch "
                                f"of {idx.shape[0]} indices at the initial point")
        grads.append(g)
    if len(parts) == 2:
        mix = (parts[0].size * grads[0] + parts[1].size * grads[1]) / n
        scale = max(np.abs(grads[2]).max(), np.abs(grads[0]).max(), np.abs(grads[1]).max())
        if not np.allclose(mix, grads[2], rtol=1e-8, atol=1e-10 * (1.0 + scale)):
            raise CallbackError(
                f"callback {role}.grad is not the mean over the samples in idx: the weighted "
                f"average of its values on the two halves of the samples differs from its value "
                f"on all {n} samples by {np.abs(mix - grads[2]).max():.3g}. Stochastic "
                "callbacks must return mean_{i in idx} grad phi_i(z) (plus sample-independent "
                "terms)")
        if n >= 2 and np.array_equal(grads[0], grads[1]) and np.any(grads[0] != 0):
            warnings.warn(f"callback {role}.grad returns identical values for two disjoint "
                          "halves of the samples: does it use idx? A callback that ignores "
                          "idx makes every stochastic method a full-batch one.",
                          RuntimeWarning, stacklevel=3)
    if dx is not None and comp.blocks:
        _check_sampled_blocks(comp, z, dx, parts[0])


def _check_sampled_blocks(comp, z, dx, idx):
    """The block oracles of ``comp`` against its joint callbacks on the batch ``idx`` (the
    full-batch check of :meth:`~mlocore._problem.CompiledObjective.check_at`, on a
    minibatch: blocks take the sample indices as the joint callbacks do)."""
    on_batch = copy.copy(comp)
    on_batch.args = (idx,) + tuple(comp.args[1:])
    g = on_batch._call("grad", comp.grad, z.copy())
    try:
        on_batch._check_blocks(z, dx, g)
    except CallbackError as exc:
        raise CallbackError(f"{exc} (on a minibatch of {idx.shape[0]} samples)") from None


def _kernel_args(obj, comp):
    if obj.n_samples is None:
        return KeyedArgs((None,) + tuple(obj.args))
    return comp.kargs


_IDENTITY = None


def _projection(problem):
    """``(mode, lb, ub, fn)`` for the kernels (see ``stochastic/_sampling.py``)."""
    global _IDENTITY
    if _IDENTITY is None:
        disp, t = compile_callback(placeholder("vector", 1, 0), "placeholder", (VEC,),
                                   "vector")
        _IDENTITY = FnTuple(disp, t, single=True)
    dx = problem.dx
    user = problem._project
    if isinstance(user, Ball):
        return (2, user.center_for(dx), np.array([user.radius]), _IDENTITY)
    if user is not None:
        disp, t = compile_callback(user, "project", (VEC,), "vector")
        return (3, np.zeros(dx), np.zeros(dx), FnTuple(disp, t, single=True))
    if problem.lb is not None:
        return (1, problem.lb, problem.ub, _IDENTITY)
    return (0, np.zeros(dx), np.zeros(dx), _IDENTITY)


def estimate_lipschitz(problem, x, y, which, *, iters=15):
    """Full-batch estimates at (x, y) of ``L_g = lambda_max(H_yy)`` (``which="lower"``) or of
    ``L_F``, the largest |eigenvalue| of the Hessian of F (``which="upper"``; power iteration
    on central differences of exact hypergradients, each with its own lower solve)."""
    if which == "lower":
        res = solve_lower(problem, x, y, method="gd", maxiter=0)
        return 1.0 / res.step
    ys = solve_lower(problem, x, y, tol=1e-10).y
    return power_on_differences(
        lambda xx: hypergrad(problem, xx, ys, method="cg", tol=1e-10).grad, x, iters)


def _batch_lipschitz(comp, x, y, batch_size, n, seed, n_batches=8, iters=20):
    """``max_b lambda_max(H_yy(x, y; b))`` over a few uniform minibatches (power iteration,
    times the usual 1.05 safety): what a minibatch step of ``1/L`` must stay stable for."""
    rng = np.random.default_rng([seed, 7919])
    dx = x.shape[0]
    z = np.concatenate([x, y])
    raw = comp.args[1:]
    best = 0.0
    for _ in range(n_batches):
        idx = np.ascontiguousarray(rng.integers(0, n, batch_size), dtype=np.int64)
        v = np.linspace(1.0, 2.0, y.shape[0])
        v /= np.linalg.norm(v)
        lam = 0.0
        for _ in range(iters):
            w = np.zeros_like(z)
            w[dx:] = v
            if comp.has_hvp:
                hv = comp.hvp(z, w, idx, *raw)[dx:]
            else:
                eps = 1e-6 * (1.0 + np.linalg.norm(z))
                hv = (comp.grad(z + eps * w, idx, *raw)
                      - comp.grad(z - eps * w, idx, *raw))[dx:] / (2 * eps)
            lam = float(np.linalg.norm(hv))
            if not np.isfinite(lam) or lam == 0.0:
                break
            v = hv / lam
        if np.isfinite(lam):
            best = max(best, lam)
    return LIPSCHITZ_SAFETY * best


class _CpuRun:
    """A run of a method's compiled loop on a :class:`~mlocore.BilevelProblem`."""

    def __init__(self, spec, method, problem, x0, y0, batch_size, upper_batch_size, sampler,
                 seed):
        self.spec, self.problem = spec, problem
        x = as_vector("x0", x0, problem.dx)
        y = as_vector("y0", y0, problem.dy)
        comp = _compiled(problem, x, y)
        if not getattr(problem, "_sample_checked", False):
            z = np.concatenate([x, y])
            check_sampled_callbacks(problem.upper, comp.upper, z, problem.dx)
            check_sampled_callbacks(problem.lower, comp.lower, z, problem.dx)
            problem._sample_checked = True
        if spec.needs_value and not problem.lower.value:
            raise ValueError(f"method {method!r} needs the lower objective's value callback")
        seq = np.random.SeedSequence(seed)
        np_rng = np.random.default_rng(seq.spawn(1)[0])
        self.samp_u, n_u, bs_u = _level_sampling(problem.upper, "upper", upper_batch_size,
                                                 sampler, np_rng)
        self.samp_l, n_l, bs_l = _level_sampling(problem.lower, "lower", batch_size, sampler,
                                                 np_rng)
        self.rng = seq.generate_state(1, np.uint64)
        self.x = problem.project(x)
        self.y = y
        self.comp, self.seed = comp, seed
        self.sizes = (n_u, n_l, bs_u, bs_l)
        self.batch_size = (bs_u, bs_l)
        self.counts = np.zeros(2 * N_COUNTERS, dtype=np.int64)
        self._lips = {}

    def lipschitz(self, which):
        """"upper": L_F; "lower_full": lambda_max of the full-batch H_yy (the Neumann step,
        whose truncation bias grows as it shrinks); "lower": also over a few minibatch
        H_yy, which can be much stiffer than their mean: an SGD step of 1/L_g must be stable
        for the batches the method will actually draw."""
        lips = self._lips
        if which not in lips:
            problem, x, y = self.problem, self.x, self.y
            n_u, n_l, bs_u, bs_l = self.sizes
            if which == "lower":
                lips[which] = self.lipschitz("lower_full")
                if problem.lower.n_samples is not None and bs_l < n_l:
                    lips[which] = max(lips[which], _batch_lipschitz(
                        self.comp.lower, x, y, bs_l, n_l, self.seed))
            else:
                lips[which] = estimate_lipschitz(problem, x, y, which.replace("_full", ""))
        return lips[which]

    def context(self):
        return Context(self.problem, self.x, self.y, *self.sizes, self.lipschitz)

    def build(self, alpha, beta, eta, T, Q, work, fextra, iextra):
        self.work = work
        self.fpar = np.array(alpha.as_array() + beta.as_array() + [eta] + list(fextra),
                             dtype=np.float64)
        self.ipar = np.array([T, Q] + list(iextra), dtype=np.int64)
        self.proj = _projection(self.problem)
        self.uargs = _kernel_args(self.problem.upper, self.comp.upper)
        self.largs = _kernel_args(self.problem.lower, self.comp.lower)
        # everything a kernel call changes is saved, except the oracle counters (the wasted
        # work stays counted, as does its time)
        # the running sum of the averaged iterates (x, y) travels with the saved states
        self.acc = np.zeros(self.x.shape[0] + self.y.shape[0])
        self.rewind = Rewind((self.x, self.y, work, self.rng, self.acc) + tuple(self.samp_u)
                              + tuple(self.samp_l))

    def _run(self, k0, n):
        comp = self.comp
        return call_kernel(self.spec.kernel, comp.upper.fns, self.uargs, comp.lower.fns,
                           self.largs, comp.upper.flags, comp.lower.flags, self.x, self.y,
                           self.work, self.fpar, self.ipar, self.samp_u, self.samp_l, self.rng,
                           self.proj, k0, n, self.counts)

    def start(self):
        self._run(0, 0)  # compile (or load from the disk cache) outside the timed region
        return self.x, _norm(self.x, self.y)

    def advance(self, k, n):
        t0 = time.perf_counter()
        s = self.avg_start
        if k + n <= s:
            st, done = self._run(k, n)
        else:  # inside the averaging window: one iteration per call, then add (x, y)
            st, done, j = _sk.OK, 0, k
            if k < s:
                st, done = self._run(k, s - k)
                j = s
            dx = self.x.shape[0]
            while st == _sk.OK and j < k + n:
                st, d = self._run(j, 1)
                if st == _sk.OK:
                    self.acc[:dx] += self.x
                    self.acc[dx:] += self.y
                    d = 1
                done = j - k + d
                j += 1
        dt = time.perf_counter() - t0
        failed = f"non-finite iterate at iteration {k + int(done) + 1}" if st != _sk.OK \
            else None
        return dt, failed, _norm(self.x, self.y), self.x

    _SLOTS = (_sk.ALPHA0, _sk.BETA0, _sk.ETA)

    def halve(self, which):
        self.fpar[[self._SLOTS[i] for i in which]] *= 0.5

    def steps(self):
        return tuple(float(self.fpar[i]) for i in self._SLOTS)

    def xy_copies(self, x):
        return x.copy(), self.y.copy()

    def averaged(self, k):
        """``(x, y, x)``: the mean of the iterates after iterations ``avg_start .. k - 1``, or
        None before the window."""
        m = k - self.avg_start
        if m <= 0:
            return None
        dx = self.x.shape[0]
        xa = self.acc[:dx] / m
        return xa, self.acc[dx:] / m, xa

    def finish(self, x_host):
        extras = {} if self.spec.result is None else self.spec.result(self.work)
        return self.x, self.y, extras, self.work, {}


def _run_loop(run, counts, maxiter, eval_every, backtrack, halvable, tol, callback,
              reference, problem):
    """Checkpoints every ``eval_every`` iterations (history, ``tol``, ``callback``). Steps
    that came from the Lipschitz defaults (``halvable``: 0 alpha, 1 beta, 2 eta) are halved
    on divergence (up to ``backtrack`` times) and the run resumes from a saved state; steps
    the user set are never changed."""
    history = {"iteration": [], "time": [], "oracle_calls": [], "samples": []}
    elapsed = 0.0
    status, k, detail = 20, 0, ""
    rewind = run.rewind
    x_host, norm0 = run.start()
    current_ref = _record_checkpoint(history, k, elapsed, counts, reference, x_host, problem)
    rewind.checkpoint(0, norm0, x_host)
    while k < maxiter:
        n = min(eval_every, maxiter - k)
        dt, failed, nz, x_new = run.advance(k, n)
        elapsed += dt
        if failed is None and rewind.blown_up(nz, k + n):
            failed = f"|(x, y)| grew to {nz:.3g} by iteration {k + n}"
        if failed is not None:
            if rewind.reductions < backtrack and halvable:
                run.halve(halvable)
                k = rewind.restore()
                for val in history.values():
                    del val[rewind.n_checkpoints:]
                continue
            rewind.restore_last()
            status = 13
            alpha0, beta0, _ = run.steps()
            detail = _divergence_detail(failed, rewind.reductions, halvable, k, alpha0, beta0)
            break
        k += n
        rewind.checkpoint(k, nz, x_new)
        current_ref = _record_checkpoint(history, k, elapsed, counts, reference, x_new,
                                         problem)
        stop = _stop_at_checkpoint(current_ref, tol, callback, k, elapsed,
                                   lambda: run.xy_copies(x_new))
        if stop is not None:
            status = stop
            break
    return status, k, detail, elapsed, current_ref, history


def minimize(methods, device_only, problem, x0, y0, method, *, maxiter=1000, batch_size=None,
             upper_batch_size=None, sampler=None, step=None, inner_step=None,
             inner_steps=None, neumann_terms=None, neumann_step=None, seed=None,
             eval_every=None, tol=None, callback=None, reference=None, backtrack=None,
             backend=None, output="numpy", average=None, **method_options):
    """Run ``methods[method]`` (a :class:`~mlocore.stochastic._spec.MethodSpec`) on the CPU,
    or on the device for a device problem, ``backend="cuda"`` or ``device_only`` (the
    device entry point, which refuses CPU problems). ``step="auto"`` first runs the counted
    step search (:func:`_step_search`)."""
    opts = dict(maxiter=maxiter, batch_size=batch_size, upper_batch_size=upper_batch_size,
                sampler=sampler, inner_steps=inner_steps, neumann_terms=neumann_terms,
                neumann_step=neumann_step, seed=seed, eval_every=eval_every, tol=tol,
                callback=callback, reference=reference, backtrack=backtrack,
                backend=backend, output=output, average=average, **method_options)
    if not check_auto_steps(step, inner_step):
        return _minimize_once(methods, device_only, problem, x0, y0, method, step=step,
                              inner_step=inner_step, **opts)
    return _step_search(methods, device_only, problem, x0, y0, method, inner_step, opts)


def _full_upper_F(problem, x, y, device):
    """The trial score ``F(x) = f(x, y*(x))`` on the full batches: y*(x) from a full-batch
    lower solve warm-started at y (tol 1e-8), then the mean of the upper sample values.
    Neither is a counted oracle call of the run."""
    obj = problem.upper
    if device:
        return _device.full_upper_F(problem, x, y)
    x = np.asarray(x, dtype=np.float64)
    ys = solve_lower(problem, x, np.asarray(y, dtype=np.float64), tol=1e-8).y
    z = np.concatenate([x, ys])
    if obj.n_samples is None:
        return float(obj.value(z, *obj.args))
    return float(obj.value(z, np.arange(obj.n_samples, dtype=np.int64), *obj.args))


def _add_counts(a, b):
    return {key: a[key] + b[key] for key in a}


def _step_search(methods, device_only, problem, x0, y0, method, inner_step, opts):
    """``step="auto"``: trial runs on the grid ``AUTO_FACTORS`` times the default initial
    upper and lower steps (upper only when ``inner_step`` is given), each for
    ``ceil(AUTO_FRACTION maxiter)`` iterations from (x0, y0) with the run's seed (common
    random numbers), scored by ``reference.F`` at the trial's returned x when the
    reference has F, else by the full-batch ``F(x) = f(x, y*(x))`` (a lower solve
    warm-started at the trial's y, then the upper value callback on all samples);
    a best pair at the smallest upper factor is followed by one trial with an upper step
    ``AUTO_STEP_OUT`` times smaller (the upper default ``0.5 / L_F`` is the guess: ``L_F``
    at x0 can be far below its value where the run goes, e.g. the breast-cancer penalties;
    the lower default is a stability bound, and short trials favour large steps, whose
    noise floor shows later, so the grid grows only there); the best pair (ties: the first
    tried) runs the full budget, its steps halved on divergence as the defaults are. A
    trial that diverges
    (status 13) or scores non-finite scores inf; when all do, the default steps run. The
    trials' oracle calls, samples and time are added to the result's totals (and to its
    history) and reported in ``res.step_search``."""
    reference = opts["reference"]
    device = device_only or getattr(problem, "on_device", False) or opts["backend"] == "cuda"
    if reference is not None and hasattr(reference, "F"):
        score_name = "reference.F(x)"

        def score(res):
            x = res.x if isinstance(res.x, np.ndarray) else res.x.copy_to_host()
            return float(reference.F(x))
    else:
        if problem.upper.value is None:
            raise ValueError("step='auto' scores the trial runs by the upper objective: it "
                             "needs the upper objective's value callback or a reference "
                             "with F(x); got neither")
        score_name = "full-batch F(x) = f(x, y*(x))"

        def score(res):
            return _full_upper_F(problem, res.x, res.y, device)
    seed = opts["seed"]
    if seed is None:  # one seed for the trials and the final run
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    maxiter = check_int("maxiter", opts["maxiter"], 0)
    trial_iters = max(1, int(np.ceil(AUTO_FRACTION * maxiter)))
    trial_opts = dict(opts, maxiter=trial_iters, seed=seed, tol=None, callback=None,
                      reference=None, eval_every=None, output="numpy")
    # the default schedules (a zero-iteration run computes them as a full run would)
    base = _minimize_once(methods, device_only, problem, x0, y0, method, step=None,
                          inner_step=inner_step, **dict(trial_opts, maxiter=0))
    alpha, beta = base.steps["alpha"], base.steps["beta"]
    beta_factors = AUTO_FACTORS if inner_step is None else (None,)
    grid, scores, trials, factors = [], [], [], []
    calls = samples = None
    elapsed = score_time = 0.0

    def run_trial(fa, fb):
        nonlocal calls, samples, elapsed, score_time
        a = dataclasses.replace(alpha, initial=alpha.initial * fa)
        b = inner_step if fb is None else dataclasses.replace(beta, initial=beta.initial * fb)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = _minimize_once(methods, device_only, problem, x0, y0, method, step=a,
                                 inner_step=b, **trial_opts)
        t0 = time.perf_counter()
        val = score(res) if res.status != 13 else np.inf
        score_time += time.perf_counter() - t0
        val = float(val) if val is not None and np.isfinite(val) else np.inf
        grid.append((a.initial, beta.initial * fb if fb is not None else
                     (b.initial if isinstance(b, Schedule) else float(b))))
        scores.append(val)
        trials.append((a, b))
        factors.append((fa, fb))
        calls = res.oracle_calls if calls is None else _add_counts(calls, res.oracle_calls)
        samples = res.oracle_samples if samples is None else \
            _add_counts(samples, res.oracle_samples)
        elapsed += res.time

    for fa in AUTO_FACTORS:
        for fb in beta_factors:
            run_trial(fa, fb)
    if np.isfinite(np.min(scores)):  # the best at the smallest upper step: one step out
        fa, fb = factors[int(np.argmin(scores))]
        if fa == AUTO_FACTORS[0]:
            run_trial(fa / AUTO_STEP_OUT, fb)
    best = int(np.argmin(scores)) if np.isfinite(np.min(scores)) else None
    if best is None:
        a_best, b_best = None, inner_step
    else:
        a_best, b_best = trials[best]
    # the chosen steps stay scaled defaults: halved on divergence as the defaults are
    res = _minimize_once(methods, device_only, problem, x0, y0, method, step=a_best,
                         inner_step=b_best, _searched=(best is not None,
                                                       best is not None and inner_step is None),
                         **dict(opts, seed=seed))
    elapsed += score_time
    search = {"grid": grid, "scores": scores, "best": best, "score": score_name,
              "iterations": trial_iters, "oracle_calls": calls, "oracle_samples": samples,
              "time": elapsed, "score_time": score_time}
    res.step_search = search
    res.oracle_calls = _add_counts(res.oracle_calls, calls)
    res.oracle_samples = _add_counts(res.oracle_samples, samples)
    res.time = res.time + elapsed
    hist = res.history
    hist["oracle_calls"] = hist["oracle_calls"] + sum(calls.values())
    hist["samples"] = hist["samples"] + sum(samples.values())
    hist["time"] = hist["time"] + elapsed
    return res


def _minimize_once(methods, device_only, problem, x0, y0, method, *, maxiter=1000,
                   batch_size=None, upper_batch_size=None, sampler=None, step=None,
                   inner_step=None, inner_steps=None, neumann_terms=None, neumann_step=None,
                   seed=None, eval_every=None, tol=None, callback=None, reference=None,
                   backtrack=None, backend=None, output="numpy", average=None,
                   _searched=(False, False), **method_options):
    """One run with numeric (or default) steps; ``_searched`` marks the upper and lower
    steps that :func:`_step_search` chose (scaled defaults, halvable on divergence)."""
    where = "minimize_bilevel (stochastic methods)"
    device = device_only or getattr(problem, "on_device", False) or \
        check_backend(backend, where) == "cuda"
    if device:
        check_problem_backend(problem, backend, where)
        check_choice("method", method, tuple(methods))
        _device.check_output(output)
    else:
        check_cpu_output(output)
        if not isinstance(problem, BilevelProblem):
            raise TypeError(f"problem must be an mlocore.BilevelProblem, got "
                            f"{type(problem).__name__}")
        check_choice("method", method, tuple(methods))
    spec = methods[method]
    maxiter, T, Q, extra, batch_size, upper_batch_size, sampler, seed, eval_every, \
        backtrack, tol = parse_run_options(
            spec, method, maxiter=maxiter, batch_size=batch_size,
            upper_batch_size=upper_batch_size, sampler=sampler, inner_steps=inner_steps,
            neumann_terms=neumann_terms, neumann_step=neumann_step, seed=seed,
            eval_every=eval_every, tol=tol, callback=callback, reference=reference,
            backtrack=backtrack, method_options=method_options)
    avg_fraction, avg_start = parse_average(spec, average, maxiter)
    if device:
        run = _device.DeviceRun(spec, method, problem, x0, y0, batch_size, upper_batch_size,
                                sampler, seed, step, inner_step, DEFAULT_BATCH, output)
    else:
        run = _CpuRun(spec, method, problem, x0, y0, batch_size, upper_batch_size, sampler,
                      seed)
    alpha, beta, eta = default_steps(spec, step, inner_step, neumann_step, run.lipschitz)
    ctx = run.context()
    ctx.T, ctx.Q, ctx.eta, ctx.sampler = T, Q, eta, sampler
    work, fextra, iextra = (np.zeros(0), [], []) if spec.setup is None else \
        spec.setup(ctx, extra)
    run.build(alpha, beta, eta, T, Q, work, fextra, iextra)
    run.avg_start = avg_start
    halvable = [i for i, (given, s) in enumerate(((step, alpha.initial),
                                                  (inner_step, beta.initial),
                                                  (neumann_step, eta)))
                if (given is None or (i < 2 and _searched[i])) and s > 0]
    counts = run.counts
    status, k, detail, elapsed, current_ref, history = _run_loop(
        run, counts, maxiter, eval_every, backtrack, halvable, tol, callback, reference,
        problem)
    reductions = run.rewind.reductions
    status, detail, calls, samples, hist = _run_summary(status, detail, tol, reductions,
                                                        counts, history)
    x, y, extras, state_work, tail = run.finish(run.rewind.extra_last)
    x_last, y_last = x, y
    averaged = run.averaged(k)
    n_avg = 0
    if averaged is not None:
        x, y, x_host = averaged
        n_avg = k - avg_start
        current_ref = _reference_values(reference, x_host, problem)
        if "transfers" in tail:
            tail["transfers"] = run.counter.as_dict()
    alpha0, beta0, eta0 = run.steps()
    return OptimizeResult(
        x=x, y=y, fun=current_ref.get("F", np.nan), jac=current_ref.get("_grad"), nit=k,
        success=status in (0, 20), status=status, message=status_message(status, detail),
        method=method, seed=seed, oracle_calls=calls, oracle_samples=samples, history=hist,
        steps={"alpha": dataclasses.replace(alpha, initial=alpha0),
               "beta": dataclasses.replace(beta, initial=beta0),
               "neumann_step": eta0},
        step_reductions=reductions, **extras, batch_size=run.batch_size, time=elapsed,
        state={"work": state_work}, x_last=x_last, y_last=y_last,
        average={"fraction": avg_fraction, "iterations": n_avg}, **tail)
