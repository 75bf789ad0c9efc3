"""Stochastic bilevel algorithms (ALGORITHMS.md section 4): option handling, default step
sizes, checkpoints and history around the compiled loops of ``_kernels/stoch_*.py``.

Each method is a :class:`MethodSpec` in :data:`METHODS`: its kernel, the schedules' default
decay powers, default sampler, the extra options it accepts and how they fill the kernel's
``work``/``fpar``/``ipar`` arrays. The driver runs the kernel ``eval_every`` iterations at a
time; between calls (outside the timed region) it records the history and calls the user's
callback. The random state lives in arrays that persist between calls, so the iterates do
not depend on ``eval_every``.
"""
from __future__ import annotations

import dataclasses
import numbers
import time
from typing import Callable

import numpy as np
from scipy.optimize import OptimizeResult

from ._callbacks import (VEC, CallbackError, FnTuple, KeyedArgs, call_kernel, compile_callback,
                         placeholder)
from ._kernels import stochastic as _sk
from ._kernels import stoch_implicit as _si
from ._kernels.oracles import COUNTER_NAMES, N_COUNTERS
from ._problem import Ball, BilevelProblem
from ._results import status_message
from ._validation import (as_vector, check_backend, check_choice, check_cpu_output,
                          check_int, check_positive)

__all__ = ["Schedule", "METHODS", "STOCHASTIC_METHODS", "minimize_stochastic",
           "estimate_lipschitz"]

