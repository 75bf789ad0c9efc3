"""Block oracles (``grad_x``, ``grad_y``, ``hvp_yy``, ``hvp_xy``): the same results as the
joint callbacks on every bilevel problem of the library, exact per-block counts, and clear
errors for block callbacks that return the wrong shape or disagree with the joint ones."""
import numpy as np
import pytest
from numba import njit

import mlocore as mlo
from mlocore import CallbackError
from mlocore.problems import make_cleaning, make_logistic, make_quadratic
from mlocore.problems.quadratic import quad_grad, quad_hvp, quad_hvp_xy, quad_hvp_yy, quad_value
from oracle_helpers import joint_only


def _library():
    quad = make_quadratic(dx=3, dy=5, seed=1)
    logi = make_logistic(n_train=40, n_val=30, n_features=4, seed=2)
    clean = make_cleaning(n_train=12, n_val=8, n_features=3, n_classes=3, seed=3)
    rng = np.random.default_rng(0)
    return {"quadratic": (quad.problem, rng.normal(size=3), rng.normal(size=5)),
            "logistic": (logi.problem, rng.uniform(-1, 0, 4), 0.1 * rng.normal(size=4)),
            "cleaning": (clean.problem, rng.normal(size=12), 0.1 * rng.normal(size=12))}


LIBRARY = _library()
ROUNDOFF = 1e-9  # relative: the same products computed in another order


def _close(a, b, rtol=ROUNDOFF):
    return np.linalg.norm(a - b) <= rtol * (1.0 + np.linalg.norm(b))


@pytest.fixture(scope="module", params=sorted(LIBRARY))
def case(request):
    problem, x, y = LIBRARY[request.param]
    assert problem.lower.blocks, "library problems give block oracles"
    return problem, joint_only(problem), x, y


@pytest.mark.parametrize("method", ["cg", "direct", "neumann"])
def test_implicit_blocks_match_joint(case, method):
    blk, jnt, x, y = case
    kw = dict(method=method, tol=1e-12, lower_tol=1e-12)
    rb, rj = mlo.hypergrad(blk, x, y, **kw), mlo.hypergrad(jnt, x, y, **kw)
    assert rb.success and rj.success, (rb.message, rj.message)
    assert _close(rb.grad, rj.grad, 1e-8)
    assert _close(rb.y, rj.y, 1e-8)
    cb, cj = rb.oracle_calls, rj.oracle_calls
    # the block run never calls the joint lower callbacks, and calls hvp_xy exactly once
    assert cb["lower_hvp"] == 0 and cb["lower_grad"] == 0
    assert cb["lower_hvp_xy"] == 1
    assert cj["lower_hvp_yy"] == cj["lower_hvp_xy"] == cj["lower_grad_y"] == 0


def test_linear_solve_counts_are_exact(case):
    """With the lower level given as solved, CG calls hvp_yy once per matrix-vector product
    and hvp_xy once; the joint run makes the same number of joint products."""
    blk, jnt, x, y = case
    ys = mlo.solve_lower(jnt, x, y, tol=1e-12).y
    rb = mlo.hypergrad(blk, x, ys, method="cg", lower_solved=True, tol=1e-12)
    rj = mlo.hypergrad(jnt, x, ys, method="cg", lower_solved=True, tol=1e-12)
    assert rb.nit == rj.nit
    assert rb.oracle_calls["lower_hvp_yy"] + 1 == rj.oracle_calls["lower_hvp"]
    assert rb.oracle_calls["lower_hvp_xy"] == 1
    assert rb.nhvp == rj.nhvp and rb.ngrad == rj.ngrad


@pytest.mark.parametrize("method", ["newton-cg", "agd", "gd"])
def test_solve_lower_blocks_match_joint(case, method):
    blk, jnt, x, y = case
    kw = dict(method=method, tol=1e-9, maxiter=20000)
    rb, rj = mlo.solve_lower(blk, x, y, **kw), mlo.solve_lower(jnt, x, y, **kw)
    assert rb.success and rj.success
    assert rb.nit == rj.nit
    assert _close(rb.y, rj.y, 1e-7)
    assert rb.oracle_calls["lower_grad"] == 0 and rb.oracle_calls["lower_hvp"] == 0
    assert rb.oracle_calls["lower_grad_y"] == rj.oracle_calls["lower_grad"]
    assert rb.oracle_calls["lower_hvp_yy"] == rj.oracle_calls["lower_hvp"]


