"""CUDA backend: the deterministic entry points added last, against the CPU to 1e-10.

``mlocore.linalg.solve_direct`` and ``hypergrad(..., method="direct")`` (dense Cholesky on the
device), ``mlocore.HyperObjective`` for a DeviceBilevelProblem (y and v warm on the device)
and ``mlocore.minimize_multilevel`` for a DeviceMultilevelProblem. Runs under numba's CUDA
simulator (tests/conftest.py): tiny sizes, few iterations.
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.optimize as so
from numba import cuda

from cuda_helpers import spd, tridiagonal_matvec

import mlocore as mlo
import mlocore.linalg as la
from mlocore.cuda import _linalg as dl
from mlocore.cuda._device import is_device_array
from mlocore.cuda._direct import solve_direct as solve_direct_cuda
from mlocore.cuda._drivers import DeviceHyperObjective
from mlocore.cuda._drivers import minimize_multilevel as minimize_multilevel_cuda
from mlocore.cuda._implicit import hypergrad as hypergrad_cuda
from mlocore.cuda._problem import DeviceBilevelProblem, DeviceObjective
from mlocore.problems import make_quadratic
from mlocore.problems.cuda_callbacks import (quad_grad_device, quad_hvp_device,
                                             quad_value_device, quadratic_device_problem)
from mlocore.problems.cuda_multilevel import trilevel_quadratic_device_problem
from mlocore.problems.multilevel import make_trilevel_quadratic
from mlocore.problems.quadratic import quad_grad, quad_hvp, quad_value

# CPU references of n-level runs take the matrix-free recursion, as the device does
pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("matrix_free_levels")]

READ_BYTES = 8 * dl.N_SCALARS


@cuda.jit
def _nan_first_kernel(p, out):
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = p[i]
        if i == 0:
            out[i] = math.nan


def nan_matvec(p, out):
    _nan_first_kernel[dl.grid_for(p.shape[0]), dl.THREADS_PER_BLOCK](p, out)


# ---------------------------------------------------------------------------------------
# solve_direct
# ---------------------------------------------------------------------------------------
def test_solve_direct_matches_cpu_and_counts_transfers():
    A, b = spd(9, seed=1)  # n > THREADS_PER_BLOCK under the simulator: rows per thread > 1
    A[0, 1] += 1e-3         # not symmetric: the solve uses the symmetric part, as the CPU
    A0, b0 = A.copy(), b.copy()
    x, info, res = la.solve_direct(A, b, backend="cuda", full_output=True)
    xc, infoc, resc = la.solve_direct(A, b, full_output=True)
    assert isinstance(x, np.ndarray) and info == infoc == 0
    assert (res.nit, res.n_matvec) == (resc.nit, resc.n_matvec) == (1, 9)
    assert res.message == resc.message
    np.testing.assert_allclose(x, xc, rtol=0, atol=1e-10)
    assert res.residual_norm == pytest.approx(resc.residual_norm, abs=1e-10)
    # A and b copied once; one read-back (info and residual), then x
    assert res.transfers == {"h2d": 2, "d2h": 2, "h2d_bytes": 8 * (81 + 9),
                             "d2h_bytes": READ_BYTES + 8 * 9}
    np.testing.assert_array_equal(A, A0)
    np.testing.assert_array_equal(b, b0)


def test_solve_direct_device_callback_and_device_output():
    n = 7
    T = 3.0 * np.eye(n) - (np.eye(n, k=1) + np.eye(n, k=-1))
    b = np.linspace(-1.0, 1.0, n)
    bd = cuda.to_device(b)
    x, info, res = solve_direct_cuda(tridiagonal_matvec, bd, args=(3.0, -1.0),
                                     full_output=True, output="device")
    assert is_device_array(x) and info == 0 and res.n_matvec == n
    np.testing.assert_allclose(x.copy_to_host(), la.solve_direct(T, b)[0], rtol=0,
                               atol=1e-10)
    assert res.transfers == {"h2d": 0, "d2h": 1, "h2d_bytes": 0, "d2h_bytes": READ_BYTES}
    np.testing.assert_array_equal(bd.copy_to_host(), b)


@pytest.mark.parametrize("A", [np.diag([2.0, -1.0, 3.0, 1.0, 0.5]),      # indefinite
                               np.diag([1.0, 1.0, 0.0, 2.0, 1.0])])      # singular PSD
def test_solve_direct_not_positive_definite(A):
    b = np.ones(5)
    x, info, res = la.solve_direct(A, b, backend="cuda", full_output=True)
    xc, infoc, resc = la.solve_direct(A, b, full_output=True)
    assert info == infoc == -4 and not res.success
    assert res.message == resc.message == "Cholesky failed: the operator is not positive " \
                                          "definite"
    np.testing.assert_array_equal(x, xc)  # zeros
    assert res.residual_norm == pytest.approx(resc.residual_norm, rel=1e-14)


def test_solve_direct_nonfinite_operator_and_errors():
    x, info, res = la.solve_direct(nan_matvec, np.ones(5), backend="cuda", full_output=True)
    assert info == -1 and not res.success and np.all(x == 0.0)
    assert "breakdown" in res.message
    with pytest.raises(ValueError, match="non-finite"):
        la.solve_direct(np.array([[1.0, np.nan], [0.0, 1.0]]), np.ones(2), backend="cuda")
    with pytest.raises(ValueError, match=r"A has shape \(3, 3\) but b has shape \(2,\)"):
        la.solve_direct(np.eye(3), np.ones(2), backend="cuda")
    from scipy.sparse.linalg import aslinearoperator
    with pytest.raises(TypeError, match="dense 2-D array"):
        la.solve_direct(aslinearoperator(np.eye(2)), np.ones(2), backend="cuda")


# ---------------------------------------------------------------------------------------
# hypergrad(method="direct")
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quadratic():
    q = make_quadratic(dx=2, dy=4, seed=0)
    return q, quadratic_device_problem(q)


def test_direct_hypergrad_matches_cpu_and_closed_form(quadratic):
    q, problem = quadratic
    x, y = np.array([0.4, -0.3]), np.zeros(4)
    res = mlo.hypergrad(problem, x, y, method="direct")
    ref = mlo.hypergrad(q.problem, x, y, method="direct")
    assert res.success, res.message
    assert res.message == ref.message and res.method == "direct"
    assert (res.nit, res.lin_info, res.lower_nit) == (ref.nit, ref.lin_info, ref.lower_nit)
    assert res.oracle_calls == ref.oracle_calls  # dy assembly products + one for H_xy v
    for key in ("grad", "y", "v"):
        np.testing.assert_allclose(res[key], ref[key], rtol=0, atol=1e-10)
    assert res.fun == pytest.approx(ref.fun, abs=1e-10)
    assert res.lin_residual == pytest.approx(ref.lin_residual, abs=1e-10)
    np.testing.assert_allclose(res.grad, q.hypergrad(x), rtol=0, atol=1e-8)
    # device inputs, device output, lower level given: no copy in; grad, y, v stay there
    ys = q.y_star(x)
    host = hypergrad_cuda(problem, x, ys, method="direct", lower_solved=True)
    dev = hypergrad_cuda(problem, cuda.to_device(x), cuda.to_device(ys), method="direct",
                         lower_solved=True, output="device")
    assert all(is_device_array(a) for a in (dev.grad, dev.y, dev.v))
    assert dev.transfers["h2d"] == 0 and host.transfers["h2d"] == 2
    # read-backs: the direct solve's one, the finiteness check, (host: grad, y, v)
    assert dev.transfers["d2h"] == 2 and host.transfers["d2h"] == 5
    np.testing.assert_allclose(dev.grad.copy_to_host(), host.grad, rtol=0, atol=1e-14)


def _indefinite_pair(q):
    """Device and CPU problems whose lower Hessian A is indefinite."""
    A, B, C, a, b = q.lower_means
    A = A.copy()
    A[0, 0] = -5.0
    lower = (A, B, C, a, b)
    dev = DeviceBilevelProblem(
        DeviceObjective(quad_grad_device, hvp=quad_hvp_device, value=quad_value_device,
                        args=q.upper_means),
        DeviceObjective(quad_grad_device, hvp=quad_hvp_device, args=lower), dims=(q.dx, q.dy))
    cpu = mlo.BilevelProblem(mlo.Objective(quad_grad, hvp=quad_hvp, value=quad_value,
                                           args=q.upper_means),
                             mlo.Objective(quad_grad, hvp=quad_hvp, args=lower),
                             dims=(q.dx, q.dy))
    return dev, cpu


def test_direct_hypergrad_indefinite_reports_cholesky_failure(quadratic):
    q, _ = quadratic
    dev, cpu = _indefinite_pair(q)
    x, y = np.array([0.4, -0.3]), np.linspace(-1.0, 1.0, 4)
    res = mlo.hypergrad(dev, x, y, method="direct", lower_solved=True)
    ref = mlo.hypergrad(cpu, x, y, method="direct", lower_solved=True)
    assert not res.success and (res.status, res.lin_info) == (ref.status, ref.lin_info) == (5, -4)
    assert res.message.split(", residual")[0] == ref.message.split(", residual")[0]
    assert "Cholesky failed" in res.message
    np.testing.assert_allclose(res.grad, ref.grad, rtol=0, atol=1e-10)  # grad_x f, v = 0
    np.testing.assert_array_equal(res.v, np.zeros(4))
    with pytest.raises(TypeError, match="eta does not apply"):
        mlo.hypergrad(dev, x, y, method="direct", eta=0.1)


# ---------------------------------------------------------------------------------------
# HyperObjective
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["cg", "direct"])
def test_hyperobjective_matches_cpu_call_for_call(quadratic, method):
    q, problem = quadratic
    hd = mlo.HyperObjective(problem, np.zeros(4), method=method)
    hc = mlo.HyperObjective(q.problem, np.zeros(4), method=method)
    assert isinstance(hd, DeviceHyperObjective) and isinstance(hd, mlo.HyperObjective)
    before = hd.transfers
    for x in (np.array([0.3, -0.2]), np.array([0.5, 0.1]), np.array([0.5, 0.1 + 1e-7])):
        fd, gd = hd(x)
        fc, gc = hc(x)
        assert fd == pytest.approx(fc, abs=1e-10)
        np.testing.assert_allclose(gd, gc, rtol=0, atol=1e-10)
        assert (hd.last.nit, hd.last.lower_nit) == (hc.last.nit, hc.last.lower_nit)
        assert hd.last.success and is_device_array(hd.last.y) and is_device_array(hd.last.v)
    assert hd.last.lower_nit <= 2  # warm-started from the previous (nearby) call's y
    assert hd.ncalls == 3 and hd.oracle_calls == hc.oracle_calls
    # per call: x in (dx values) and the hypergradient out; y and v never leave the device
    t = hd.transfers
    assert t["h2d"] - before["h2d"] == 3 and t["h2d_bytes"] - before["h2d_bytes"] == 3 * 16
    assert (t["d2h_bytes"] - before["d2h_bytes"]) % READ_BYTES == 3 * 16
    np.testing.assert_allclose(hd.y, hc.y, rtol=0, atol=1e-10)
    np.testing.assert_allclose(hd.v, hc.v, rtol=0, atol=1e-10)


def test_hyperobjective_scipy_minimize_reaches_x_star(quadratic):
    q, problem = quadratic
    y0 = cuda.to_device(np.zeros(4))
    hd = mlo.HyperObjective(problem, y0, backend="cuda")
    options = {"gtol": 1e-10, "ftol": 1e-15}
    res = so.minimize(hd, np.zeros(2), jac=True, method="L-BFGS-B", options=options)
    hc = mlo.HyperObjective(q.problem, np.zeros(4))
    ref = so.minimize(hc, np.zeros(2), jac=True, method="L-BFGS-B", options=options)
    assert res.success and ref.success, (res.message, ref.message)
    # Not call for call: the CPU's block oracles are BLAS products (A @ v, C @ v), the
    # device's sum in the joint kernels' order, and with ftol = 1e-15 scipy's line search
    # sees that round-off (its iteration and evaluation counts may differ by a few, and it
    # stops at points ~1e-9 apart). Both reach the closed-form x* to that accuracy, and each
    # backend's counts are consistent with its run.
    assert hd.ncalls == res.nfev and hc.ncalls == ref.nfev
    assert hd.oracle_calls["lower_hvp"] == hd.oracle_calls["lower_grad"] == 0
    np.testing.assert_allclose(res.x, q.x_star, rtol=0, atol=1e-9)
    # the CPU run (BLAS block products) stops 1.1e-9 away from x*: near x* the computed
    # hypergradients are round-off (~1e-9), which bounds how close gtol = 1e-10 can get
    np.testing.assert_allclose(ref.x, q.x_star, rtol=0, atol=2e-9)
    np.testing.assert_array_equal(y0.copy_to_host(), np.zeros(4))  # never modified


def test_hyperobjective_errors(quadratic):
    q, problem = quadratic
    y = np.zeros(4)
    with pytest.raises(TypeError, match="needs device callbacks"):
        mlo.HyperObjective(q.problem, y, backend="cuda")
    with pytest.raises(TypeError, match="runs on the CUDA backend only"):
        mlo.HyperObjective(problem, y, backend="cpu")
    with pytest.raises(ValueError, match="unknown method"):
        mlo.HyperObjective(problem, y, method="itd-reverse")
    no_value = DeviceBilevelProblem(
        DeviceObjective(quad_grad_device, hvp=quad_hvp_device, args=q.upper_means),
        problem.lower, dims=(2, 4))
    with pytest.raises(ValueError, match="value callback"):
        mlo.HyperObjective(no_value, y)
    with pytest.raises(ValueError, match=r"y0 must have shape \(4,\)"):
        mlo.HyperObjective(problem, np.zeros(3))
    dev, _ = _indefinite_pair(q)
    h = mlo.HyperObjective(dev, y)
    with pytest.raises(RuntimeError, match="not positive definite"):
        h(np.zeros(2))
    assert h.ncalls == 1 and not h.last.success


# ---------------------------------------------------------------------------------------
# minimize_multilevel
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trilevel():
    tq = make_trilevel_quadratic(dim=1)
    return tq, trilevel_quadratic_device_problem(tq)


def _same_run(res, ref, atol=1e-10):
    assert (res.nit, res.status, res.success) == (ref.nit, ref.status, ref.success)
    assert res.message == ref.message and res.method == ref.method
    for key in ("x", "z", "jac"):
        np.testing.assert_allclose(res[key], ref[key], rtol=0, atol=atol)
    for a, b in zip(res.xs, ref.xs):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    assert res.fun == pytest.approx(ref.fun, abs=atol)
    for key in ("fun", "grad_norm"):
        np.testing.assert_allclose(res.history[key], ref.history[key], rtol=0, atol=atol)


def test_minimize_multilevel_line_search_matches_cpu(trilevel):
    tq, dp = trilevel
    xs = [np.array([0.3]), np.zeros(1), np.zeros(1)]
    xs0 = [x.copy() for x in xs]
    res = mlo.minimize_multilevel(dp, xs, method="exact", maxiter=5)
    ref = mlo.minimize_multilevel(tq.problem, xs, method="exact", maxiter=5)
    assert res.success, res.message
    _same_run(res, ref)
    np.testing.assert_allclose(res.x, tq.x_star, rtol=0, atol=1e-10)
    calls, ref_calls = res.oracle_calls, ref.oracle_calls
    for k in ("level1", "level2"):
        assert calls[k] == ref_calls[k]
    # no device tvp: each CPU third-order product is two level-3 hvps
    assert calls["level3"]["hvp"] == ref_calls["level3"]["hvp"] + 2 * ref_calls["level3"]["tvp"]
    assert calls["level3"]["grad"] == ref_calls["level3"]["grad"]
    # x0s in (3 copies), then one copy per new x_1 (x0 and each line-search trial: the
    # F evaluations, i.e. the level-1 values, since each direction reuses the F of its
    # point); the levels stay on the device
    n_f_evals = calls["level1"]["value"]
    assert res.transfers["h2d"] == 3 + n_f_evals and n_f_evals > res.nit
    for x, x0 in zip(xs, xs0):
        np.testing.assert_array_equal(x, x0)


def test_minimize_multilevel_fixed_step_callback_device_output(trilevel):
    tq, dp = trilevel
    z0 = cuda.to_device(np.array([0.3, 0.1, -0.2]))  # one joint device vector
    seen, seen_ref = [], []
    res = minimize_multilevel_cuda(dp, z0, "truncated", step=0.1, maxiter=2, tol=0.0,
                                   callback=lambda r: seen.append(r.xs), output="device")
    ref = mlo.minimize_multilevel(tq.problem, [np.array([0.3]), np.array([0.1]),
                                               np.array([-0.2])], "truncated", step=0.1,
                                  maxiter=2, tol=0.0, callback=lambda r: seen_ref.append(r.xs))
    assert is_device_array(res.z) and all(is_device_array(x) for x in res.xs)
    res.z = res.z.copy_to_host()
    res.xs = [x.copy_to_host() for x in res.xs]
    _same_run(res, ref)
    assert res.status == 10 and len(seen) == len(seen_ref) == 2
    for a, b in zip(seen, seen_ref):
        np.testing.assert_allclose(np.concatenate(a), np.concatenate(b), rtol=0, atol=1e-10)
    np.testing.assert_array_equal(z0.copy_to_host(), [0.3, 0.1, -0.2])


def test_minimize_multilevel_errors(trilevel):
    tq, dp = trilevel
    xs = [np.zeros(1)] * 3
    with pytest.raises(ValueError, match="T must be"):
        mlo.minimize_multilevel(dp, xs, method="itd", T=0)
    with pytest.raises(TypeError, match="needs device callbacks"):
        mlo.minimize_multilevel(tq.problem, xs, backend="cuda")
    with pytest.raises(TypeError, match="runs on the CUDA backend only"):
        mlo.minimize_multilevel(dp, xs, backend="cpu")
    with pytest.raises(ValueError, match="unknown method"):
        mlo.minimize_multilevel(dp, xs, method="nope")
    with pytest.raises(ValueError, match=r"must hold 3 arrays"):
        mlo.minimize_multilevel(dp, xs[:2])


# ---------------------------------------------------------------------------------------
# The direct solve's kernels compile for a real GPU (libNVVM, no GPU needed)
# ---------------------------------------------------------------------------------------
_PTX_SCRIPT = r"""
import os, shutil, subprocess, sys, tempfile
from numba import cuda, types
import numba.cuda.dispatcher as dispatcher
from numba.cuda.cudadrv.error import CudaSupportError, NvvmSupportError
from numba.cuda.cudadrv.nvvm import NvvmError


