"""Several bilevel methods on one problem at the same budget of oracle samples and the same
seeds: traces, a table and a convergence plot (:func:`compare_methods`).

Oracle samples are counted as the stochastic driver counts them in ``history["samples"]``:
every oracle call (gradient, Hessian-vector product, value, block callbacks included) counts
the number of samples it averages, a minibatch call ``b``, a call on an objective without
``n_samples`` 1. A deterministic (full-batch) method's calls count ``n_samples`` each: the
upper objective's ``n_samples`` for an upper call, the lower one's for a lower call (those of
the stochastic form of the problem). Everything a run consumes counts: initial full passes
(SABA's tables, VRBO's refreshes), work that a step halving after a divergence discarded,
the line searches and the final F evaluation of the deterministic methods.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from ._descent import BILEVEL_METHODS
from ._minimize import minimize_bilevel
from ._problem import BilevelProblem
from ._validation import as_vector
from .stochastic import STOCHASTIC_METHODS
from .stochastic._spec import DEFAULT_BATCH, _reference_values

__all__ = ["compare_methods", "Comparison", "MethodRun", "DETERMINISTIC_PREFIX"]

#: ``"det-aid"``, ``"det-itd"``, ``"det-alternating"``: the deterministic methods of
#: :func:`mlocore.minimize_bilevel` (``"aid"`` and ``"alternating"`` alone are the stochastic ones)
DETERMINISTIC_PREFIX = "det-"
#: options that :func:`compare_methods` sets itself
_RESERVED = ("maxiter", "seed", "eval_every", "reference", "callback", "backend", "output")
_WHY = ("maxiter from the budget, seed from seeds, eval_every from n_points, reference and "
        "callback for the traces; CPU runs")
#: statuses of a run that used its budget or converged (anything else is a failure)
_OK = (0, 10, 20, 99)
_PILOT = 16
_METRICS = ("F", "dist_to_x_star", "grad_norm_sq", "grad_mapping_sq")
_NAMES = {"F": "F", "dist_to_x_star": "|x - x*|", "grad_norm_sq": "|grad F|^2",
          "grad_mapping_sq": "|x - P(x - grad F)|^2"}


class _Target:
    """A reference made of a callable F and/or a point x*."""

    def __init__(self, F=None, x_star=None):
        if F is not None:
            self.F = F
        if x_star is not None:
            self.x_star = x_star


class MethodRun:
    """One run of a comparison: one method, one seed.

    Attributes
    ----------
    label : str
        The name given in ``methods``.
    method : str
        The method of :func:`mlocore.minimize_bilevel`.
    stochastic : bool
    seed : int or None
        None for the deterministic methods (run once).
    problem : BilevelProblem
        The problem the run used (the stochastic or the deterministic form).
    settings : dict
        Keyword arguments of :func:`mlocore.minimize_bilevel` (``method`` included) that
        reproduce the run: ``minimize_bilevel(run.problem, x0, y0, **run.settings)`` (add
        ``reference=`` for the stochastic history's reference values).
    result : scipy.optimize.OptimizeResult
        The result of that call.
    trace : dict of ndarray
        ``iteration``, ``samples`` and ``time`` (seconds in the compiled loops for the
        stochastic methods, since the start of the outer loop for the deterministic ones),
        and the reference values that exist (``F``, ``dist_to_x_star``, ``grad_norm_sq``;
        ``grad_mapping_sq``, ``|x - P(x - grad F)|^2``, with constraints on x): at
        the checkpoints of a stochastic run, at up to ``n_points + 1`` evenly spaced iterations
        of a deterministic one (first and last included).
    samples, oracle_calls : int
        Totals of the run.
    time : float
        Seconds (``result.time`` for the stochastic methods, the last trace time for the
        deterministic ones).
    halvings : int
        Halvings of the default steps after a divergence (stochastic methods).
    note : str or None
        Where a run with halvings was stopped (see :func:`compare_methods`).
    spent : bool
        The halvings discarded the whole budget: the run is back at x0 (``result`` is the
        run with ``maxiter=0``), counted as failed.
    ok : bool
        The run used its budget or converged (status 0, 10 or 20; 99 where the comparison
        stopped it at its last checkpoint within the budget, after step halvings), not a
        failure.
    """

    def __init__(self, label, method, stochastic, seed, problem, settings, result, trace,
                 samples, oracle_calls, time, note=None, halvings=0, spent=False):
        self.label, self.method, self.stochastic, self.seed = label, method, stochastic, seed
        self.problem, self.settings, self.result, self.trace = problem, settings, result, trace
        self.samples, self.oracle_calls, self.time = int(samples), int(oracle_calls), time
        self.note, self.halvings, self.spent = note, int(halvings), bool(spent)
        self.ok = int(result.status) in _OK and not spent

    @property
    def final(self):
        """The reference values at the last point of the trace: the run's answer
        ``result.x`` (for stochastic methods with ``average > 0``, the tail average; the
        earlier points of the trace are the iterates at the checkpoints)."""
        return {k: float(self.trace[k][-1]) for k in _METRICS if k in self.trace}

    def __repr__(self):
        seed = "" if self.seed is None else f", seed={self.seed}"
        return (f"MethodRun({self.label!r}{seed}, nit={self.result.nit}, "
                f"samples={self.samples}, ok={self.ok})")


class Comparison:
    """The result of :func:`compare_methods`.

    Attributes
    ----------
    methods : list of str
        Labels, in the order given.
    runs : dict
        label -> list of :class:`MethodRun` (one per seed; one for a deterministic method).
    budget : int
        Oracle samples per run.
    seeds : list of int
    batch_size : int or None
    reference : object or None
        What the reference values come from.
    F_star : float or None
        The reference's ``F_star`` when it has a finite one (then the table and plot show
        ``F - F*``).
    """

    def __init__(self, methods, runs, budget, seeds, batch_size, reference, F_star):
        self.methods, self.runs, self.budget, self.seeds = methods, runs, budget, seeds
        self.batch_size, self.reference, self.F_star = batch_size, reference, F_star

    def metrics(self):
        """The reference values present in every run's trace."""
        return [k for k in _METRICS
                if all(k in r.trace for rs in self.runs.values() for r in rs)]

    def _shown(self):
        """The table's values: F, the distance, and one stationarity measure (the
        projected-gradient mapping with constraints, else |grad F|^2)."""
        have = self.metrics()
        if "grad_mapping_sq" in have:
            have.remove("grad_norm_sq")
        return have

    def summary(self):
        """label -> dict: ``runs``, ``ok`` (count), and the mean and standard deviation over
        the runs (``<name>_mean``, ``<name>_std``) of ``iterations``, ``samples``, ``time``,
        ``oracle_calls`` and of the final reference values (``F`` is ``F - F*`` when
        :attr:`F_star` is known)."""
        out = {}
        for label in self.methods:
            rs = self.runs[label]
            row = {"runs": len(rs), "ok": sum(r.ok for r in rs)}
            cols = {"iterations": [r.result.nit for r in rs], "samples": [r.samples for r in rs],
                    "time": [r.time for r in rs], "oracle_calls": [r.oracle_calls for r in rs]}
            for k in self.metrics():
                vals = [r.final[k] for r in rs]
                if k == "F" and self.F_star is not None:
                    vals = [v - self.F_star for v in vals]
                cols[k] = vals
            for k, vals in cols.items():
                a = np.asarray(vals, dtype=np.float64)
                row[k + "_mean"] = float(a.mean())
                row[k + "_std"] = float(a.std())
            out[label] = row
        return out

    def table(self):
        """The comparison as text: per method, the runs, mean iterations, samples, time and
        oracle calls, the final reference values as mean +- standard deviation over the
        seeds, and how many runs succeeded."""
        summ = self.summary()
        metrics = self._shown()
        names = dict(_NAMES, F="F - F*" if self.F_star is not None else "F")
        w = max([6] + [len(m) for m in self.methods]) + 2
        head = (f"{'method':<{w}}{'runs':>5}{'iters':>9}{'samples':>11}{'time':>11}"
                f"{'oracle calls':>14}" + "".join(f"{names[k] + ' (mean +- std)':>38}"
                                                  for k in metrics) + "   ok")
        seeds = ", ".join(map(str, self.seeds))
        lines = [f"budget {self.budget:,} oracle samples per run; seeds {seeds}; batch size "
                 f"{'method default' if self.batch_size is None else self.batch_size}"
                 + (f"; F* = {self.F_star:.6g}" if self.F_star is not None else ""), head]
        for label in self.methods:
            s = summ[label]
            line = (f"{label:<{w}}{s['runs']:>5}{s['iterations_mean']:>9.0f}"
                    f"{s['samples_mean']:>11.0f}{format_seconds(s['time_mean']):>11}"
                    f"{s['oracle_calls_mean']:>14.0f}")
            for k in metrics:
                mean, std = s[k + "_mean"], s[k + "_std"]
                num = f"{mean:.4e}" if k != "F" or self.F_star is not None else f"{mean:.6g}"
                line += f"{num + ' +- ' + f'{std:.1e}':>38}"
            lines.append(line + f"  {s['ok']}/{s['runs']}")
        lines.append("(time: seconds in the compiled loops for the stochastic methods, of the "
                     "outer loop for the deterministic ones, run once)")
        for label in self.methods:
            halved = [r for r in self.runs[label] if r.halvings]
            if halved:
                lines.append(f"{label}: default steps halved after a divergence, " + "; ".join(
                    f"seed {r.seed} {r.halvings}x" + (" (all the budget discarded: failed)"
                                                      if r.spent else "") for r in halved)
                    + " (a run stops at its last checkpoint within the budget)")
        return "\n".join(lines)

    def __str__(self):
        return self.table()

    def __repr__(self):
        return (f"Comparison(methods={self.methods}, budget={self.budget}, "
                f"seeds={self.seeds})")

    def plot(self, ax=None, x="samples", y=None):
        """Convergence plot: per method the mean over the seeds (line) and the range from the
        smallest to the largest value (band), on a common grid (linear interpolation between
        each run's trace points).

        Parameters
        ----------
        ax : matplotlib Axes, optional
            Default: a new figure.
        x : {"samples", "time"}
        y : {"F", "dist", "grad"}, optional
            ``F`` (``F - F*`` on a log scale when :attr:`F_star` is known), ``|x - x*|`` or
            ``|grad F|^2`` (the projected-gradient mapping ``|x - P(x - grad F)|^2`` with
            constraints); default the distance when known, else F.

        Returns
        -------
        matplotlib Axes

        Raises
        ------
        ImportError
            Without matplotlib.
        """
        if x not in ("samples", "time"):
            raise ValueError(f"x must be 'samples' or 'time', got {x!r}")
        have = self._shown()
        keys = {"F": "F", "dist": "dist_to_x_star",
                "grad": "grad_mapping_sq" if "grad_mapping_sq" in have else "grad_norm_sq"}
        if y is None:
            y = "dist" if "dist_to_x_star" in have else "F" if "F" in have else "grad"
        if y not in keys:
            raise ValueError(f"y must be 'F', 'dist' or 'grad', got {y!r}")
        key = keys[y]
        if key not in have:
            raise ValueError(f"no {key!r} in the traces: the reference gives "
                             f"{have or 'nothing'} (pass reference= with F(x), x_star or "
                             "hypergrad(x))")
        try:
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError("Comparison.plot needs matplotlib (pip install matplotlib); "
                              "the traces are in .runs[method][i].trace") from exc
        if ax is None:
            _, ax = plt.subplots(figsize=(6.4, 4.4))
        shift = self.F_star if key == "F" and self.F_star is not None else 0.0
        log = key != "F" or self.F_star is not None
        for i, label in enumerate(self.methods):
            style = ("-", "--", ":", "-.")[i // 10 % 4]  # the default color cycle has 10
            xs = [np.asarray(r.trace[x], dtype=np.float64) for r in self.runs[label]]
            ys = [np.asarray(r.trace[key], dtype=np.float64) - shift for r in self.runs[label]]
            if len(xs) == 1:
                ax.plot(xs[0], ys[0], style, label=label)
                continue
            lo, hi = max(a[0] for a in xs), min(a[-1] for a in xs)
            grid = np.linspace(lo, hi, 200) if hi > lo else np.array([lo])
            vals = np.array([np.interp(grid, a, b) for a, b in zip(xs, ys)])
            line, = ax.plot(grid, vals.mean(axis=0), style, label=f"{label} ({len(xs)} seeds)")
            ax.fill_between(grid, vals.min(axis=0), vals.max(axis=0), alpha=0.2,
                            color=line.get_color(), linewidth=0)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("oracle samples" if x == "samples" else "time (s)")
        ax.set_ylabel(dict(_NAMES, F="F - F*" if shift else "F")[key])
        ax.set_title(f"budget {self.budget:,} samples; mean and range over seeds")
        ax.legend(fontsize="small")
        return ax


def format_seconds(t):
    """A duration for tables: microseconds, milliseconds or seconds (also used by the demo)."""
    if t < 1e-3:
        return f"{t * 1e6:.0f} us"
    if t < 1.0:
        return f"{t * 1e3:.1f} ms"
    return f"{t:.2f} s"


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------
def _resolve_method(name):
    """``(method, stochastic)`` of a label."""
    if not isinstance(name, str):
        raise TypeError(f"methods must be names (str), got {type(name).__name__} {name!r}")
    if name.startswith(DETERMINISTIC_PREFIX) and name[len(DETERMINISTIC_PREFIX):] in \
            BILEVEL_METHODS:
        return name[len(DETERMINISTIC_PREFIX):], False
    if name in STOCHASTIC_METHODS:
        return name, True
    if name in BILEVEL_METHODS:  # "itd": deterministic only
        return name, False
    known = list(STOCHASTIC_METHODS) + [DETERMINISTIC_PREFIX + m for m in BILEVEL_METHODS]
    raise ValueError(f"unknown method {name!r}; expected one of {', '.join(known)} (or "
                     "'itd')")


def _check_budget(budget):
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or \
            not math.isfinite(budget) or budget < 1 or budget != int(budget):
        raise ValueError(f"budget must be a positive whole number of oracle samples, got "
                         f"{budget!r}")
    return int(budget)


def _check_seeds(seeds):
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds must be a positive count or a list of seeds, got {seeds}")
        return list(range(int(seeds)))
    try:
        out = list(seeds)
    except TypeError:
        raise TypeError(f"seeds must be a count or a list of non-negative integers, got "
                        f"{type(seeds).__name__}") from None
    if not out or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0
                      for s in out) or len(set(out)) != len(out):
        raise ValueError(f"seeds must be a non-empty list of distinct non-negative "
                         f"integers, got {seeds!r}")
    return [int(s) for s in out]


