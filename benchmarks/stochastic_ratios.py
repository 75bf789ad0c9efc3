"""One-run tables for mlocore's stochastic bilevel methods.

    python benchmarks/stochastic_ratios.py            # full run (about 5 minutes, 2 cores)
    python benchmarks/stochastic_ratios.py --quick    # smoke run (under a minute)

Methods are discovered at run time from ``mlocore.stochastic.METHODS`` (a family that is not
registered yet is reported and skipped). Every run uses the default steps (what users get):
``step = 0.5 / L_F``, ``inner_step = neumann_step = 1 / L_g`` with each method's default
schedule; the Lipschitz estimates are those of the driver, memoized per problem and start
(so that they are computed once, not once per run). Same seed for every method.

1. Suboptimality against oracle samples and against time (seconds inside the compiled loops,
   compile excluded) on the quadratic (dx=10, dy=20, n=1000, batch 64; closed-form F*, x*)
   and on a logistic hyperparameter problem (ijcnn1-shaped synthetic data when
   ``make_logistic_ijcnn1_like`` exists, else breast cancer): F - F* (quadratic) or
   |grad F|^2 (logistic: F* and x* are not finite there) at three sample budgets and three
   time budgets, log-interpolated between each method's checkpoints; final distance to x*;
   which methods stall or diverge.
2. Empirical sample complexity on the quadratic: the log-log slope of |grad F|^2 against the
   number of oracle samples (geometric mean over 3 seeds), next to the slides' claims.
3. Each compiled loop against the same algorithm written as a plain NumPy loop
   (``numpy_loops_implicit.py`` and, when present, ``numpy_loops_variance.py`` and
   ``numpy_loops_free.py``): full-batch agreement of the implicit family, steady-state time per
   iteration (NumPy / compiled) at a small and a medium size, and first-call times of each
   kernel in fresh processes (disk cache warm: cache load; empty cache: compile).

Output: printed and written to ``benchmarks/results/stochastic-<date>[-quick].txt``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from benchmarks import common  # noqa: E402  (benchmarks/benchmarks/common.py)
from benchmarks.common import Report, fmt_t  # noqa: E402

import mlocore as mlo  # noqa: E402
import mlocore.stochastic as _stoch  # noqa: E402
import mlocore.stochastic._driver as _stoch_driver  # noqa: E402
from mlocore.problems import make_quadratic  # noqa: E402

EXPECTED = ("alternating", "bsa", "stocbio", "aid", "ttsa", "soba", "stable", "sustain",
            "mrbo", "vrbo", "saba", "hessian-free", "penalty", "primal-dual")
NUMPY_MODULES = ("numpy_loops_implicit", "numpy_loops_variance", "numpy_loops_free")
#: slides' claims (complexity O(eps^-p) <=> |grad F|^2 ~ samples^(-1/p)); "lit." = the papers
CLAIMS = {
    "bsa": "eps^-2 (T growing) / eps^-3: -0.50 / -0.33",
    "ttsa": "eps^-5/2: -0.40",
    "stable": "eps^-2: -0.50",
    "stocbio": "lit. eps^-2: -0.50",
    "soba": "lit. eps^-2: -0.50",
    "sustain": "lit. eps^-3/2: -0.67",
    "mrbo": "lit. eps^-3/2: -0.67",
    "vrbo": "lit. eps^-3/2: -0.67",
    "alternating": "biased (no convergence)",
}


# ---------------------------------------------------------------------------------------
# Default steps: the driver's own Lipschitz estimates, memoized per (problem, start)
# ---------------------------------------------------------------------------------------
_LIPS = {}
_estimate = _stoch_driver.estimate_lipschitz


def _memo_lipschitz(problem, x, y, which, **kw):
    key = (id(problem), np.asarray(x).tobytes(), np.asarray(y).tobytes(), which)
    if key not in _LIPS:
        _LIPS[key] = _estimate(problem, x, y, which, **kw)
    return _LIPS[key]


_stoch_driver.estimate_lipschitz = _memo_lipschitz


def available_methods(out):
    methods = list(_stoch.METHODS)
    missing = [m for m in EXPECTED if m not in methods]
    out(f"methods registered in mlocore.stochastic.METHODS ({len(methods)}): "
        + ", ".join(methods))
    if missing:
        out("  not registered yet (skipped): " + ", ".join(missing))
    return methods


def fmt_e(v):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    if not np.isfinite(v):
        return "inf"
    return f"{v:.2e}"


def interp_log(xs, vals, b):
    """log10(vals) linearly interpolated in xs at b; None beyond the run's end."""
    xs = np.asarray(xs, dtype=float)
    vals = np.asarray(vals, dtype=float)
    if b > xs[-1] * (1 + 1e-12) or b < xs[0]:
        return None
    j = int(np.searchsorted(xs, b, side="left"))
    if j == 0 or xs[j] == b:
        return float(vals[j])
    x0, x1 = xs[j - 1], xs[j]
    v0, v1 = vals[j - 1], vals[j]
    if not (v0 > 0 and v1 > 0 and np.isfinite(v0) and np.isfinite(v1)):
        return float(v1)
    w = (b - x0) / (x1 - x0)
    return float(10 ** ((1 - w) * math.log10(v0) + w * math.log10(v1)))


