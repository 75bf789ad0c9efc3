"""One-run peer benchmark: one logistic HPO hypergradient, mlocore against its peers.

    python benchmarks/peers_logistic.py [--repeat K] [--out FILE]

Problem: ``mlocore.problems.make_logistic(n_train, n_val=n_train // 4, n_features=d)``,
per-feature log-penalties ``lam`` (upper variable), weights ``w`` (lower variable):

    lower  g(lam, w) = mean_i [softplus(x_i'w) - t_i x_i'w]  (training set)
                       + 1/2 sum_j exp(lam_j) w_j^2
    upper  f(lam, w) = validation log-loss of w

For n_train in (1e3, 1e4) and d in (10, 100), w* is solved once at a fixed lam
(``mlocore.solve_lower``, |grad_w g| <= 1e-12); then ONE hypergradient
``grad F(lam) = -H_lam,w H_ww^{-1} grad_w f`` is timed from that solved point, the adjoint
solve ``H_ww v = grad_w f`` run by CG from v = 0 to a relative residual of 1e-10, by

  mlocore   ``mlocore.hypergrad(problem, lam, w*, method="cg", lower_solved=True,
            tol=1e-10)`` on the problem's block callbacks;
  scipy     NumPy products ``H_ww p = X'(s(1-s) * (X p)) / n + exp(lam) * p`` (s computed once
            per hypergradient) in a ``scipy.sparse.linalg.LinearOperator``,
            ``scipy.sparse.linalg.cg``, then ``grad = -exp(lam) * w * v``;
  jaxopt    ``jaxopt.implicit_diff.custom_root`` on the optimality condition
            ``F(w, lam) = grad_w g`` (``jax.grad`` of the lower objective in jax.numpy),
            ``solve=jaxopt.linear_solve.solve_cg``, a decorated solver that returns the given
            w*, and ``jax.jit(jax.grad(validation loss through it))`` with the data passed as
            arguments; float64; timed after compilation (compile time reported apart);
  fused     a hand-written ``@numba.njit(fastmath=True)`` function: the sigmoid weights once,
            then CG with the logistic Hessian-vector product inlined (one pass over X per
            product, reductions free to be reordered so that they vectorize): the limit of
            what a CG hypergradient can cost here;
  fused-strict  the same function compiled without fastmath (strict summation order, as
            mlocore's problem callbacks are compiled): the scalar-loop cost.

Under each table, mlocore's time is split into its CG iterations times one call of the
problem's ``logistic_lower_hvp_yy_cached`` callback (timed alone at one point, its curvature
weights cached as in a CG solve, in the same round-robin) and the
rest (the gradients, the CG vector work, the per-call overhead of ``hypergrad``); both terms
are separately timed minima, so the split is only as good as the noise (a negative rest is
noise).

Every hypergradient is checked against a dense reference (the Hessian formed, a direct
solve): relative error <= 1e-6 for all. Times are best of K samples taken round-robin over
the methods (a shared machine's noise falls on all of them alike). Ratios are peer /
mlocore; the target is >= 2x against scipy and jaxopt.

jax and jaxopt are optional and not installed by mlocore: without them the jaxopt column
reads "n/a". One thread everywhere unless the environment says otherwise
(OPENBLAS/OMP/NUMBA threads, XLA's Eigen pool off).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time

for _k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1")

import numba  # noqa: E402
import numpy as np  # noqa: E402
import scipy  # noqa: E402
from scipy.sparse.linalg import LinearOperator, cg  # noqa: E402
from scipy.special import expit  # noqa: E402

import mlocore as mlo  # noqa: E402
from mlocore.problems import make_logistic  # noqa: E402
from mlocore.problems.logistic import (logistic_lower_hvp_yy_cached,  # noqa: E402
                                       new_curvature_cache)

try:
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jaxopt.implicit_diff import custom_root
    from jaxopt.linear_solve import solve_cg
    HAVE_JAX = True
    JAX_NOTE = ""
except Exception as exc:  # ImportError, or a jaxopt that does not work with this jax
    HAVE_JAX = False
    JAX_NOTE = f"{type(exc).__name__}: {exc}"

TOL = 1e-10           # relative residual of every adjoint CG solve
AGREE = 1e-6          # relative error against the dense reference
TARGET = 2.0          # peer / mlocore
CASES = [(1000, 10), (1000, 100), (10000, 10), (10000, 100)]


def lam_of(d):
    """The fixed upper point: per-feature penalties exp(lam) from 7e-3 to 0.37."""
    return np.linspace(-5.0, -1.0, d)


# ---------------------------------------------------------------------------------------
# Dense reference
# ---------------------------------------------------------------------------------------
def dense_reference(P, lam, w):
    e = np.exp(lam)
    s = expit(P.X_train @ w)
    H = (P.X_train.T * (s * (1.0 - s))) @ P.X_train / P.n_train + np.diag(e)
    b = P.X_val.T @ (expit(P.X_val @ w) - P.t_val) / P.n_val
    v = np.linalg.solve(H, b)
    return -e * w * v, np.linalg.cond(H)


# ---------------------------------------------------------------------------------------
# (b) SciPy, written the usual way
# ---------------------------------------------------------------------------------------
def scipy_hypergrad(X, t, Xv, tv, lam, w, tol=TOL, callback=None):
    n, d = X.shape
    e = np.exp(lam)
    s = expit(X @ w)
    dd = s * (1.0 - s) / n

    def matvec(p):
        return X.T @ (dd * (X @ p)) + e * p

    H = LinearOperator((d, d), matvec=matvec, dtype=np.float64)
    b = Xv.T @ (expit(Xv @ w) - tv) / Xv.shape[0]
    v, info = cg(H, b, rtol=tol, atol=0.0, maxiter=10 * d, callback=callback)
    if info != 0:
        raise RuntimeError(f"scipy cg did not converge (info={info})")
    return -e * w * v  # + grad_lam f, which is zero here


# ---------------------------------------------------------------------------------------
# (d) Hand-fused Numba kernel
# ---------------------------------------------------------------------------------------
@numba.njit
def _sig(m):
    if m >= 0.0:
        return 1.0 / (1.0 + np.exp(-m))
    q = np.exp(m)
    return q / (1.0 + q)


def _fused_hypergrad(X, t, Xv, tv, lam, w, tol, maxiter):
    n, d = X.shape
    nv = Xv.shape[0]
    e = np.exp(lam)
    dd = np.empty(n)
    for i in range(n):
        m = 0.0
        for j in range(d):
            m += X[i, j] * w[j]
        s = _sig(m)
        dd[i] = s * (1.0 - s) / n
    b = np.zeros(d)
    for i in range(nv):
        m = 0.0
        for j in range(d):
            m += Xv[i, j] * w[j]
        r = (_sig(m) - tv[i]) / nv
        for j in range(d):
            b[j] += r * Xv[i, j]
    v = np.zeros(d)
    r = b.copy()
    p = b.copy()
    Ap = np.empty(d)
    rs = 0.0
    for j in range(d):
        rs += r[j] * r[j]
    stop = tol * math.sqrt(rs)
    it = 0
    while math.sqrt(rs) > stop and it < maxiter:
        for j in range(d):
            Ap[j] = e[j] * p[j]
        for i in range(n):
            xp = 0.0
            for j in range(d):
                xp += X[i, j] * p[j]
            c = dd[i] * xp
            for j in range(d):
                Ap[j] += c * X[i, j]
        pAp = 0.0
        for j in range(d):
            pAp += p[j] * Ap[j]
        alpha = rs / pAp
        rs_new = 0.0
        for j in range(d):
            v[j] += alpha * p[j]
            r[j] -= alpha * Ap[j]
            rs_new += r[j] * r[j]
        beta = rs_new / rs
        for j in range(d):
            p[j] = r[j] + beta * p[j]
        rs = rs_new
        it += 1
    g = np.empty(d)
    for j in range(d):
        g[j] = -e[j] * w[j] * v[j]
    return g, it


fused_hypergrad = numba.njit(fastmath=True)(_fused_hypergrad)
fused_strict_hypergrad = numba.njit(_fused_hypergrad)


# ---------------------------------------------------------------------------------------
# (c) JAXopt custom_root
# ---------------------------------------------------------------------------------------
def make_jaxopt_grad(d):
    def lower_obj(w, lam, X, t):
        m = X @ w
        return jnp.mean(jnp.logaddexp(0.0, m) - t * m) + 0.5 * jnp.sum(jnp.exp(lam) * w ** 2)

    optimality = jax.grad(lower_obj)  # F(w, lam, X, t) = grad_w g

    def solve(matvec, b):
        return solve_cg(matvec, b, tol=TOL, atol=0.0, maxiter=10 * d)

    @custom_root(optimality, solve=solve)
    def inner_solver(w_init, lam, X, t):
        return w_init  # the lower problem is already solved: w_init is w*

    def outer(lam, w_init, X, t, Xv, tv):
        w = inner_solver(w_init, lam, X, t)
        m = Xv @ w
        return jnp.mean(jnp.logaddexp(0.0, m) - tv * m)

    return jax.jit(jax.grad(outer))


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------
def interleaved(fns, repeat, min_time=0.05):
    """Best and median per-call time of each fns[name]; samples taken round-robin, each
    sample running enough calls to last >= min_time."""
    number, samples = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter() - t0
        number[name] = max(1, math.ceil(min_time / max(t1, 1e-9)))
        samples[name] = []
    for _ in range(repeat):
        for name, fn in fns.items():
            k = number[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - t0) / k)
    return {k: (min(v), statistics.median(v)) for k, v in samples.items()}


def fmt(t):
    if t is None:
        return "n/a"
    if t < 1e-3:
        return f"{t * 1e6:7.1f} us"
    if t < 1.0:
        return f"{t * 1e3:7.2f} ms"
    return f"{t:7.2f} s "


def relerr(g, ref):
    return float(np.linalg.norm(np.asarray(g) - ref) / np.linalg.norm(ref))


def header(repeat):
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                             check=False).stdout.strip() or "?"
    except OSError:
        rev = "?"
    vers = (f"numpy {np.__version__}, scipy {scipy.__version__}, numba {numba.__version__}, "
            f"Python {platform.python_version()}")
    if HAVE_JAX:
        from importlib.metadata import version
        vers += f", jax {jax.__version__}, jaxlib {version('jaxlib')}, jaxopt {version('jaxopt')}"
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    lines = [
        f"mlocore peer benchmark: logistic HPO hypergradient, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"  mlocore {getattr(mlo, '__version__', '?')} at {rev}; {vers}",
        f"  {platform.machine()}, {os.cpu_count()} CPUs, load average {load}; threads: "
        f"OPENBLAS={os.environ.get('OPENBLAS_NUM_THREADS')}, "
        f"NUMBA={os.environ.get('NUMBA_NUM_THREADS')}, XLA_FLAGS='{os.environ.get('XLA_FLAGS')}'",
        f"  make_logistic(n_train, n_val=n_train//4, n_features=d, seed=0), lam = "
        f"linspace(-5, -1, d); w* by solve_lower (|grad_w g| <= 1e-12)",
        f"  one hypergradient from the solved point, CG from v = 0 to relative residual "
        f"{TOL:g}; best (median) of {repeat} interleaved samples",
    ]
    if not HAVE_JAX:
        lines.append(f"  jaxopt column skipped: jax/jaxopt not importable ({JAX_NOTE})")
    return lines


def run_case(n_train, d, repeat, emit):
    P = make_logistic(n_train=n_train, n_val=n_train // 4, n_features=d, seed=0)
    prob = P.problem
    lam = lam_of(d)
    sol = mlo.solve_lower(prob, lam, np.zeros(d), tol=1e-12)
    if not sol.success:
        raise RuntimeError(sol.message)
    w = sol.y
    ref, cond = dense_reference(P, lam, w)
    X, t, Xv, tv = P.X_train, P.t_train, P.X_val, P.t_val

    first = {}
    t0 = time.perf_counter()
    res = mlo.hypergrad(prob, lam, w, method="cg", lower_solved=True, tol=TOL)
    first["mlocore"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    g_fused, nit_fused = fused_hypergrad(X, t, Xv, tv, lam, w, TOL, 10 * d)
    first["fused"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    g_strict, _ = fused_strict_hypergrad(X, t, Xv, tv, lam, w, TOL, 10 * d)
    first["fused-strict"] = time.perf_counter() - t0
    its = [0]

    def count(_):
        its[0] += 1

    g_scipy = scipy_hypergrad(X, t, Xv, tv, lam, w, callback=count)
    grads = {"mlocore": res.grad, "scipy": g_scipy, "fused": g_fused, "fused-strict": g_strict}
    nits = {"mlocore": res.nit, "scipy": its[0], "fused": nit_fused, "fused-strict": nit_fused,
            "jaxopt": None}
    z = np.concatenate([lam, w])
    p = np.ones(d)
    cache = new_curvature_cache(X)

    fns = {
        "mlocore": lambda: mlo.hypergrad(prob, lam, w, method="cg", lower_solved=True,
                                         tol=TOL),
        "scipy": lambda: scipy_hypergrad(X, t, Xv, tv, lam, w),
        "fused": lambda: fused_hypergrad(X, t, Xv, tv, lam, w, TOL, 10 * d),
        "fused-strict": lambda: fused_strict_hypergrad(X, t, Xv, tv, lam, w, TOL, 10 * d),
        "hvp_yy": lambda: logistic_lower_hvp_yy_cached(z, p, X, t, cache),
    }
    if HAVE_JAX:
        jg = make_jaxopt_grad(d)
        jargs = tuple(jnp.asarray(a) for a in (lam, w, X, t, Xv, tv))
        t0 = time.perf_counter()
        g_jax = jg(*jargs).block_until_ready()
        first["jaxopt"] = time.perf_counter() - t0
        grads["jaxopt"] = np.asarray(g_jax)
        fns["jaxopt"] = lambda: jg(*jargs).block_until_ready()

    errs = {k: relerr(g, ref) for k, g in grads.items()}
    times = interleaved(fns, repeat)
    t_hvp = times.pop("hvp_yy")[0]
    tm = times["mlocore"][0]
    emit("")
    emit(f"n_train = {n_train}, n_val = {n_train // 4}, d = {d}  "
         f"(cond(H_ww) = {cond:.3g}, |grad F| = {np.linalg.norm(ref):.3e})")
    emit(f"  {'method':<13}{'best':>11}{'median':>12}{'CG its':>8}{'rel.err':>10}"
         f"{'first call':>13}{'x mlocore':>11}")
    for k in ("mlocore", "scipy", "jaxopt", "fused", "fused-strict"):
        if k not in times:
            emit(f"  {k:<13}{'n/a':>11}   ({JAX_NOTE or 'not run'})")
            continue
        b, med = times[k]
        nit = "-" if nits[k] is None else str(nits[k])
        emit(f"  {k:<13}{fmt(b):>11}{fmt(med):>12}{nit:>8}{errs[k]:>10.1e}"
             f"{fmt(first.get(k)) if k in first else '':>13}{b / tm:>11.2f}")
    emit(f"  mlocore = {res.nit} x logistic_lower_hvp_yy_cached ({fmt(t_hvp).strip()} each) = "
         f"{fmt(res.nit * t_hvp).strip()} ({100 * res.nit * t_hvp / tm:.0f}%) + rest "
         f"{fmt(tm - res.nit * t_hvp).strip()}; fused: {fmt(times['fused'][0] / max(nit_fused, 1)).strip()}"
         f" per CG iteration, all included")
    bad = [k for k, e in errs.items() if not e <= AGREE]
    if bad:
        emit(f"  AGREEMENT FAILED (rel.err > {AGREE:g}): {', '.join(bad)}")
    verdict = []
    for k in ("scipy", "jaxopt"):
        if k in times:
            r = times[k][0] / tm
            verdict.append(f"{k}/mlocore = {r:.2f} ({'MET' if r >= TARGET else 'not met'})")
    verdict.append(f"fused/mlocore = {times['fused'][0] / tm:.2f}")
    emit(f"  target >= {TARGET:g}x: " + "; ".join(verdict))
    return {k: v[0] / tm for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7, help="samples per method (default 7)")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args(argv)
    lines = []

    def emit(s):
        print(s, flush=True)
        lines.append(s)

    for s in header(args.repeat):
        emit(s)
    summary = {}
    t0 = time.perf_counter()
    for n_train, d in CASES:
        summary[(n_train, d)] = run_case(n_train, d, args.repeat, emit)
    emit("")
    emit("summary: peer time / mlocore time (best of k): > 1 mlocore faster, < 1 mlocore "
         "slower; target scipy and jaxopt >= 2")
    emit("  (scipy/fused, jaxopt/fused: the most any CG hypergradient at these iteration counts "
         "could gain over the peer on this machine)")
    cols = ["scipy", "jaxopt", "fused", "fused-strict"]
    emit(f"  {'n_train':>8}{'d':>5}" + "".join(f"{c:>13}" for c in cols)
         + f"{'scipy/fused':>13}{'jaxopt/fused':>13}   2x target")
    for (n_train, d), r in summary.items():
        row = "".join(f"{r[c]:>13.2f}" if c in r else f"{'n/a':>13}" for c in cols)
        row += "".join(f"{r[c] / r['fused']:>13.2f}" if c in r else f"{'n/a':>13}"
                       for c in ("scipy", "jaxopt"))
        peers = [r[c] for c in ("scipy", "jaxopt") if c in r]
        emit(f"  {n_train:>8}{d:>5}{row}   {'MET' if min(peers) >= TARGET else 'not met'}")
    emit(f"(total {time.perf_counter() - t0:.1f} s)")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