def _check_options(options, labels, common):
    for name in _RESERVED:
        if name in common:
            raise ValueError(f"compare_methods sets {name!r} itself; got {name}="
                             f"{common[name]!r} ({_WHY})")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict method -> dict of options, got "
                        f"{type(options).__name__}")
    for label, opts in options.items():
        if label not in labels:
            raise ValueError(f"options given for {label!r}, which is not among the methods "
                             f"{labels}")
        if not isinstance(opts, dict):
            raise TypeError(f"options[{label!r}] must be a dict of options, got "
                            f"{type(opts).__name__}")
        for name in _RESERVED:
            if name in opts:
                raise ValueError(f"compare_methods sets {name!r} itself; got "
                                 f"options[{label!r}][{name!r}] = {opts[name]!r} ({_WHY})")
    return options


def _forms(problem):
    """``(stochastic form, deterministic form, default reference)`` of the problem."""
    if isinstance(problem, BilevelProblem):
        return problem, problem, None
    sp = getattr(problem, "stochastic_problem", None)
    dp = getattr(problem, "problem", None)
    sp = sp if isinstance(sp, BilevelProblem) else None
    dp = dp if isinstance(dp, BilevelProblem) else None
    if sp is None and dp is None:
        raise TypeError(f"problem must be an mlocore.BilevelProblem or a problem object with "
                        f".stochastic_problem and/or .problem (mlocore.problems), got "
                        f"{type(problem).__name__}")
    default = problem if any(hasattr(problem, a) for a in ("F", "hypergrad")) else None
    return sp or dp, dp or sp, default


