"""Outer loops of the deterministic drivers (``outer=``): the L-BFGS default reaches the
closed-form optima of quadratic bilevel and n-level problems, with and without active
bounds; validation, maxiter and line-search statuses."""
import numpy as np
import pytest
import scipy.optimize as so

import mlocore as mlo
from mlocore import _descent
from mlocore.problems import make_nlevel_quadratic, make_quadratic

# (dx, dy, ridge, seed): ridge sets the conditioning of the lower level and of F
SIZES = [(3, 5, 0.1, 0), (6, 10, 0.02, 1), (10, 15, 0.05, 2)]


def rel_err(x, ref):
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def box_qp(Q, r, lb, ub):
    """argmin 1/2 x^T Q x + r^T x on [lb, ub]: L-BFGS-B on the closed form, then the active
    set's reduced system solved exactly (and checked with the KKT conditions)."""
    fun = lambda x: (0.5 * x @ Q @ x + r @ x, Q @ x + r)
    res = so.minimize(fun, np.zeros(len(r)), jac=True, method="L-BFGS-B",
                      bounds=list(zip(lb, ub)), options={"gtol": 1e-14, "ftol": 0.0,
                                                        "maxiter": 10_000})
    x = np.clip(res.x, lb, ub)
    g = Q @ x + r
    active = ((x <= lb + 1e-9) & (g > 0)) | ((x >= ub - 1e-9) & (g < 0))
    x[active] = np.where(g[active] > 0, lb[active], ub[active])
    free = ~active
    x[free] = np.linalg.solve(Q[np.ix_(free, free)], -(r[free] + Q[np.ix_(free, active)]
                                                        @ x[active]))
    g = Q @ x + r
    assert np.all(x >= lb - 1e-12) and np.all(x <= ub + 1e-12)
    np.testing.assert_allclose(x - np.clip(x - g, lb, ub), 0.0, atol=1e-10)
    return x, active


@pytest.mark.parametrize("dx, dy, ridge, seed", SIZES)
def test_aid_lbfgs_reaches_closed_form(dx, dy, ridge, seed):
    q = make_quadratic(dx=dx, dy=dy, ridge=ridge, seed=seed)
    res = mlo.minimize_bilevel(q.problem, np.zeros(dx), np.zeros(dy), method="aid",
                               tol=1e-10)
    assert res.success and res.status == 0, res.message
    assert res.nit <= 100
    assert rel_err(res.x, q.x_star) <= 1e-8
    assert res.fun == pytest.approx(q.F_star, rel=1e-12, abs=1e-12)


def test_lbfgs_needs_fewer_iterations_than_bb():
    """The issue's case: BB stops at maxiter short of tol=1e-10, L-BFGS converges."""
    q = make_quadratic(dx=20, dy=30, seed=1)
    x0, y0 = np.zeros(20), np.zeros(30)
    lb = mlo.minimize_bilevel(q.problem, x0, y0, method="aid", tol=1e-10)
    bb = mlo.minimize_bilevel(q.problem, x0, y0, method="aid", tol=1e-10, outer="bb")
    assert lb.success and lb.nit < 60 and rel_err(lb.x, q.x_star) <= 1e-8
    assert not bb.success and bb.status == 10 and bb.nit == 100


@pytest.mark.parametrize("dx, dy, ridge, seed", SIZES)
def test_aid_lbfgs_with_active_bounds(dx, dy, ridge, seed):
    q = make_quadratic(dx=dx, dy=dy, ridge=ridge, seed=seed)
    c = 0.5 * np.median(np.abs(q.x_star))  # cuts about half of the components
    lb, ub = np.full(dx, -c), np.full(dx, c)
    ref, active = box_qp(q.Q, q.r, lb, ub)
    assert active.any()
    p = mlo.BilevelProblem(q.problem.upper, q.problem.lower, dims=(dx, dy),
                           bounds=(lb, ub))
    res = mlo.minimize_bilevel(p, np.zeros(dx), np.zeros(dy), method="aid", tol=1e-10)
    assert res.success, res.message
    assert res.nit <= 100
    assert np.all(res.x >= lb) and np.all(res.x <= ub)
    assert rel_err(res.x, ref) <= 1e-8