def nice_floor(v):
    """Largest 1-2-5 x 10^k not above v."""
    e = math.floor(math.log10(v))
    for m in (5, 2, 1):
        if m * 10 ** e <= v:
            return m * 10 ** e
    return 10 ** e


class RefOnly:
    """F and hypergrad of a reference, without x_star (whose search can take minutes)."""

    def __init__(self, ref):
        self._ref = ref

    failures = 0

    def F(self, x):
        try:
            return self._ref.F(x)
        except Exception:  # the reference lower solve fails at extreme iterates
            RefOnly.failures += 1
            return float("nan")

    def hypergrad(self, x):
        try:
            return self._ref.hypergrad(x)
        except Exception:
            return np.full(np.shape(x), np.nan)


def run_to_budget(problem, x0, y0, method, samples, n_checkpoints, batch, seed, reference):
    """minimize_bilevel with default steps until about ``samples`` oracle samples."""
    probe = mlo.minimize_bilevel(problem, x0, y0, method=method, batch_size=batch, seed=seed,
                                 maxiter=20, eval_every=20)
    per_iter = max(1.0, probe.history["samples"][-1] / max(1, probe.nit))
    maxiter = max(2, int(math.ceil(samples / per_iter)))
    for _ in range(3):  # the probe's rate can be off (periodic full batches, random Q)
        ev = max(1, maxiter // n_checkpoints)
        res = mlo.minimize_bilevel(problem, x0, y0, method=method, batch_size=batch,
                                   seed=seed, maxiter=maxiter, eval_every=ev,
                                   reference=reference)
        done = res.history["samples"][-1]
        if done >= samples or res.status == 13 or res.nit < maxiter:
            break
        maxiter = int(math.ceil(maxiter * samples / max(done, 1) * 1.02)) + 1
    return res


# ---------------------------------------------------------------------------------------
# Part 1
# ---------------------------------------------------------------------------------------
def suboptimality_table(out, name, problem, x0, y0, methods, metric, f_star, reference,
                        budget, n_ckpt, batch, seed):
    out(f"\n--- {name}: {metric_label(metric, f_star)} against oracle samples and time "
        f"(batch {batch}, seed {seed}, ~{budget:.0e} samples per method) ---")
    runs = {}
    for m in methods:
        t0 = time.perf_counter()
        try:
            res = run_to_budget(problem, x0, y0, m, budget, n_ckpt, batch, seed, reference)
        except Exception as exc:  # a family still being written
            out(f"  {m}: skipped ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        h = res.history
        vals = (h["F"] - f_star) if metric == "F" else h["grad_norm_sq"]
        runs[m] = (res, np.asarray(vals, dtype=float), time.perf_counter() - t0)
    if not runs:
        return {}
    sb = [budget / 100, budget / 10, budget]
    finals = [r.history["time"][-1] for r, _, _ in runs.values()
              if r.status != 13 and r.history["time"][-1] > 0]
    tmax = nice_floor(min(finals)) if finals else 1.0
    tb = [tmax / 100, tmax / 10, tmax]
    has_d = any("dist_to_x_star" in r.history for r, _, _ in runs.values())
    head = (f"{'method':13s} " + " ".join(f"{'S=' + format(s, '.0e'):>9s}" for s in sb) + " | "
            + " ".join(f"{'t=' + fmt_t(t):>10s}" for t in tb)
            + f" | {'iters':>6s} {'loop time':>9s}" + (f" {'|x-x*|':>9s}" if has_d else "")
            + "  note")
    out(head)
    notes = {}
    for m, (res, vals, wall) in runs.items():
        h = res.history
        s_cols = [interp_log(h["samples"], vals, b) for b in sb]
        t_cols = [interp_log(h["time"], vals, b) for b in tb]
        note = behaviour(res, vals, h)
        notes[m] = note
        d = fmt_e(h["dist_to_x_star"][-1]) if has_d and "dist_to_x_star" in h else ""
        out(f"{m:13s} " + " ".join(f"{fmt_e(v):>9s}" for v in s_cols) + " | "
            + " ".join(f"{fmt_e(v):>10s}" for v in t_cols)
            + f" | {res.nit:6d} {fmt_t(res.time):>9s}" + (f" {d:>9s}" if has_d else "")
            + f"  {note}")
    out(f"  start: {fmt_e(next(iter(runs.values()))[1][0])}; S = oracle samples (sum of batch "
        "sizes over all oracle calls), t = seconds inside the compiled loops; values "
        "log-interpolated between checkpoints, '-' = beyond the method's run")
    return runs


def metric_label(metric, f_star):
    return "F - F*" if metric == "F" else "|grad F|^2"


def behaviour(res, vals, h):
    if res.status == 13:
        return "DIVERGED (non-finite iterate)"
    v0, vend = vals[0], vals[-1]
    if np.isnan(vend):
        return "reference failed at the final iterate (extreme x): diverging"
    if not np.isfinite(vend) or vend > 10 * v0:
        return f"diverges (x{vend / v0:.1e} of start)"
    s = np.asarray(h["samples"], dtype=float)
    j = int(np.searchsorted(s, s[-1] / 10))
    ratio = vend / vals[j] if vals[j] > 0 else 1.0
    if ratio > 0.5:
        return f"stalls (last decade of samples: x{ratio:.2f})"
    return f"last decade x{ratio:.2g}"


# ---------------------------------------------------------------------------------------
# Part 2
# ---------------------------------------------------------------------------------------
def slope(xs, ys):
    ok = (xs > 0) & (ys > 0) & np.isfinite(ys)
    if ok.sum() < 3:
        return float("nan")
    return float(np.polyfit(np.log10(xs[ok]), np.log10(ys[ok]), 1)[0])


def complexity_table(out, q, methods, budget, seeds, batch):
    out(f"\n=== 2. Empirical sample complexity on the quadratic (dx={q.dx}, dy={q.dy}, "
        f"n={q.n_inner}, batch {batch}, default steps, seeds {list(seeds)}) ===")
    out("slope of log10 |grad F|^2 against log10(oracle samples); ~400 evenly spaced "
        "checkpoints per run, thinned to 30 log-spaced ones from the first checkpoint to the "
        "end;\n'2nd half' fits the last 15 (samples in [S/20, S]), '1st half' the first 15; "
        "geometric mean of |grad F|^2 over seeds (slope range over single seeds in brackets)")
    x0, y0 = np.zeros(q.dx), np.zeros(q.dy)
    out(f"{'method':13s} {'1st half':>9s} {'2nd half':>9s} {'(per seed)':>17s} "
        f"{'|gF|^2 end':>10s} {'samples':>9s}  claim (slope)")
    results = {}
    for m in methods:
        per_seed = []
        try:
            for s in seeds:
                res = run_to_budget(q.stochastic_problem, x0, y0, m, budget, 400, batch, s, q)
                per_seed.append(res)
        except Exception as exc:
            out(f"{m:13s} skipped ({type(exc).__name__}: {str(exc)[:100]})")
            continue
        n = min(len(r.history["samples"]) for r in per_seed)
        S = np.mean([r.history["samples"][:n] for r in per_seed], axis=0)
        G = np.array([r.history["grad_norm_sq"][:n] for r in per_seed], dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            Gm = 10 ** np.mean(np.log10(G), axis=0)
        idx = np.unique(np.round(np.geomspace(1, n - 1, 30)).astype(int))
        half = len(idx) // 2
        first, second = idx[:half], idx[half:]
        s1 = slope(S[first], Gm[first])
        s2 = slope(S[second], Gm[second])
        ps = [slope(S[second], G[i][second]) for i in range(len(per_seed))]
        diverged = any(r.status == 13 for r in per_seed)
        results[m] = (s1, s2, ps)
        rng_txt = f"[{min(ps):+.2f}, {max(ps):+.2f}]" if all(np.isfinite(ps)) else "n/a"
        out(f"{m:13s} {s1:+9.2f} {s2:+9.2f} {rng_txt:>17s} {fmt_e(Gm[-1]):>10s} "
            f"{S[-1]:9.2e}  {CLAIMS.get(m, '-')}" + ("  (a seed diverged)" if diverged else ""))
    return results


# ---------------------------------------------------------------------------------------
# Part 3
# ---------------------------------------------------------------------------------------
def load_numpy_loops(out):
    loops = {}
    for mod in NUMPY_MODULES:
        try:
            module = importlib.import_module(mod)
        except ImportError as exc:
            out(f"  {mod}.py: not available ({exc}); its methods have no NumPy baseline")
            continue
        for m in _stoch.METHODS:
            fn = getattr(module, m.replace("-", "_") + "_numpy", None)
            if fn is not None and m not in loops:
                loops[m] = (mod, fn)
    return loops


def numpy_kwargs(fn, spec, res):
    """Arguments of another family's loop, from mlocore's defaults (constant steps: the
    schedule's initial value; eta = the Neumann step; Q, T = the method's defaults)."""
    params = inspect.signature(fn).parameters
    kw = {}
    eta = res.steps["neumann_step"] or res.steps["beta"].initial
    cand = {"eta": eta, "Q": spec.neumann_terms, "neumann_terms": spec.neumann_terms,
            "inner_steps": spec.inner_steps}
    cand.update(spec.options)
    for k, v in cand.items():
        if k in params and v is not None:
            kw[k] = v
    return kw


def time_case(out, label, q, batch, methods, loops, repeats, target):
    x0, y0 = np.zeros(q.dx), np.zeros(q.dy)
    prob = q.stochastic_problem
    out(f"\n--- {label}: dx={q.dx}, dy={q.dy}, n={q.n_inner}, batch {batch} ---")
    out(f"{'method':13s} {'compiled/it':>11s} {'NumPy/it':>10s} {'NumPy/compiled':>14s} "
        f"{'iters':>6s}  baseline")
    ratios = {}
    for m in methods:
        if m not in loops:
            out(f"{m:13s} (no NumPy loop)")
            continue
        mod, fn = loops[m]
        spec = _stoch.METHODS[m]
        try:
            res = mlo.minimize_bilevel(prob, x0, y0, method=m, batch_size=batch, seed=0,
                                       maxiter=5)
        except Exception as exc:
            out(f"{m:13s} skipped ({type(exc).__name__}: {str(exc)[:100]})")
            continue
        alpha, beta = res.steps["alpha"], res.steps["beta"]
        implicit = mod == "numpy_loops_implicit"
        if implicit:
            from numpy_loops_implicit import LOOP_OPTIONS
            kw = {"inner_steps": spec.inner_steps, "neumann_terms": spec.neumann_terms,
                  "eta": res.steps["neumann_step"]}
            kw = {k: v for k, v in kw.items() if k in LOOP_OPTIONS[m]}
            a_np, b_np = alpha, beta
        else:
            kw = numpy_kwargs(fn, spec, res)
            a_np, b_np = alpha.initial, beta.initial

        def run_c(n):
            r = mlo.minimize_bilevel(prob, x0, y0, method=m, batch_size=batch, seed=0,
                                     maxiter=n, eval_every=n, step=alpha, inner_step=beta)
            return r.time, r.status

        def run_n(n):
            t0 = time.perf_counter()
            with np.errstate(all="ignore"):
                fn(q, x0, y0, n, batch, 0, a_np, b_np, **kw)
            return time.perf_counter() - t0

        tc, st = run_c(20)
        tn = run_n(5)
        nc = max(20, int(target / max(tc / 20, 1e-7)))
        nn = max(3, int(target / max(tn / 5, 1e-7)))
        n_it = min(nc, nn)  # same iterations for both (same trajectory length)
        bc, bn = [], []
        for _ in range(repeats):  # interleaved
            t, st = run_c(n_it)
            bc.append(t / n_it)
            bn.append(run_n(n_it) / n_it)
        c, p = min(bc), min(bn)
        ratios[m] = p / c
        flag = "  (mlocore diverged: partial run)" if st == 13 else ""
        out(f"{m:13s} {fmt_t(c):>11s} {fmt_t(p):>10s} {p / c:14.1f} {n_it:6d}  {mod}{flag}")
    return ratios


_FIRST_CALL = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
import numpy as np
t0 = time.perf_counter()
import mlocore as mlo
from mlocore.stochastic import METHODS
from mlocore.problems import make_quadratic
t_import = time.perf_counter() - t0
q = make_quadratic(dx=5, dy=10, n_outer=200, n_inner=200, seed=0)
out = {{"import": t_import}}
for m in {methods!r}:
    spec = METHODS[m]
    kw = dict(step=1e-3, inner_step=1e-3)
    if "neumann_step" in spec.uses:
        kw["neumann_step"] = 1e-3
    ts = []
    try:
        for _ in range(2):
            t = time.perf_counter()
            mlo.minimize_bilevel(q.stochastic_problem, np.zeros(5), np.zeros(10), method=m,
                                 batch_size=16, seed=0, maxiter=1, **kw)
            ts.append(time.perf_counter() - t)
        out[m] = ts[0] - ts[1]
    except Exception as exc:
        out[m] = repr(exc)[:100]
print("JSON" + json.dumps(out))
"""


def first_call(methods, env_extra=None, timeout=600):
    env = dict(os.environ)
    env.update(env_extra or {})
    code = _FIRST_CALL.format(root=ROOT, methods=list(methods))
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {}
    for line in p.stdout.splitlines():
        if line.startswith("JSON"):
            return json.loads(line[4:])
    return {"error": p.stderr[-300:]}


def compile_table(out, methods, quick):
    out("\n--- first-call time of each kernel, in fresh processes (first minimize_bilevel call "
        "minus a second identical one;\n    maxiter=1 on a small quadratic; explicit steps, so "
        "no Lipschitz estimate is timed) ---")
    warm = {}
    for m in methods:  # one process per method: nothing shared is already loaded; the
        first_call([m])  # first process rewrites a stale or missing cache, the second loads
        warm.update({k: v for k, v in first_call([m]).items() if k == m})
    cold = {}
    if not quick:
        with tempfile.TemporaryDirectory(prefix="bench-numba-cache-") as tmp:
            cold = first_call(methods, {"NUMBA_CACHE_DIR": tmp})
    out(f"{'method':13s} {'cache load':>11s} {'compile':>9s}")
    for m in methods:
        w, c = warm.get(m), cold.get(m)
        fw = fmt_t(w) if isinstance(w, float) else str(w)
        fc = fmt_t(c) if isinstance(c, float) else ("-" if c is None else str(c))
        out(f"{m:13s} {fw:>11s} {fc:>9s}")
    out("'cache load': numba's on-disk cache warm (what a user pays once per process after the "
        "first run),\nin its own fresh process per method, the second such process (the first "
        "refreshes a stale cache; callbacks and shared helpers included). "
        + ("'compile': not measured in --quick." if quick else
           "'compile': empty NUMBA_CACHE_DIR, all methods\nin one process in this order: the "
           "first one also compiles the quadratic's callbacks and the shared helpers\n"
           "(samplers, oracles, Neumann estimators), the later ones mostly their own kernel;\n"
           "methods that share a kernel with an earlier one (mrbo: sustain's "
           "run_double_momentum) cost ~0."))


def validation(out):
    import numpy_loops_implicit as nli
    q = make_quadratic(dx=5, dy=10, n_outer=100, n_inner=100, seed=1)
    out("full-batch agreement (batch_size = n_samples = 100, 5 iterations, same steps; "
        "BSA/TTSA with neumann_terms=1,\nStocBiO/AID also with Q=3): max |difference| / "
        "max(1, |iterate|)")
    parts = []
    for m in nli.NUMPY_LOOPS:
        if m not in _stoch.METHODS:
            continue
        d = nli.validate(q, m, n_iter=5)
        extra = ""
        if m in ("stocbio", "aid"):
            extra = f" / {nli.validate(q, m, n_iter=5, neumann_terms=3):.1e}"
        parts.append(f"{m} {d:.1e}{extra}")
    out("  " + ", ".join(parts))


# ---------------------------------------------------------------------------------------
def logistic_problem(out, quick):
    from mlocore.problems import logistic as L
    if hasattr(L, "make_logistic_ijcnn1_like"):
        if quick:
            p = L.make_logistic_ijcnn1_like(n_train=2000, n_val=2000, seed=0)
            return p, "logistic, ijcnn1-shaped synthetic (reduced: 2000 train / 2000 val)"
        p = L.make_logistic_ijcnn1_like(seed=0)
        return p, (f"logistic, ijcnn1-shaped synthetic ({p.n_features} features, "
                   f"{p.n_train} train / {p.n_val} val)")
    p = L.load_breast_cancer_logistic(seed=0)
    return p, f"logistic, breast cancer ({p.n_features} features, {p.n_train} train)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (under a minute)")
    ap.add_argument("--no-save", action="store_true", help="do not write the results file")
    ap.add_argument("--parts", default="123", help="which parts to run, e.g. 13")
    args = ap.parse_args()
    quick = args.quick
    out = Report()
    t_start = time.perf_counter()
    for line in common.environment_lines("mlocore stochastic bilevel tables", quick,
                                         "timings are best of interleaved samples"):
        out(line)
    try:
        import threadpoolctl
        info = threadpoolctl.threadpool_info()
        out("  BLAS for the NumPy baselines: " + ", ".join(
            f"{d.get('internal_api')} {d.get('num_threads')} threads" for d in info))
    except ImportError:
        pass
    methods = available_methods(out)
    seed, batch = 0, 64

    if "1" in args.parts:
        out("\n=== 1. Suboptimality against oracle samples and time, default steps ===")
        n = 1000
        q = make_quadratic(dx=10, dy=20, n_outer=n, n_inner=n, seed=0)
        out(f"quadratic: dx=10, dy=20, n_outer=n_inner={n}, ridge {q.ridge:g}, F* = "
            f"{q.F_star:.6g}, |x*| = {np.linalg.norm(q.x_star):.3g}, x0 = y0 = 0")
        suboptimality_table(out, "quadratic", q.stochastic_problem, np.zeros(q.dx),
                            np.zeros(q.dy), methods, "F", q.F_star, q,
                            5e4 if quick else 2e6, 50 if quick else 200, batch, seed)
        try:
            lp, lname = logistic_problem(out, quick)
        except Exception as exc:
            out(f"logistic problem unavailable ({type(exc).__name__}: {exc}); skipped")
            lp = None
        if lp is not None:
            d = lp.n_features
            out(f"\n{lname}; F* and x* unknown: the per-feature penalties' infimum is at "
                "+-infinity for some features\n(BilevelReference's x_star search finds a flat "
                "direction), so the table shows |grad F|^2 (exact, full batch); x0 = y0 = 0")
            t0 = time.perf_counter()
            suboptimality_table(out, "logistic", lp.stochastic_problem, np.zeros(d),
                                np.zeros(d), methods, "grad", None, RefOnly(lp),
                                5e4 if quick else 2e6, 8 if quick else 40, batch, seed)
            out(f"  (logistic section: {time.perf_counter() - t0:.0f} s of wall time: runs, "
                "full-batch reference F and hypergradient at checkpoints, and the kernels' "
                "compile or cache load for the logistic callbacks)")

    if "2" in args.parts:
        q2 = make_quadratic(dx=10, dy=20, n_outer=1000, n_inner=1000, seed=0)
        complexity_table(out, q2, methods, 5e4 if quick else 2e6,
                         (0,) if quick else (0, 1, 2), batch)

    if "3" in args.parts:
        out("\n=== 3. Compiled loops against plain NumPy loops (steady state, per iteration) ===")
        loops = load_numpy_loops(out)
        validation(out)
        out("timing: default steps (decaying schedules for the implicit family's NumPy loops; "
            "the other families' loops\ntake constant steps = the schedule's initial value), "
            "time inside the compiled loops (res.time)\nagainst wall time of the NumPy loop, "
            "same iterations, best of interleaved samples")
        sizes = [("small", 5, 10, 16), ("medium", 50, 100, 64)]
        for label, dx, dy, bs in sizes:
            qq = make_quadratic(dx=dx, dy=dy, n_outer=1000, n_inner=1000, seed=0)
            time_case(out, label, qq, bs, methods, loops, 2 if quick else 3,
                      0.01 if quick else 0.25)
        compile_table(out, methods[:2] if quick else methods, quick)

    out(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    if not args.no_save:
        date = datetime.date.today().isoformat()
        path = os.path.join(HERE, "results",
                            f"stochastic-{date}{'-quick' if quick else ''}.txt")
        with open(path, "w") as fh:
            fh.write("\n".join(out.lines) + "\n")
        print(f"written to {path}")


if __name__ == "__main__":
    main()
