"""K-fold cross-validated per-feature l2 penalties of a logistic regression, on a Dask cluster.

scikit-learn's breast cancer data (569 samples, 30 features): a stratified test split is held
out; the rest is split into K folds. For every (restart, fold) pair, mlocore.minimize_bilevel
learns one log-penalty per feature (lower level: the penalized training log-loss of the
other folds; upper level: the log-loss on the fold) from the start ``lambda = restart``. The
restart with the lowest mean validation loss is picked, its learned penalties are averaged
over the folds, and the weights refit on all the non-test data are scored on the test split.

All (restart, fold) problems run with mlocore.distributed.minimize_many, once serially and
once on a local cluster (the data are scattered to the workers once), and the two are checked
to agree bit for bit::

    python3 examples/cross_validation.py [--folds 5] [--workers 2]

Needs scikit-learn and dask (``pip install "mlocore[data,dask]"``).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

import mlocore as mlo
from mlocore.distributed import minimize_many
from mlocore.problems.logistic import (logistic_lower_grad, logistic_lower_grad_y,
                                       logistic_lower_hvp, logistic_lower_hvp_xy,
                                       logistic_lower_hvp_yy, logistic_lower_value,
                                       logistic_upper_grad, logistic_upper_grad_x,
                                       logistic_upper_grad_y, logistic_upper_hvp,
                                       logistic_upper_value)

BOUNDS = (-8.0, 8.0)
OPTIONS = dict(method="aid", maxiter=40, tol=1e-4, lower_tol=1e-8)


def load_data(n_folds, seed=0, test_fraction=0.25):
    """Raw breast cancer data, a stratified test split and K stratified folds of the rest."""
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError:
        raise ImportError('this example needs scikit-learn: pip install "mlocore[data]"') \
            from None
    raw = load_breast_cancer()
    X = np.asarray(raw.data, dtype=np.float64)
    t = np.asarray(raw.target, dtype=np.float64)
    rng = np.random.default_rng(seed)
    test, folds = [], [[] for _ in range(n_folds)]
    for label in (0.0, 1.0):
        idx = rng.permutation(np.flatnonzero(t == label))
        n_test = int(round(test_fraction * idx.size))
        test.append(idx[:n_test])
        for k, part in enumerate(np.array_split(idx[n_test:], n_folds)):
            folds[k].append(part)
    return {"X": X, "t": t, "test": np.sort(np.concatenate(test)),
            "folds": [np.sort(np.concatenate(f)) for f in folds]}


def _standardized(X, train, *others):
    mu, sd = X[train].mean(axis=0), X[train].std(axis=0)
    sd[sd == 0] = 1.0
    return tuple(np.ascontiguousarray((X[i] - mu) / sd) for i in (train,) + others)


def logistic_problem(X_train, t_train, X_val, t_val):
    """The bilevel problem over ``z = concat(lambda, w)`` with the library's callbacks: the
    joint ones and the blocks that the solvers call (``grad_y`` in the lower solve,
    ``hvp_yy`` in every CG iteration, ``hvp_xy`` once per hypergradient)."""
    d = X_train.shape[1]
    return mlo.BilevelProblem(
        upper=mlo.Objective(logistic_upper_grad, hvp=logistic_upper_hvp,
                            value=logistic_upper_value, args=(X_val, t_val),
                            grad_x=logistic_upper_grad_x, grad_y=logistic_upper_grad_y),
        lower=mlo.Objective(logistic_lower_grad, hvp=logistic_lower_hvp,
                            value=logistic_lower_value, args=(X_train, t_train),
                            grad_y=logistic_lower_grad_y, hvp_yy=logistic_lower_hvp_yy,
                            hvp_xy=logistic_lower_hvp_xy),
        dims=(d, d), bounds=BOUNDS)


def build_fold(param, data):
    """``param = (restart, fold)``: the fold's problem, started at ``lambda = restart``."""
    restart, fold = param
    val = data["folds"][fold]
    train = np.sort(np.concatenate([f for k, f in enumerate(data["folds"]) if k != fold]))
    X_train, X_val = _standardized(data["X"], train, val)
    problem = logistic_problem(X_train, data["t"][train], X_val, data["t"][val])
    d = X_train.shape[1]
    return problem, np.full(d, float(restart)), np.zeros(d)


def _logloss(X, t, w):
    m = X @ w
    return float(np.mean(np.logaddexp(0.0, m) - t * m))


def _test_scores(data, lam):
    """Refit the weights on all non-test data with penalties exp(lam); test loss, accuracy."""
    train = np.sort(np.concatenate(data["folds"]))
    X_train, X_test = _standardized(data["X"], train, data["test"])
    t_train, t_test = data["t"][train], data["t"][data["test"]]
    problem = logistic_problem(X_train, t_train, X_test, t_test)
    w = mlo.solve_lower(problem, lam, np.zeros(lam.size)).y
    acc = float(np.mean((X_test @ w > 0) == (t_test > 0.5)))
    return _logloss(X_test, t_test, w), acc