def _as_reference(reference, default, dx):
    if reference is None:
        return default
    if isinstance(reference, (np.ndarray, list, tuple)):
        return _Target(x_star=as_vector("reference", reference, dx))
    if any(hasattr(reference, a) for a in ("F", "hypergrad", "x_star")):
        return reference
    if callable(reference):
        return _Target(F=reference)
    raise TypeError(f"reference must be x* (an array), a callable F(x) or an object with "
                    f"F(x), hypergrad(x) and/or x_star, got {type(reference).__name__}")


def _F_star(reference):
    value = getattr(reference, "F_star", None) if reference is not None else None
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------
# runs at a budget
# ---------------------------------------------------------------------------------------
def _total(res):
    return int(sum(res.oracle_samples.values()))


class _StopAt:
    """``callback`` that ends a run (StopIteration) at the checkpoint with iteration ``nit``
    and iterate ``x`` (bit for bit): one point of one trajectory, whatever the rewinds
    after a divergence that revisit the same iteration with other steps."""

    def __init__(self, nit, x):
        self.nit, self.x = int(nit), np.array(x, dtype=np.float64)

    def __call__(self, inter):
        if inter.nit == self.nit and np.array_equal(inter.x, self.x):
            raise StopIteration

    def __repr__(self):
        return f"_StopAt(nit={self.nit})"


