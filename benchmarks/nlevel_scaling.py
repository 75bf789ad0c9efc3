"""How the n-level hypergradient grows with n (one run, one process, 1 BLAS thread).

    python benchmarks/nlevel_scaling.py            # cap 10 s per point
    python benchmarks/nlevel_scaling.py --quick    # cap 3 s per point (under 3 minutes)

n = 2..8 levels of d = 2, 5, 10 variables each, every level started away from its best
response, one ``hypergrad(problem, xs, method=mode)`` per point: time (best of 3 when under
0.1 s), Newton iterations and level solves summed over the levels, oracle calls (grad, hvp,
tvp) summed over the levels, and the relative error of the hypergradient.

1. Random quadratic chains (``make_nlevel_quadratic``), error against the closed form, in
   the modes "exact" and "truncated" with the levels declared quadratic
   (``Objective(quadratic=True)``: the curvature terms, zero here, are skipped) and
   "exact", "truncated", "fd" undeclared (the curvature terms evaluated: nested central
   differences below level n - 1).
2. The non-quadratic chain ``make_nlevel_logcosh`` (log-cosh plus quadratic levels, no
   closed form): "exact", "truncated" and "fd"; error of "exact" against central
   differences of F (where affordable) and the gap |exact - truncated| / |exact|.
3. The multilevel gradient method's hypergradient ("exact", declared quadratic chain, d = 5)
   against the unrolled method of Sato, Tanaka & Takeda (2021) (``method="itd"``) at equal
   accuracy: for each n the smallest T in 2, 4, .., 128 whose hypergradient is within
   1e-3 (and 1e-6) of the closed form, with its time and oracle calls.

4. Joint against block callbacks (``make_nlevel_quadratic(..., block_oracles=True)``:
   ``hvp_block = P[x_i, x_j] v``, ``grad_block``, against the joint ``P v``) on quadratic
   chains large enough for the matrix-free (n = 3) and dense (n = 4) forms: one run each
   after a warm-up, time, joint and block Hessian products summed over the levels, ratio
   t(joint) / t(block), and the relative difference of the hypergradients.
   ``--blocks-only`` runs this section alone.

A point is skipped, printed "skipped (> cap)", when the growth of the previous points
predicts more than ``--cap`` seconds (and so are the larger n of that configuration). The
tables go to ``benchmarks/results/nlevel-scaling-<date>[-quick].txt``, a plot (when
matplotlib is installed) to the same name with ``.png``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import mlocore as mlo  # noqa: E402
from mlocore.problems import make_nlevel_logcosh, make_nlevel_quadratic  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET_N5_MS = 50.0
TARGET_GROWTH_6_3 = 30.0
NS = range(2, 9)
DS = (2, 5, 10)
SKIPPED = "skipped (> cap)"


def timed(fn, fast=0.1):
    """(best time, result): one call, and best of 3 more when it took under ``fast``."""
    t = time.perf_counter()
    out = fn()
    best = time.perf_counter() - t
    if best < fast:
        for _ in range(3):
            t = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t)
    return best, out


def calls(res):
    oc = res.oracle_calls.values()
    return (sum(c["grad"] for c in oc), sum(c["hvp"] for c in oc), sum(c["tvp"] for c in oc))


class Capped:
    """Predicts the next point of a configuration from the growth of the last two."""

    def __init__(self, cap):
        self.cap, self.times, self.stopped = cap, [], False

    def skip(self):
        if self.stopped:
            return True
        if self.times:
            growth = self.times[-1] / self.times[-2] if len(self.times) > 1 else 2.0
            if self.times[-1] * max(growth, 1.0) > self.cap:
                self.stopped = True
        return self.stopped

    def add(self, t):
        self.times.append(t)
        if t > self.cap:
            self.stopped = True


def quadratic_point(n, d, declared):
    q = make_nlevel_quadratic(n=n, dims=(d,) * n, seed=0, declare_quadratic=declared)
    rng = np.random.default_rng(1)
    return q, [rng.normal(size=d) for _ in range(n)]


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


BLOCK_CASES = ((3, 100), (3, 300), (4, 50), (4, 60))   # (n, d): matrix-free n = 3, dense n = 4


def block_rows(emit):
    """Section 4: one hypergradient with joint and with block callbacks per case and mode."""
    emit("4. joint against block callbacks (make_nlevel_quadratic, seed 0, declared "
         "quadratic), one run each after a warm-up")
    emit(f"{'mode':>10} {'n':>2} {'d':>4} {'joint':>10} {'block':>10} {'ratio':>6} "
         f"{'hvp(j)':>7} {'hvp(b)':>7} {'blocks':>7} {'rel diff':>9}")
    for n, d in BLOCK_CASES:
        kw = dict(n=n, dims=(d,) * n, seed=0, declare_quadratic=True)
        qj = make_nlevel_quadratic(**kw)
        qb = make_nlevel_quadratic(block_oracles=True, **kw)
        rng = np.random.default_rng(1)
        xs = [rng.normal(size=d) for _ in range(n)]
        for mode in ("exact", "truncated"):
            for q in (qj, qb):  # warm-up: compile, first-use checks
                mlo.hypergrad(q.problem, xs, method=mode)
            t0 = time.perf_counter()
            rj = mlo.hypergrad(qj.problem, xs, method=mode)
            tj = time.perf_counter() - t0
            t0 = time.perf_counter()
            rb = mlo.hypergrad(qb.problem, xs, method=mode)
            tb = time.perf_counter() - t0
            hj = sum(c["hvp"] for c in rj.oracle_calls.values())
            hb = sum(c["hvp"] for c in rb.oracle_calls.values())
            nb = sum(c.get("hvp_block", 0) for c in rb.oracle_calls.values())
            emit(f"{mode:>10} {n:>2} {d:>4} {tj * 1e3:>8.1f}ms {tb * 1e3:>8.1f}ms "
                 f"{tj / tb:>6.2f} {hj:>7} {hb:>7} {nb:>7} {rel(rb.grad, rj.grad):>9.1e}")
    emit()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--blocks-only", action="store_true",
                    help="only section 4 (joint against block callbacks)")
    ap.add_argument("--cap", type=float, default=None, help="seconds per point")
    args = ap.parse_args()
    cap = args.cap if args.cap is not None else (3.0 if args.quick else 10.0)
    start = time.perf_counter()
    flags = (" --quick" if args.quick else "") + (" --blocks-only" if args.blocks_only else "")
    lines = [f"benchmarks/nlevel_scaling.py{flags}, "
             f"{datetime.datetime.now():%Y-%m-%d %H:%M}, numba {__import__('numba').__version__}, "
             f"numpy {np.__version__}, {os.cpu_count()} cpus, 1 BLAS thread, cap {cap:g} s "
             "per point", ""]

    def emit(s=""):
        print(s, flush=True)
        lines.append(s)

    if args.blocks_only:
        block_rows(emit)
        emit(f"total {time.perf_counter() - start:.0f} s")
        name = f"nlevel-blocks-{datetime.date.today()}"
        with open(os.path.join(HERE, "results", name + ".txt"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
        return
    head = (f"{'mode':>19} {'n':>2} {'time':>10} {'growth':>7} {'newton':>7} {'solves':>7} "
            f"{'grad':>8} {'hvp':>9} {'tvp':>8} {'rel err':>9}")
    # warm-up: compile the callbacks and kernels
    q, xs = quadratic_point(4, 2, False)
    for mode in ("exact", "truncated", "fd"):
        mlo.hypergrad(q.problem, xs, method=mode)
    mlo.hypergrad(q.problem, xs, method="itd", T=2)
    lc = make_nlevel_logcosh(3)
    for mode in ("exact", "truncated", "fd"):
        mlo.hypergrad(lc.problem, [np.zeros(1)] * 3, method=mode)

    times, plot = {}, {}
    emit("1. quadratic chains (make_nlevel_quadratic, seed 0), error against the closed form")
    variants = [("exact", True), ("truncated", True), ("exact", False), ("truncated", False),
                ("fd", False)]
    for d in DS:
        emit(f"d = {d} per level")
        emit(head)
        for mode, declared in variants:
            label = f"{mode} ({'declared' if declared else 'undeclared'})"
            capped = Capped(cap)
            for n in NS:
                if capped.skip():
                    emit(f"{label:>19} {n:>2} {SKIPPED}")
                    continue
                q, xs = quadratic_point(n, d, declared)
                t, res = timed(lambda: mlo.hypergrad(q.problem, xs, method=mode))
                capped.add(t)
                prev = times.get((d, label, n - 1))
                times[(d, label, n)] = t
                ng, nh, nt = calls(res)
                plot.setdefault((d, label), []).append((n, t, ng + nh + nt))
                growth = "-" if prev is None else f"{t / prev:.1f}"
                emit(f"{label:>19} {n:>2} {t * 1e3:>8.2f}ms {growth:>7} "
                     f"{int(res.lower_nit.sum()):>7} {int(res.lower_solves.sum()):>7} {ng:>8} "
                     f"{nh:>9} {nt:>8} {rel(res.grad, q.hypergrad(xs[0])):>9.1e}"
                     + ("" if res.success else f"  {res.message}"))
        emit()

    emit("2. non-quadratic chains (make_nlevel_logcosh, seed 1), x_1 = 0.3, lower levels from 0;")
    emit("   rel err: exact against central differences of F (h = 1e-4, levels solved to "
         "1e-11), '-' where too slow; gap: |exact - truncated| / |exact|")
    for d in DS:
        emit(f"d = {d} per level")
        emit(head + f" {'gap':>9}")
        exact_res = {}
        for mode in ("exact", "truncated", "fd"):
            capped = Capped(cap)
            for n in NS:
                if capped.skip():
                    emit(f"{mode:>19} {n:>2} {SKIPPED}")
                    continue
                lc = make_nlevel_logcosh(n, dims=(d,) * n, seed=1)
                xs = [np.full(d, 0.3)] + [np.zeros(d)] * (n - 1)
                kw = dict(method=mode, tol=1e-12, lower_tol=1e-11)
                t, res = timed(lambda: mlo.hypergrad(lc.problem, xs, **kw))
                capped.add(t)
                prev = times.get((d, f"logcosh {mode}", n - 1))
                times[(d, f"logcosh {mode}", n)] = t
                ng, nh, nt = calls(res)
                plot.setdefault((d, f"logcosh {mode}"), []).append((n, t, ng + nh + nt))
                err, gap = "-", "-"
                if mode == "exact":
                    exact_res[n] = res
                    if 2 * d * t < cap and res.success:
                        err = f"{rel(res.grad, lc.hypergrad_fd(xs[0])):.1e}"
                elif n in exact_res:
                    gap = f"{rel(res.grad, exact_res[n].grad):.1e}"
                growth = "-" if prev is None else f"{t / prev:.1f}"
                emit(f"{mode:>19} {n:>2} {t * 1e3:>8.2f}ms {growth:>7} "
                     f"{int(res.lower_nit.sum()):>7} {int(res.lower_solves.sum()):>7} {ng:>8} "
                     f"{nh:>9} {nt:>8} {err:>9} {gap:>9}"
                     + ("" if res.success else f"  {res.message}"))
        emit()

    d = 5
    emit(f"3. exact hypergradient (declared quadratic chain, d = {d}) against the unrolled "
         "method (itd, Sato et al. 2021) at equal accuracy:")
    emit("   smallest T in 2, 4, .., 128 (all levels) with rel err <= the target; ratio = "
         "t(itd) / t(exact)")
    emit(f"{'n':>2} {'exact':>10} {'err':>8} {'calls':>7} | {'target':>6} {'T':>4} "
         f"{'itd':>10} {'err':>8} {'calls':>9} {'ratio':>8}")
    itd_cap = {1e-3: Capped(cap), 1e-6: Capped(cap)}
    for n in NS:
        q, xs = quadratic_point(n, d, True)
        g = q.hypergrad(xs[0])
        te, ex = timed(lambda: mlo.hypergrad(q.problem, xs, method="exact"))
        ce = sum(calls(ex))
        for target in (1e-3, 1e-6):
            c = itd_cap[target]
            row = f"{n:>2} {te * 1e3:>8.2f}ms {rel(ex.grad, g):>8.1e} {ce:>7} | {target:>6.0e}"
            if c.skip():
                emit(f"{row} {SKIPPED}")
                continue
            T, found, spent = 2, None, 0.0
            last = None
            while T <= 128:
                if last is not None and last * 2.0 ** (n - 1) > cap:
                    break                          # the next T is predicted too slow
                t, res = timed(lambda: mlo.hypergrad(q.problem, xs, method="itd", T=T))
                spent += t
                last = t
                if res.success and rel(res.grad, g) <= target:
                    found = (T, t, res)
                    break
                T *= 2
            if found is None:
                c.stopped = True
                emit(f"{row} {SKIPPED} (T = {T} not reached)")
                continue
            T, t, res = found
            c.add(t)
            plot.setdefault((d, f"itd, err <= {target:.0e}"), []).append((n, t, sum(calls(res))))
            emit(f"{row} {T:>4} {t * 1e3:>8.2f}ms {rel(res.grad, g):>8.1e} {sum(calls(res)):>9} "
                 f"{t / te:>8.0f}")
    emit()

    block_rows(emit)

    emit("targets (d = 5, quadratic chain):")
    t5 = times.get((5, "exact (declared)", 5))
    if t5 is not None:
        emit(f"  exact (declared), n = 5, within {TARGET_N5_MS:.0f} ms: {t5 * 1e3:.2f} ms "
             f"({'MET' if t5 * 1e3 <= TARGET_N5_MS else 'not met'})")
    t5u = times.get((5, "exact (undeclared)", 5))
    if t5u is not None:
        emit(f"  exact (undeclared), n = 5: {t5u * 1e3:.1f} ms")
    for label in ("exact (declared)", "truncated (declared)", "exact (undeclared)",
                  "truncated (undeclared)", "fd (undeclared)", "logcosh exact",
                  "logcosh truncated", "logcosh fd"):
        t3, t6 = times.get((5, label, 3)), times.get((5, label, 6))
        if t3 is not None and t6 is not None:
            r = t6 / t3
            emit(f"  t(6) / t(3), {label}: {r:.1f}"
                 + (f" ({'MET' if r <= TARGET_GROWTH_6_3 else 'not met'} <= "
                    f"{TARGET_GROWTH_6_3:.0f})" if label == "exact (declared)" else ""))
        elif t3 is not None:
            emit(f"  t(6) / t(3), {label}: n = 6 {SKIPPED}")
    emit(f"total {time.perf_counter() - start:.0f} s")
    name = f"nlevel-scaling-{datetime.date.today()}{'-quick' if args.quick else ''}"
    with open(os.path.join(HERE, "results", name + ".txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (dd, label), pts in sorted(plot.items()):
        if dd != 5:
            continue
        n_, t_, c_ = zip(*pts)
        style = "--" if label.startswith("itd") else (":" if "logcosh" in label else "-")
        axes[0].semilogy(n_, t_, style, marker="o", label=label)
        axes[1].semilogy(n_, c_, style, marker="o", label=label)
    axes[0].set_ylabel("time per hypergradient (s)")
    axes[1].set_ylabel("oracle calls (grad + hvp + tvp)")
    for ax in axes:
        ax.set_xlabel("levels n (d = 5 per level)")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("mlocore n-level hypergradient: exact / truncated / fd vs unrolled (itd)")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "results", name + ".png"), dpi=110)


if __name__ == "__main__":
    main()