#: default upper-level step = STEP_SAFETY / L_F, lower step and Neumann step = 1 / L_g
STEP_SAFETY = 0.5
#: decaying default schedules keep their initial step for about this many iterations
DEFAULT_OFFSET = 100.0
DEFAULT_BATCH = 64
#: default number of step halvings after a divergence (``backtrack`` option)
DEFAULT_BACKTRACK = 8
#: an iterate norm above BLOWUP_FACTOR (1 + |z_0|) that also grew BLOWUP_GROWTH-fold since
#: the checkpoint at half the iterations counts as divergence while still finite
BLOWUP_FACTOR = 1.0e3
BLOWUP_GROWTH = 4.0
SAMPLERS = {"uniform": _sk.UNIFORM, "batches": _sk.BATCHES}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Step-size schedule ``s_k = initial * (offset / (offset + k))**power``, k = 0, 1, ...

    ``power = 0`` is a constant step; ``Schedule(a, 0.5)`` is ``a / sqrt(k + 1)`` (offset 1).
    """

    initial: float
    power: float = 0.0
    offset: float = 1.0

    def __post_init__(self):
        check_positive("Schedule.initial", self.initial)
        check_positive("Schedule.power", self.power, allow_zero=True)
        check_positive("Schedule.offset", self.offset)

    def __call__(self, k):
        return self.initial * (self.offset / (self.offset + k)) ** self.power

    def as_array(self):
        return [float(self.initial), float(self.power), float(self.offset)]


@dataclasses.dataclass
class MethodSpec:
    """How a method fills its kernel's arrays. ``setup(ctx, opts)`` returns
    ``(work, extra_fpar, extra_ipar)``; ``options`` maps the extra option names the method
    accepts to their defaults."""

    kernel: object
    alpha_power: float = 0.0
    beta_power: float = 0.0
    inner_steps: int = 1
    neumann_terms: int = 10
    sampler: str = "uniform"
    alpha_safety: float = 1.0   # default alpha0 = alpha_safety * STEP_SAFETY / L_F
    beta_safety: float = 1.0    # default beta0 = beta_safety / L_g
    uses: tuple = ("inner_steps", "neumann_terms", "neumann_step")
    options: dict = dataclasses.field(default_factory=dict)
    setup: Callable = None
    needs_value: bool = False
    result: Callable = None     # work -> dict of extra result fields
    doc: str = ""


def _work_v(ctx, opts):
    return np.zeros(ctx.dy), [], []


METHODS = {
    "alternating": MethodSpec(_si.run_alternating, alpha_power=0.5, uses=("inner_steps",),
                              doc="T lower SGD steps, then an upper SGD step on grad_x f"),
    "bsa": MethodSpec(_si.run_bsa, alpha_power=0.5, inner_steps=10,
                      doc="Ghadimi & Wang 2018: randomized Neumann, double loop"),
    "stocbio": MethodSpec(_si.run_stocbio, alpha_power=0.5, inner_steps=10,
                          doc="Ji, Yang & Liang 2021: Neumann sum, warm-started inner SGD"),
    "aid": MethodSpec(_si.run_aid, alpha_power=0.5, inner_steps=10,
                      uses=("inner_steps", "neumann_terms"),
                      setup=_work_v, doc="stochastic AID-BiO: CG on a minibatch Hessian"),
    "ttsa": MethodSpec(_si.run_ttsa, alpha_power=0.6, beta_power=0.4, inner_steps=1,
                       doc="Hong et al. 2023: two timescales, alpha ~ k^-3/5, beta ~ k^-2/5"),
    "soba": MethodSpec(_si.run_soba, alpha_power=0.6, beta_power=0.4, uses=(),
                       setup=_work_v, doc="Dagreou et al. 2022: joint steps on y, v, x"),
}

def _register_families():
    """Methods defined in their own family modules (``_stochastic_<family>.py``)."""
    from ._stochastic_free import FREE_METHODS
    from ._stochastic_variance import VARIANCE_METHODS
    METHODS.update(VARIANCE_METHODS)
    METHODS.update(FREE_METHODS)


_register_families()
STOCHASTIC_METHODS = tuple(METHODS)


class _Context:
    """What a method's setup sees: sizes, sampler sizes, Lipschitz estimates (lazy)."""

    def __init__(self, problem, x0, y0, n_u, n_l, bs_u, bs_l, lipschitz):
        self.problem, self.x0, self.y0 = problem, x0, y0
        self.dx, self.dy = problem.dx, problem.dy
        self.n_upper, self.n_lower = n_u, n_l
        self.batch_upper, self.batch_lower = bs_u, bs_l
        self.n_batches_upper = -(-n_u // bs_u)
        self.n_batches_lower = -(-n_l // bs_l)
        self._lipschitz = lipschitz

    def lipschitz(self, which):
        return self._lipschitz(which)


def _as_schedule(name, value, default_power, default_initial):
    off = DEFAULT_OFFSET if default_power > 0 else 1.0
    if value is None:
        return Schedule(default_initial(), default_power, off)
    if isinstance(value, Schedule):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return Schedule(check_positive(name, value), default_power, off)
    raise TypeError(f"{name} must be None, a positive number or mlocore.Schedule, got "
                    f"{value!r}")


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


def check_sampled_callbacks(obj, comp, z):
    """Check idx-taking callbacks once at z: vector shapes for batches of several sizes, and
    that they return the *mean* over the samples in idx (the estimators assume it).

    Raises CallbackError for wrong shapes or a sum/other aggregate; warns when two disjoint
    batches give bit-identical gradients (a callback that ignores idx).
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
            import warnings
            warnings.warn(f"callback {role}.grad returns identical values for two disjoint "
                          "halves of the samples: does it use idx? A callback that ignores "
                          "idx makes every stochastic method a full-batch one.",
                          RuntimeWarning, stacklevel=3)


def _kernel_args(obj, comp):
    if obj.n_samples is None:
        return KeyedArgs((None,) + tuple(obj.args))
    return comp.kargs


_IDENTITY = None


def _projection(problem):
    """``(mode, lb, ub, fn)`` for the kernels (see ``_kernels/stochastic.py``)."""
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
    from ._hypergrad import hypergrad, solve_lower
    if which == "lower":
        res = solve_lower(problem, x, y, method="gd", maxiter=0)
        return 1.0 / res.step
    ys = solve_lower(problem, x, y, tol=1e-10).y
    rng = np.random.default_rng(12345)
    u = rng.standard_normal(problem.dx)
    u /= np.linalg.norm(u)
    h = 1e-4 * (1.0 + np.linalg.norm(x))
    lam = 0.0
    for _ in range(iters):
        gp = hypergrad(problem, x + h * u, ys, method="cg", tol=1e-10).grad
        gm = hypergrad(problem, x - h * u, ys, method="cg", tol=1e-10).grad
        hu = (gp - gm) / (2 * h)
        lam = float(np.linalg.norm(hu))
        if not np.isfinite(lam) or lam == 0.0:
            break
        u = hu / lam
    return max(lam, 1e-12)


def _batch_lipschitz(comp, x, y, batch_size, n, seed, n_batches=8, iters=20):
    """``max_b lambda_max(H_yy(x, y; b))`` over a few uniform minibatches (power iteration,
    times the usual 1.05 safety): what a minibatch step of ``1/L`` must stay stable for."""
    from ._config import LIPSCHITZ_SAFETY
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


def _norm(x, y):
    with np.errstate(over="ignore"):  # |z| ~ 1e160 overflows |z|^2: inf is a blow-up too
        return float(np.sqrt(x @ x + y @ y))


class _Rewind:
    """Saved kernel states for resuming after a divergence (``backtrack``).

    The state at the last checkpoint and at the start are kept. A divergence resumes from
    the last checkpoint; a second one before the next checkpoint means that state is
    already spoiled (e.g. a penalty run off to where exp overflows on the next step), so
    the run restarts from the start. Each resume follows a halving of the default steps.
    """

    def __init__(self, arrays):
        self.arrays = arrays
        self.reductions = 0
        self.norms = []          # (iteration, |(x, y)|) per kept checkpoint
        self.start = self.last = None
        self.resumed = False     # a resume happened since the last checkpoint

    def checkpoint(self, k, norm):
        self.last = [a.copy() for a in self.arrays]
        if self.start is None:
            self.start = self.last
        self.norms.append((k, norm))
        self.resumed = False

    @property
    def n_checkpoints(self):
        return len(self.norms)

    def blown_up(self, norm, k):
        """Growth without bound while still finite: ``|z|`` above ``BLOWUP_FACTOR (1 +
        |z_0|)`` and ``BLOWUP_GROWTH`` times its value at the checkpoint nearest to k/2
        (linear drift at most doubles over that span; geometric growth multiplies)."""
        if not np.isfinite(norm):
            return True
        if norm <= BLOWUP_FACTOR * (1.0 + self.norms[0][1]):
            return False
        past = [nz for kk, nz in self.norms if 1 <= kk <= k / 2]
        return bool(past) and 1.0 + norm > BLOWUP_GROWTH * (1.0 + past[-1])

    def _put(self, saved):
        for a, val in zip(self.arrays, saved):
            a[...] = val

    def restore(self):
        """Resume after a step halving; returns the iteration resumed from."""
        self.reductions += 1
        if self.resumed:  # diverged again before any new checkpoint: go back to the start
            del self.norms[1:]
            self.last = self.start
        self.resumed = True
        self._put(self.last)
        return self.norms[-1][0]

    def restore_last(self):
        self._put(self.last)


def _reference_values(reference, x, problem=None):
    """The reference's values at a checkpoint: ``F``, ``grad_norm_sq`` (and ``_grad``),
    ``dist_to_x_star``; for a constrained ``problem`` also ``grad_mapping_sq``,
    ``|x - P(x - grad F)|^2`` (stationarity with constraints)."""
    out = {}
    if reference is None:
        return out
    if hasattr(reference, "F"):
        out["F"] = float(reference.F(x))
    if hasattr(reference, "hypergrad"):
        g = np.asarray(reference.hypergrad(x), dtype=np.float64)
        out["grad_norm_sq"] = float(g @ g)
        out["_grad"] = g
        if problem is not None and problem.constrained:
            gm = x - problem.project(x - g)
            out["grad_mapping_sq"] = float(gm @ gm)
    xs = getattr(reference, "x_star", None)
    if xs is not None:
        out["dist_to_x_star"] = float(np.linalg.norm(x - xs))
    return out


def _record_checkpoint(history, k, elapsed, counts, reference, x, problem):
    """Append checkpoint k to ``history`` (iteration, time, oracle calls and samples so far,
    the reference's public values at x); returns the reference values (``_grad`` too)."""
    history["iteration"].append(k)
    history["time"].append(elapsed)
    history["oracle_calls"].append(int(counts[:N_COUNTERS].sum()))
    history["samples"].append(int(counts[N_COUNTERS:].sum()))
    ref = _reference_values(reference, x, problem)
    for key, val in ref.items():
        if not key.startswith("_"):
            history.setdefault(key, []).append(val)
    return ref


def _divergence_detail(what, reductions, halvable, k, alpha0, beta0):
    """The message of a run that diverged after its last allowed halving (status 13)."""
    halved = (f"after {reductions} halvings of the default steps" if halvable
              else "with the steps given")
    return (f"Diverged ({what}) {halved}; returning the last checkpoint's iterate "
            f"(iteration {k}). Decrease step / inner_step (now {alpha0:.3g} / {beta0:.3g}).")


def _stop_at_checkpoint(current_ref, tol, callback, k, elapsed, xy):
    """After a kept checkpoint: status 0 when ``tol`` is met (:func:`_stationarity`), 99
    when ``callback`` raised StopIteration, else None. ``xy()`` gives the (x, y) copies
    handed to the callback (called only when there is one)."""
    if tol is not None and _stationarity(current_ref) <= tol:
        return 0
    if callback is not None:
        x, y = xy()
        inter = OptimizeResult(x=x, y=y, nit=k, time=elapsed,
                               **{key: v for key, v in current_ref.items()
                                  if not key.startswith("_")})
        if "F" in current_ref:
            inter.fun = current_ref["F"]
        try:
            callback(inter)
        except StopIteration:
            return 99
    return None


def _run_summary(status, detail, tol, reductions, counts, history):
    """``(status, detail, oracle_calls, oracle_samples, history)`` at the end of a run:
    maxiter with a tol is status 10; halvings are reported unless the run diverged."""
    if status == 20 and tol is not None:
        status = 10
    if reductions and status != 13:
        detail = (f"The default steps were halved {reductions} time(s) after divergence "
                  f"(res.steps holds the final ones).")
    calls = {name: int(c) for name, c in zip(COUNTER_NAMES, counts[:N_COUNTERS])}
    samples = {name: int(c) for name, c in zip(COUNTER_NAMES, counts[N_COUNTERS:])}
    hist = {key: np.asarray(val) for key, val in history.items()}
    return status, detail, calls, samples, hist


def _stationarity(ref):
    """What ``tol`` is compared with: the projected-gradient mapping ``|x - P(x - grad
    F)|^2`` with constraints (``grad F`` need not vanish on the boundary), else ``|grad
    F|^2``; inf without a reference hypergradient."""
    return ref.get("grad_mapping_sq", ref.get("grad_norm_sq", np.inf))


def parse_run_options(spec, method, *, maxiter, batch_size, upper_batch_size, sampler,
                      inner_steps, neumann_terms, neumann_step, seed, eval_every, tol,
                      callback, reference, backtrack, method_options):
    """Validate the options every stochastic driver (CPU and CUDA) shares; returns
    ``(maxiter, T, Q, extra, batch_size, upper_batch_size, sampler, seed, eval_every,
    backtrack, tol)`` with the method's defaults filled in and a drawn seed for None."""
    maxiter = check_int("maxiter", maxiter, 0)
    for name, value in (("inner_steps", inner_steps), ("neumann_terms", neumann_terms),
                        ("neumann_step", neumann_step)):
        if value is not None and name not in spec.uses:
            raise TypeError(f"method {method!r} does not use {name}")
    T = spec.inner_steps if inner_steps is None else check_int("inner_steps", inner_steps, 1)
    Q = spec.neumann_terms if neumann_terms is None else check_int("neumann_terms",
                                                                   neumann_terms, 1)
    extra = dict(spec.options)
    for name, value in method_options.items():
        if name not in spec.options:
            raise TypeError(f"minimize_bilevel(method={method!r}) got an unexpected keyword "
                            f"argument {name!r}; its method-specific options are: "
                            + (", ".join(sorted(spec.options)) or "none"))
        extra[name] = value
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, 1)
    upper_batch_size = batch_size if upper_batch_size is None else \
        check_int("upper_batch_size", upper_batch_size, 1)
    sampler = spec.sampler if sampler is None else check_choice("sampler", sampler,
                                                                tuple(SAMPLERS))
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    eval_every = max(1, maxiter // 20) if eval_every is None else \
        check_int("eval_every", eval_every, 1)
    backtrack = DEFAULT_BACKTRACK if backtrack is None else check_int("backtrack", backtrack, 0)
    tol = check_positive("tol", tol, allow_none=True, allow_zero=True)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    if reference is not None and not any(hasattr(reference, a)
                                         for a in ("F", "hypergrad", "x_star")):
        raise TypeError(f"reference must have F(x), hypergrad(x) and/or x_star (the problem "
                        f"library's problems do), got {type(reference).__name__}")
    return (maxiter, T, Q, extra, batch_size, upper_batch_size, sampler, int(seed),
            eval_every, backtrack, tol)


def minimize_stochastic(problem, x0, y0, method, *, maxiter=1000, batch_size=None,
                        upper_batch_size=None, sampler=None, step=None, inner_step=None,
                        inner_steps=None, neumann_terms=None, neumann_step=None, seed=None,
                        eval_every=None, tol=None, callback=None, reference=None,
                        backtrack=None, backend=None, output="numpy", **method_options):
    """Driver of the stochastic methods; see :func:`mlocore.minimize_bilevel`."""
    if getattr(problem, "on_device", False) or \
            check_backend(backend, "minimize_bilevel (stochastic methods)") == "cuda":
        from .cuda._stochastic import minimize_stochastic as _device_minimize
        return _device_minimize(problem, x0, y0, method, maxiter=maxiter,
                                batch_size=batch_size, upper_batch_size=upper_batch_size,
                                sampler=sampler, step=step, inner_step=inner_step,
                                inner_steps=inner_steps, neumann_terms=neumann_terms,
                                neumann_step=neumann_step, seed=seed, eval_every=eval_every,
                                tol=tol, callback=callback, reference=reference,
                                backtrack=backtrack, backend=backend, output=output,
                                **method_options)
    check_cpu_output(output)
    if not isinstance(problem, BilevelProblem):
        raise TypeError(f"problem must be an mlocore.BilevelProblem, got "
                        f"{type(problem).__name__}")
    check_choice("method", method, STOCHASTIC_METHODS)
    spec = METHODS[method]
    x = as_vector("x0", x0, problem.dx)
    y = as_vector("y0", y0, problem.dy)
    maxiter, T, Q, extra, batch_size, upper_batch_size, sampler, seed, eval_every, \
        backtrack, tol = parse_run_options(
            spec, method, maxiter=maxiter, batch_size=batch_size,
            upper_batch_size=upper_batch_size, sampler=sampler, inner_steps=inner_steps,
            neumann_terms=neumann_terms, neumann_step=neumann_step, seed=seed,
            eval_every=eval_every, tol=tol, callback=callback, reference=reference,
            backtrack=backtrack, method_options=method_options)

    from ._hypergrad import _compiled
    comp = _compiled(problem, x, y)
    if not getattr(problem, "_sample_checked", False):
        z = np.concatenate([x, y])
        check_sampled_callbacks(problem.upper, comp.upper, z)
        check_sampled_callbacks(problem.lower, comp.lower, z)
        problem._sample_checked = True
    if spec.needs_value and not problem.lower.value:
        raise ValueError(f"method {method!r} needs the lower objective's value callback")
    seq = np.random.SeedSequence(seed)
    np_rng = np.random.default_rng(seq.spawn(1)[0])
    samp_u, n_u, bs_u = _level_sampling(problem.upper, "upper", upper_batch_size, sampler,
                                        np_rng)
    samp_l, n_l, bs_l = _level_sampling(problem.lower, "lower", batch_size, sampler, np_rng)
    rng = seq.generate_state(1, np.uint64)

    x = problem.project(x)
    lips = {}

    def lipschitz(which):
        """"upper": L_F; "lower_full": lambda_max of the full-batch H_yy (the Neumann step,
        whose truncation bias grows as it shrinks); "lower": also over a few minibatch
        H_yy, which can be much stiffer than their mean: an SGD step of 1/L_g must be stable
        for the batches the method will actually draw."""
        if which not in lips:
            if which == "lower":
                lips[which] = lipschitz("lower_full")
                if problem.lower.n_samples is not None and bs_l < n_l:
                    lips[which] = max(lips[which], _batch_lipschitz(comp.lower, x, y, bs_l,
                                                                    n_l, seed))
            else:
                lips[which] = estimate_lipschitz(problem, x, y, which.replace("_full", ""))
        return lips[which]

    alpha = _as_schedule("step", step, spec.alpha_power,
                         lambda: spec.alpha_safety * STEP_SAFETY / lipschitz("upper"))
    beta = _as_schedule("inner_step", inner_step, spec.beta_power,
                        lambda: spec.beta_safety / lipschitz("lower"))
    eta = check_positive("neumann_step", neumann_step) if neumann_step is not None else \
        (1.0 / lipschitz("lower_full")
         if "neumann_step" in spec.uses or "neumann_terms" in spec.uses
         else 0.0)
    ctx = _Context(problem, x, y, n_u, n_l, bs_u, bs_l, lipschitz)
    ctx.T, ctx.Q, ctx.eta, ctx.sampler = T, Q, eta, sampler
    work, fextra, iextra = (np.zeros(0), [], []) if spec.setup is None else \
        spec.setup(ctx, extra)
    fpar = np.array(alpha.as_array() + beta.as_array() + [eta] + list(fextra),
                    dtype=np.float64)
    ipar = np.array([T, Q] + list(iextra), dtype=np.int64)
    proj = _projection(problem)
    uargs = _kernel_args(problem.upper, comp.upper)
    largs = _kernel_args(problem.lower, comp.lower)
    counts = np.zeros(2 * N_COUNTERS, dtype=np.int64)

    history = {"iteration": [], "time": [], "oracle_calls": [], "samples": []}
    elapsed = 0.0
    status, k, detail = 20, 0, ""
    current_ref = {}

    def checkpoint():
        nonlocal current_ref
        current_ref = _record_checkpoint(history, k, elapsed, counts, reference, x, problem)

    def run(k0, n):
        return call_kernel(spec.kernel, comp.upper.fns, uargs, comp.lower.fns, largs,
                           comp.upper.has_hvp, comp.lower.has_hvp, x, y, work, fpar, ipar,
                           samp_u, samp_l, rng, proj, k0, n, counts)

    # Steps that came from the Lipschitz defaults are halved on divergence (up to
    # ``backtrack`` times) and the run resumes from a saved state; steps the user set are
    # never changed. Everything a kernel call changes is saved, except the oracle counters
    # (the wasted work stays counted, as does its time).
    halvable = [i for i, given in ((_sk.ALPHA0, step), (_sk.BETA0, inner_step),
                                   (_sk.ETA, neumann_step))
                if given is None and fpar[i] > 0]
    rewind = _Rewind((x, y, work, rng) + tuple(samp_u) + tuple(samp_l))

    run(0, 0)  # compile (or load from the disk cache) outside the timed region
    checkpoint()
    rewind.checkpoint(0, _norm(x, y))
    while k < maxiter:
        n = min(eval_every, maxiter - k)
        t0 = time.perf_counter()
        st, done = run(k, n)
        elapsed += time.perf_counter() - t0
        nz = _norm(x, y)
        if st != _sk.OK or rewind.blown_up(nz, k + n):
            what = (f"non-finite iterate at iteration {k + int(done) + 1}" if st != _sk.OK
                    else f"|(x, y)| grew to {nz:.3g} by iteration {k + n}")
            if rewind.reductions < backtrack and halvable:
                fpar[halvable] *= 0.5
                k = rewind.restore()
                for val in history.values():
                    del val[rewind.n_checkpoints:]
                continue
            rewind.restore_last()
            status = 13
            detail = _divergence_detail(what, rewind.reductions, halvable, k,
                                        fpar[_sk.ALPHA0], fpar[_sk.BETA0])
            break
        k += n
        rewind.checkpoint(k, nz)
        checkpoint()
        stop = _stop_at_checkpoint(current_ref, tol, callback, k, elapsed,
                                   lambda: (x.copy(), y.copy()))
        if stop is not None:
            status = stop
            break
    reductions = rewind.reductions
    status, detail, calls, samples, hist = _run_summary(status, detail, tol, reductions,
                                                        counts, history)
    fun = current_ref.get("F", np.nan)
    return OptimizeResult(
        x=x, y=y, fun=fun, jac=current_ref.get("_grad"), nit=k, success=status in (0, 20),
        status=status, message=status_message(status, detail), method=method, seed=seed,
        oracle_calls=calls, oracle_samples=samples, history=hist,
        steps={"alpha": dataclasses.replace(alpha, initial=float(fpar[_sk.ALPHA0])),
               "beta": dataclasses.replace(beta, initial=float(fpar[_sk.BETA0])),
               "neumann_step": float(fpar[_sk.ETA])},
        step_reductions=reductions,
        **({} if spec.result is None else spec.result(work)),
        batch_size=(bs_u, bs_l), time=elapsed, state={"work": work})
