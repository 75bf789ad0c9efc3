"""Outer loops of the deterministic drivers (``outer=``): the L-BFGS default reaches the
closed-form optima of quadratic bilevel and n-level problems, with and without active
bounds; validation; the statuses of scipy's conventions (maxiter, line-search failure,
inner solve failures); the reuse of the line search's lower solves."""
import numpy as np
import pytest
import scipy.optimize as so
from numba import njit

import mlocore as mlo
from mlocore import _descent
from mlocore._results import STATUS_MESSAGES
from mlocore.problems import make_nlevel_quadratic, make_quadratic
from mlocore.problems.quadratic import quad_value

from conftest import DenseQuadratic

# (dx, dy, ridge, seed): ridge sets the conditioning of the lower level and of F
# (make_quadratic raises it until both are well enough conditioned); cond(Hess F) is
# 2.2, 36, 21, 962 and 405
SIZES = [(3, 5, 0.1, 0), (6, 10, 0.02, 1), (10, 15, 0.05, 2), (5, 8, 0.0, 7),
         (8, 12, 0.0, 5)]


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


def test_sizes_span_conditionings():
    conds = []
    for dx, dy, ridge, seed in SIZES:
        ev = np.linalg.eigvalsh(make_quadratic(dx=dx, dy=dy, ridge=ridge, seed=seed).Q)
        conds.append(ev[-1] / ev[0])
    assert min(conds) < 5 and max(conds) > 500


def test_multilevel_lbfgs_with_active_bounds():
    """F of an n-level quadratic is the quadratic x.Q x / 2 + r.x: the dense projected
    solve of box_qp is the reference."""
    q = make_nlevel_quadratic(n=3, dims=(4, 3, 3), seed=5)
    c = 0.5 * np.median(np.abs(q.x_star))
    lb, ub = np.full(4, -c), np.full(4, c)
    ref, active = box_qp(q.Q, q.r, lb, ub)
    assert active.any()
    p = mlo.MultilevelProblem(q.problem.levels, dims=q.dims, bounds=(lb, ub))
    res = mlo.minimize_multilevel(p, [np.zeros(d) for d in q.dims], tol=1e-10)
    assert res.success, res.message
    assert res.nit <= 100
    assert np.all(res.x >= lb) and np.all(res.x <= ub)
    assert rel_err(res.x, ref) <= 1e-8
    np.testing.assert_allclose(np.concatenate(res.xs), q.best_response(res.x), atol=1e-8)


def test_multilevel_maxiter_status_and_message():
    q = make_nlevel_quadratic(n=3, dims=(3, 4, 5), seed=3)
    res = mlo.minimize_multilevel(q.problem, [np.zeros(d) for d in q.dims], tol=1e-14,
                                  maxiter=2)
    assert not res.success and res.status == 10 and res.nit == 2
    assert res.message == STATUS_MESSAGES[10]
    assert res.fun == pytest.approx(q.F(res.x), rel=1e-10)


@njit(cache=True)
def value_only_at_zero(z, A, B, C, a, b):
    """The quadratic's upper value at x_0 = 0, NaN wherever x_0 moved: no trial point of
    a line search from x = 0 has a finite F."""
    if z[0] != 0.0:
        return np.nan
    return quad_value(z, A, B, C, a, b)


def test_line_search_failure_end_to_end():
    """Every trial fails: 40 halvings along the first (gradient) step, a retry from x0
    with the user's inner tolerances and a fresh memory (F at x0 again), 40 halvings
    more, then status 11 at x0; F at the returned x0 once more (status != 0)."""
    q = make_quadratic(dx=3, dy=5, seed=0)
    up = q.problem.upper
    upper = mlo.Objective(up.grad, hvp=up.hvp, value=value_only_at_zero, args=up.args)
    p = mlo.BilevelProblem(upper, q.problem.lower, dims=(3, 5))
    res = mlo.minimize_bilevel(p, np.zeros(3), np.zeros(5), tol=1e-10)
    assert not res.success and res.status == 11 and res.nit == 0
    assert res.message == STATUS_MESSAGES[11]
    np.testing.assert_array_equal(res.x, np.zeros(3))
    assert res.fun == pytest.approx(q.F(np.zeros(3)), rel=1e-12)
    assert res.nfev == 1 + 40 + 1 + 40 + 1
    assert res.oracle_calls["upper_value"] == res.nfev
    # the first hypergradient reuses the lower solve of F(x0); the retry's F at x0 is
    # reused by the second: two hypergradients, no lower solve of their own
    assert res.oracle_calls["upper_grad"] == 2


