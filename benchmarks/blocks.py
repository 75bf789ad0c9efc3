"""Block oracles against joint callbacks: CG hypergradients at the BLAS limit (one run).

    python benchmarks/blocks.py            # dy = 100 and 1000, dx in 5, 100, 1000
    python benchmarks/blocks.py --quick    # fewer samples

Problem: the dense quadratic bilevel problem
``g(x, y) = y.A y / 2 + x.B x / 2 + x.C y``, ``f(x, y) = |y - t|^2 / 2 + mu |x|^2 / 2``,
callbacks written as a user would with NumPy/BLAS products: the joint ``hvp`` computes
``(B v_x + C v_y, C^T v_x + A v_y)`` (four matrix-vector products), the block oracles
``hvp_yy = A v`` and ``hvp_xy = C v`` one each.

For each size, ``hypergrad(method="cg", lower_solved=True)`` to the same tolerance with
block oracles and with the joint callbacks only, against

- raw BLAS: the products the block form needs, ``n_yy x (A @ v)`` plus one ``C @ v``, in a
  compiled loop (the hardware limit of any CG hypergradient on this problem);
- scipy: ``scipy.sparse.linalg.cg`` on a ``LinearOperator`` whose matvec is ``A @ p``, then
  ``grad_x f - C v``: the same hypergradient written by hand, with the block products.

Times are the best of interleaved samples, with one BLAS thread when threadpoolctl is
installed (on a shared 2-core machine a two-thread gemv stalls whenever the other core is
busy). Results go to ``benchmarks/results/blocks-<date>.txt``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numba
import numpy as np

import mlocore as mlo

HERE = os.path.dirname(os.path.abspath(__file__))
RTOL = 1e-8
MU = 0.1


@numba.njit(cache=True)
def lower_grad(z, A, B, C):
    dx = B.shape[0]
    out = np.empty(z.shape[0])
    out[:dx] = B @ z[:dx] + C @ z[dx:]
    out[dx:] = z[:dx] @ C + A @ z[dx:]
    return out


@numba.njit(cache=True)
def lower_hvp(z, v, A, B, C):
    dx = B.shape[0]
    out = np.empty(z.shape[0])
    out[:dx] = B @ v[:dx] + C @ v[dx:]
    out[dx:] = v[:dx] @ C + A @ v[dx:]
    return out


@numba.njit(cache=True)
def lower_grad_y(z, A, B, C):
    dx = B.shape[0]
    return z[:dx] @ C + A @ z[dx:]


@numba.njit(cache=True)
def lower_hvp_yy(z, v, A, B, C):
    return A @ v


@numba.njit(cache=True)
def lower_hvp_xy(z, v, A, B, C):
    return C @ v


@numba.njit(cache=True)
def upper_grad(z, t, mu):
    dx = z.shape[0] - t.shape[0]
    out = np.empty(z.shape[0])
    out[:dx] = mu * z[:dx]
    out[dx:] = z[dx:] - t
    return out


@numba.njit(cache=True)
def raw_products(A, C, v, n_yy):
    """``n_yy`` products ``A @ v`` and one ``C @ v`` (the block form's BLAS work)."""
    s = 0.0
    for _ in range(n_yy):
        s += (A @ v)[0]
    return s + (C @ v)[0]


class Case:
    def __init__(self, dx, dy, seed=0):
        rng = np.random.default_rng([seed, dx, dy])
        M = rng.standard_normal((dy, dy))
        self.A = np.ascontiguousarray(M @ M.T / dy + np.eye(dy))
        N = rng.standard_normal((dx, dx))
        self.B = np.ascontiguousarray(N @ N.T / dx + np.eye(dx))
        self.C = np.ascontiguousarray(rng.standard_normal((dx, dy)) / np.sqrt(dy))
        self.t = rng.standard_normal(dy)
        self.x = rng.standard_normal(dx)
        self.y = np.linalg.solve(self.A, -self.x @ self.C)
        self.dx, self.dy = dx, dy
        args = (self.A, self.B, self.C)
        upper = mlo.Objective(upper_grad, args=(self.t, MU))
        self.blocks = mlo.BilevelProblem(
            upper, mlo.Objective(lower_grad, hvp=lower_hvp, args=args, grad_y=lower_grad_y,
                                 hvp_yy=lower_hvp_yy, hvp_xy=lower_hvp_xy), (dx, dy))
        self.joint = mlo.BilevelProblem(
            upper, mlo.Objective(lower_grad, hvp=lower_hvp, args=args), (dx, dy))

    def run(self, problem):
        return mlo.hypergrad(problem, self.x, self.y, method="cg", tol=RTOL, lower_solved=True)

    def scipy(self):
        from scipy.sparse.linalg import LinearOperator, cg
        A, C = self.A, self.C
        op = LinearOperator((self.dy, self.dy), matvec=lambda p: A @ p, dtype=np.float64)
        v, info = cg(op, self.y - self.t, rtol=RTOL, atol=0.0, maxiter=10 * self.dy)
        assert info == 0
        return MU * self.x - C @ v


def interleaved(fns, repeat, min_time):
    number, best = {}, {k: np.inf for k in fns}
    for k, f in fns.items():
        f()
        t0 = time.perf_counter()
        f()
        number[k] = max(1, int(min_time / max(time.perf_counter() - t0, 1e-9)))
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(number[k]):
                f()
            best[k] = min(best[k], (time.perf_counter() - t0) / number[k])
    return best


def table(out, sizes, repeat, min_time):
    out(f"CG hypergradient (lower_solved, rtol {RTOL:g}); best of {repeat} interleaved samples")
    out(f"  {'dx':>5} {'dy':>5} {'nit':>4} {'blocks':>10} {'joint':>10} {'raw BLAS':>10} "
        f"{'scipy':>10} {'blk/raw':>8} {'jnt/raw':>8} {'scipy/blk':>9} {'max|diff|':>9}")
    rows = []
    for dx, dy in sizes:
        c = Case(dx, dy)
        rb, rj = c.run(c.blocks), c.run(c.joint)
        assert rb.success and rj.success
        n_yy = rb.oracle_calls["lower_hvp_yy"]
        assert rb.oracle_calls["lower_hvp_xy"] == 1 and rb.oracle_calls["lower_hvp"] == 0
        v = np.random.default_rng(1).standard_normal(dy)
        diff = float(np.max(np.abs(rb.grad - c.scipy())))
        t = interleaved({"blocks": lambda: c.run(c.blocks), "joint": lambda: c.run(c.joint),
                         "raw": lambda: raw_products(c.A, c.C, v, n_yy),
                         "scipy": c.scipy}, repeat, min_time)
        out(f"  {dx:>5} {dy:>5} {rb.nit:>4} {t['blocks'] * 1e3:>8.3f}ms {t['joint'] * 1e3:>8.3f}ms "
            f"{t['raw'] * 1e3:>8.3f}ms {t['scipy'] * 1e3:>8.3f}ms {t['blocks'] / t['raw']:>8.2f} "
            f"{t['joint'] / t['raw']:>8.2f} {t['scipy'] / t['blocks']:>9.2f} {diff:>9.1e}")
        rows.append((dx, dy, t))
    out("  raw BLAS = nit products A @ v + one C @ v in a compiled loop (what the block form "
        "needs); joint = every product a joint hvp (4 matrix-vector products);")
    out("  scipy = scipy.sparse.linalg.cg on a LinearOperator p -> A @ p, then grad_x f - C v; "
        "max|diff| = mlocore (blocks) against scipy")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    sizes = [(5, 10), (5, 100), (100, 100), (5, 1000), (100, 1000), (1000, 1000)]
    repeat, min_time = (5, 0.05) if args.quick else (9, 0.1)
    out(f"benchmarks/blocks.py, {datetime.datetime.now():%Y-%m-%d %H:%M}, numba "
        f"{numba.__version__}, numpy {np.__version__}, {os.cpu_count()} cpus")
    try:
        from threadpoolctl import threadpool_limits
        with threadpool_limits(limits=1, user_api="blas"):
            out("1 BLAS thread")
            table(out, sizes, repeat, min_time)
    except ImportError:
        out("default BLAS threads (threadpoolctl not installed)")
        table(out, sizes, repeat, min_time)
    if not args.no_save:
        path = os.path.join(HERE, "results", f"blocks-{datetime.date.today()}.txt")
        with open(path, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        print(f"written to {path}")


if __name__ == "__main__":
    sys.exit(main())
