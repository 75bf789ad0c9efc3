"""CUDA backend: unrolled differentiation (ITD), the deterministic minimizer and the
data-cleaning device callbacks, against the CPU backend.

Runs under numba's CUDA simulator (tests/conftest.py sets NUMBA_ENABLE_CUDASIM=1), where every
simulated thread is a Python thread: tiny sizes and few steps.
"""
from types import SimpleNamespace

import numpy as np
import pytest
from numba import cuda

import mlocore as mlo
from mlocore.cuda._device import is_device_array
from mlocore.cuda._minimize import minimize_bilevel as cuda_minimize_bilevel
from mlocore.cuda._problem import DeviceBilevelProblem, DeviceObjective
from mlocore.cuda._unrolled import unrolled_hypergrad
from mlocore.problems import cleaning as cl
from mlocore.problems import make_cleaning, make_logistic, make_quadratic
from mlocore.problems.cuda_callbacks import (cleaning_device_problem, logistic_device_problem,
                                             quad_grad_device, quad_hvp_device,
                                             quadratic_device_problem)

pytestmark = pytest.mark.cuda

DX, DY = 2, 4




def _checked(problem, dx, dy):
    """The problem with its callbacks checked once (so later transfer counts are exact)."""
    mlo.solve_lower(problem, np.zeros(dx), np.zeros(dy), maxiter=0)
    return problem


@pytest.fixture(scope="module")
def quadratic():
    q = make_quadratic(dx=DX, dy=DY, seed=0)
    return q, _checked(quadratic_device_problem(q), DX, DY)


def _unchecked_quadratic(q, with_value=True):
    """A fresh device quadratic (callbacks not yet checked); optionally no upper value."""
    if with_value:
        return quadratic_device_problem(q)
    upper = DeviceObjective(quad_grad_device, hvp=quad_hvp_device, args=q.upper_means)
    return DeviceBilevelProblem(upper, quadratic_device_problem(q).lower, dims=(q.dx, q.dy))


def _assert_same_itd(res, ref):
    assert res.status == ref.status == 0, res.message
    assert (res.nit, res.K, res.lower_nit) == (ref.nit, ref.K, ref.lower_nit)
    assert res.oracle_calls == ref.oracle_calls
    assert res.step == pytest.approx(ref.step, rel=1e-13)
    np.testing.assert_allclose(res.grad, ref.grad, rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.y, ref.y, rtol=0, atol=1e-10)
    assert res.fun == pytest.approx(ref.fun, rel=1e-12)
    if res.method == "itd-reverse":
        assert res.jacobian is None
        np.testing.assert_allclose(res.v, ref.v, rtol=0, atol=1e-10)
    else:
        assert res.v is None and res.jacobian.shape == ref.jacobian.shape == (len(res.y),
                                                                              len(res.x))
        np.testing.assert_allclose(res.jacobian, ref.jacobian, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------
# ITD hypergradients
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["itd-reverse", "itd-forward"])
def test_itd_quadratic_matches_cpu_and_counts_transfers(quadratic, method):
    q, problem = quadratic
    x, y = np.linspace(-1.0, 1.0, DX), np.linspace(0.5, -0.5, DY)
    x0, y0 = x.copy(), y.copy()
    res = mlo.hypergrad(problem, x, y, method=method, T=8, K=5)
    ref = mlo.hypergrad(q.problem, x, y, method=method, T=8, K=5)
    _assert_same_itd(res, ref)
    # x and y copied in; read-backs: the power iteration's estimate, the finiteness tests of
    # y_T and of the gradient, then grad, y and v (or the Jacobian)
    aux_bytes = 8 * (DY if method == "itd-reverse" else DX * DY)
    assert res.transfers == {"h2d": 2, "d2h": 6, "h2d_bytes": 8 * (DX + DY),
                             "d2h_bytes": 8 * (3 * 10 + DX + DY) + aux_bytes}
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)


