"""The stochastic comparison tables: every method at the same budget of oracle samples.

    python benchmarks/stochastic_comparison.py           # full run (about 10 minutes, 2 cores)
    python benchmarks/stochastic_comparison.py --quick   # smoke run (small budgets, 4 methods)

One call of :func:`mlocore.compare_methods` per problem, default steps (what users get),
3 seeds, the same budget for every method:

1. quadratic (``make_quadratic``, dx=10, dy=20, n_outer = n_inner = 1000, ridge 0.1, batch
   64, 2e6 samples): closed-form F*, x*;
2. logistic hyperparameters on ijcnn1-shaped synthetic data
   (``make_logistic_ijcnn1_like``, 22 features, n_train = n_val = 5000 for time, batch 64,
   4e6 samples), lambda0 = 0;
3. breast cancer (``load_breast_cancer_logistic``: 285 train / 142 validation, 30
   features, batch 32, 5e5 samples), lambda0 = -2, bounds [-8, 8] (as ``python -m
   mlocore``);
4. data cleaning on digits (``load_digits_cleaning``: 300 train samples with half of the
   labels corrupted, 300 clean validation samples, x = one weight logit per training sample,
   dx = 300, dy = 650, batch 32, 5e5 samples).

The logistic and cleaning problems have no finite minimizer (their reference ``x_star`` is
None): the tables show F and ``|grad F|^2`` (the projected-gradient mapping with bounds).
Samples are counted as in ``history["samples"]`` (a minibatch call counts its batch size,
a full-batch call of the deterministic methods ``n_samples``). Times are seconds inside the
compiled loops (stochastic) or of the outer loop (deterministic), on a shared machine:
compare them within one table (on the quadratic the deterministic callbacks use the mean
matrices, so there a full-batch call costs one sample's work). Output: printed, written to
``benchmarks/results/stochastic-comparison-<date>[-quick].txt``; the quadratic's convergence
plot to ``stochastic-comparison-<date>.png`` when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from benchmarks.common import Report, environment_lines  # noqa: E402

import mlocore as mlo  # noqa: E402
from mlocore import problems  # noqa: E402
from mlocore.stochastic import STOCHASTIC_METHODS  # noqa: E402

DETERMINISTIC = ["det-aid", "det-itd", "det-alternating"]
QUICK_METHODS = ["soba", "saba", "stocbio", "det-aid"]


def boxed(data, bounds):
    """The problem object with bounds on x in both forms, the data's exact F."""
    sp, p = data.stochastic_problem, data.problem
    return types.SimpleNamespace(
        problem=mlo.BilevelProblem(p.upper, p.lower, dims=p.dims, bounds=bounds),
        stochastic_problem=mlo.BilevelProblem(sp.upper, sp.lower, dims=sp.dims, bounds=bounds),
        F=data.F, hypergrad=data.hypergrad)


def cases(quick):
    q = problems.make_quadratic(dx=10, dy=20, n_outer=1000, n_inner=1000, seed=0)
    yield ("quadratic: dx=10, dy=20, n_outer = n_inner = 1000, ridge 0.1; x0 = y0 = 0",
           q, np.zeros(10), np.zeros(20), 64, 2e5 if quick else 2e6, "quadratic")
    ij = problems.make_logistic_ijcnn1_like(n_train=5000, n_val=5000, seed=0)
    ij.reference.find_star = False  # no finite minimizer (README of the problem library)
    yield ("logistic, ijcnn1-shaped synthetic data: 22 features, n_train = n_val = 5000; "
           "lambda0 = 0, w0 = 0", ij, np.zeros(22), np.zeros(22), 64,
           1e6 if quick else 4e6, "ijcnn1")
    try:
        bc = problems.load_breast_cancer_logistic(seed=0)
        dg = problems.load_digits_cleaning(n_train=300, n_val=300, seed=0)
    except ImportError as exc:
        print(f"[{exc}] -- skipping the breast cancer and digits problems")
        return
    d = bc.n_features
    yield (f"logistic, breast cancer: {bc.n_train} train / {bc.n_val} validation, {d} "
           "features; lambda0 = -2, w0 = 0, bounds [-8, 8]", boxed(bc, (-8.0, 8.0)),
           np.full(d, -2.0), np.zeros(d), 32, 5e4 if quick else 5e5, "breast-cancer")
    yield (f"data cleaning, digits: {dg.n_train} train (half the labels corrupted) / "
           f"{dg.n_val} validation, dx = {dg.dx}, dy = {dg.dy}; x0 = 0, W0 = 0",
           dg, np.zeros(dg.dx), np.zeros(dg.dy), 32, 1e5 if quick else 5e5, "digits")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    report = Report()
    for line in environment_lines("mlocore stochastic comparison (compare_methods)",
                                  args.quick, "one run per seed, times from one run"):
        report(line)
    methods = QUICK_METHODS if args.quick else list(STOCHASTIC_METHODS) + DETERMINISTIC
    report(f"methods: {', '.join(methods)}; default steps; seeds 0, 1, 2")
    stamp = datetime.date.today().isoformat() + ("-quick" if args.quick else "")
    figure = None
    for title, prob, x0, y0, batch, budget, tag in cases(args.quick):
        report()
        report(f"=== {title} ===")
        t0 = time.perf_counter()
        comp = mlo.compare_methods(prob, x0, y0, methods, budget=int(budget), seeds=3,
                                   batch_size=batch)
        report(comp.table())
        if tag == "quadratic":
            report("(the deterministic methods run on .problem, whose callbacks use the mean "
                   "matrices: a full-batch call costs the work of one sample there, so compare "
                   "them on samples, not time)")
        report(f"(compare_methods: {time.perf_counter() - t0:.1f} s in all, probes, "
               "references and compiles included)")
        if tag == "quadratic":
            figure = comp
    if figure is not None and not args.quick:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            report("matplotlib is not installed: no figure")
        else:
            fig, axes = plt.subplots(1, 2, figsize=(13, 5))
            figure.plot(ax=axes[0], x="samples", y="dist")
            figure.plot(ax=axes[1], x="time", y="dist")
            axes[1].get_legend().remove()
            fig.suptitle("quadratic dx=10, dy=20, n=1000, batch 64: |x - x*|, mean and "
                         "range over 3 seeds")
            fig.tight_layout()
            png = os.path.join(HERE, "results", f"stochastic-comparison-{stamp}.png")
            fig.savefig(png, dpi=70)
            report(f"figure: {os.path.relpath(png, ROOT)}")
    out = os.path.join(HERE, "results", f"stochastic-comparison-{stamp}.txt")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        fh.write("\n".join(report.lines) + "\n")
    print("written", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
