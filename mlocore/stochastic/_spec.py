"""What both backends of the stochastic methods share: the method specification
(:class:`MethodSpec`), step-size schedules, option parsing, default steps, the rewind after
a divergence, checkpoints, history and the run summary.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Callable

import numpy as np
from scipy.optimize import OptimizeResult

from .._kernels.oracles import COUNTER_NAMES, N_COUNTERS
from .._validation import check_choice, check_int, check_positive
from . import _sampling as _sk

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
#: default tail averaging: the returned (x, y) is the mean of the iterates over the last
#: DEFAULT_AVERAGE of the iterations (Polyak & Juditsky 1992), for methods whose steps
#: leave a noise ball (``MethodSpec.average``)
DEFAULT_AVERAGE = 0.5
#: ``step="auto"``: multiplicative grid around the default initial upper / lower steps,
#: each trial run for AUTO_FRACTION of maxiter
AUTO_FACTORS = (1.0 / 3.0, 1.0, 3.0)
AUTO_FRACTION = 0.1
#: a best trial at the smallest upper factor is followed by one trial with an upper step
#: this factor smaller
AUTO_STEP_OUT = 3.0


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
    """One method, for both backends: its CPU kernel (``kernel``) and device loop
    (``device``, a :class:`~mlocore.stochastic._device.DeviceMethod` subclass), the
    schedules' default decay powers, default sampler, the common options it ``uses`` and
    the extra ``options`` it accepts (name -> default). ``setup(ctx, opts)`` validates those
    and returns ``(work, extra_fpar, extra_ipar)``, the kernel's state and parameters (the
    device loop reads the same layout)."""

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
    device: type = None         # the device loop (a DeviceMethod subclass)
    gradient_only: bool = False  # on the device: no lower hvp needed when steps are given
    average: float = DEFAULT_AVERAGE  # default tail-averaging fraction (0: last iterate)
    alpha_offset: float = DEFAULT_OFFSET  # offsets of the decaying default schedules
    beta_offset: float = DEFAULT_OFFSET


def work_v(ctx, opts):
    """``work = v`` (dy zeros): the linear-system iterate of SOBA and AID."""
    return np.zeros(ctx.dy), [], []


class Context:
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


def _as_schedule(name, value, default_power, default_initial, offset=DEFAULT_OFFSET):
    off = offset if default_power > 0 else 1.0
    if value is None:
        return Schedule(default_initial(), default_power, off)
    if isinstance(value, Schedule):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return Schedule(check_positive(name, value), default_power, off)
    raise TypeError(f"{name} must be None, a positive number or mlocore.Schedule, got "
                    f"{value!r}")


def default_steps(spec, step, inner_step, neumann_step, lipschitz):
    """The schedules ``alpha`` (upper), ``beta`` (lower) and the Neumann step ``eta``; the
    defaults come from ``lipschitz(which)`` ("upper": L_F, "lower": L_g over minibatches,
    "lower_full": the full-batch L_g)."""
    alpha = _as_schedule("step", step, spec.alpha_power,
                         lambda: spec.alpha_safety * STEP_SAFETY / lipschitz("upper"),
                         spec.alpha_offset)
    beta = _as_schedule("inner_step", inner_step, spec.beta_power,
                        lambda: spec.beta_safety / lipschitz("lower"), spec.beta_offset)
    eta = check_positive("neumann_step", neumann_step) if neumann_step is not None else \
        (1.0 / lipschitz("lower_full")
         if "neumann_step" in spec.uses or "neumann_terms" in spec.uses
         else 0.0)
    return alpha, beta, eta


def power_on_differences(grad, x, iters):
    """``L_F``, the largest |eigenvalue| of the Hessian of F at x: power iteration on
    central differences ``(grad(x + h u) - grad(x - h u)) / 2h`` of the hypergradient
    ``grad`` (from a fixed random start)."""
    rng = np.random.default_rng(12345)
    u = rng.standard_normal(x.shape[0])
    u /= np.linalg.norm(u)
    h = 1e-4 * (1.0 + np.linalg.norm(x))
    lam = 0.0
    for _ in range(iters):
        gp = grad(x + h * u)
        gm = grad(x - h * u)
        hu = (gp - gm) / (2 * h)
        lam = float(np.linalg.norm(hu))
        if not np.isfinite(lam) or lam == 0.0:
            break
        u = hu / lam
    return max(lam, 1e-12)


def step_at(schedule, k):
    """``s0 (offset / (offset + k))**power`` for ``schedule = (s0, power, offset)`` (the
    kernels' ``step_at``, on the host)."""
    s0, p, off = schedule
    if p == 0.0:
        return s0
    return s0 * (off / (off + k)) ** p


def _norm(x, y):
    with np.errstate(over="ignore"):  # |z| ~ 1e160 overflows |z|^2: inf is a blow-up too
        return float(np.sqrt(x @ x + y @ y))


class Rewind:
    """Saved kernel states for resuming after a divergence (``backtrack``).

    The state at the last checkpoint and at the start are kept. A divergence resumes from
    the last checkpoint; a second one before the next checkpoint means that state is
    already spoiled (e.g. a penalty run off to where exp overflows on the next step), so
    the run restarts from the start. Each resume follows a halving of the default steps.
    ``extra`` (any object, e.g. the host copy of a device iterate) is kept with each
    saved state; :attr:`extra_last` is the one of the state restored last. Subclasses
    copy other array kinds by overriding :meth:`_copy` and :meth:`_put_one`.
    """

    def __init__(self, arrays):
        self.arrays = arrays
        self.reductions = 0
        self.norms = []          # (iteration, |(x, y)|) per kept checkpoint
        self.start = self.last = None
        self.extra_start = self.extra_last = None
        self.resumed = False     # a resume happened since the last checkpoint

    @staticmethod
    def _copy(a):
        return a.copy()

    @staticmethod
    def _put_one(dst, src):
        dst[...] = src

    def checkpoint(self, k, norm, extra=None):
        self.last = [self._copy(a) for a in self.arrays]
        self.extra_last = extra
        if self.start is None:
            self.start, self.extra_start = self.last, extra
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
            self._put_one(a, val)

    def restore(self):
        """Resume after a step halving; returns the iteration resumed from."""
        self.reductions += 1
        if self.resumed:  # diverged again before any new checkpoint: go back to the start
            del self.norms[1:]
            self.last = self.start
            self.extra_last = self.extra_start
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


def parse_average(spec, average, maxiter):
    """The iteration from which iterates are averaged (``maxiter`` for none): ``average`` is
    None (the method's default), a bool (True: DEFAULT_AVERAGE) or a fraction in [0, 1] of
    the final iterations."""
    if average is None:
        frac = spec.average
    elif isinstance(average, bool):
        frac = DEFAULT_AVERAGE if average else 0.0
    elif isinstance(average, numbers.Real) and 0.0 <= float(average) <= 1.0:
        frac = float(average)
    else:
        raise ValueError(f"average must be None, a bool or a fraction in [0, 1], got "
                         f"{average!r}")
    return frac, maxiter - int(round(frac * maxiter))


def check_auto_steps(step, inner_step):
    """``step`` may be "auto" (the counted search of the driver); other strings, and a string
    ``inner_step``, are errors. Returns whether the search is asked for."""
    if isinstance(inner_step, str):
        raise ValueError(f"inner_step must be None, a positive number or mlocore.Schedule, "
                         f"got {inner_step!r} (step='auto' searches the upper and lower "
                         f"steps together; an explicit inner_step restricts it to the upper "
                         f"step)")
    if isinstance(step, str):
        if step != "auto":
            raise ValueError(f"step must be None, 'auto', a positive number or "
                             f"mlocore.Schedule, got {step!r}")
        return True
    return False


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