@pytest.mark.parametrize("dx, dy, ridge, seed", SIZES[:2])
def test_itd_lbfgs_reaches_closed_form(dx, dy, ridge, seed):
    """T = 200 unrolled steps: the unrolled hypergradient is exact to well below tol."""
    q = make_quadratic(dx=dx, dy=dy, ridge=ridge, seed=seed)
    res = mlo.minimize_bilevel(q.problem, np.zeros(dx), np.zeros(dy), method="itd",
                               T=200, tol=1e-9)
    assert res.success, res.message
    assert res.nit <= 100
    assert rel_err(res.x, q.x_star) <= 1e-8


@pytest.mark.parametrize("n, dims", [(3, (3, 4, 5)), (4, (2, 3, 3, 4))])
def test_multilevel_lbfgs_reaches_closed_form(n, dims):
    q = make_nlevel_quadratic(n=n, dims=dims, seed=n)
    res = mlo.minimize_multilevel(q.problem, [np.zeros(d) for d in dims], method="exact",
                                  tol=1e-10)
    assert res.success, res.message
    assert res.nit <= 100
    assert rel_err(res.x, q.x_star) <= 1e-8


@pytest.mark.parametrize("outer", ["bb", "gd"])
def test_other_outer_loops_still_descend(outer):
    q = make_quadratic(dx=3, dy=5, seed=0)
    res = mlo.minimize_bilevel(q.problem, np.zeros(3), np.zeros(5), tol=1e-6, maxiter=500,
                               outer=outer)
    assert res.success, res.message
    assert np.all(np.diff(res.history["fun"]) <= 1e-12 * abs(q.F_star))
    assert rel_err(res.x, q.x_star) <= 1e-5


def test_outer_validation():
    q = make_quadratic(dx=3, dy=5, seed=0)
    with pytest.raises(ValueError, match="unknown outer 'newton'; expected one of 'lbfgs', "
                                         "'bb', 'gd'"):
        mlo.minimize_bilevel(q.problem, np.zeros(3), np.zeros(5), outer="newton")
    nq = make_nlevel_quadratic(n=3, dims=(2, 2, 2), seed=0)
    with pytest.raises(ValueError, match="unknown outer"):
        mlo.minimize_multilevel(nq.problem, [np.zeros(2)] * 3, outer="BFGS")


def test_maxiter_status_and_message():
    q = make_quadratic(dx=10, dy=15, seed=2)
    res = mlo.minimize_bilevel(q.problem, np.zeros(10), np.zeros(15), tol=1e-10, maxiter=3)
    assert not res.success and res.status == 10 and res.nit == 3
    assert res.message.startswith("Maximum number of iterations reached")
    assert len(res.history["grad_norm"]) == 4
    # F at the returned x, lower level solved there
    assert res.fun == pytest.approx(q.F(res.x), rel=1e-10)


def test_line_search_failure_status():
    """F fails at every trial point: no step is accepted (status 11, success False) after
    the 40 halvings of the first search."""
    q = make_quadratic(dx=3, dy=5, seed=0)
    x0 = np.ones(3)
    calls = []

    def F_eval(x):
        calls.append(x)
        return (q.F(x) if np.array_equal(x, x0) else np.inf), None, 0, ""

    def direction(x):
        return q.hypergrad(x), 0, "", q.F(x)

    x, fun, grad, nit, status, _, _ = _descent.descent_loop(
        lambda z: z.copy(), x0, direction, F_eval, lambda s: None, None, 10, 1e-10,
        None, dict, outer="lbfgs")
    assert status == 11 and nit == 0 and np.array_equal(x, x0)
    assert len(calls) == 1 + _descent._MAX_BACKTRACK
    assert mlo._results.status_message(11).startswith("The line search on F found no")


def test_skips_pairs_without_curvature():
    st = _descent._LBFGS(lambda z: z.copy(), None, None)
    st.add_pair(np.array([1.0, 0.0]), np.array([-1.0, 0.0]))  # s^T y < 0: skipped
    st.add_pair(np.array([0.0, 1.0]), np.array([0.0, 2.0]))
    d, scale = st._direction(np.array([1.0, 1.0]), np.array([True, True]), 1.0)
    assert scale == pytest.approx(0.5)
    np.testing.assert_allclose(d, [-0.5, -0.5])