def test_lower_solve_failure_status():
    q = DenseQuadratic(eigs=[1.0, 2.0, -1.0, 3.0, 4.0, 5.0])  # H_yy indefinite
    res = mlo.minimize_bilevel(q.problem(), np.zeros(3), np.zeros(6))
    assert not res.success and res.status == 3 and res.nit == 0
    assert res.message.startswith(STATUS_MESSAGES[3]) and "At x0" in res.message


def test_linear_solve_failure_status():
    q = make_quadratic(dx=3, dy=5, seed=0)
    res = mlo.minimize_bilevel(q.problem, np.zeros(3), np.zeros(5), lin_maxiter=1)
    assert not res.success and res.status == 5 and res.nit == 0
    assert res.message.startswith(STATUS_MESSAGES[5])
    assert "Linear solve (cg): not converged: maxiter reached" in res.message


def test_multilevel_level_failure_status():
    q = make_nlevel_quadratic(n=3, dims=(3, 4, 5), seed=3)
    res = mlo.minimize_multilevel(q.problem, [np.zeros(d) for d in q.dims],
                                  lower_maxiter=1, lower_tol=1e-14)
    assert not res.success and res.status == 1 and res.nit == 0
    assert res.message.startswith(STATUS_MESSAGES[1])
    assert "At x0: level 3: |grad| = " in res.message  # level 3 is solved first


def test_accepted_trials_reuse_the_lower_solve():
    """Every hypergradient of an "aid" run is at a point where the line search (or the
    first F) solved the lower level: it reuses that solve and its F, so the upper values
    are those of the F evaluations alone (one per trial point, and F at x0)."""
    q = make_quadratic(dx=6, dy=10, ridge=0.02, seed=1)
    trials = []
    orig = _descent._LBFGS.try_arc

    def recording(self, x, fun, grad, d, t):
        F_eval = self.F_eval

        def F_rec(x_try):
            trials.append(x_try.copy())
            return F_eval(x_try)
        self.F_eval = F_rec
        try:
            return orig(self, x, fun, grad, d, t)
        finally:
            self.F_eval = F_eval

    _descent._LBFGS.try_arc = recording
    try:
        res = mlo.minimize_bilevel(q.problem, np.zeros(6), np.zeros(10), tol=1e-10)
    finally:
        _descent._LBFGS.try_arc = orig
    assert res.success, res.message
    c = res.oracle_calls
    assert c["upper_value"] == res.nfev == len(trials) + 1
    assert c["upper_grad"] >= res.nit + 1
    assert rel_err(res.x, q.x_star) <= 1e-8


@pytest.mark.parametrize("n, dims, seed", [(3, (5, 5, 5), 3), (4, (3, 3, 3, 3), 4)])
def test_multilevel_iteration_costs_one_hypergradient(n, dims, seed):
    """Along the run's own path, the oracle calls equal those of one hypergradient per
    iterate, each warm-started from the previous iterate's lower solutions (the F
    evaluation of each accepted trial is the lower solve of the next hypergradient)."""
    q = make_nlevel_quadratic(n=n, dims=dims, seed=seed)
    p = q.problem
    x0s = [np.zeros(d) for d in dims]
    path = []
    res = mlo.minimize_multilevel(p, x0s, tol=1e-10,
                                  callback=lambda r: path.append((r.x, r.xs)))
    assert res.success, res.message
    # every step accepted at its first trial (no rejected trial to pay for): one F per
    # iterate, x0's included
    assert res.oracle_calls["level1"]["value"] == res.nit + 1
    xs_0 = mlo.hypergrad(p, x0s, tol=1e-10, lower_tol=1e-10).xs
    points = zip([x0s[0]] + [x for x, _ in path], [x0s, xs_0] + [xs for _, xs in path[:-1]])
    calls = np.zeros((n, 4), dtype=np.int64)
    for x, prev in points:
        h = mlo.hypergrad(p, [x] + list(prev[1:]), tol=1e-10, lower_tol=1e-10)
        calls += [[c["grad"], c["hvp"], c["tvp"], c["value"]]
                  for c in h.oracle_calls.values()]
    run = np.array([[c["grad"], c["hvp"], c["tvp"], c["value"]]
                    for c in res.oracle_calls.values()])
    np.testing.assert_array_equal(run, calls)
