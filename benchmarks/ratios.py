"""One-run ratio table of mlocore's hypergradient methods (no asv needed).

    python benchmarks/ratios.py            # full run (dy up to 3000, several minutes)
    python benchmarks/ratios.py --quick    # dy in 10, 100, 1000 (well under 2 minutes)

Measures, in one process (compile and warm-up excluded, best of k interleaved samples):

1. per dy: mlocore "cg", "neumann", "direct", "itd-reverse", "itd-forward" at equal accuracy
   (relative error <= 1e-6 against the closed form; each error is printed) and the same CG
   hypergradient written with ``scipy.sparse.linalg.cg`` + a NumPy ``LinearOperator``;
   ratios scipy/cg and method/cg;
2. at dy = 1000 (and 3000): mlocore's CG hypergradient against the raw cost of the same
   number of dense products ``A @ v`` done directly with NumPy/BLAS;
3. first-call (compile) time of a NEW problem in fresh subprocesses;
4. peak memory of reverse ITD against CG as T grows (dy = 1000).

Targets: CG hypergradient >= 10x faster than scipy for dy <= 100; <= 1.2x the raw BLAS
matvec cost at dy = 1000. The table is also written to ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from benchmarks import common  # noqa: E402  (benchmarks/benchmarks/common.py)
from benchmarks.common import Report  # noqa: E402
from benchmarks import compile as compile_bench  # noqa: E402
from benchmarks.common import ALL_METHODS, TARGET_RELERR, get_case, warm_up  # noqa: E402

import mlocore as mlo  # noqa: E402,F401  (imported first: compiles nothing, warms numba)

SCIPY_SPEEDUP_TARGET = 10.0
BLAS_RATIO_TARGET = 1.2


# ---------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------
def interleaved(fns, repeat, min_time, budget):
    """Best and median per-call times of each ``fns[name]``, samples taken round-robin.

    Each sample runs ``number`` calls (so that it lasts >= ``min_time``); each function
    gets at most ``repeat`` samples and stops after ``budget`` seconds (>= 2 samples).
    Round-robin sampling spreads the noise of a shared machine over all methods alike.
    """
    number, samples, spent = {}, {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter() - t0
        number[name] = max(1, math.ceil(min_time / max(t1, 1e-9)))
        samples[name] = [t1]
        spent[name] = t1
    for r in range(repeat):
        for name, fn in fns.items():
            if r >= 2 and spent[name] > budget:
                continue
            n = number[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            dt = time.perf_counter() - t0
            spent[name] += dt
            samples[name].append(dt / n)
    return {k: (min(v), statistics.median(v), len(v)) for k, v in samples.items()}


def fmt_t(t):
    if t is None or not np.isfinite(t):
        return "n/a"
    if t < 1e-3:
        return f"{t * 1e6:8.1f} us"
    if t < 1.0:
        return f"{t * 1e3:8.2f} ms"
    return f"{t:8.3f} s "


# ---------------------------------------------------------------------------------------
# 1. Hypergradient methods at equal accuracy
# ---------------------------------------------------------------------------------------
SLOW = {3000: ("direct", "itd-forward")}  # skipped at this size (tens of seconds per call)


def setting(case, method):
    if method == "cg":
        return f"tol={case.cg_tol:.0e}"
    if method == "scipy-cg":
        return f"rtol={case.scipy_tol:.0e}"
    if method == "neumann":
        return f"{case.T} terms"
    if method.startswith("itd"):
        return f"T={case.T}"
    return "Cholesky"


def method_table(out, dy, args):
    t0 = time.perf_counter()
    case = get_case(dy)
    methods = [m for m in ALL_METHODS if m not in SLOW.get(dy, ())]
    for m in methods:
        warm_up(case, m)
    info = {}
    for m in methods:
        if m == "scipy-cg":
            g = case.run(m)
            info[m] = dict(err=case.data.relerr(g), calls=case.oracle_calls(m), hvp=None)
        else:
            res = case.run(m)
            info[m] = dict(err=case.data.relerr(res.grad), calls=int(sum(res.oracle_calls.values())),
                           hvp=res.nhvp, success=res.success)
    t_setup = time.perf_counter() - t0
    fns = {m: (lambda m=m: case.run(m)) for m in methods}
    fns.update(decomposition_fns(case, info["cg"]["hvp"]))
    times = interleaved(fns, args.repeat, args.min_time, args.budget)
    tcg = times["cg"][0]
    out(f"dy = {dy}  (dx = {case.data.dx}, kappa(A) = {case.data.kappa:g}, target rel. error "
        f"{TARGET_RELERR:.0e}; setup + calibration + warm-up {t_setup:.1f} s)")
    out(f"  {'method':<12} {'setting':<14} {'best':>11} {'median':>11} {'n':>3} "
        f"{'oracles':>8} {'rel.err':>9} {'x cg':>8}")
    for m in methods:
        best, med, n = times[m]
        i = info[m]
        flag = "" if i["err"] <= TARGET_RELERR * 1.001 and i.get("success", True) else "  !!"
        out(f"  {m:<12} {setting(case, m):<14} {fmt_t(best):>11} {fmt_t(med):>11} {n:>3} "
            f"{i['calls']:>8} {i['err']:>9.2e} {best / tcg:>8.2f}{flag}")
    for m in SLOW.get(dy, ()):
        out(f"  {m:<12} skipped at this size (too slow for this script)")
    out(f"  ratios: scipy/cg = {times['scipy-cg'][0] / tcg:.2f}"
        + "".join(f", {m}/cg = {times[m][0] / tcg:.1f}"
                  for m in ("itd-reverse", "itd-forward") if m in times))
    info["_decomposition"] = decomposition(out, case, info, times, args)
    out()
    return case, times, info


def decomposition_fns(case, n):
    """Where the CG hypergradient's time goes: ``_floor`` is one ``hypergrad`` call whose CG
    stops before its first iteration (tol = 1: 1 upper grad + 1 HVP + all fixed costs);
    ``_compute`` is the same number n of HVPs as the solve, called from a compiled loop."""
    d = case.data
    z = np.concatenate([d.x, d.y_star])
    w = np.concatenate([np.zeros(d.dx), np.random.default_rng(2).standard_normal(d.dy)])
    common.hvp_loop(z, w, d.A, d.C, 1)
    return {"_floor": lambda: case.run("cg", tol=1.0),
            "_compute": lambda: common.hvp_loop(z, w, d.A, d.C, n)}


def decomposition(out, case, info, times, args):
    n = info["cg"]["hvp"]
    compute = times["_compute"][0]
    fixed = max(times["_floor"][0] - compute / n, 0.0)  # the floor call makes one HVP
    tcg, tsp = times["cg"][0], times["scipy-cg"][0]
    out(f"  cg = {fmt_t(tcg).strip()}: fixed per-call cost {fmt_t(fixed).strip()} + {n} HVPs "
        f"{fmt_t(compute).strip()} (in a compiled loop) + CG vector work "
        f"{fmt_t(max(tcg - fixed - compute, 0.0)).strip()};")
    out(f"  scipy / (the {n} HVPs alone) = {tsp / compute:.1f}: the most any CG "
        "hypergradient could gain over scipy here")
    return dict(fixed=fixed, compute=compute, bound=tsp / compute)


# ---------------------------------------------------------------------------------------
# 2. CG hypergradient against raw BLAS products
# ---------------------------------------------------------------------------------------
def blas_table(out, case, nhvp, args):
    """CG hypergradient vs ``nhvp`` raw products, with the default BLAS threads and, where
    threadpoolctl is there, with 1 thread (on a shared 2-core machine a 2-thread gemv
    stalls whenever the other core is busy: the 1-thread column is the steadier one)."""
    d = case.data
    A, C = d.A, d.C
    v = np.random.default_rng(1).standard_normal(d.dy)
    z = np.concatenate([d.x, d.y_star])
    w = np.concatenate([np.zeros(d.dx), v])
    hvp_py = common.lower_hvp.py_func

    CT = np.ascontiguousarray(C.T)

    def raw():  # what the block oracles compute: nhvp - 1 products A v and one C^T v
        for _ in range(nhvp - 1):
            A @ v
        CT @ v

    def raw_joint():
        for _ in range(nhvp):
            hvp_py(z, w, A, C)

    common.matvec_loop(A, v, 1)
    fns = {"cg": lambda: case.run("cg"), "cg_joint": lambda: case.run("cg", joint=True),
           "raw": raw,
           "raw_nb": lambda: common.matvec_loop(A, v, nhvp), "joint": raw_joint}
    try:
        from threadpoolctl import threadpool_limits
        settings = [("default threads", None), ("1 BLAS thread", 1)]
    except ImportError:
        threadpool_limits, settings = None, [("default threads", None)]
    cols = []
    for label, limit in settings:
        if limit is None:
            t = interleaved(fns, 2 * args.repeat, args.min_time, args.budget)
        else:
            with threadpool_limits(limits=limit, user_api="blas"):
                t = interleaved(fns, 2 * args.repeat, args.min_time, args.budget)
        cols.append((label, {k: v[0] for k, v in t.items()}))

    def row(name, fn):
        return f"  {name:<34}" + "".join(f"{fn(t):>28}" for _, t in cols)

    def per(key):
        return lambda t: f"{fmt_t(t[key]).strip()} ({t[key] / nhvp * 1e6:.1f} us/op)"

    out(f"dy = {d.dy}: CG hypergradient vs the same number of products done directly with BLAS")
    out(f"  {'':<34}" + "".join(f"{label:>28}" for label, _ in cols))
    out(row(f"mlocore cg, block oracles ({nhvp} calls)", per("cg")))
    out(row(f"mlocore cg, joint hvp ({nhvp} calls)", per("cg_joint")))
    out(row(f"{nhvp} x (A @ v), NumPy loop", per("raw")))
    out(row(f"{nhvp} x (A @ v), compiled loop", per("raw_nb")))
    out(row(f"{nhvp} x joint HVP in NumPy", per("joint")))
    ratios = [t["cg"] / min(t["raw"], t["raw_nb"]) for _, t in cols]
    out(f"  {'ratio cg / raw A @ v':<34}" + "".join(f"{r:>28.2f}" for r in ratios))
    out(f"  {'ratio cg joint-hvp / raw A @ v':<34}"
        + "".join(f"{t['cg_joint'] / min(t['raw'], t['raw_nb']):>28.2f}" for _, t in cols))
    out(f"  {'ratio cg / joint HVPs in NumPy':<34}"
        + "".join(f"{t['cg'] / t['joint']:>28.2f}" for _, t in cols))
    out(f"  (raw = the faster of the NumPy and the compiled loop, both the same OpenBLAS gemv; "
        f"calls = CG's hvp_yy products + the final hvp_xy; target <= {BLAS_RATIO_TARGET:g})")
    out()
    return ratios


# ---------------------------------------------------------------------------------------
# 3. First-call (compile) time in fresh processes
# ---------------------------------------------------------------------------------------
_SCRIPT_HEAD = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import numba
import mlocore as mlo
t_import = time.perf_counter() - t0
"""

