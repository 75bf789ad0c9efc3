"""CUDA backend against the CPU backend, in one run (issue 5's benchmark).

    python benchmarks/cuda_ratios.py                                  # on a machine with a GPU
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/cuda_ratios.py --quick   # smoke run, simulator

1. Hypergradient ``mlocore.hypergrad(problem, x, y0, method="cg")`` (lower solve by
   Newton-CG, then CG on ``H_yy v = grad_y f``, tol 1e-10) on the CPU (``BilevelProblem`` of
   ``@njit`` callbacks) and on the GPU (``DeviceBilevelProblem`` of device-array callbacks,
   vectors on the device for the whole solve), for lower dimensions dy = 1e3 .. 1e6:

   * dense: the library quadratic (``quad_grad`` / ``quad_hvp`` and their device twins) with
     a dense SPD ``A = (1 + s) I + R R^T / k`` (dy^2 floats: up to dy = 1e4);
   * sparse-structured: a tridiagonal lower Hessian ``A = tridiag(-1, 2 + s, -1)`` coupled to
     x by a dense (dy, dx) matrix (O(dy dx) per product: up to dy = 1e6).

   Reported: first call (compile + run; the CPU side's compile is cached on disk, the CUDA
   side's is not), steady state (best of several calls), the ratio CPU / CUDA, agreement of
   the two hypergradients and the host/device transfers of one call.
2. Batched throughput: ``batched_hypergrad`` on n small quadratics (dx=2, dy=8) in one launch
   (one block per problem) against a CPU loop of ``mlocore.hypergrad`` over the same
   problems: problems per second.

Figures under the simulator mean nothing (it runs the kernels in Python threads); the
``--quick`` run only checks that the script works. Output: printed and written to
``benchmarks/results/cuda-<date>[-quick].txt``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numba
import numpy as np
from numba import cuda

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import mlocore as mlo  # noqa: E402
from mlocore.cuda import (DeviceBilevelProblem, DeviceObjective, batched_hypergrad,  # noqa: E402
                          cuda_available, device_info, simulator_enabled)
from mlocore.cuda import _linalg as dl  # noqa: E402
from mlocore.problems import make_quadratic  # noqa: E402
from mlocore.problems.cuda_callbacks import (quad_grad_device, quad_hvp_device,  # noqa: E402
                                             quad_value_device)
from mlocore.problems.quadratic import quad_grad, quad_hvp, quad_value  # noqa: E402

DX = 10
SHIFT = 0.25     # s: the lower Hessians' smallest eigenvalue is about s (condition ~ 17)
MU = 0.1
RANK = 16


def fmt_t(t):
    if not np.isfinite(t):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t * 1e9:.3g} ns"


# ---------------------------------------------------------------------------------------
# The sparse-structured problem: g = y.A y/2 + y.C x, A tridiagonal; f = |y - t|^2/2 + mu|x|^2/2
# ---------------------------------------------------------------------------------------
@numba.njit(cache=True)
def _tri_affine_cpu(z, C, t, mu, upper, lin):
    """Gradient (lin = 1) or Hessian-vector product (z = v, lin = 0) of either level."""
    dy, dx = C.shape
    out = np.empty(dx + dy)
    if upper:
        for p in range(dx):
            out[p] = mu * z[p]
        for q in range(dy):
            out[dx + q] = z[dx + q] - lin * t[q]
        return out
    for p in range(dx):
        s = 0.0
        for q in range(dy):
            s += C[q, p] * z[dx + q]
        out[p] = s
    for q in range(dy):
        s = (2.0 + SHIFT) * z[dx + q]
        if q > 0:
            s -= z[dx + q - 1]
        if q < dy - 1:
            s -= z[dx + q + 1]
        for p in range(dx):
            s += C[q, p] * z[p]
        out[dx + q] = s
    return out


@numba.njit(cache=True)
def tri_lower_grad(z, C, t, mu):
    return _tri_affine_cpu(z, C, t, mu, False, 1.0)


@numba.njit(cache=True)
def tri_lower_hvp(z, v, C, t, mu):
    return _tri_affine_cpu(v, C, t, mu, False, 0.0)


@numba.njit(cache=True)
def tri_upper_grad(z, C, t, mu):
    return _tri_affine_cpu(z, C, t, mu, True, 1.0)


@numba.njit(cache=True)
def tri_upper_hvp(z, v, C, t, mu):
    return _tri_affine_cpu(v, C, t, mu, True, 0.0)


@cuda.jit
def _tri_lower_y_kernel(w, C, out):
    """y-part of the lower product: A w_y + C w_x, one thread per entry."""
    dy, dx = C.shape
    for q in range(cuda.grid(1), dy, cuda.gridsize(1)):
        s = (2.0 + SHIFT) * w[dx + q]
        if q > 0:
            s -= w[dx + q - 1]
        if q < dy - 1:
            s -= w[dx + q + 1]
        for p in range(dx):
            s += C[q, p] * w[p]
        out[dx + q] = s


def x_chunks(dy):
    """Blocks per entry p of ``C^T w_y``: enough of them to fill the GPU when dy is large
    (one block per p would keep only DX = 10 multiprocessors busy), at most 64."""
    return max(1, min(64, -(-dy // (16 * dl.THREADS_PER_BLOCK))))


@cuda.jit
def _tri_lower_x_partial_kernel(w, CT, partials):
    """x-part of the lower product, first pass: grid (dx, n_chunks); block (p, c) sums
    ``CT[p, q] w_y[q]`` over its interleaved share of q (coalesced) into
    ``partials[p n_chunks + c]`` (mlocore's shared-memory block reduction)."""
    dx, dy = CT.shape
    p, c = cuda.blockIdx.x, cuda.blockIdx.y
    n_chunks, width = cuda.gridDim.y, cuda.blockDim.x
    acc = 0.0
    for q in range(c * width + cuda.threadIdx.x, dy, n_chunks * width):
        acc += CT[p, q] * w[dx + q]
    dl._block_sum_store(acc, partials, p * n_chunks + c)


@cuda.jit
def _tri_lower_x_sum_kernel(partials, n_chunks, out):
    """Second pass, one block per p: ``out[p] = sum_c partials[p n_chunks + c]``."""
    p = cuda.blockIdx.x
    acc = 0.0
    for c in range(cuda.threadIdx.x, n_chunks, cuda.blockDim.x):
        acc += partials[p * n_chunks + c]
    dl._block_sum_store(acc, out, p)


@cuda.jit
def _tri_upper_kernel(w, t, mu, lin, out):
    dx = out.shape[0] - t.shape[0]
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        if i < dx:
            out[i] = mu * w[i]
        else:
            out[i] = w[i] - lin * t[i - dx]


def _tri_lower_device(w, out, C, CT, partials):
    dy, dx = C.shape
    n_chunks = partials.shape[0] // dx
    _tri_lower_y_kernel[dl.grid_for(dy), dl.THREADS_PER_BLOCK](w, C, out)
    _tri_lower_x_partial_kernel[(dx, n_chunks), dl.THREADS_PER_BLOCK](w, CT, partials)
    _tri_lower_x_sum_kernel[dx, dl.THREADS_PER_BLOCK](partials, n_chunks, out)


def tri_lower_grad_device(z, out, C, CT, t, mu, partials):
    _tri_lower_device(z, out, C, CT, partials)


def tri_lower_hvp_device(z, v, out, C, CT, t, mu, partials):
    _tri_lower_device(v, out, C, CT, partials)


def tri_upper_grad_device(z, out, C, CT, t, mu, partials):
    _tri_upper_kernel[dl.grid_for(out.shape[0]), dl.THREADS_PER_BLOCK](z, t, mu, 1.0, out)


def tri_upper_hvp_device(z, v, out, C, CT, t, mu, partials):
    _tri_upper_kernel[dl.grid_for(out.shape[0]), dl.THREADS_PER_BLOCK](v, t, mu, 0.0, out)


def structured_problems(dy, rng):
    C = np.ascontiguousarray(rng.standard_normal((dy, DX)) / np.sqrt(DX))
    t = rng.standard_normal(dy)
    cpu_args = (C, t, MU)
    cpu = mlo.BilevelProblem(mlo.Objective(tri_upper_grad, hvp=tri_upper_hvp, args=cpu_args),
                             mlo.Objective(tri_lower_grad, hvp=tri_lower_hvp, args=cpu_args),
                             dims=(DX, dy))
    dev_args = (C, np.ascontiguousarray(C.T), t, MU, np.zeros(DX * x_chunks(dy)))
    dev = DeviceBilevelProblem(
        DeviceObjective(tri_upper_grad_device, hvp=tri_upper_hvp_device, args=dev_args),
        DeviceObjective(tri_lower_grad_device, hvp=tri_lower_hvp_device, args=dev_args),
        dims=(DX, dy))
    return cpu, dev


def dense_problems(dy, rng):
    """The library quadratic over z = (x, y) with a dense lower A (quad_* callbacks)."""
    R = rng.standard_normal((dy, RANK))
    A = R @ R.T / RANK
    A[np.diag_indices(dy)] += 1.0 + SHIFT
    A = 0.5 * (A + A.T)  # exactly symmetric: the device kernel reads A by columns
    C = rng.standard_normal((DX, dy)) / np.sqrt(dy)
    lower = (A, np.zeros((DX, DX)), C, np.zeros(dy), np.zeros(DX))
    upper = (np.eye(dy), MU * np.eye(DX), np.zeros((DX, dy)), -rng.standard_normal(dy),
             np.zeros(DX))
    cpu = mlo.BilevelProblem(mlo.Objective(quad_grad, hvp=quad_hvp, value=quad_value,
                                           args=upper),
                             mlo.Objective(quad_grad, hvp=quad_hvp, value=quad_value,
                                           args=lower), dims=(DX, dy))
    dev = DeviceBilevelProblem(
        DeviceObjective(quad_grad_device, hvp=quad_hvp_device, value=quad_value_device,
                        args=upper),
        DeviceObjective(quad_grad_device, hvp=quad_hvp_device, value=quad_value_device,
                        args=lower), dims=(DX, dy))
    return cpu, dev


def timed(fn, repeats):
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return out, first, best


def hypergrad_table(out, kind, sizes, repeats):
    out(f"\n--- hypergradient, {kind} lower Hessian (dx={DX}, Newton-CG lower solve + CG adjoint, "
        f"tol 1e-10; steady = best of {repeats}) ---")
    out(f"{'dy':>9s} {'CPU first':>11s} {'CPU steady':>11s} {'CUDA first':>11s} "
        f"{'CUDA steady':>12s} {'CPU/CUDA':>9s} {'rel diff':>9s} {'CG its':>7s}  transfers/call")
    build = dense_problems if kind == "dense" else structured_problems
    for dy in sizes:
        rng = np.random.default_rng(dy)
        cpu, dev = build(dy, rng)
        x = np.ones(DX)
        y0 = np.zeros(dy)
        rc, c_first, c_best = timed(lambda: mlo.hypergrad(cpu, x, y0, method="cg"), repeats)
        rg, g_first, g_best = timed(lambda: mlo.hypergrad(dev, x, y0, method="cg"), repeats)
        rel = np.linalg.norm(rg.grad - rc.grad) / max(np.linalg.norm(rc.grad), 1e-300)
        tr = rg.get("transfers", {})
        out(f"{dy:9d} {fmt_t(c_first):>11s} {fmt_t(c_best):>11s} {fmt_t(g_first):>11s} "
            f"{fmt_t(g_best):>12s} {c_best / g_best:9.2f} {rel:9.1e} {rg.nit:7d}  "
            f"h2d {tr.get('h2d', '?')}, d2h {tr.get('d2h', '?')} "
            f"({tr.get('d2h_bytes', 0)} B back)")
        if not (rc.success and rg.success):
            out(f"          CPU: {rc.message} | CUDA: {rg.message}")


def batched_table(out, sizes, cpu_cap):
    dx, dy = 2, 8
    out(f"\n--- batched throughput: n quadratics (dx={dx}, dy={dy}) per launch, one block per "
        f"problem, against a CPU loop of mlocore.hypergrad (timed on at most {cpu_cap} "
        "problems) ---")
    out(f"{'n':>7s} {'CUDA first':>11s} {'CUDA steady':>12s} {'CUDA prob/s':>12s} "
        f"{'CPU prob/s':>11s} {'CUDA/CPU':>9s} {'max rel diff':>13s}")
    from mlocore.problems.cuda_batched import make_batched_quadratic
    for n in sizes:
        quads = [make_quadratic(dx=dx, dy=dy, n_outer=10, n_inner=10, seed=s) for s in range(n)]
        bq = make_batched_quadratic(quads)
        x = np.random.default_rng(n).standard_normal((n, dx))
        y0 = np.zeros((n, dy))
        res, first, best = timed(lambda: batched_hypergrad(bq.problem, x, y0, bq.upper_data,
                                                           bq.lower_data), 3)
        m = min(n, cpu_cap)
        mlo.hypergrad(quads[0].problem, x[0], y0[0])  # compile / cache load
        t0 = time.perf_counter()
        ref = [mlo.hypergrad(quads[i].problem, x[i], y0[i]).grad for i in range(m)]
        cpu_rate = m / (time.perf_counter() - t0)
        diff = max(np.linalg.norm(res.grad[i] - ref[i]) / max(np.linalg.norm(ref[i]), 1e-300)
                   for i in range(m))
        out(f"{n:7d} {fmt_t(first):>11s} {fmt_t(best):>12s} {n / best:12.3g} "
            f"{cpu_rate:11.3g} {n / best / cpu_rate:9.2f} {diff:13.1e}")
        if not np.all(res.success):
            out(f"        {res.message}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (simulator smoke run)")
    ap.add_argument("--no-save", action="store_true", help="do not write the results file")
    args = ap.parse_args()
    if not cuda_available():
        print("No CUDA device (and the simulator is off): nothing to measure. On a GPU machine "
              "run this script as is; for a smoke run set NUMBA_ENABLE_CUDASIM=1 and --quick.")
        return 0
    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    now = datetime.datetime.now()
    out(f"mlocore CUDA vs CPU, {now:%Y-%m-%d %H:%M}")
    out(f"  device: {device_info()}; host: {platform.machine()}, {os.cpu_count()} CPUs; "
        f"numba {numba.__version__}, numpy {np.__version__}")
    if simulator_enabled():
        out("  SIMULATOR: the CUDA figures below time Python threads, not a GPU; this run only "
            "checks that the script works")
    if args.quick:
        dense, structured, batched, repeats, cap = [8], [8], [2], 1, 2
    else:
        dense, structured, batched, repeats, cap = ([1000, 3000, 10000],
                                                    [1000, 10000, 100000, 1000000],
                                                    [256, 4096, 16384], 3, 256)
    t0 = time.perf_counter()
    hypergrad_table(out, "dense", dense, repeats)
    hypergrad_table(out, "tridiagonal", structured, repeats)
    batched_table(out, batched, cap)
    out(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")
    if not args.no_save:
        name = f"cuda-{now:%Y-%m-%d}{'-quick' if args.quick else ''}.txt"
        path = os.path.join(HERE, "results", name)
        with open(path, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
