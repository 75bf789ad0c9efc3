"""How user callbacks are compiled: recompilation, the disk cache, explicit signatures."""
import numpy as np
import pytest
from numba import njit

import mlocore as mlo

from conftest import quad_lower_grad, quad_upper_grad

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


def test_recompiled_callback_is_used_not_its_stale_compilation():
    """y* = 0.1 SCALE: after ``recompile()`` the new global value must be seen."""
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


@njit("float64[:](float64[:], float64[:, :], float64[:, :], float64[:])")
def lower_grad_explicit_signature(z, A, C, a):
    return quad_lower_grad(np.ascontiguousarray(z), np.ascontiguousarray(A),
                           np.ascontiguousarray(C), np.ascontiguousarray(a))


def test_njit_callback_with_explicit_signature_gives_the_closed_form(quad):
    upper = mlo.Objective(quad_upper_grad, args=(quad.t, quad.mu, quad.h))
    lower = mlo.Objective(lower_grad_explicit_signature, args=(quad.A, quad.C, quad.a))
    p = mlo.BilevelProblem(upper, lower, dims=(quad.dx, quad.dy))
    x = np.array([0.3, -1.0, 2.0])
    res = mlo.hypergrad(p, x, np.zeros(quad.dy))
    np.testing.assert_allclose(res.grad, quad.hypergrad(x), rtol=1e-6)


@njit
def tripled_lower_grad(z):
    out = np.empty(2)
    out[0] = 0.0
    out[1] = z[1] - 0.3
    return out


def test_replaced_callback_reaches_the_bound_kernel_entry():
    """Kernel entry points are bound to a problem's callbacks once; replacing a callback
    (y* = 0.1 -> 0.3) must still reach the kernels, for solve_lower and hypergrad."""
    lower = mlo.Objective(scaled_lower_grad)
    p = mlo.BilevelProblem(mlo.Objective(identity_upper_grad), lower, dims=(1, 1))
    x0, y0 = np.zeros(1), np.zeros(1)
    assert mlo.solve_lower(p, x0, y0).y[0] == pytest.approx(0.1)
    assert mlo.hypergrad(p, x0, y0).y[0] == pytest.approx(0.1)
    lower.grad = tripled_lower_grad
    assert mlo.solve_lower(p, x0, y0).y[0] == pytest.approx(0.3)
    assert mlo.hypergrad(p, x0, y0).y[0] == pytest.approx(0.3)


def test_option_types_do_not_change_the_bound_kernel_answer(quad):
    """NumPy scalars for the per-call options (another key of the bound entry) give the
    same hypergradient as Python scalars."""
    p = quad.problem()
    x, y = np.ones(quad.dx), np.zeros(quad.dy)
    ref = mlo.hypergrad(p, x, y, tol=1e-12, maxiter=200)
    other = mlo.hypergrad(p, x, y, tol=np.float64(1e-12), maxiter=np.int64(200),
                          lower_maxiter=np.int32(1000))
    np.testing.assert_array_equal(ref.grad, other.grad)
    np.testing.assert_allclose(ref.grad, quad.hypergrad(x), rtol=1e-9, atol=1e-12)