# the same data and never-compiled callbacks as the asv compile benchmarks
_SCRIPT_NEW = compile_bench._DATA + """
_CALLBACKS = {callbacks!r}

def make():
    # new @njit dispatchers at each call: a problem this process has never compiled
    ns = {{"np": np}}
    exec(_CALLBACKS, ns)
    return mlo.BilevelProblem(mlo.Objective(ns["f_grad"], args=(yt, 0.1)),
                              mlo.Objective(ns["g_grad"], hvp=ns["g_hvp"], args=(A, C)),
                              dims=(dx, dy))
""".format(callbacks=compile_bench._NEW_CALLBACKS)

_SCRIPT_CACHED = """
sys.path.insert(0, {here!r})
from benchmarks import common
data = common.QuadData(100)
x, y = data.x, data.y_star

def make():
    return common.make_problem(data)
"""

_SCRIPT_TAIL = """
def first_cg(parts=None):
    t0 = time.perf_counter()
    p = make()
    if parts is not None:  # the same first call, timed piece by piece
        up, lo = p.upper.compiled("upper"), p.lower.compiled("lower")  # callbacks compiled
        parts["callbacks"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        up.fns, lo.fns  # the two oracle bundles
        parts["bundles"] = time.perf_counter() - t1
        t1 = time.perf_counter()
    r = mlo.hypergrad(p, x, y, method="cg", lower_solved=True)
    assert r.success, r.message
    if parts is not None:
        parts["kernel"] = time.perf_counter() - t1  # first-point checks + kernel cache load
    return p, time.perf_counter() - t0

t0 = time.perf_counter()
numba.njit(lambda a: a.sum())(np.ones(3))
t_numba = time.perf_counter() - t0
parts = {}
p, t_first = first_cg(parts)
t0 = time.perf_counter()
for _ in range(20):
    mlo.hypergrad(p, x, y, method="cg", lower_solved=True)
t_steady = (time.perf_counter() - t0) / 20
t0 = time.perf_counter()
r = mlo.hypergrad(p, x, y, method="itd-reverse", T=10)
t_itd = time.perf_counter() - t0
_, t_another = first_cg()
print(json.dumps(dict(t_import=t_import, t_numba=t_numba, t_first=t_first,
                      t_steady=t_steady, t_itd=t_itd, t_another=t_another, **parts)))
"""


