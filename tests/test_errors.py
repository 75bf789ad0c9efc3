"""Bad input gets a clear error; failing solvers give success=False and a message."""
import numpy as np
import pytest
from numba import njit
from scipy.special import expit

import mlocore as mlo
from mlocore import CallbackError
from mlocore._validation import as_vector

from conftest import (DenseQuadratic, quad_lower_grad, quad_lower_hvp, quad_upper_grad,
                      quad_upper_value)


@njit(cache=True)
def grad_raises(z, A, C, a):
    if z[0] > 100.0:
        raise ValueError("x too large for this model")
    return quad_lower_grad(z, A, C, a)


@njit(cache=True)
def grad_wrong_shape(z, A, C, a):
    return quad_lower_grad(z, A, C, a)[1:]


@njit(cache=True)
def grad_nan_far(z, A, C, a):
    g = quad_lower_grad(z, A, C, a)
    if z[0] > 10.0:
        g[-1] = np.nan  # in the y-block, which the lower solver uses
    return g


@njit(cache=True)
def grad_returns_int(z, A, C, a):
    return np.zeros(z.shape[0], dtype=np.int64)


def not_compilable(z, A, C, a):
    return expit(quad_lower_grad(z, A, C, a))  # a scipy function: Numba cannot compile it


def make(q, lower_grad=quad_lower_grad, lower_hvp=quad_lower_hvp):
    upper = mlo.Objective(quad_upper_grad, value=quad_upper_value, args=(q.t, q.mu, q.h))
    lower = mlo.Objective(lower_grad, hvp=lower_hvp, args=(q.A, q.C, q.a))
    return mlo.BilevelProblem(upper, lower, dims=(q.dx, q.dy))


@pytest.fixture(scope="module")
def q():
    return DenseQuadratic()


@pytest.mark.parametrize("x, y, exc, match", [
    (np.zeros(4), np.zeros(6), ValueError, r"x must have shape \(3,\)"),
    (np.zeros(3), np.zeros(5), ValueError, r"y must have shape \(6,\)"),
    (np.zeros((3, 1)), np.zeros(6), ValueError, "1-D"),
    (np.array([0.0, np.nan, 0.0]), np.zeros(6), ValueError, "finite"),
    (np.zeros(3), np.full(6, np.inf), ValueError, "finite"),
    (np.zeros(3, dtype=complex), np.zeros(6), TypeError, "dtype=complex"),
    (np.array(["a", "b", "c"]), np.zeros(6), TypeError, "dtype"),
])
def test_bad_arrays(q, quad_problem, x, y, exc, match):
    with pytest.raises(exc, match=match):
        mlo.hypergrad(quad_problem, x, y)


def test_integer_arrays_are_accepted(q, quad_problem):
    res = mlo.hypergrad(quad_problem, np.array([1, 0, 0]), np.zeros(6, dtype=np.int32))
    np.testing.assert_allclose(res.grad, q.hypergrad(np.array([1.0, 0, 0])), rtol=1e-8)


@pytest.mark.parametrize("bad, first, n_bad", [((np.inf, -np.inf), 1, 2), ((1.0, np.nan), 4, 1)])
@pytest.mark.parametrize("size", [6, 100])  # the small-array and the BLAS finiteness test
def test_non_finite_entries_are_refused(bad, first, n_bad, size):
    y = np.ones(size)
    y[[1, 4]] = bad  # inf - inf: a NaN sum; 1 + NaN: a NaN sum
    with pytest.raises(ValueError, match=f"y must be finite.*at index {first} .{n_bad} non-fin"):
        as_vector("y", y, size)


@pytest.mark.parametrize("size", [6, 100])
def test_finite_entries_whose_sum_overflows_are_accepted(size):
    y = np.full(size, 1e308)
    out = as_vector("y", y, size)
    np.testing.assert_array_equal(out, y)
    assert out is not y and out.flags.c_contiguous and out.flags.writeable


def test_arrays_from_compiled_code_and_other_byte_orders_are_accepted(q, quad_problem):
    y = mlo.solve_lower(quad_problem, np.zeros(3), np.zeros(6)).y  # a dtype made by Numba
    swapped = y.astype(y.dtype.newbyteorder(">"))
    ref = mlo.hypergrad(quad_problem, np.zeros(3), y, lower_solved=True)
    res = mlo.hypergrad(quad_problem, np.zeros(3), swapped, lower_solved=True)
    np.testing.assert_array_equal(res.grad, ref.grad)
    assert res.y.dtype.byteorder in "=|" and res.y is not swapped