def run_cv_demo(client=None, n_folds=5, restarts=(-4.0, -2.0, 0.0), n_workers=2,
                seed=0, compare_serial=True):
    """Run the cross-validation and return the printed report (a table) as a string.

    Parameters
    ----------
    client : dask.distributed.Client or "serial", optional
        Where to solve. Default: a local cluster of ``n_workers`` processes, started and
        closed here.
    n_folds : int
        K of the K-fold split.
    restarts : sequence of float
        Starting log-penalties (the same for every feature) to try.
    n_workers : int
        Workers of the local cluster started when ``client`` is None.
    seed : int
        Seed of the test split and the folds.
    compare_serial : bool
        Also run the serial loop, check that it gives the same bits, and report the
        wall-time speed-up (not with ``client="serial"``).
    """
    if __name__ != "__main__":
        # imported (e.g. from a file path the workers cannot import): ship this module's
        # functions to the workers by value
        import sys
        import cloudpickle
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    compare_serial = compare_serial and client != "serial"
    data = load_data(n_folds, seed)
    params = [(float(r), k) for r in restarts for k in range(n_folds)]
    lines = [f"{n_folds}-fold cross-validation of per-feature l2 penalties, logistic regression "
             f"on breast cancer ({data['X'].shape[0]} samples, {data['X'].shape[1]} features, "
             f"{data['test'].size} held out for test); {len(params)} bilevel problems "
             f"({len(restarts)} restarts x {n_folds} folds), minimize_bilevel(method='aid', "
             f"bounds {BOUNDS})"]

    owned = None
    if client is None:
        from dask.distributed import Client, LocalCluster
        t0 = time.perf_counter()
        owned = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                             dashboard_address=None)
        client = Client(owned)
        t_start = time.perf_counter() - t0
    try:
        t_serial = serial = None
        if compare_serial:
            minimize_many(build_fold, params[:1], client="serial", data=data, **OPTIONS)
            t0 = time.perf_counter()
            serial = minimize_many(build_fold, params, client="serial", data=data, **OPTIONS)
            t_serial = time.perf_counter() - t0
        t_warm = None
        if client != "serial":
            # load mlocore's compiled kernels into every worker before timing
            t0 = time.perf_counter()
            minimize_many(build_fold, params[:1] * len(client.nthreads()), client=client,
                          data=data, chunksize=1, **OPTIONS)
            t_warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = minimize_many(build_fold, params, client=client, data=data, **OPTIONS)
        t_par = time.perf_counter() - t0
    finally:
        if owned is not None:
            client.close()
            owned.close()

    lines.append("")
    lines.append(f"  {'restart':>8} {'fold':>5} {'val loss':>10} {'iters':>6} "
                 f"{'median exp(lambda)':>19}  status")
    for r in results:
        restart, fold = r.param
        med = np.exp(np.median(r.x)) if r.x is not None else np.nan
        lines.append(f"  {restart:8.1f} {fold:5d} {r.fun:10.5f} {r.get('nit', 0):6d} "
                     f"{med:19.3g}  {'ok' if r.success else r.message[:60]}")
    lines.append("")
    lines.append(f"  {'restart':>8} {'mean val loss':>14} {'std':>9}")
    means = {}
    for restart in restarts:
        f = np.array([r.fun for r in results if r.param[0] == float(restart)])
        means[float(restart)] = np.mean(f)
        lines.append(f"  {restart:8.1f} {np.mean(f):14.5f} {np.std(f):9.5f}")
    best = min(means, key=lambda k: (np.nan_to_num(means[k], nan=np.inf), k))
    lam = np.mean([r.x for r in results if r.param[0] == best and r.x is not None], axis=0)
    test_loss, test_acc = _test_scores(data, lam)
    base_loss, base_acc = _test_scores(data, np.zeros(lam.size))
    lines.append("")
    lines.append(f"picked restart {best:g} (lowest mean validation loss); penalties averaged "
                 f"over the folds, weights refit on all {sum(f.size for f in data['folds'])} "
                 "non-test samples:")
    lines.append(f"  test loss {test_loss:.5f}, accuracy {test_acc:.4f}  (unit penalties "
                 f"exp(0) = 1: test loss {base_loss:.5f}, accuracy {base_acc:.4f})")
    lines.append("")
    if compare_serial:
        same = all(np.array_equal(a.x, b.x) and np.array_equal(a.fun, b.fun, equal_nan=True)
                   for a, b in zip(results, serial))
        lines.append(f"wall time: serial loop {t_serial:.2f} s, the cluster {t_par:.2f} s: "
                     f"speed-up {t_serial / t_par:.2f}x; results identical bit for bit: "
                     f"{'yes' if same else 'NO'}")
    if t_warm is not None:
        extra = f"cluster start {t_start:.1f} s, " if owned is not None else ""
        lines.append(f"  (not timed above: {extra}first task per worker, loading mlocore's "
                     f"compiled kernels, {t_warm:.1f} s)")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    print(run_cv_demo(n_folds=args.folds, n_workers=args.workers))


if __name__ == "__main__":
    main()