class _StochasticPlan:
    """Iterations of a stochastic method within the budget.

    A short pilot (first seed) estimates the samples per iteration, hence the number of
    iterations that fit and the checkpoint spacing ``eval_every`` (shared by the seeds: the
    rewinds after a divergence resume from checkpoints, so the spacing is part of the run).
    Per seed, a probe run without reference and without step halvings (``backtrack=0``)
    past the budget gives the samples at each checkpoint. If it crosses the budget before
    any divergence, K is the last iteration within the budget (linear in the last checkpoint
    interval) and the recorded run has ``maxiter = K`` (checked, and K lowered, if beyond
    the budget). If it diverges first, the real run halves its default steps and resumes
    from a checkpoint (the wasted work counts): a second probe, with the halvings, finds its
    last checkpoint within the budget, where the recorded run is stopped by a callback
    (status 99).
    """

    def __init__(self, label, method, problem, x0, y0, budget, opts, seed, n_points):
        self.label, self.method, self.problem = label, method, problem
        self.x0, self.y0, self.budget, self.opts = x0, y0, budget, opts
        pilot = minimize_bilevel(problem, x0, y0, method, maxiter=_PILOT, eval_every=_PILOT,
                                 seed=seed, **dict(opts, backtrack=0))
        per_iter = max(_total(pilot) / max(pilot.nit, 1), 1.0)
        self.k_est = max(1, int(budget / per_iter))
        self.eval_every = max(1, self.k_est // n_points)

    def _call(self, seed, maxiter, reference, **extra):
        settings = dict(method=self.method, maxiter=maxiter, eval_every=self.eval_every,
                        seed=seed, **dict(self.opts, **extra))
        return settings, minimize_bilevel(self.problem, self.x0, self.y0, reference=reference,
                                          **settings)

    def _probe(self, seed, M, reference, **extra):
        """A run past the budget (maxiter doubled until it is spent or the run stops)."""
        for _ in range(30):
            _, probe = self._call(seed, M, reference, **extra)
            if _total(probe) > self.budget or probe.status not in (10, 20):
                return probe, M
            M *= 2
        return probe, M

    def run(self, seed, reference):
        budget = self.budget
        probe_ref = reference if self.opts.get("tol") is not None else None
        probe, M = self._probe(seed, self.k_est + self.k_est // 4 + 2 * self.eval_every,
                               probe_ref, backtrack=0)
        its = np.asarray(probe.history["iteration"])
        s = np.asarray(probe.history["samples"])
        if _total(probe) <= budget and probe.status != 13:  # converged (tol) within budget
            return self._call(seed, M, reference) + (None, 0)
        j = int(np.nonzero(s <= budget)[0][-1])
        if probe.status == 13 and j + 1 == len(s):  # diverged before the budget ran out
            return self._with_halvings(seed, M, reference, probe_ref)
        k_lo, s_lo = int(its[j]), int(s[j])
        k_hi, s_hi = int(its[j + 1]), int(s[j + 1])
        rate = max((s_hi - s_lo) / max(k_hi - k_lo, 1), 1e-300)
        K = k_lo + min(k_hi - k_lo - 1, int((budget - s_lo) // rate))
        for attempt in range(4):
            if K < 1:
                raise ValueError(f"budget = {budget} oracle samples is below one iteration "
                                 f"of method {self.label!r} (its first {k_hi} iteration(s) "
                                 f"use {s_hi} samples)")
            settings, res = self._call(seed, K, reference)
            over = _total(res) - budget
            if over <= 0:
                return settings, res, None, 0
            K = k_lo if attempt == 2 or K == k_lo + 1 else \
                max(k_lo, K - max(1, math.ceil(over / rate)))
            if K == k_lo and k_lo == 0:
                K = 0
        raise RuntimeError(f"method {self.label!r}: no run within the budget found")

    def _with_halvings(self, seed, M, reference, probe_ref):
        log = []
        probe, M = self._probe(seed, M, probe_ref,
                               callback=lambda inter: log.append((inter.nit, inter.x)))
        if _total(probe) <= self.budget:  # stopped for good (diverged again) within budget
            settings, res = self._call(seed, M, reference)
            return settings, res, None, int(res.step_reductions)
        its = np.asarray(probe.history["iteration"])
        s = np.asarray(probe.history["samples"])
        j = int(np.nonzero(s <= self.budget)[0][-1])
        if j == 0:  # all spent on work discarded by the halvings: the run is back at x0
            settings, res = self._call(seed, 0, reference)
            return settings, res, ("the budget went into runs discarded by halvings of the "
                                   "default steps: back at x0, failed"), \
                int(probe.step_reductions)
        # the kept checkpoints are the last callback calls with their iterations, in order
        pos = len(log)
        for e in range(len(s) - 1, j - 1, -1):
            pos = max(i for i in range(pos) if log[i][0] == its[e])
        settings, res = self._call(seed, M, reference, callback=_StopAt(its[j], log[pos][1]))
        if _total(res) > self.budget or res.status != 99:
            raise RuntimeError(f"method {self.label!r}: the run stopped at its last "
                               f"checkpoint within the budget did not reproduce the probe "
                               f"(status {res.status}, {_total(res)} samples)")
        return settings, res, "stopped at its last checkpoint within the budget", \
            int(res.step_reductions)


def _deterministic_run(label, method, problem, x0, y0, budget, opts, reference, n_points,
                       n_up, n_low):
    """The deterministic method with the largest ``maxiter`` whose run stays within the
    budget (every iteration's cumulative samples come from the history's upper and lower
    calls), recorded with a callback that keeps the iterates."""
    def samples_of(res):
        up = sum(v for k, v in res.oracle_calls.items() if k.startswith("upper"))
        return up * n_up + (sum(res.oracle_calls.values()) - up) * n_low

    def call(maxiter, xs=None):
        settings = dict(method=method, maxiter=maxiter, **opts)
        cb = None if xs is None else (lambda inter: xs.append(inter.x))
        return settings, minimize_bilevel(problem, x0, y0, callback=cb, **settings)

    M = budget // (n_up + n_low) + 1  # each iteration: >= one upper and one lower call
    _, probe = call(M)
    h = probe.history
    s = np.asarray(h["upper_calls"]) * n_up + np.asarray(h["lower_calls"]) * n_low
    within = samples_of(probe) <= budget or not len(s)  # (no history: failed at x0)
    K = M if within else int(np.count_nonzero(s <= budget)) - 1
    used = samples_of(probe) if M == 1 else None
    while True:
        if K < 1:
            first = int(s[min(1, len(s) - 1)]) if used is None else used
            raise ValueError(f"budget = {budget} oracle samples is below one iteration of "
                             f"method {label!r} (a run with maxiter=1 uses at least "
                             f"{first} samples)")
        xs = [problem.project(as_vector("x0", x0, problem.dx))]
        settings, res = call(K, xs)
        used = samples_of(res)
        if used <= budget:
            break
        K -= 1
    h = res.history
    n = len(h["time"])
    if n == 0:  # failed at x0 (see res.message)
        h = {"time": [0.0], "upper_calls": [0], "lower_calls": [0]}
        n = 1
    s = np.asarray(h["upper_calls"]) * n_up + np.asarray(h["lower_calls"]) * n_low
    keep = np.unique(np.round(np.linspace(0, n - 1, min(n, n_points + 1))).astype(np.int64))
    trace = {"iteration": keep, "samples": s[keep],
             "time": np.asarray(h["time"], dtype=np.float64)[keep]}
    vals = [_reference_values(reference, xs[i], problem) for i in keep]
    for k in _METRICS:
        if vals and k in vals[0]:
            trace[k] = np.array([v[k] for v in vals])
    return settings, res, trace, samples_of(res), float(trace["time"][-1])


def _end_at_returned_point(trace, res, reference, problem):
    """The history's checkpoints hold the last iterates; a run that returns a tail average
    (``res.average["iterations"] > 0``) ends at that average: its reference values replace
    the last point's, so that the trace ends where the run's answer ``res.x`` is."""
    avg = res.get("average") or {}
    if not avg.get("iterations") or not len(trace.get("iteration", ())):
        return
    vals = _reference_values(reference, res.x, problem)
    for k in _METRICS:
        if k in trace and k in vals:
            trace[k] = np.array(trace[k], dtype=np.float64)
            trace[k][-1] = vals[k]


def compare_methods(problem, x0, y0, methods, *, budget, seeds=3, batch_size=None,
                    reference=None, options=None, n_points=20, **common):
    """Run several bilevel methods on one problem with the same budget of oracle samples
    and the same seeds.

    Every stochastic method runs once per seed, as many iterations as fit in ``budget``
    samples (a method that uses more samples per iteration gets fewer); a deterministic
    method runs once (it has no randomness), with the largest ``maxiter`` whose run fits.
    Each recorded run is an ordinary :func:`mlocore.minimize_bilevel` call
    (``run.settings``), preceded by probe runs (same settings, no reference) that find how
    many iterations fit.

    Parameters
    ----------
    problem : BilevelProblem or problem object
        A problem of :mod:`mlocore.problems` (``.stochastic_problem`` runs the stochastic
        methods, ``.problem`` the deterministic ones; the object is the default reference),
        or a CPU :class:`mlocore.BilevelProblem` for all of them.
    x0, y0 : array_like
        Starting points (never modified).
    methods : list of str
        Names of :func:`mlocore.minimize_bilevel`'s stochastic methods
        (``mlocore.stochastic.STOCHASTIC_METHODS``; ``"aid"`` and ``"alternating"`` are the
        stochastic forms) and ``"det-aid"``, ``"det-itd"`` (or ``"itd"``),
        ``"det-alternating"`` for the deterministic ones.
    budget : int
        Oracle samples per run (see the module docstring for how they are counted: a
        minibatch call counts its batch size, a full-batch call ``n_samples``).
    seeds : int or list of int
        Seeds of the stochastic runs; an int n means ``0, .., n-1``.
    batch_size : int, optional
        ``batch_size`` of every stochastic method (default: the methods' own).
    reference : optional
        What the traces track: an object with ``F(x)``, ``hypergrad(x)`` and/or ``x_star``,
        an array (x*) or a callable F(x). Default: the problem object, if it has them.
    options : dict, optional
        Per-method options, ``{"soba": {"step": 0.1}, "det-aid": {"outer": "bb"}}``, passed
        to :func:`mlocore.minimize_bilevel` (they override ``common``).
    n_points : int
        Trace points per run (about; ``eval_every`` of the stochastic methods).
    **common
        Options for every stochastic method (``step=``, ``sampler=``, ...); the
        deterministic methods take only their ``options``. ``maxiter``, ``seed``,
        ``eval_every``, ``reference`` and ``callback`` are set here and refused.

    Returns
    -------
    Comparison
        ``.runs[label]`` (:class:`MethodRun` per seed: traces of samples, time and the
        reference values), ``.table()``, ``.summary()`` and ``.plot(ax=None, x="samples" |
        "time")``.

    Raises
    ------
    ValueError
        An unknown method, a repeated one, a bad budget or seeds, a budget below one
        iteration of a method, or options the comparison sets itself.

    Notes
    -----
    Where the default steps of a stochastic method diverge, the driver halves them and
    resumes from a checkpoint (``backtrack``; the discarded work counts): such a run is
    stopped at its last checkpoint within the budget by a callback in its settings (status
    99, ``run.halvings``, a footnote of the table); one whose halvings used up the whole
    budget counts as failed.

    Fair budgets in samples, several seeds and mean +- spread follow the benchmarking
    practice of Dagreou et al. (2022, "A framework for bilevel optimization that enables
    stochastic and global variance reduction algorithms", benchopt's bilevel benchmark).
    """
    if isinstance(methods, str) or not hasattr(methods, "__iter__"):
        raise TypeError(f"methods must be a list of method names, got {methods!r}")
    labels = list(methods)
    if not labels:
        raise ValueError("methods is empty; expected at least one method name")
    if len(set(labels)) != len(labels):
        raise ValueError(f"methods has repeated names: {labels}")
    resolved = {label: _resolve_method(label) for label in labels}
    budget = _check_budget(budget)
    seeds = _check_seeds(seeds)
    options = _check_options(options, labels, common)
    if isinstance(n_points, bool) or not isinstance(n_points, numbers.Integral) or n_points < 1:
        raise ValueError(f"n_points must be a positive integer, got {n_points!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or
                                   not isinstance(batch_size, numbers.Integral) or
                                   batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    sp, dp, default_ref = _forms(problem)
    x0 = as_vector("x0", x0, sp.dx).copy()
    y0 = as_vector("y0", y0, sp.dy).copy()
    ref = _as_reference(reference, default_ref, sp.dx)
    n_up = sp.upper.n_samples or 1
    n_low = sp.lower.n_samples or 1

    runs = {}
    for label in labels:
        method, stochastic = resolved[label]
        if not stochastic:
            opts = dict(options.get(label, {}))
            settings, res, trace, samples, t = _deterministic_run(
                label, method, dp, x0, y0, budget, opts, ref, n_points, n_up, n_low)
            runs[label] = [MethodRun(label, method, False, None, dp, settings, res, trace,
                                     samples, sum(res.oracle_calls.values()), t)]
            continue
        opts = dict(common)
        if batch_size is not None:
            opts["batch_size"] = batch_size
        opts.update(options.get(label, {}))
        if method in BILEVEL_METHODS and opts.get("batch_size") is None:
            # "aid" / "alternating" are stochastic with a batch size: the driver's default
            opts["batch_size"] = min(DEFAULT_BATCH, n_low)
            opts.setdefault("upper_batch_size", min(DEFAULT_BATCH, n_up))
        plan = _StochasticPlan(label, method, sp, x0, y0, budget, opts, seeds[0], n_points)
        runs[label] = []
        for seed in seeds:
            settings, res, note, halvings = plan.run(seed, ref)
            trace = {k: np.asarray(v) for k, v in res.history.items()
                     if k in ("iteration", "samples", "time") + _METRICS}
            _end_at_returned_point(trace, res, ref, sp)
            spent = settings["maxiter"] == 0  # budget wasted on discarded runs: failed
            runs[label].append(MethodRun(label, method, True, seed, sp, settings, res, trace,
                                         budget if spent else _total(res),
                                         sum(res.oracle_calls.values()), float(res.time),
                                         note, halvings, spent))
    return Comparison(labels, runs, budget, seeds, batch_size, ref, _F_star(ref))
