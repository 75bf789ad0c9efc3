"""The CUDA backend: your own device callbacks, one large problem, and many small ones.

1. **Device callbacks** (``mlocore.cuda.DeviceObjective``): a separable bilevel problem,
   written as four elementwise ``numba.cuda`` kernels over z = (x, y), x and y of size d::

       lower g(x, y) = sum_j exp(x_j) y_j^2 / 2 - a_j y_j   ->  y*_j(x) = a_j exp(-x_j)
       upper f(x, y) = |y - b|^2 / 2

   so ``dF/dx_j = -(y*_j - b_j) y*_j``: the closed form the device hypergradient (CG on
   the device, every vector kept there) is checked against, for d up to 1e6 on a GPU.
2. **One large problem**: ``mlocore.minimize_bilevel(..., method="aid")`` on it, where
   only the scalars of the line search and the stopping tests cross the bus.
3. **Many small problems at once**: a grid of ridge penalties, each a ``make_quadratic``
   problem, hypergradients of all of them in one launch (``batched_hypergrad``, one thread
   block per problem), against a CPU loop.

Run: ``python examples/cuda_backend.py`` where there is an NVIDIA GPU (``pip install -e
".[cuda]"``), or ``python examples/cuda_backend.py --simulator`` anywhere (numba's CUDA
simulator: tiny sizes, slow, for trying the API only; no timing there means anything).
"""
import math
import os
import sys
import time

if "--simulator" in sys.argv:  # must be set before numba is imported
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

import mlocore as mlo  # noqa: E402
from mlocore.cuda import (DeviceBilevelProblem, DeviceObjective, batched_hypergrad,  # noqa: E402
                          device_info, require_cuda, simulator_enabled)
from mlocore.problems import make_quadratic  # noqa: E402
from mlocore.problems.cuda_batched import make_batched_quadratic  # noqa: E402

SIM = "--simulator" in sys.argv
D = 8 if SIM else 1_000_000           # size of x and of y in part 1
N_PROBLEMS = 4 if SIM else 20_000    # problems in part 3
DIMS_BATCHED = (2, 4) if SIM else (4, 16)
THREADS = 4 if SIM else 256


# ---------------------------------------------------------------------------------------
# 1. Device callbacks: grad(z, out, *args) and hvp(z, v, out, *args) write into out
# ---------------------------------------------------------------------------------------
@cuda.jit
def _lower_grad_kernel(z, out, a):
    d = a.shape[0]
    for j in range(cuda.grid(1), d, cuda.gridsize(1)):
        e, y = math.exp(z[j]), z[d + j]
        out[j] = 0.5 * e * y * y            # d g / d x_j
        out[d + j] = e * y - a[j]            # d g / d y_j


@cuda.jit
def _lower_hvp_kernel(z, v, out, a):
    d = a.shape[0]
    for j in range(cuda.grid(1), d, cuda.gridsize(1)):
        e, y = math.exp(z[j]), z[d + j]
        out[j] = 0.5 * e * y * y * v[j] + e * y * v[d + j]
        out[d + j] = e * y * v[j] + e * v[d + j]


@cuda.jit
def _upper_grad_kernel(z, out, b):
    d = b.shape[0]
    for j in range(cuda.grid(1), d, cuda.gridsize(1)):
        out[j] = 0.0
        out[d + j] = z[d + j] - b[j]


@cuda.jit
def _upper_hvp_kernel(z, v, out, b):
    d = b.shape[0]
    for j in range(cuda.grid(1), d, cuda.gridsize(1)):
        out[j] = 0.0
        out[d + j] = v[d + j]


@cuda.jit
def _upper_value_terms_kernel(z, b, terms):
    d = b.shape[0]
    for j in range(cuda.grid(1), d, cuda.gridsize(1)):
        r = z[d + j] - b[j]
        terms[j] = 0.5 * r * r


@cuda.reduce
def _device_sum(s, t):
    return s + t