class _Device:
    compute_capability = (8, 0)


dispatcher.get_current_device = lambda: _Device()
try:
    from mlocore.cuda import _direct as d
    cuda.compile_ptx(d._unit_kernel.py_func, types.void(types.float64[::1], types.int64),
                     cc=(8, 0))
except (CudaSupportError, NvvmSupportError, NvvmError, OSError) as exc:
    print("NVVM unavailable:", exc)
    sys.exit(77)
v, va = types.float64[::1], types.Array(types.float64, 1, "A")
m = types.float64[:, ::1]
sigs = [(d._unit_kernel, (v, types.int64)), (d._store_column_kernel, (m, v, types.int64)),
        (d._symmetric_part_kernel, (m, m)),
        (d._cholesky_solve_kernel, (m, v, v, v, types.int64)),
        (d._cholesky_solve_kernel, (m, va, v, v, types.int64))]
ptxas = shutil.which("ptxas")
for kernel, sig in sigs:
    ptx, _ = cuda.compile_ptx(kernel.py_func, types.void(*sig), cc=(8, 0))
    if ptxas:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            open(src, "w").write(ptx)
            proc = subprocess.run([ptxas, "-arch=sm_80", src, "-o",
                                   os.path.join(tmp, "k.cubin")], capture_output=True,
                                  text=True)
            assert proc.returncode == 0, proc.stderr
print("ok", len(sigs))
"""


def test_direct_kernels_compile_for_a_real_gpu():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300, cwd=root)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok 5"