@pytest.mark.parametrize("method", ["itd-reverse", "itd-forward"])
def test_unrolled_blocks_match_joint(case, method):
    blk, jnt, x, y = case
    kw = dict(method=method, T=15, K=10)
    rb, rj = mlo.hypergrad(blk, x, y, **kw), mlo.hypergrad(jnt, x, y, **kw)
    assert rb.success and rj.success
    assert rb.step == pytest.approx(rj.step, rel=1e-10)
    assert _close(rb.grad, rj.grad)
    assert _close(rb.y, rj.y)
    cb = rb.oracle_calls
    assert cb["lower_grad"] == 0 and cb["lower_grad_y"] == 15
    if method == "itd-reverse":  # one (H_xy a, H_yy a) pair per differentiated step
        assert cb["lower_hvp_xy"] == 10 and cb["lower_hvp"] == 0
    else:  # forward mode needs H_yx e_j: joint products, dx per differentiated step
        assert cb["lower_hvp"] == 10 * x.shape[0]


def test_minimize_blocks_match_joint():
    blk, x, y = LIBRARY["quadratic"]
    jnt = joint_only(blk)
    kw = dict(method="aid", maxiter=15, tol=1e-12)
    rb, rj = mlo.minimize_bilevel(blk, x, y, **kw), mlo.minimize_bilevel(jnt, x, y, **kw)
    assert rb.nit == rj.nit
    assert _close(rb.x, rj.x, 1e-7)


# -- errors ------------------------------------------------------------------------------
@njit(cache=True)
def _hvp_yy_wrong_shape(z, v, A, B, C, a, b):
    return (A @ v)[:-1]


@njit(cache=True)
def _hvp_xy_wrong_values(z, v, A, B, C, a, b):
    return 2.0 * (C @ v)


@njit(cache=True)
def _grad_y_wrong(z, A, B, C, a, b):
    dx = B.shape[0]
    return A @ z[dx:] + a


def _quad_with(**blocks):
    quad = make_quadratic(dx=3, dy=5, seed=1)
    lower = mlo.Objective(quad_grad, hvp=quad_hvp, value=quad_value, args=quad.lower_means,
                          **blocks)
    upper = mlo.Objective(quad_grad, value=quad_value, args=quad.upper_means)
    return mlo.BilevelProblem(upper, lower, (3, 5)), np.ones(3), np.zeros(5)


def test_block_with_wrong_shape_is_named():
    p, x, y = _quad_with(hvp_yy=_hvp_yy_wrong_shape)
    with pytest.raises(CallbackError, match=r"lower\.hvp_yy returned shape \(4,\); expected "
                                            r"\(5,\)"):
        mlo.hypergrad(p, x, y)


def test_block_that_disagrees_is_named():
    p, x, y = _quad_with(hvp_xy=_hvp_xy_wrong_values)
    with pytest.raises(CallbackError, match=r"lower\.hvp_xy disagrees with the joint"):
        mlo.hypergrad(p, x, y)
    p, x, y = _quad_with(grad_y=_grad_y_wrong)
    with pytest.raises(CallbackError, match=r"lower\.grad_y disagrees"):
        mlo.solve_lower(p, x, y)


def test_blocks_checked_against_differences_without_hvp():
    quad = make_quadratic(dx=3, dy=5, seed=1)
    good = mlo.Objective(quad_grad, args=quad.lower_means, hvp_yy=quad_hvp_yy,
                         hvp_xy=quad_hvp_xy)
    upper = mlo.Objective(quad_grad, value=quad_value, args=quad.upper_means)
    p = mlo.BilevelProblem(upper, good, (3, 5))
    res = mlo.hypergrad(p, np.ones(3), np.zeros(5), tol=1e-12)
    assert np.allclose(res.grad, quad.hypergrad(np.ones(3)), rtol=1e-8, atol=1e-10)
    assert res.oracle_calls["lower_hvp"] == 0  # no difference quotients either
    bad = mlo.Objective(quad_grad, args=quad.lower_means, hvp_xy=_hvp_xy_wrong_values)
    with pytest.raises(CallbackError, match="by central differences of grad"):
        mlo.hypergrad(mlo.BilevelProblem(upper, bad, (3, 5)), np.ones(3), np.zeros(5))


def test_changed_block_is_checked_again():
    p, x, y = _quad_with(hvp_yy=quad_hvp_yy)
    assert mlo.hypergrad(p, x, y).success
    p.lower.hvp_yy = _hvp_yy_wrong_shape
    with pytest.raises(CallbackError, match=r"lower\.hvp_yy returned shape"):
        mlo.hypergrad(p, x, y)


def test_multilevel_rejects_block_oracles():
    quad = make_quadratic(dx=3, dy=5, seed=1)
    lev = mlo.Objective(quad_grad, hvp=quad_hvp, value=quad_value, args=quad.lower_means,
                        hvp_yy=quad_hvp_yy)
    top = mlo.Objective(quad_grad, hvp=quad_hvp, value=quad_value, args=quad.upper_means)
    p = mlo.MultilevelProblem([top, lev], (3, 5))
    with pytest.raises(ValueError, match="block oracles"):
        mlo.hypergrad(p, [np.ones(3), np.zeros(5)])


def test_non_callable_block_is_a_type_error():
    with pytest.raises(TypeError, match="hvp_yy must be callable"):
        mlo.Objective(quad_grad, hvp_yy=3.0)