def _blocks(d):
    return min((d + THREADS - 1) // THREADS, 1024)


def lower_grad(z, out, a):
    _lower_grad_kernel[_blocks(a.shape[0]), THREADS](z, out, a)


def lower_hvp(z, v, out, a):
    _lower_hvp_kernel[_blocks(a.shape[0]), THREADS](z, v, out, a)


def upper_grad(z, out, b):
    _upper_grad_kernel[_blocks(b.shape[0]), THREADS](z, out, b)


def upper_hvp(z, v, out, b):
    _upper_hvp_kernel[_blocks(b.shape[0]), THREADS](z, v, out, b)


def upper_value(z, b):
    """f(x, y) (the line search of minimize_bilevel calls it): the terms by a kernel, their
    sum by numba's ``cuda.reduce`` (one scalar read back). A real program would keep the
    terms array instead of allocating it per call."""
    terms = cuda.device_array(b.shape[0])
    _upper_value_terms_kernel[_blocks(b.shape[0]), THREADS](z, b, terms)
    return float(_device_sum(terms))


def separable_problem(d, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 2.0, d)
    b = rng.uniform(-1.0, 1.0, d)
    a_dev, b_dev = cuda.to_device(a), cuda.to_device(b)   # the data live on the device
    problem = DeviceBilevelProblem(DeviceObjective(upper_grad, hvp=upper_hvp,
                                                   value=upper_value, args=(b_dev,)),
                                   DeviceObjective(lower_grad, hvp=lower_hvp, args=(a_dev,)),
                                   dims=(d, d))
    return problem, a, b


def part1_and_2():
    problem, a, b = separable_problem(D)
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.5, 0.5, D)
    y0 = np.zeros(D)
    ys = a * np.exp(-x)
    exact = -(ys - b) * ys
    print(f"1. hypergradient of the separable problem, d = {D:,} (x and y each)")
    for label in ("first call (compiles)", "second call"):
        t0 = time.perf_counter()
        res = mlo.hypergrad(problem, x, y0, method="cg", tol=1e-10, backend="cuda")
        dt = time.perf_counter() - t0
        err = np.abs(res.grad - exact).max() / np.abs(exact).max()
        print(f"   {label:<22} {dt:8.3f} s   max rel. error vs closed form {err:.1e}   "
              f"success={res.success}   transfers {res.transfers['h2d']} in / "
              f"{res.transfers['d2h']} out")
    assert err < 1e-8, err

    print("2. minimize_bilevel(method='aid') on it, backend='cuda'")
    F = lambda x: 0.5 * np.sum((a * np.exp(-x) - b) ** 2)  # noqa: E731  (closed form)
    x0 = np.zeros(D)
    t0 = time.perf_counter()
    res = mlo.minimize_bilevel(problem, x0, y0, method="aid", maxiter=2 if SIM else 30,
                               tol=1e-8,
                               backend="cuda")
    dt = time.perf_counter() - t0
    print(f"   F: {F(x0):.4e} -> {F(res.x):.4e} in {res.nit} iterations, {dt:.2f} s "
          f"({res.message})")
    print(f"   host <-> device copies: {res.transfers['h2d']} in, {res.transfers['d2h']} out "
          f"({res.transfers['d2h_bytes'] / 1e6:.1f} MB back, mostly scalars and x at the end)")


def part3():
    dx, dy = DIMS_BATCHED
    lams = np.logspace(-2, 1, N_PROBLEMS)
    quads = [make_quadratic(dx=dx, dy=dy, seed=0, ridge=lam) for lam in lams]
    bq = make_batched_quadratic(quads)
    x = np.zeros((N_PROBLEMS, dx))
    y0 = np.zeros((N_PROBLEMS, dy))
    print(f"3. batched hypergradients: {N_PROBLEMS:,} quadratic problems (dx={dx}, dy={dy}), "
          f"ridge penalty from {lams[0]:g} to {lams[-1]:g}")
    for label in ("first call (compiles)", "second call"):
        t0 = time.perf_counter()
        res = batched_hypergrad(bq.problem, x, y0, bq.upper_data, bq.lower_data)
        dt = time.perf_counter() - t0
        print(f"   {'simulator' if SIM else 'GPU'}, {label:<22} {dt:8.3f} s   ({N_PROBLEMS / dt:,.0f} problems/s), "
              f"{int(np.sum(res.success))} of {N_PROBLEMS} succeeded")
    n_cpu = min(N_PROBLEMS, 200)
    mlo.hypergrad(quads[0].problem, x[0], y0[0])  # compile outside the timing
    t0 = time.perf_counter()
    cpu = [mlo.hypergrad(quads[i].problem, x[i], y0[i], method="cg", tol=1e-10).grad
           for i in range(n_cpu)]
    dt = time.perf_counter() - t0
    print(f"   CPU loop over the first {n_cpu}: {n_cpu / dt:,.0f} problems/s")
    diff = np.abs(np.array(cpu) - res.grad[:n_cpu]).max()
    print(f"   max |GPU - CPU| over those: {diff:.1e}")
    assert diff < 1e-8, diff


if __name__ == "__main__":
    require_cuda("examples/cuda_backend.py (or run it with --simulator)")
    print("device:", "numba's CUDA simulator (sizes tiny, timings meaningless)"
          if simulator_enabled() else device_info())
    part1_and_2()
    part3()
