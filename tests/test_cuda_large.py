"""CUDA backend, "one large problem" mode: device solvers and hypergradients against the CPU.

Runs under numba's CUDA simulator (tests/conftest.py sets NUMBA_ENABLE_CUDASIM=1), where
every simulated thread is a Python thread: sizes stay small (dy <= 40, few iterations).
"""
import math

import numpy as np
import pytest
from numba import cuda

from cuda_helpers import spd, tridiagonal, tridiagonal_matvec

import mlocore as mlo
import mlocore.linalg as la
from mlocore._callbacks import CallbackError
from mlocore.cuda import _linalg as dl
from mlocore.cuda._device import is_device_array
from mlocore.cuda._problem import DeviceBilevelProblem, DeviceObjective
from mlocore.problems import make_logistic, make_quadratic
from mlocore.problems.cuda_callbacks import (logistic_device_problem, quad_grad_device,
                                             quad_hvp_device, quadratic_device_problem)

pytestmark = pytest.mark.cuda


# ---------------------------------------------------------------------------------------
# Linear solvers
# ---------------------------------------------------------------------------------------
def test_cg_dense_matches_cpu_and_counts_transfers():
    A, b = spd(10)
    A0, b0 = A.copy(), b.copy()
    x, info, res = la.cg(A, b, rtol=1e-12, backend="cuda", full_output=True)
    xc, infoc, resc = la.cg(A, b, rtol=1e-12, full_output=True)
    assert isinstance(x, np.ndarray) and info == infoc == 0
    assert res.nit == resc.nit and res.n_matvec == resc.n_matvec
    np.testing.assert_allclose(x, xc, rtol=0, atol=1e-10)
    # A and b copied once; one read-back before the loop, one per iteration, x at the end
    assert res.transfers["h2d"] == 2
    assert res.transfers["d2h"] == res.nit + 2
    np.testing.assert_array_equal(A, A0)
    np.testing.assert_array_equal(b, b0)


def test_cg_device_callback_warm_start_and_device_output():
    n = 12
    T = tridiagonal(n, 3.0, -1.0)
    rng = np.random.default_rng(1)
    b, x0 = rng.standard_normal(n), rng.standard_normal(n)
    bd, x0d = cuda.to_device(b), cuda.to_device(x0)
    x, info, res = la.cg(tridiagonal_matvec, bd, x0d, rtol=1e-12, args=(3.0, -1.0),
                         backend="cuda", full_output=True, output="device")
    xc, infoc, resc = la.cg(T, b, x0, rtol=1e-12, full_output=True)
    assert is_device_array(x) and info == infoc == 0
    assert res.nit == resc.nit and res.n_matvec == resc.n_matvec == res.nit + 1
    np.testing.assert_allclose(x.copy_to_host(), xc, rtol=0, atol=1e-10)
    # nothing copied in; read-backs: |x0|, then |b|, |r0|, then one per iteration
    assert res.transfers["h2d"] == 0 and res.transfers["d2h"] == res.nit + 2
    np.testing.assert_array_equal(bd.copy_to_host(), b)
    np.testing.assert_array_equal(x0d.copy_to_host(), x0)


def test_cg_second_reduction_pass(monkeypatch):
    """Several blocks per launch: the block partials are summed by the second pass (n is
    10 blocks' worth of threads, capped at 4 blocks: 40 under the simulator, 2560 on a GPU)."""
    monkeypatch.setattr(dl, "MAX_BLOCKS", 4)
    n = 10 * dl.THREADS_PER_BLOCK
    A, b = spd(n, seed=2, shift=4.0)
    assert dl.grid_for(n) == 4
    x, info, res = la.cg(A, b, rtol=1e-10, backend="cuda", full_output=True)
    xc, infoc, resc = la.cg(A, b, rtol=1e-10, full_output=True)
    assert info == infoc == 0 and res.nit == resc.nit
    np.testing.assert_allclose(x, xc, rtol=0, atol=1e-10)


def test_neumann_matches_cpu_default_and_given_step():
    A, b = spd(8, seed=3, shift=2.0)
    x, info, res = la.neumann(A, b, rtol=1e-8, backend="cuda", full_output=True)
    xc, infoc, resc = la.neumann(A, b, rtol=1e-8, full_output=True)
    assert info == infoc == 0 and res.nit == resc.nit
    assert res.eta == pytest.approx(resc.eta, rel=1e-12)
    np.testing.assert_allclose(x, xc, rtol=0, atol=1e-10)
    n = 10
    T = tridiagonal(n, 3.0, -1.0)
    b = np.linspace(-1.0, 1.0, n)
    x, info, res = la.neumann(tridiagonal_matvec, b, eta=0.2, rtol=1e-6, args=(3.0, -1.0),
                              backend="cuda", full_output=True)
    xc, infoc, resc = la.neumann(T, b, eta=0.2, rtol=1e-6, full_output=True)
    assert info == infoc == 0 and res.nit == resc.nit
    np.testing.assert_allclose(x, xc, rtol=0, atol=1e-10)
    assert res.transfers == {"h2d": 1, "d2h": res.nit + 2, "h2d_bytes": 8 * n,
                             "d2h_bytes": 8 * (dl.N_SCALARS * (res.nit + 1) + n)}


