"""``python -m mlocore``: hyperparameter learning on real data, every hypergradient method.

The embedded default: l2-regularized logistic regression on scikit-learn's breast cancer data
(569 samples, 30 features, split train / validation / test), one penalty exp(lambda_j) per
feature. It prints (1) each hypergradient method at the starting lambda with its error against
the dense direct solve, its steady-state time, and its oracle calls, then (2) learns lambda by
L-BFGS-B on (F, grad F) with warm-started inner solves and reports validation and test loss,
then (3) runs mlocore's AID driver, (4) every stochastic method on minibatches, (5) a few
methods at the same budget of oracle samples over 3 seeds (``mlocore.compare_methods``),
(6) where a CUDA GPU is present, the same hypergradients on the GPU against the CPU, and (7)
K-fold cross-validation of the penalties, many bilevel problems at once on a local Dask
cluster (``examples/cross_validation.py``), against the serial loop.
Without scikit-learn it says so and runs on synthetic data of the same shape.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.optimize as so


def _lower_calls(calls):
    """(lower gradients, lower Hessian-vector products) of an ``oracle_calls`` dict, block
    callbacks included."""
    return (calls["lower_grad"] + calls["lower_grad_y"],
            calls["lower_hvp"] + calls["lower_hvp_yy"] + calls["lower_hvp_xy"])


def _timed(fn, repeat=5):
    best = np.inf
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def _fmt_time(seconds):
    from mlocore.compare import format_seconds  # imported on demand, as the demo's others
    return format_seconds(seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mlocore", description=__doc__.split("\n")[0])
    parser.add_argument("--lambda0", type=float, default=-2.0,
                        help="starting log-penalty for every feature (default -2)")
    parser.add_argument("--T", type=int, default=200, help="unrolled steps for ITD (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", action="store_true", help="use synthetic data")
    parser.add_argument("--stochastic-iters", type=int, default=2000,
                        help="upper iterations of each stochastic method (default 2000)")
    parser.add_argument("--budget", type=int, default=200000,
                        help="oracle samples per run of the comparison (default 200000)")
    parser.add_argument("--no-cluster", action="store_true",
                        help="skip the cross-validation on a local Dask cluster")
    args = parser.parse_args(argv)

    t_import = time.perf_counter()
    import mlocore as mlo
    from mlocore import problems
    t_import = time.perf_counter() - t_import

    source = "scikit-learn breast cancer (569 x 30)"
    if args.synthetic:
        data = problems.make_logistic(n_train=285, n_val=142, n_features=30, seed=args.seed)
        source = "synthetic (285 train / 142 val, 30 features)"
    else:
        try:
            data = problems.load_breast_cancer_logistic(seed=args.seed)
        except ImportError as exc:
            print(f"[{exc}] -- falling back to synthetic data of the same shape")
            data = problems.make_logistic(n_train=285, n_val=142, n_features=30, seed=args.seed)
            source = "synthetic (scikit-learn not installed)"
    p = data.problem
    d = data.n_features
    x0 = np.full(d, args.lambda0)
    y0 = np.zeros(d)
    print(f"mlocore {mlo.__version__}: learning one l2 penalty per feature by bilevel "
          "optimization")
    print(f"data: {source}; train {data.X_train.shape[0]}, validation {data.X_val.shape[0]}"
          + (f", test {data.X_test.shape[0]}" if getattr(data, "X_test", None) is not None
             else "") + " samples")
    print(f"upper: validation log-loss; lower: training log-loss + sum_j exp(lambda_j) w_j^2 / 2;"
          f" lambda0 = {args.lambda0}\n")

    # (1) hypergradients at lambda0
    t0 = time.perf_counter()
    ref = mlo.hypergrad(p, x0, y0, method="direct", tol=1e-12)
    t_first = time.perf_counter() - t0
    y_star = ref.y
    rows = []
    methods = [("direct", {}), ("cg", {}), ("neumann", {}),
               ("itd-reverse", {"T": args.T}), ("itd-forward", {"T": args.T})]
    for name, opts in methods:
        start = y_star if not name.startswith("itd") else y0
        mlo.hypergrad(p, x0, start, method=name, **opts)  # warm-up: compile outside timing
        res, t = _timed(lambda: mlo.hypergrad(p, x0, start, method=name, tol=1e-10,
                                              lower_solved=not name.startswith("itd"),
                                              **opts)
                        if not name.startswith("itd") else
                        mlo.hypergrad(p, x0, start, method=name, **opts))
        err = np.linalg.norm(res.grad - ref.grad) / np.linalg.norm(ref.grad)
        rows.append((name + (f" (T={args.T})" if "T" in opts else ""), err, t,
                     *_lower_calls(res.oracle_calls),
                     "yes" if res.success else "NO"))
    print(f"Hypergradient of the validation loss at lambda0 (|grad F| = "
          f"{np.linalg.norm(ref.grad):.3e}), lower level solved once to |grad_y g| <= 1e-12:")
    print(f"  {'method':<22}{'rel. error':>12}{'time':>13}{'grads':>8}{'HVPs':>8}  ok")
    for name, err, t, ng, nh, ok in rows:
        print(f"  {name:<22}{err:12.2e}{_fmt_time(t):>13}{ng:8d}{nh:8d}  {ok}")
    print("  (implicit methods from the solved lower point; ITD unrolls T steps from w = 0;\n"
          f"   first call incl. compiling the problem's callbacks: {t_first:.2f} s, "
          f"import {t_import:.2f} s)\n")

    # (2) learn lambda: L-BFGS-B on (F, grad F), inner solutions warm-started
    fobj = mlo.HyperObjective(p, y0, method="cg", tol=1e-10)
    f_start, _ = fobj(x0)
    t0 = time.perf_counter()
    out = so.minimize(fobj, x0, jac=True, method="L-BFGS-B", bounds=[(-8.0, 8.0)] * d,
                      options={"maxiter": 200, "gtol": 1e-7})
    t_opt = time.perf_counter() - t0
    w_start = mlo.solve_lower(p, x0, y0).y
    w_final = fobj.y
    print(f"Learning lambda with scipy L-BFGS-B on mlocore.HyperObjective ({out.nit} "
          f"iterations, {fobj.ncalls} hypergradients, {_fmt_time(t_opt).strip()}; "
          f"{out.message}):")
    print(f"  {'':<22}{'start':>12}{'learned':>12}")
    print(f"  {'validation loss':<22}{f_start:12.5f}{out.fun:12.5f}")
    print(f"  {'validation accuracy':<22}{data.accuracy(w_start, 'val'):12.4f}"
          f"{data.accuracy(w_final, 'val'):12.4f}")
    if getattr(data, "X_test", None) is not None:
        print(f"  {'test loss':<22}{data.loss(w_start, 'test'):12.5f}"
              f"{data.loss(w_final, 'test'):12.5f}")
        print(f"  {'test accuracy':<22}{data.accuracy(w_start, 'test'):12.4f}"
              f"{data.accuracy(w_final, 'test'):12.4f}")
    lam = out.x
    print(f"  learned exp(lambda): min {np.exp(lam.min()):.3g}, median "
          f"{np.exp(np.median(lam)):.3g}, max {np.exp(lam.max()):.3g}")
    calls = fobj.oracle_calls
    lower_grads, lower_hvps = _lower_calls(calls)
    print(f"  oracle calls: {lower_grads} lower gradients, {lower_hvps} lower HVPs, "
          f"{calls['upper_grad'] + calls['upper_grad_x'] + calls['upper_grad_y']} upper "
          f"gradients (block callbacks included)")

    # (3) the same bounds with mlocore's own AID-BiO driver (projected L-BFGS by default)
    boxed = mlo.BilevelProblem(p.upper, p.lower, dims=p.dims, bounds=(-8.0, 8.0))
    t0 = time.perf_counter()
    aid = mlo.minimize_bilevel(boxed, x0, y0, method="aid", maxiter=300, tol=1e-4)
    t_aid = time.perf_counter() - t0
    print(f"\nmlocore.minimize_bilevel(method='aid') with the same bounds: validation loss "
          f"{aid.fun:.5f}, test loss {data.loss(aid.y, 'test'):.5f} after {aid.nit} iterations "
          f"({_fmt_time(t_aid).strip()}), projected gradient norm "
          f"{aid.history['grad_norm'][-1]:.1e}: {aid.message}"
          if getattr(data, "X_test", None) is not None else
          f"\nmlocore.minimize_bilevel(method='aid') with the same bounds: validation loss "
          f"{aid.fun:.5f} after {aid.nit} iterations ({_fmt_time(t_aid).strip()}): "
          f"{aid.message}")

    # (4) the stochastic methods on minibatches of the same data (same bounds, same seed)
    if hasattr(data, "stochastic_problem"):
        _stochastic_table(mlo, data, x0, y0, out.fun, args.seed, args.stochastic_iters)

    # (5) a few methods at the same budget of oracle samples, over seeds
        _comparison_section(mlo, data, x0, y0, args.budget)

    # (6) the CUDA backend on the same problem, where there is a GPU
    _cuda_section(mlo, data, x0, y0)

    # (7) many problems at once: K-fold cross-validation on a local Dask cluster
    if not args.no_cluster:
        _cluster_section(args.seed)
    return 0


def _cluster_section(seed):
    import importlib.util
    import os
    import sys
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples", "cross_validation.py")
    print("\nMany problems at once (mlocore.distributed.minimize_many):")
    if importlib.util.find_spec("dask") is None or \
            importlib.util.find_spec("distributed") is None:
        print('  skipped: needs Dask (pip install "mlocore[dask]")')
        return
    if not os.path.exists(path):
        print(f"  skipped: {path} not found (run from a source checkout)")
        return
    spec = importlib.util.spec_from_file_location("mlocore_cross_validation_example", path)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # its functions are pickled by value for the workers
    spec.loader.exec_module(example)
    report = example.run_cv_demo(n_folds=5, n_workers=min(2, os.cpu_count() or 1), seed=seed)
    print("  " + report.replace("\n", "\n  "))


def _stochastic_table(mlo, data, x0, y0, f_best, seed, maxiter, batch_size=32):
    from mlocore.stochastic import METHODS
    sp = data.stochastic_problem
    boxed = mlo.BilevelProblem(sp.upper, sp.lower, dims=sp.dims, bounds=(-8.0, 8.0))
    ref = getattr(data, "reference", None)
    if ref is not None and hasattr(ref, "find_star"):
        ref.find_star = False  # F has no finite minimizer here (penalties run off to +-8)
    print(f"\nStochastic methods (minibatches of {batch_size}, {maxiter} upper iterations, "
          f"seed {seed}, bounds [-8, 8]); F = validation loss at the returned x (a tail "
          f"average where the method averages), L-BFGS-B reached {f_best:.5f}; default steps, "
          f"and step='auto' (a counted 3x3 step search, one more trial when the smallest upper "
          f"step wins, 10% of maxiter per trial):")
    print(f"  {'method':<14}{'F start':>10}{'F final':>10}{'F auto':>10}{'|grad F|^2':>12}"
          f"{'loop time':>12}{'samples':>10}  status")
    for name in METHODS:
        opts = {"batch_size": batch_size}
        try:
            t0 = time.perf_counter()
            res = mlo.minimize_bilevel(boxed, x0, y0, method=name, maxiter=maxiter, seed=seed,
                                       reference=data, eval_every=maxiter // 4, **opts)
            auto = mlo.minimize_bilevel(boxed, x0, y0, method=name, maxiter=maxiter,
                                        seed=seed, reference=data, eval_every=maxiter // 4,
                                        step="auto", **opts)
            t_all = time.perf_counter() - t0
        except (ValueError, TypeError) as exc:
            print(f"  {name:<14}  not run: {exc}")
            continue
        h = res.history
        gsq = h.get("grad_mapping_sq", h.get("grad_norm_sq"))
        print(f"  {name:<14}{h['F'][0]:10.5f}{res.fun:10.5f}{auto.fun:10.5f}{gsq[-1]:12.2e}"
              f"{_fmt_time(res.time):>12}{sum(res.oracle_samples.values()):10d}  "
              f"{_run_status(res)}  ({t_all:.1f} s for both, with compile, search "
              f"and checkpoints)")
    print("  (|grad F|^2 is the projected-gradient mapping |x - P(x - grad F)|^2 at the last "
          "checkpoint, default steps; loop time and samples of the default-step run, "
          "excluding compiling and the reference evaluations; the search costs 0.9-1.0x "
          "the budget more; 'alternating' drops the implicit term, and the validation loss "
          "does not depend on lambda directly: grad_x f = 0, it does not move)")


def _comparison_section(mlo, data, x0, y0, budget, batch_size=32):
    import types
    box = (-8.0, 8.0)
    sp, p = data.stochastic_problem, data.problem
    boxed = types.SimpleNamespace(  # both forms with the bounds, the data's exact F
        problem=mlo.BilevelProblem(p.upper, p.lower, dims=p.dims, bounds=box),
        stochastic_problem=mlo.BilevelProblem(sp.upper, sp.lower, dims=sp.dims, bounds=box),
        F=data.F, hypergrad=data.hypergrad)
    methods = ["soba", "saba", "stocbio", "mrbo", "det-aid"]
    t0 = time.perf_counter()
    comp = mlo.compare_methods(boxed, x0, y0, methods, budget=budget, seeds=3,
                               batch_size=batch_size)
    print(f"\nmlocore.compare_methods: {', '.join(methods)} at the same budget "
          f"({time.perf_counter() - t0:.1f} s; F = validation loss, bounds [-8, 8]; det-aid "
          "counts n_samples per full-batch call):")
    print("  " + comp.table().replace("\n", "\n  "))
    print("  (comp.plot(x='samples' | 'time') draws the convergence curves with matplotlib)")


def _cuda_section(mlo, data, x0, y0):
    from mlocore.cuda import cuda_available, device_info, simulator_enabled
    if simulator_enabled() or not cuda_available():
        print("\nCUDA backend: no GPU here, skipped (the CUDA tests run in numba's simulator; "
              "README, 'CUDA backend').")
        return
    from mlocore.problems.cuda_callbacks import logistic_device_problem
    dev = logistic_device_problem(data)
    print(f"\nCUDA backend on {device_info()}: the same hypergradients with every vector on "
          "the GPU")
    print(f"  {'method':<14}{'CPU':>13}{'GPU':>13}{'GPU first':>13}{'rel. diff':>11}"
          "  transfers (GPU)")
    for name in ("cg", "neumann", "itd-reverse"):
        kw = {"T": 200} if name.startswith("itd") else {"tol": 1e-10}
        cpu, t_cpu = _timed(lambda: mlo.hypergrad(data.problem, x0, y0, method=name, **kw))
        t0 = time.perf_counter()
        mlo.hypergrad(dev, x0, y0, method=name, **kw)
        t_first = time.perf_counter() - t0
        gpu, t_gpu = _timed(lambda: mlo.hypergrad(dev, x0, y0, method=name, **kw))
        diff = np.linalg.norm(gpu.grad - cpu.grad) / np.linalg.norm(cpu.grad)
        tr = gpu.transfers
        print(f"  {name:<14}{_fmt_time(t_cpu):>13}{_fmt_time(t_gpu):>13}"
              f"{_fmt_time(t_first):>13}{diff:11.1e}  {tr['h2d']} in, {tr['d2h']} out")
    n, d = data.X_train.shape
    print(f"  ({n} training samples x {d} features is far too small for a GPU to pay off: "
          "benchmarks/cuda_ratios.py measures the sizes where it does)")


def _run_status(res):
    if not res.success:
        return res.message[:60]
    halved = res.get("step_reductions", 0)
    return f"ok (default steps halved {halved}x)" if halved else "ok"


if __name__ == "__main__":
    raise SystemExit(main())