def test_validated_options_are_memoized_by_type(quad_problem):
    """A memo hit must not let through a value of another type that compares equal."""
    x, y = np.zeros(3), np.zeros(6)
    mlo.hypergrad(quad_problem, x, y, tol=1, maxiter=5)  # valid: memoized
    with pytest.raises(TypeError, match="tol must be a real number, got True"):
        mlo.hypergrad(quad_problem, x, y, tol=True, maxiter=5)
    with pytest.raises(TypeError, match="maxiter must be an integer, got 5.0"):
        mlo.hypergrad(quad_problem, x, y, tol=1, maxiter=5.0)


def test_bad_options(quad_problem):
    x, y = np.zeros(3), np.zeros(6)
    with pytest.raises(ValueError, match="unknown method 'newton'"):
        mlo.hypergrad(quad_problem, x, y, method="newton")
    with pytest.raises(ValueError, match="tol"):
        mlo.hypergrad(quad_problem, x, y, tol=-1.0)
    with pytest.raises(ValueError, match="K"):
        mlo.hypergrad(quad_problem, x, y, method="itd-reverse", T=5, K=6)
    with pytest.raises(TypeError, match="T must be an integer"):
        mlo.hypergrad(quad_problem, x, y, method="itd-reverse", T=5.5)
    with pytest.raises(ValueError, match="lower_method"):
        mlo.hypergrad(quad_problem, x, y, lower_method="bfgs")
    with pytest.raises(TypeError, match="BilevelProblem"):
        mlo.hypergrad("problem", x, y)


def test_bad_problem_definitions(q):
    up = mlo.Objective(quad_upper_grad, args=(q.t, q.mu, q.h))
    with pytest.raises(TypeError, match="callable"):
        mlo.Objective(grad=3)
    with pytest.raises(ValueError, match="dims"):
        mlo.BilevelProblem(up, up, dims=(3,))
    with pytest.raises(ValueError, match="positive"):
        mlo.BilevelProblem(up, up, dims=(0, 3))
    with pytest.raises(ValueError, match="either bounds or project"):
        mlo.BilevelProblem(up, up, dims=(3, 6), bounds=(0, 1), project=lambda x: x)
    with pytest.raises(ValueError, match="lo <= hi"):
        mlo.BilevelProblem(up, up, dims=(3, 6), bounds=(1, 0))
    with pytest.raises(ValueError, match="n_samples"):
        mlo.Objective(quad_upper_grad, n_samples=0)


def test_callback_that_raises(q):
    p = make(q, lower_grad=grad_raises)
    with pytest.raises(CallbackError, match="lower.grad raised ValueError"):
        mlo.hypergrad(p, np.array([200.0, 0, 0]), np.zeros(6))
    # raised inside the compiled loop: the user's exception propagates unchanged
    p2 = make(q, lower_grad=grad_raises)
    mlo.hypergrad(p2, np.zeros(3), np.zeros(6))  # checks pass at a good point
    with pytest.raises(ValueError, match="x too large"):
        mlo.hypergrad(p2, np.array([200.0, 0, 0]), np.zeros(6))


def test_callback_wrong_shape(q):
    with pytest.raises(CallbackError, match=r"lower.grad returned shape \(8,\); expected \(9,\)"):
        mlo.hypergrad(make(q, lower_grad=grad_wrong_shape), np.zeros(3), np.zeros(6))


def test_callback_wrong_return_type(q):
    with pytest.raises(CallbackError, match="must return a 1-D float64 array.*int64"):
        mlo.hypergrad(make(q, lower_grad=grad_returns_int), np.zeros(3), np.zeros(6))


def test_callback_numba_cannot_compile(q):
    with pytest.raises(CallbackError) as info:
        mlo.hypergrad(make(q, lower_grad=not_compilable), np.zeros(3), np.zeros(6))
    msg = str(info.value)
    assert "not_compilable" in msg and "lower.grad" in msg and "Numba says" in msg