def test_info_codes_match_cpu():
    n = 6
    indefinite = np.diag(np.linspace(-1.0, 2.0, n))
    b = np.ones(n)
    for kw in ({}, {"maxiter": 2}):
        x, info, res = la.cg(indefinite, b, backend="cuda", full_output=True, **kw)
        xc, infoc, resc = la.cg(indefinite, b, full_output=True, **kw)
        assert info == infoc and res.nit == resc.nit, kw
        np.testing.assert_allclose(x, xc, rtol=0, atol=1e-12)
    assert la.cg(indefinite, b, backend="cuda")[1] == -2
    A, b = spd(n, seed=4)
    assert la.cg(A, b, rtol=1e-14, maxiter=2, backend="cuda")[1] == 2
    x, info = la.neumann(A, b, eta=10.0, backend="cuda")
    assert info == la.neumann(A, b, eta=10.0)[1] == -3


def test_linear_solver_input_errors():
    A, b = spd(4)
    with pytest.raises(ValueError, match="square"):
        la.cg(np.ones((3, 4)), b, backend="cuda")
    with pytest.raises(ValueError, match=r"A has shape \(4, 4\) but b has shape \(3,\)"):
        la.cg(A, b[:3], backend="cuda")
    with pytest.raises(TypeError, match="float64"):
        la.cg(A, cuda.to_device(b.astype(np.float32)), backend="cuda")
    with pytest.raises(ValueError, match="non-finite"):
        la.cg(A, np.array([1.0, np.nan, 0.0, 0.0]), backend="cuda")
    from scipy.sparse.linalg import aslinearoperator
    with pytest.raises(TypeError, match="dense 2-D array"):
        la.cg(aslinearoperator(A), b, backend="cuda")
    with pytest.raises(ValueError, match="needs backend='cuda'"):
        la.cg(A, b, output="device")
    with pytest.raises(NotImplementedError, match="M is not supported"):
        la.cg(A, b, M=np.ones(4), backend="cuda")

    def raising(p, out):
        raise RuntimeError("boom")
    with pytest.raises(CallbackError, match="raising raised RuntimeError: boom"):
        la.cg(raising, b, backend="cuda")


# ---------------------------------------------------------------------------------------
# Hypergradients
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quadratic():
    q = make_quadratic(dx=3, dy=8, seed=0)
    return q, quadratic_device_problem(q)


@pytest.fixture(scope="module")
def logistic():
    lh = make_logistic(n_train=20, n_val=15, n_features=4, seed=0)
    return lh, logistic_device_problem(lh)


@pytest.mark.parametrize("method", ["cg", "neumann"])
def test_quadratic_hypergrad_matches_cpu_and_closed_form(quadratic, method):
    q, problem = quadratic
    assert problem.transfers["h2d"] == 10
    x, y = np.linspace(-1.0, 1.0, 3), np.zeros(8)
    res = mlo.hypergrad(problem, x, y, method=method, backend="cuda")
    ref = mlo.hypergrad(q.problem, x, y, method=method)
    assert res.success, res.message
    assert (res.nit, res.lower_nit) == (ref.nit, ref.lower_nit)
    assert res.oracle_calls == ref.oracle_calls
    np.testing.assert_allclose(res.grad, ref.grad, rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.y, ref.y, rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.v, ref.v, rtol=0, atol=1e-10)
    assert res.fun == pytest.approx(ref.fun, rel=1e-12)
    np.testing.assert_allclose(res.grad, q.hypergrad(x), rtol=0, atol=1e-8)


@pytest.mark.parametrize("method", ["cg", "neumann"])
def test_logistic_hypergrad_matches_cpu(logistic, method):
    lh, problem = logistic
    x, y = np.full(4, -1.0), np.zeros(4)
    res = mlo.hypergrad(problem, x, y, method=method)  # backend None: the problem decides
    ref = mlo.hypergrad(lh.problem, x, y, method=method)
    assert res.success, res.message
    assert res.oracle_calls == ref.oracle_calls and res.nit == ref.nit
    np.testing.assert_allclose(res.grad, ref.grad, rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.y, ref.y, rtol=0, atol=1e-10)
    assert res.fun == pytest.approx(ref.fun, rel=1e-12)


