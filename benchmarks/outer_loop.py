"""Outer loops of minimize_bilevel / minimize_multilevel: L-BFGS (default) against
Barzilai-Borwein and scipy, and the cost of a multilevel iteration against a hypergradient.

    python benchmarks/outer_loop.py               # benchmarks/results/outer-loop-<date>.txt
    python benchmarks/outer_loop.py --quick       # one timing sample
    python benchmarks/outer_loop.py --before DIR  # also the mlocore tree in DIR (e.g. a
                                                  # git archive of an older commit), case by
                                                  # case in alternation, and after/before

Each case runs in its own process (``--case I``, JSON on stdout), in turn for each tree, so
that both see the same machine load. BLAS runs on one thread (``OPENBLAS_NUM_THREADS=1``
unless set): on the shared 2-core machine scipy's L-BFGS-B step took ~3 ms a call with the
default threads, far above its cost.

Bilevel cases, all from zeros: ``minimize_bilevel(method="aid", outer=...)`` with
``outer="lbfgs"`` (row ``lbfgs``) and ``outer="bb"`` (``bb``), ``minimize_bilevel(method=
"itd")`` with the default L-BFGS loop (``itd``; T = 100 unrolled steps, warm-started), and
scipy's L-BFGS-B on :class:`mlocore.HyperObjective` (``gtol`` = tol, ``ftol`` = 0; the same
bounds) through its two interfaces: ``minimize(fobj, x0, jac=True)`` (``scipy``) and
``minimize(fobj.fun, x0, jac=fobj.jac)`` (``scipy-fj``, F and grad F as two callables that
share one warm-started lower solve at the same x):

- ``nit``: outer iterations; ``hg``: hypergradients (upper-gradient evaluations of
  minimize_bilevel, ``HyperObjective.ncalls`` for scipy); ``ls``: lower-level solves
  (``HyperObjective.nsolves`` for scipy; for minimize_bilevel, calls of the driver's lower
  solve and hypergradients that solve the lower level, counted by wrapping
  ``mlocore._minimize._solve_lower`` / ``implicit_call``, which the scipy runs check against
  ``nsolves``); ``lo``: lower-level oracle calls (``lower_*``); ``time``: best of the
  samples, in ms of process CPU time (the machine is shared: CPU time leaves out the waits
  for a core; the first, compiling call excluded), for the whole run to its stopping test;
  ``F``: the final value; ``err``: ``|x - x*| / |x*|`` against the closed form (quadratics;
  the logistic problem is not convex in the penalties, and the runs may stop at different
  local minima); ``ok``: reported success.
- ratios: bb, itd, scipy and scipy-fj over lbfgs, and scipy-fj over scipy. scipy stops
  where F no longer decreases in floating point (``ftol = 0``), at ``err`` ~1e-7; the L-BFGS
  loop goes on to ``tol`` (its approximate-Wolfe test needs no decrease of F) and the table
  also gives the iterations it takes to reach scipy's final error.

Problems: ``make_quadratic`` at three sizes / ridges (the ridge sets the conditioning), tol
1e-10; ``make_logistic`` (per-feature penalties, box ``|lam| <= 20``), tol 1e-6.

Multilevel cases. ``minimize_multilevel(method="exact", tol=1e-10)`` from zeros on
``make_nlevel_quadratic`` chains of 3 and 4 levels, 5 variables each, against the
hypergradients along its own path: ``hypergrad(problem, [x_k] + xs_{k-1}[1:])`` at each
iterate x_k, warm-started from the previous iterate's lower solutions (x_0 from zeros), which
is the least an iteration has to pay. ``ratio``: the run's cost over the sum of those
hypergradients' (time, best of the samples of each; oracle calls of levels 2..n; all
oracle calls).
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import scipy.optimize as so  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BILEVEL = ("quadratic dx=10 dy=15", "quadratic dx=20 dy=30", "quadratic dx=50 dy=80",
           "logistic n_features=10 n=200")
MULTILEVEL = ("chain n=3 dims=5", "chain n=4 dims=5")


class _LowerSolves:
    """Counts the lower solves of :func:`mlocore.minimize_bilevel` (benchmark
    instrumentation): the CPU driver calls ``mlocore._minimize._solve_lower`` (line-search F
    evaluations) and ``mlocore._minimize.implicit_call`` (hypergradients, which solve the
    lower level when their ``solve_lower_flag`` is set), looked up in that module at each
    call. :class:`mlocore.HyperObjective` counts its own (``nsolves``); run_bilevel checks
    that this counter agrees with it on the scipy runs, so a stale hook shows up as an
    error rather than as zeros."""

    def __init__(self):
        import mlocore._minimize as mn
        self.n = 0
        solve, implicit = mn._solve_lower, mn.implicit_call

        def counted_solve(*args, **kw):
            self.n += 1
            return solve(*args, **kw)

        def counted_implicit(comp, method, x, y, v0, solve_lower_flag, *args, **kw):
            self.n += bool(solve_lower_flag)
            return implicit(comp, method, x, y, v0, solve_lower_flag, *args, **kw)
        mn._solve_lower, mn.implicit_call = counted_solve, counted_implicit


def _best(fn, samples):
    fn()  # compiles
    best, out = np.inf, None
    for _ in range(samples):
        t0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t0)
    return out, 1e3 * best


def _bilevel_case(i):
    import mlocore as mlo
    from mlocore.problems import make_logistic, make_quadratic
    if i < 3:
        dx, dy, ridge = ((10, 15, 0.1), (20, 30, 0.1), (50, 80, 0.02))[i]
        q = make_quadratic(dx=dx, dy=dy, ridge=ridge, seed=1)
        return q.problem, None, 1e-10, q.x_star
    lg = make_logistic(n_train=200, n_val=200, n_features=10, seed=0)
    d = lg.n_features
    bounds = (np.full(d, -20.0), np.full(d, 20.0))
    p = mlo.BilevelProblem(lg.problem.upper, lg.problem.lower, dims=(d, d), bounds=bounds)
    return p, bounds, 1e-6, None


def _lower_calls(c):
    return sum(v for k, v in c.items() if k.startswith("lower"))


def run_bilevel(i, samples):
    import mlocore as mlo
    p, bounds, tol, x_star = _bilevel_case(i)
    solves = _LowerSolves()
    x0, y0 = np.zeros(p.dx), np.zeros(p.dy)
    rows = {}
    for loop, method, outer in (("lbfgs", "aid", "lbfgs"), ("bb", "aid", "bb"),
                                ("itd", "itd", "lbfgs")):
        def run(method=method, outer=outer):
            return mlo.minimize_bilevel(p, x0, y0, method=method, tol=tol, outer=outer)
        res, ms = _best(run, samples)
        solves.n = 0
        res = run()
        if solves.n == 0:
            raise RuntimeError(f"{loop}: no lower solve counted (stale instrumentation?)")
        c = res.oracle_calls
        rows[loop] = dict(x=res.x, fun=res.fun, nit=res.nit, ok=bool(res.success), ms=ms,
                          hg=max(c["upper_grad"], c["upper_grad_x"], c["upper_grad_y"]),
                          ls=solves.n, lo=_lower_calls(c))
    scipy_bounds = None if bounds is None else list(zip(*bounds))
    options = {"gtol": tol, "ftol": 0.0, "maxiter": 1000}

    def scipy_run(pair):
        fobj = mlo.HyperObjective(p, y0)
        if pair:  # F and grad F as two callables sharing the lower solve at x
            r = so.minimize(fobj.fun, x0, jac=fobj.jac, method="L-BFGS-B",
                            bounds=scipy_bounds, options=options)
        else:
            r = so.minimize(fobj, x0, jac=True, method="L-BFGS-B", bounds=scipy_bounds,
                            options=options)
        return r, fobj

    for loop, pair in (("scipy", False), ("scipy-fj", True)):
        _, ms = _best(lambda: scipy_run(pair), samples)
        solves.n = 0
        res, fobj = scipy_run(pair)
        if solves.n != fobj.nsolves:
            raise RuntimeError(f"{loop}: counted {solves.n} lower solves, HyperObjective "
                               f"reports nsolves = {fobj.nsolves}")
        rows[loop] = dict(x=res.x, fun=float(res.fun), nit=int(res.nit), ok=bool(res.success),
                          ms=ms, hg=fobj.ncalls, ls=fobj.nsolves, nfev=int(res.nfev),
                          lo=_lower_calls(fobj.oracle_calls))
    for r in rows.values():
        x = r.pop("x")
        r["err"] = None if x_star is None else float(np.linalg.norm(x - x_star)
                                                     / np.linalg.norm(x_star))
    if x_star is not None:  # lbfgs: iterations until its error is at most scipy's final one
        errs = []
        mlo.minimize_bilevel(p, x0, y0, method="aid", tol=tol, callback=lambda r: errs.append(
            np.linalg.norm(r.x - x_star) / np.linalg.norm(x_star)))
        rows["lbfgs"]["nit_scipy_err"] = next(
            (k for k, e in enumerate(errs, 1) if e <= rows["scipy"]["err"]), None)
    return rows


def _total(calls, levels):
    return sum(sum(calls[f"level{k}"].values()) for k in levels)


def run_multilevel(i, samples):
    import mlocore as mlo
    from mlocore.problems import make_nlevel_quadratic
    n = (3, 4)[i]
    q = make_nlevel_quadratic(n=n, dims=(5,) * n, seed=n)
    p = q.problem
    x0s = [np.zeros(5) for _ in range(n)]
    kw = dict(method="exact", tol=1e-10)
    res, ms = _best(lambda: mlo.minimize_multilevel(p, x0s, **kw), samples)
    path = []
    res = mlo.minimize_multilevel(p, x0s, callback=lambda r: path.append((r.x, r.xs)), **kw)
    lower, every = range(2, n + 1), range(1, n + 1)
    mlo.hypergrad(p, x0s, tol=1e-10, lower_tol=1e-10)  # compiles
    # the iterates x_0..x_nit (the callback sees x_1..x_nit), each with the lower
    # solutions at the previous iterate (x_0 with the zeros of x0s)
    xs_0 = mlo.hypergrad(p, x0s, tol=1e-10, lower_tol=1e-10).xs
    iterates = [x0s[0]] + [x for x, _ in path]
    previous = [x0s, xs_0] + [xs for _, xs in path[:-1]]
    points = list(zip(iterates, previous))
    hg_ms, hg_lower, hg_all = 0.0, 0, 0
    for x, xs_prev in points:
        start = [x] + list(xs_prev[1:])
        best = np.inf
        for _ in range(samples):
            t0 = time.process_time()
            h = mlo.hypergrad(p, start, tol=1e-10, lower_tol=1e-10)
            best = min(best, time.process_time() - t0)
        hg_ms += 1e3 * best
        hg_lower += _total(h.oracle_calls, lower)
        hg_all += _total(h.oracle_calls, every)
    return dict(nit=res.nit, ok=bool(res.success), ms=ms, hg_n=len(points), hg_ms=hg_ms,
                lower=_total(res.oracle_calls, lower), all=_total(res.oracle_calls, every),
                hg_lower=hg_lower, hg_all=hg_all,
                err=float(np.linalg.norm(res.x - q.x_star) / np.linalg.norm(q.x_star)))


def _case(name, samples, tree):
    """One case in a fresh process on the mlocore tree ``tree`` (JSON back)."""
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", name,
                          "--samples", str(samples)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _bilevel_lines(name, rows):
    lines = []
    for loop, r in rows.items():
        err = "-" if r["err"] is None else f"{r['err']:.1e}"
        lines.append(f"{name:<30}{loop:<9}{r['nit']:>5}{r['hg']:>5}{r['ls']:>5}{r['lo']:>7}"
                     f"{r['ms']:>9.2f}{r['fun']:>15.10f}{err:>9}{'y' if r['ok'] else 'n':>3}")
    return lines


def _tables(results, label):
    lines = [f"## {label}", "", f"{'problem':<30}{'loop':<9}{'nit':>5}{'hg':>5}{'ls':>5}"
             f"{'lo':>7}{'time ms':>9}{'F':>15}{'err':>9}{'ok':>3}"]
    for name in BILEVEL:
        lines += _bilevel_lines(name, results[name])
    lines += ["", "lbfgs: iterations until |x - x*| / |x*| is at most scipy's final error "
              "(scipy stops where F no longer decreases in floating point)"]
    for name in BILEVEL:
        k = results[name]["lbfgs"].get("nit_scipy_err")
        if k is not None:
            lines.append(f"{name:<30}{k:>4} (scipy {results[name]['scipy']['nit']})")
    lines += ["", "ratios to lbfgs (aid); bb and itd stop at maxiter=100 where their ok is n; "
              "fj: scipy with fun=fobj.fun, jac=fobj.jac",
              f"{'problem':<30}{'bb hg':>7}{'bb t':>7}{'itd hg':>7}{'itd t':>7}"
              f"{'scipy hg':>9}{'ls':>6}{'lo':>6}{'t':>6}{'fj hg':>7}{'ls':>6}{'lo':>6}"
              f"{'t':>6}"]
    for name in BILEVEL:
        r = results[name]
        lb = r["lbfgs"]
        cols = [r["bb"]["hg"] / lb["hg"], r["bb"]["ms"] / lb["ms"],
                r["itd"]["hg"] / lb["hg"], r["itd"]["ms"] / lb["ms"]]
        line = f"{name:<30}" + "".join(f"{v:>7.2f}" for v in cols)
        for loop in ("scipy", "scipy-fj"):
            sc = r[loop]
            line += (f"{sc['hg'] / lb['hg']:>{9 if loop == 'scipy' else 7}.2f}"
                     f"{sc['ls'] / lb['ls']:>6.2f}{sc['lo'] / lb['lo']:>6.2f}"
                     f"{sc['ms'] / lb['ms']:>6.2f}")
        lines.append(line)
    lines += ["", "scipy-fj / scipy (same L-BFGS-B iterates: nsolves and time of the two "
              "interfaces)", f"{'problem':<30}{'nit':>5}{'nfev':>6}{'ls':>6}{'lo':>6}{'t':>6}"]
    for name in BILEVEL:
        a, b = results[name]["scipy-fj"], results[name]["scipy"]
        lines.append(f"{name:<30}{a['nit'] / b['nit']:>5.2f}{a['nfev'] / b['nfev']:>6.2f}"
                     f"{a['ls'] / b['ls']:>6.2f}{a['lo'] / b['lo']:>6.2f}"
                     f"{a['ms'] / b['ms']:>6.2f}")
    lines += ["", "multilevel: the run against the hypergradients along its path (hg: how "
              "many; ratio run / hypergradients)",
              f"{'problem':<22}{'nit':>4}{'err':>9}{'time ms':>9}{'hg':>4}{'hg ms':>8}"
              f"{'t ratio':>8}{'lower':>7}{'hg lower':>9}{'ratio':>7}{'all':>7}{'hg all':>7}"
              f"{'ratio':>7}"]
    for name in MULTILEVEL:
        m = results[name]
        lines.append(f"{name:<22}{m['nit']:>4}{m['err']:>9.1e}{m['ms']:>9.2f}{m['hg_n']:>4}"
                     f"{m['hg_ms']:>8.2f}{m['ms'] / m['hg_ms']:>8.2f}{m['lower']:>7}"
                     f"{m['hg_lower']:>9}{m['lower'] / m['hg_lower']:>7.2f}{m['all']:>7}"
                     f"{m['hg_all']:>7}{m['all'] / m['hg_all']:>7.2f}")
    return lines


def _compare(after, before):
    lines = ["## after / before (same process order, case by case)", "",
             f"{'problem':<30}{'loop':<7}{'ls':>7}{'lo':>7}{'time':>7}"]
    for name in BILEVEL:
        for loop in ("lbfgs", "scipy"):
            a, b = after[name][loop], before[name][loop]
            lines.append(f"{name:<30}{loop:<7}{a['ls'] / b['ls']:>7.2f}"
                         f"{a['lo'] / b['lo']:>7.2f}{a['ms'] / b['ms']:>7.2f}")
    lines += ["", f"{'problem':<30}{'':<7}{'lower':>7}{'all':>7}{'time':>7}"]
    for name in MULTILEVEL:
        a, b = after[name], before[name]
        lines.append(f"{name:<30}{'run':<7}{a['lower'] / b['lower']:>7.2f}"
                     f"{a['all'] / b['all']:>7.2f}{a['ms'] / b['ms']:>7.2f}")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--before", help="another mlocore tree, measured case by case in turn")
    ap.add_argument("--before-label", help="what --before is, for the results file")
    ap.add_argument("--samples", type=int, default=15, help="timing samples per run")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case is not None:
        if args.case in BILEVEL:
            out = run_bilevel(BILEVEL.index(args.case), args.samples)
        else:
            out = run_multilevel(MULTILEVEL.index(args.case), args.samples)
        print(json.dumps(out))
        return
    samples = 1 if args.quick else args.samples
    trees = {"after": ROOT} if args.before is None else {"before": args.before,
                                                         "after": ROOT}
    results = {t: {} for t in trees}
    for name in BILEVEL + MULTILEVEL:
        for tree, path in trees.items():
            results[tree][name] = _case(name, samples, path)
    import numpy, scipy
    before = args.before_label or args.before
    lines = [f"# benchmarks/outer_loop.py{' --before ' + before if args.before else ''}"
             f", {datetime.date.today()}, {samples} samples, python "
             f"{sys.version.split()[0]}, numpy {numpy.__version__}, scipy {scipy.__version__}"
             f", OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}, load average "
             + ", ".join(f"{v:.2f}" for v in os.getloadavg()) + " at the end (shared machine)",
             ""]
    for tree in trees:
        lines += _tables(results[tree], tree if args.before else "results") + [""]
    if args.before:
        lines += _compare(results["after"], results["before"])
    out = "\n".join(lines).rstrip()
    print(out)
    path = os.path.join(HERE, "results", f"outer-loop-{datetime.date.today()}.txt")
    with open(path, "w") as fh:
        fh.write(out + "\n")


if __name__ == "__main__":
    main()