# the same never-compiled callbacks, compiled and called once by plain numba (no mlocore):
# what a user's first call of these functions costs anyway
_SCRIPT_PLAIN = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import numba
t_import = time.perf_counter() - t0
""" + compile_bench._DATA + compile_bench._NEW_CALLBACKS.replace("import mlocore as mlo", "") + """
t0 = time.perf_counter()
numba.njit(lambda a: a.sum())(np.ones(3))
t_numba = time.perf_counter() - t0
z = np.concatenate([x, y])
t0 = time.perf_counter()
g_grad(z, A, C); g_hvp(z, z, A, C); f_grad(z, yt, 0.1)
t_callbacks = time.perf_counter() - t0
print(json.dumps(dict(t_import=t_import, t_numba=t_numba, callbacks=t_callbacks)))
"""


def run_fresh(kind, cache_dir=None):
    if kind == "plain":
        script = _SCRIPT_PLAIN
    else:
        body = _SCRIPT_NEW if kind == "new" else _SCRIPT_CACHED.format(here=HERE)
        script = _SCRIPT_HEAD + body + _SCRIPT_TAIL
    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"fresh-process run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compile_table(out, args):
    out("First calls in a fresh process (problem: dy = 100; 'new' = plain @njit callbacks the "
        "process has never compiled)")
    out(f"  {'run':<50} {'import':>7} {'numba':>7} {'1st cg':>7} {'steady':>8} {'1st itd':>8} "
        f"{'another':>8}")
    rows = []
    if args.cold:
        with tempfile.TemporaryDirectory(prefix="mlocore-numba-cache-") as cache:
            rows.append(("0. new problem, EMPTY numba cache (compiles all)",
                         run_fresh("new", cache)))
    rows.append(("1. new problem, default cache (may fill it)", run_fresh("new")))
    rows.append(("2. new problem, default cache again", run_fresh("new")))
    rows.append(("3. benchmark problem, callbacks @njit(cache=True)", run_fresh("cached")))
    for name, r in rows:
        out(f"  {name:<50} {r['t_import']:>6.2f}s {r['t_numba']:>6.2f}s {r['t_first']:>6.2f}s "
            f"{r['t_steady'] * 1e3:>6.2f}ms {r['t_itd']:>7.3f}s {r['t_another']:>7.3f}s")
    out(f"  {'1st cg made of:':<50} {'callbacks':>10} {'bundles':>8} {'kernel':>8}  "
        "(compiling the user's callbacks and placeholders; building the oracle bundles; "
        "first-point checks + loading the kernel from the cache)")
    for name, r in rows:
        out(f"  {name:<50} {r['callbacks']:>9.2f}s {r['bundles']:>7.3f}s {r['kernel']:>7.3f}s")
    plain = run_fresh("plain")
    out(f"  {'4. the same callbacks, plain numba (no mlocore)':<50} {plain['callbacks']:>9.2f}s"
        f"      (import numpy+numba {plain['t_import']:.2f}s, numba start-up "
        f"{plain['t_numba']:.2f}s)")
    out("  import: numpy+numba+mlocore; numba: numba's one-off start-up (first compile of a "
        "trivial function);")
    out("  1st cg: Objective/BilevelProblem + first hypergrad (callbacks compiled, kernel "
        "loaded from the cache);")
    out("  steady: later cg calls; 1st itd: first itd-reverse call after that; another: one "
        "more new problem,")
    out("  same process (the marginal per-problem cost). A user's first call costs numba + "
        "1st cg.")
    out()


# ---------------------------------------------------------------------------------------
# 4. Peak memory: reverse ITD vs CG as T grows
# ---------------------------------------------------------------------------------------
def memory_table(out, args):
    dy = 1000
    case = get_case(dy)
    for m in ("cg", "direct", "itd-reverse", "itd-forward"):
        warm_up(case, m)
    out(f"Peak memory of one hypergradient call, dy = {dy} (increase of the process peak RSS "
        "over its RSS before the call)")
    if common.peak_rss_increase(lambda: None) is None:
        out("  /proc/self/clear_refs is not available: skipped")
        out()
        return
    out(f"  {'method':<12} {'T':>6} {'peak +MiB':>10} {'T*dy*8 B':>11} {'time':>11} {'rel.err':>9}")
    rows = [("cg", None), ("direct", None)] + [("itd-reverse", T) for T in args.mem_T] \
        + [("itd-forward", T) for T in args.mem_T if T <= args.max_forward_T]
    for m, T in rows:
        res = {}

        def call():
            t0 = time.perf_counter()
            res["r"] = case.run(m, T=T)
            res["t"] = time.perf_counter() - t0

        inc = common.peak_rss_increase(call)
        expect = f"{T * dy * 8 / 2 ** 20:11.1f}" if m == "itd-reverse" else f"{'-':>11}"
        out(f"  {m:<12} {('any' if T is None else T):>6} {inc / 2 ** 20:>10.1f} {expect} "
            f"{fmt_t(res['t']):>11} {case.data.relerr(res['r'].grad):>9.1e}")
    out()


# ---------------------------------------------------------------------------------------
def environment(out, args):
    for line in common.environment_lines("mlocore ratio table", args.quick,
                                         "best of k, interleaved"):
        out(line)
    try:
        import threadpoolctl
        blas = "; ".join(f"{i['filepath'].rsplit('/', 1)[-1]}: {i['num_threads']} threads"
                         for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas")
        out(f"  BLAS: {blas}")
    except ImportError:
        pass
    out(f"  Problem: lower g = 0.5 y'Ay + y'Cx (A SPD, eigenvalues geomspace(1, 100)), upper "
        f"f = 0.5|y - y_t|^2 + 0.5 mu|x|^2, mu = {common.MU}")
    out("  All methods start at the lower solution y*(x) (implicit: lower_solved=True; ITD: "
        "y0 = y*), step/eta = 1/lambda_max(A)")
    out()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="dy <= 1000, fewer samples")
    p.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/")
    p.add_argument("--cold", action=argparse.BooleanOptionalAction, default=None,
                   help="also time a fresh process with an empty numba cache "
                        "(default: on without --quick)")
    args = p.parse_args(argv)
    if args.cold is None:
        args.cold = not args.quick
    args.sizes = (10, 100, 1000) if args.quick else (10, 100, 1000, 3000)
    args.repeat, args.min_time, args.budget = (5, 0.02, 2.0) if args.quick else (9, 0.05, 20.0)
    args.mem_T = (100, 1000, 10000)
    args.max_forward_T = 1000 if args.quick else 10000

    t_start = time.perf_counter()
    out = Report()
    environment(out, args)
    summary = {}
    for dy in args.sizes:
        case, times, info = method_table(out, dy, args)
        summary[dy] = (case, times, info)
    blas = {}
    for dy in args.sizes:
        if dy >= 1000:
            case, times, info = summary[dy]
            blas[dy] = blas_table(out, case, info["cg"]["hvp"], args)
    compile_table(out, args)
    memory_table(out, args)

    out("Targets")
    for dy in (10, 100):
        r = summary[dy][1]["scipy-cg"][0] / summary[dy][1]["cg"][0]
        ok = "MET" if r >= SCIPY_SPEEDUP_TARGET else "NOT MET"
        dec = summary[dy][2]["_decomposition"]
        out(f"  dy = {dy:<5} scipy / mlocore cg = {r:6.2f}   (target >= "
            f"{SCIPY_SPEEDUP_TARGET:g})  {ok}: fixed per-call cost "
            f"{fmt_t(dec['fixed']).strip()} of {fmt_t(summary[dy][1]['cg'][0]).strip()}; "
            f"the HVPs alone cap the ratio at {dec['bound']:.1f}")
    r = blas[1000]
    ok = all(x <= BLAS_RATIO_TARGET for x in r)
    out(f"  dy = 1000  mlocore cg / raw A @ v = {' / '.join(f'{x:.2f}' for x in r)}  "
        f"(default / 1 BLAS thread; target <= {BLAS_RATIO_TARGET:g})  "
        f"{'MET' if ok else 'NOT MET'}")
    worst = max(i["err"] for _, _, info in summary.values() for k, i in info.items()
                if not k.startswith("_"))
    out(f"  accuracy: worst rel. error {worst:.2e} (every method tuned to <= "
        f"{TARGET_RELERR:.0e}; direct and dy=10 CG are exact)  "
        f"{'OK' if worst <= TARGET_RELERR * 1.001 else 'FAILED'}")
    out(f"(total {time.perf_counter() - t_start:.0f} s)")

    if not args.no_save:
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        name = f"ratios-{datetime.date.today():%Y-%m-%d}{'-quick' if args.quick else ''}.txt"
        path = os.path.join(HERE, "results", name)
        with open(path, "w") as fh:
            fh.write("\n".join(out.lines) + "\n")
        print(f"written to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