def test_nan_inside_the_loop_is_reported(q):
    p = make(q, lower_grad=grad_nan_far)
    mlo.hypergrad(p, np.zeros(3), np.zeros(6))
    res = mlo.hypergrad(p, np.array([20.0, 0, 0]), np.zeros(6))
    assert not res.success and res.status == 2
    assert "non-finite" in res.message


def test_nan_at_initial_point_is_a_clear_error(q):
    p = make(q, lower_grad=grad_nan_far)
    with pytest.raises(CallbackError, match="non-finite"):
        mlo.hypergrad(p, np.array([20.0, 0, 0]), np.zeros(6))


@pytest.mark.parametrize("method", ["cg", "neumann", "direct"])
def test_indefinite_lower_hessian_stops_the_lower_solve(method):
    q = DenseQuadratic(eigs=[1.0, 2.0, -1.0, 3.0, 4.0, 5.0])
    res = mlo.hypergrad(q.problem(), np.zeros(3), np.zeros(6), method=method)
    assert not res.success and res.status == 3
    assert "H_yy is not positive definite" in res.message


@pytest.mark.parametrize("method, detail", [
    ("cg", "negative curvature p^T A p < 0"),
    ("neumann", "diverged: the Neumann step eta is too large"),
    ("direct", "Cholesky failed"),
])
def test_indefinite_lower_hessian_fails_the_linear_solve(method, detail):
    """Given y (no lower solve), the linear solver itself must detect it, each in its way."""
    q = DenseQuadratic(eigs=[1.0, 2.0, -1.0, 3.0, 4.0, 5.0])
    res = mlo.hypergrad(q.problem(), np.zeros(3), np.zeros(6), method=method,
                        lower_solved=True)
    assert not res.success and res.status == 5
    assert f"Linear solve ({method}): {detail}" in res.message


def test_non_convergence_is_reported(q, quad_problem):
    res = mlo.hypergrad(quad_problem, np.ones(3), np.zeros(6), lower_method="gd",
                        lower_maxiter=2)
    assert not res.success and res.status == 1 and "maxiter" in res.message
    assert np.all(np.isfinite(res.grad))  # an answer from the inexact y, flagged
    res = mlo.hypergrad(quad_problem, np.ones(3), np.zeros(6), maxiter=0)
    assert not res.success and "maxiter" in res.message
    res = mlo.solve_lower(quad_problem, np.ones(3), np.zeros(6), maxiter=0)
    assert not res.success and res.nit == 0


def test_divergent_inner_step_is_reported(q, quad_problem):
    res = mlo.hypergrad(quad_problem, np.ones(3), np.zeros(6), method="itd-reverse", T=500,
                        step=1.0)  # beta > 2 / lambda_max = 0.1
    assert not res.success and res.status == 2
    assert "step size is too large" in res.message


def test_options_a_method_would_ignore_are_rejected(quad_problem):
    x, y = np.zeros(3), np.zeros(6)
    with pytest.raises(TypeError, match="v0 does not apply to method='itd-reverse'"):
        mlo.hypergrad(quad_problem, x, y, method="itd-reverse", v0=np.zeros(6))
    with pytest.raises(TypeError, match="K does not apply"):
        mlo.hypergrad(quad_problem, x, y, method="cg", K=3)
    with pytest.raises(TypeError, match="eta"):
        mlo.hypergrad(quad_problem, x, y, method="cg", eta=0.1)
    ml = mlo.MultilevelProblem([quad_problem.upper, quad_problem.lower], dims=(3, 6))
    with pytest.raises(TypeError, match="maxiter"):
        mlo.hypergrad(ml, [x, y], maxiter=10)


def test_objective_args_are_read_only():
    obj = mlo.Objective(quad_upper_grad, args=(np.ones(2), 0.1, np.ones(1)))
    with pytest.raises(AttributeError, match="new Objective"):
        obj.args = (np.zeros(2), 0.1, np.ones(1))


def test_infeasible_or_wrong_length_bounds_are_rejected():
    q = DenseQuadratic(dx=2, dy=3)
    with pytest.raises(ValueError, match="infeasible"):
        q.problem(bounds=(np.inf, np.inf))
    with pytest.raises(ValueError, match="length 2"):
        q.problem(bounds=(np.zeros(3), np.ones(3)))