def test_itd_logistic_matches_cpu_both_modes_agree():
    lh = make_logistic(n_train=10, n_val=8, n_features=3, seed=0)
    problem = logistic_device_problem(lh)
    x, y = np.full(3, -1.0), np.zeros(3)
    results = {}
    for method in ("itd-reverse", "itd-forward"):
        res = mlo.hypergrad(problem, x, y, method=method, T=6)
        _assert_same_itd(res, mlo.hypergrad(lh.problem, x, y, method=method, T=6))
        results[method] = res
    # forward and reverse differentiate the same loop (docs/mathematics.md section 2)
    np.testing.assert_allclose(results["itd-reverse"].grad, results["itd-forward"].grad,
                               rtol=0, atol=1e-12)


def test_itd_given_step_device_arrays_and_truncation(quadratic):
    q, problem = quadratic
    x, y = np.linspace(-1.0, 1.0, DX), np.zeros(DY)
    xd, yd = cuda.to_device(x), cuda.to_device(y)
    res = unrolled_hypergrad(problem, xd, yd, "itd-forward", T=4, K=0, step=0.3,
                             output="device")
    ref = mlo.hypergrad(q.problem, x, y, method="itd-forward", T=4, K=0, step=0.3)
    assert all(is_device_array(a) for a in (res.grad, res.y, res.jacobian)) and res.x is xd
    # nothing copied in, no power iteration, no output copied: the two finiteness tests only
    assert res.transfers["h2d"] == 0 and res.transfers["d2h"] == 2
    assert res.step == 0.3 and res.oracle_calls == ref.oracle_calls
    assert res.oracle_calls["lower_hvp"] == 0  # K = 0: nothing differentiated
    np.testing.assert_allclose(res.grad.copy_to_host(), ref.grad, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.y.copy_to_host(), ref.y, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(res.jacobian.copy_to_host(), np.zeros((DY, DX)))
    np.testing.assert_array_equal(xd.copy_to_host(), x)
    np.testing.assert_array_equal(yd.copy_to_host(), y)


@pytest.mark.filterwarnings("ignore:.*overflow:RuntimeWarning",
                            "ignore:.*invalid value:RuntimeWarning")
def test_itd_diverging_inner_loop_reports_nonfinite(quadratic):
    """The simulator's NumPy scalars warn on overflow (a GPU does not); the status does."""
    q, problem = quadratic
    x, y = np.ones(DX), np.ones(DY)
    res = mlo.hypergrad(problem, x, y, method="itd-reverse", T=25, K=1, step=1e150)
    ref = mlo.hypergrad(q.problem, x, y, method="itd-reverse", T=25, K=1, step=1e150)
    assert res.status == ref.status == 2 and not res.success
    assert np.all(np.isnan(res.grad)) and np.all(np.isnan(ref.grad))
    assert not np.all(np.isfinite(res.y))


def test_itd_errors(quadratic):
    q, problem = quadratic
    x, y = np.zeros(DX), np.zeros(DY)
    with pytest.raises(ValueError, match=r"K \(steps differentiated\) must be <= T = 5, got "
                                         "K=6"):
        mlo.hypergrad(problem, x, y, method="itd-reverse", T=5, K=6)
    with pytest.raises(TypeError, match="T"):
        mlo.hypergrad(problem, x, y, method="itd-reverse", T=5.5)
    with pytest.raises(ValueError, match="step"):
        mlo.hypergrad(problem, x, y, method="itd-forward", T=5, step=-1.0)
    with pytest.raises(TypeError, match="v0 does not apply to method='itd-reverse'"):
        mlo.hypergrad(problem, x, y, method="itd-reverse", v0=np.zeros(DY))
    with pytest.raises(TypeError, match="lower_solved does not apply"):
        mlo.hypergrad(problem, x, y, method="itd-forward", lower_solved=True)
    with pytest.raises(ValueError, match=r"y must have shape \(4,\), got shape \(3,\)"):
        mlo.hypergrad(problem, x, np.zeros(3), method="itd-reverse")
    with pytest.raises(ValueError, match="method must be one of"):
        unrolled_hypergrad(problem, x, y, "itd")
    with pytest.raises(TypeError, match="needs device callbacks"):
        unrolled_hypergrad(q.problem, x, y, "itd-reverse", backend="cuda")


# ---------------------------------------------------------------------------------------
# Deterministic minimizer
# ---------------------------------------------------------------------------------------
def test_minimize_aid_matches_cpu_and_reaches_x_star(quadratic):
    q, problem = quadratic
    x0, y0 = np.ones(DX), np.zeros(DY)
    # tol 1e-7: closer to x*, successive trial values of F differ by a few ulps, and the
    # Armijo test's verdict then depends on the last bit of F, which the two backends
    # round differently (the runs would still agree to 1e-10 but not in nfev)
    res = mlo.minimize_bilevel(problem, x0, y0, method="aid", tol=1e-7)
    ref = mlo.minimize_bilevel(q.problem, x0, y0, method="aid", tol=1e-7)
    assert res.success and ref.success, res.message
    assert (res.nit, res.nfev) == (ref.nit, ref.nfev)
    assert res.oracle_calls == ref.oracle_calls
    np.testing.assert_allclose(res.x, ref.x, rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.y, ref.y, rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.v, ref.v, rtol=0, atol=1e-10)
    assert res.fun == pytest.approx(ref.fun, rel=1e-12)
    np.testing.assert_allclose(res.history["grad_norm"], ref.history["grad_norm"], rtol=1e-6,
                               atol=1e-12)
    np.testing.assert_allclose(res.x, q.x_star, rtol=0, atol=1e-6)   # measured 8e-8
    # y0 and each new upper point copied in once (line-search trials included)
    assert res.transfers["h2d"] == 1 + res.nfev
    np.testing.assert_array_equal(x0, np.ones(DX))


def test_minimize_itd_fixed_steps_matches_cpu_exact_transfers(quadratic):
    q, _ = quadratic
    problem = _unchecked_quadratic(q, with_value=False)  # no value: no final lower solve
    up = q.problem.upper
    cpu_problem = mlo.BilevelProblem(mlo.Objective(up.grad, hvp=up.hvp, args=up.args),
                                     q.problem.lower, dims=(DX, DY))
    x0 = np.ones(DX)
    y0 = cuda.to_device(np.zeros(DY))
    seen = []
    res = cuda_minimize_bilevel(problem, x0, y0, method="itd", step=0.2, maxiter=3, tol=0.0,
                                T=6, K=4, inner_step=0.3, output="device",
                                callback=lambda r: seen.append(r.y))
    ref = mlo.minimize_bilevel(cpu_problem, x0, np.zeros(DY), method="itd", step=0.2,
                               maxiter=3, tol=0.0, T=6, K=4, inner_step=0.3)
    assert res.status == ref.status == 10 and res.nit == ref.nit == 3
    assert res.oracle_calls == ref.oracle_calls and res.v is None is ref.v
    # K cross pairs (H_xy a, H_yy a) per hypergradient, from the lower blocks
    assert res.oracle_calls["lower_hvp_xy"] == 4 * (res.nit + 1)
    assert res.oracle_calls["lower_hvp"] == 0
    np.testing.assert_allclose(res.x, ref.x, rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.jac, ref.jac, rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.history["grad_norm"], ref.history["grad_norm"], rtol=0,
                               atol=1e-10)
    assert is_device_array(res.y)
    np.testing.assert_allclose(res.y.copy_to_host(), ref.y, rtol=0, atol=1e-10)
    assert len(seen) == 3 and isinstance(seen[0], np.ndarray)
    # in: one x per iteration (y0 is on the device); out: 4 callback checks, the lower
    # block check (z, its direction, the joint grad and hvp, the 3 blocks: 7 vectors), then
    # per hypergradient two finiteness tests and the gradient, and y for each callback call
    n_dir = res.nit + 1
    assert res.transfers["h2d"] == n_dir
    assert res.transfers["d2h"] == 4 + 7 + 3 * n_dir + len(seen)
    np.testing.assert_array_equal(y0.copy_to_host(), np.zeros(DY))


def test_minimize_alternating_matches_cpu(quadratic):
    q, problem = quadratic
    x0, y0 = np.ones(DX), np.zeros(DY)
    kw = dict(method="alternating", step=0.1, maxiter=2, T=3)
    res = mlo.minimize_bilevel(problem, x0, y0, **kw)
    ref = mlo.minimize_bilevel(q.problem, x0, y0, **kw)
    assert (res.status, res.nit, res.nfev) == (ref.status, ref.nit, ref.nfev)
    assert res.oracle_calls == ref.oracle_calls
    np.testing.assert_allclose(res.x, ref.x, rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.y, ref.y, rtol=0, atol=1e-10)
    assert res.fun == pytest.approx(ref.fun, rel=1e-12)


def test_minimize_routing_and_errors(quadratic):
    q, problem = quadratic
    x0, y0 = np.ones(DX), np.zeros(DY)
    with pytest.raises(ValueError, match="needs the upper objective's value callback"):
        mlo.minimize_bilevel(_unchecked_quadratic(q, with_value=False), x0, y0)
    with pytest.raises(ValueError, match="K must be <= T = 3, got K=4"):
        mlo.minimize_bilevel(problem, x0, y0, method="itd", T=3, K=4)
    with pytest.raises(ValueError, match=r"x0 must have shape"):
        mlo.minimize_bilevel(problem, np.ones(DX + 1), y0)
    with pytest.raises(ValueError, match=r"y0 must have shape \(4,\)"):
        mlo.minimize_bilevel(problem, x0, np.zeros(DY + 1))
    with pytest.raises(TypeError, match="runs on the CUDA backend only"):
        mlo.minimize_bilevel(problem, x0, y0, backend="cpu")
    with pytest.raises(TypeError, match="needs device callbacks"):
        cuda_minimize_bilevel(q.problem, x0, y0, backend="cuda")
    with pytest.raises(ValueError, match="method"):
        cuda_minimize_bilevel(problem, x0, y0, method="bsa")
    with pytest.raises(ValueError, match="output must be"):
        cuda_minimize_bilevel(problem, x0, y0, output="cupy")


# ---------------------------------------------------------------------------------------
# Data cleaning
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cleaning():
    dc = make_cleaning(n_train=8, n_val=6, n_features=2, n_classes=3, seed=0, upper_reg=0.1)
    return dc, cleaning_device_problem(dc)


def test_cleaning_callbacks_match_cpu(cleaning):
    dc, problem = cleaning
    assert problem.transfers["h2d"] == 4 and problem.dims == (dc.dx, dc.dy)
    rng = np.random.default_rng(1)
    n = dc.dx + dc.dy
    z, v = rng.standard_normal(n), rng.standard_normal(n)
    zd, vd, out = cuda.to_device(z), cuda.to_device(v), cuda.device_array(n)
    for level, obj, A, t, ridge in (("lower", problem.lower, dc.A_train, dc.t_train, dc.reg),
                                    ("upper", problem.upper, dc.A_val, dc.t_val,
                                     dc.upper_reg)):
        idx = np.arange(A.shape[0])
        cpu = [getattr(cl, f"cleaning_{level}_{kind}") for kind in ("grad", "hvp", "value")]
        obj.grad(zd, out, *obj.args)
        np.testing.assert_allclose(out.copy_to_host(), cpu[0](z, idx, A, t, 3, ridge),
                                   rtol=0, atol=1e-13)
        obj.hvp(zd, vd, out, *obj.args)
        np.testing.assert_allclose(out.copy_to_host(), cpu[1](z, v, idx, A, t, 3, ridge),
                                   rtol=0, atol=1e-13)
        assert obj.value(zd, *obj.args) == pytest.approx(cpu[2](z, idx, A, t, 3, ridge),
                                                         rel=1e-13)
    np.testing.assert_array_equal(zd.copy_to_host(), z)
    np.testing.assert_array_equal(vd.copy_to_host(), v)


def test_cleaning_hypergrad_matches_cpu(cleaning):
    dc, problem = cleaning
    x, y = np.linspace(-1.0, 1.0, dc.dx), np.zeros(dc.dy)
    res = mlo.hypergrad(problem, x, y, method="cg")
    ref = mlo.hypergrad(dc.problem, x, y, method="cg")
    assert res.success, res.message
    assert (res.nit, res.lower_nit) == (ref.nit, ref.lower_nit)
    assert res.oracle_calls == ref.oracle_calls
    np.testing.assert_allclose(res.grad, ref.grad, rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.y, ref.y, rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.v, ref.v, rtol=0, atol=1e-10)
    assert res.fun == pytest.approx(ref.fun, rel=1e-12)


def test_cleaning_too_many_classes():
    with pytest.raises(ValueError, match="at most 64 classes.*got n_classes=65"):
        cleaning_device_problem(SimpleNamespace(n_classes=65))