def test_device_inputs_device_output_and_transfers(quadratic):
    q, problem = quadratic
    x = np.linspace(-1.0, 1.0, 3)
    y = q.y_star(x)
    mlo.hypergrad(problem, x, y, lower_solved=True)  # a first call also checks the callbacks
    host = mlo.hypergrad(problem, x, y, lower_solved=True)
    assert host.transfers["h2d"] == 2  # x and y, once each
    xd, yd = cuda.to_device(x), cuda.to_device(y)
    dev = _cuda_hypergrad(problem, xd, yd, lower_solved=True, output="device")
    assert all(is_device_array(a) for a in (dev.grad, dev.y, dev.v))
    assert dev.x is xd
    # no input copied; the same scalar read-backs; the three outputs stay on the device
    assert dev.transfers["h2d"] == 0
    assert dev.transfers["d2h"] == host.transfers["d2h"] - 3
    np.testing.assert_array_equal(dev.grad.copy_to_host(), host.grad)
    np.testing.assert_array_equal(xd.copy_to_host(), x)
    np.testing.assert_array_equal(yd.copy_to_host(), y)


def _cuda_hypergrad(*args, **kw):
    from mlocore.cuda._implicit import hypergrad
    return hypergrad(*args, **kw)


@pytest.mark.parametrize("method", ["gd", "agd"])
def test_solve_lower_first_order_matches_cpu(logistic, method):
    lh, problem = logistic
    x, y = np.full(4, -1.0), np.zeros(4)
    res = mlo.solve_lower(problem, x, y, method=method, tol=1e-6, maxiter=30)
    ref = mlo.solve_lower(lh.problem, x, y, method=method, tol=1e-6, maxiter=30)
    assert (res.status, res.nit) == (ref.status, ref.nit)
    assert res.step == pytest.approx(ref.step, rel=1e-12)
    np.testing.assert_allclose(res.y, ref.y, rtol=0, atol=1e-10)


def test_difference_hvp_without_hvp_callback(quadratic):
    q, _ = quadratic
    problem = DeviceBilevelProblem(DeviceObjective(quad_grad_device, args=q.upper_means),
                                   DeviceObjective(quad_grad_device, args=q.lower_means),
                                   dims=(3, 8))
    x, y = np.linspace(-1.0, 1.0, 3), q.y_star(np.linspace(-1.0, 1.0, 3))
    res = mlo.hypergrad(problem, x, y, lower_solved=True)
    assert res.success and res.oracle_calls["lower_hvp"] == 0
    np.testing.assert_allclose(res.grad, q.hypergrad(x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------
@cuda.jit
def _nan_kernel(out):
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = math.nan


def nan_grad(z, out, *args):
    _nan_kernel[dl.grid_for(out.shape[0]), dl.THREADS_PER_BLOCK](out)


def raising_hvp(z, v, out, *args):
    raise ValueError("bad hvp")


def test_bilevel_errors(quadratic):
    q, problem = quadratic
    x, y = np.zeros(3), np.zeros(8)
    with pytest.raises(ValueError, match=r"x must have shape \(3,\)"):
        mlo.hypergrad(problem, np.zeros(4), y)
    with pytest.raises(TypeError, match="real array"):
        mlo.hypergrad(problem, x.astype(complex), y)
    with pytest.raises(TypeError, match="needs device callbacks"):
        mlo.hypergrad(q.problem, x, y, backend="cuda")
    with pytest.raises(TypeError, match="needs device callbacks"):
        mlo.solve_lower(q.problem, x, y, backend="cuda")
    with pytest.raises(TypeError, match="runs on the CUDA backend only"):
        mlo.hypergrad(problem, x, y, backend="cpu")
    upper = DeviceObjective(quad_grad_device, hvp=quad_hvp_device, args=q.upper_means)
    bad_grad = DeviceBilevelProblem(upper, DeviceObjective(nan_grad, args=q.lower_means),
                                    dims=(3, 8))
    with pytest.raises(CallbackError, match="lower.grad wrote non-finite"):
        mlo.hypergrad(bad_grad, x, y)
    bad_hvp = DeviceBilevelProblem(
        upper, DeviceObjective(quad_grad_device, hvp=raising_hvp, args=q.lower_means),
        dims=(3, 8))
    with pytest.raises(CallbackError, match="lower.hvp raised ValueError: bad hvp"):
        mlo.hypergrad(bad_hvp, x, y)
    with pytest.raises(TypeError, match="DeviceObjective"):
        DeviceBilevelProblem(q.problem.upper, q.problem.lower, dims=(3, 8))
