"""Regressions for defects found in review: each test failed before its fix."""
import numpy as np
import pytest
from numba import njit

import mlocore as mlo
from mlocore import linalg
from mlocore.problems.multilevel import (logcosh_quad_grad, logcosh_quad_hvp,
                                         logcosh_quad_tvp, logcosh_quad_value)

from conftest import DenseQuadratic, quad_lower_grad, quad_upper_grad

SCALE = 1.0


@njit
def scaled_lower_grad(z):
    out = np.empty(2)
    out[0] = 0.0
    out[1] = z[1] - SCALE * 0.1
    return out


@njit
def identity_upper_grad(z):
    out = np.zeros(2)
    out[1] = z[1]
    return out


def test_recompiled_callback_is_not_stale():
    global SCALE
    p = mlo.BilevelProblem(mlo.Objective(identity_upper_grad), mlo.Objective(scaled_lower_grad),
                           dims=(1, 1))
    assert mlo.solve_lower(p, np.zeros(1), np.zeros(1)).y[0] == pytest.approx(0.1)
    SCALE = 3.0
    try:
        scaled_lower_grad.recompile()
        assert mlo.solve_lower(p, np.zeros(1), np.zeros(1)).y[0] == pytest.approx(0.3)
    finally:
        SCALE = 1.0
        scaled_lower_grad.recompile()


def test_plain_callbacks_are_not_cached_on_disk():
    """Numba's disk cache ignores globals: a plain function reading one would go stale."""
    from mlocore._callbacks import _jit_plain

    def plain(z):
        return z * SCALE

    assert type(_jit_plain(plain)._cache).__name__ == "NullCache"


def four_level_logcosh():
    rng = np.random.default_rng(1)
    levels = []
    for k in range(4):
        G = rng.standard_normal((3, 4)) * 1.5
        b = rng.standard_normal(3)
        c = rng.uniform(0.5, 1.5, 3)
        P = np.zeros((4, 4))
        P[k, k] = 3.0 if k > 0 else 0.5
        if k > 0:
            P[k, k - 1] = P[k - 1, k] = 0.5
        q = rng.standard_normal(4) * 0.5
        levels.append(mlo.Objective(logcosh_quad_grad, hvp=logcosh_quad_hvp,
                                    value=logcosh_quad_value, tvp=logcosh_quad_tvp,
                                    args=(G, b, c, P, q)))
    return mlo.MultilevelProblem(levels, (1, 1, 1, 1))


def test_truncated_mode_solves_the_same_lower_levels_for_n4():
    p = four_level_logcosh()
    xs = [np.array([0.3]), np.zeros(1), np.zeros(1), np.zeros(1)]
    exact = mlo.hypergrad(p, xs, method="exact", tol=1e-12, lower_tol=1e-11)
    trunc = mlo.hypergrad(p, xs, method="truncated", tol=1e-12, lower_tol=1e-11)
    assert exact.success and trunc.success
    np.testing.assert_allclose(np.concatenate(trunc.xs), np.concatenate(exact.xs), atol=1e-8)
    assert trunc.fun == pytest.approx(exact.fun, rel=1e-10)

    def F(v):
        return mlo.hypergrad(p, [np.array([v]), np.zeros(1), np.zeros(1), np.zeros(1)],
                             method="exact", tol=1e-12, lower_tol=1e-11).fun

    h = 1e-4
    fd = (F(0.3 + h) - F(0.3 - h)) / (2 * h)
    assert exact.grad[0] == pytest.approx(fd, rel=1e-5)  # exact mode: n = 4, FD curvature


def test_solve_direct_rejects_nan():
    A = np.eye(3)
    A[1, 1] = np.nan
    x, info = linalg.solve_direct(lambda p, M: M @ p, np.ones(3), args=(A,))
    assert info == -1


def test_multilevel_lower_maxiter_with_fixed_step_keeps_x_finite():
    p = four_level_logcosh()
    res = mlo.minimize_multilevel(p, [np.array([0.3]), np.zeros(1), np.zeros(1), np.zeros(1)],
                                  step=0.1, lower_maxiter=1, lower_tol=1e-14)
    assert not res.success and res.status == 1
    assert np.all(np.isfinite(res.x)) and "level" in res.message


def test_objective_args_are_read_only():
    obj = mlo.Objective(quad_upper_grad, args=(np.ones(2), 0.1, np.ones(1)))
    with pytest.raises(AttributeError, match="new Objective"):
        obj.args = (np.zeros(2), 0.1, np.ones(1))


def test_bounds_parsing():
    q = DenseQuadratic(dx=2, dy=3)
    p = q.problem(bounds=[(0.0, 1.0), (-2.0, 3.0)])
    np.testing.assert_array_equal(p.lb, [0.0, -2.0])
    np.testing.assert_array_equal(p.ub, [1.0, 3.0])
    p = q.problem(bounds=(-1.0, None))
    np.testing.assert_array_equal(p.lb, [-1.0, -1.0])
    assert np.all(np.isinf(p.ub))
    with pytest.raises(ValueError, match="infeasible"):
        q.problem(bounds=(np.inf, np.inf))
    with pytest.raises(ValueError, match="length 2"):
        q.problem(bounds=(np.zeros(3), np.ones(3)))


def test_lower_tolerance_is_scale_invariant():
    q = DenseQuadratic(seed=4)
    big = DenseQuadratic(seed=4)
    big.A, big.C, big.a = 1e7 * q.A, 1e7 * q.C, 1e7 * q.a  # same y*(x), F and grad F
    x = np.array([0.3, -1.0, 2.0])
    res = mlo.hypergrad(big.problem(), x, np.zeros(6), method="cg")
    assert res.success, res.message
    np.testing.assert_allclose(res.grad, q.hypergrad(x), rtol=1e-7)


@njit("float64[:](float64[:], float64[:, :], float64[:, :], float64[:])")
def lower_grad_explicit_signature(z, A, C, a):
    return quad_lower_grad(np.ascontiguousarray(z), np.ascontiguousarray(A),
                           np.ascontiguousarray(C), np.ascontiguousarray(a))


def test_explicit_signature_njit_callback(quad):
    upper = mlo.Objective(quad_upper_grad, args=(quad.t, quad.mu, quad.h))
    lower = mlo.Objective(lower_grad_explicit_signature, args=(quad.A, quad.C, quad.a))
    p = mlo.BilevelProblem(upper, lower, dims=(quad.dx, quad.dy))
    x = np.array([0.3, -1.0, 2.0])
    res = mlo.hypergrad(p, x, np.zeros(quad.dy))
    np.testing.assert_allclose(res.grad, quad.hypergrad(x), rtol=1e-6)


def test_linalg_args_as_list():
    A = np.diag([1.0, 2.0, 4.0])
    x, info = linalg.cg(lambda p, M: M @ p, np.ones(3), args=[A], rtol=1e-12)
    assert info == 0
    np.testing.assert_allclose(x, [1.0, 0.5, 0.25])
