"""Bilevel optimization reaches closed-form optima; SciPy integration."""
import numpy as np
import pytest
import scipy.optimize as so

import mlocore as mlo

from conftest import DenseQuadratic


@pytest.mark.parametrize("method, step", [("aid", None), ("aid", 0.5), ("itd", None)])
def test_reaches_closed_form_optimum(quad, quad_problem, method, step):
    res = mlo.minimize_bilevel(quad_problem, np.zeros(3), np.zeros(6), method=method,
                               step=step, maxiter=2000, tol=1e-10, T=400)
    assert res.success, res.message
    # |x - x*| <= |grad F| / lambda_min(Hess F), with lambda_min >= mu = 0.1
    np.testing.assert_allclose(res.x, quad.x_star, atol=1e-8)
    assert res.fun == pytest.approx(quad.F(quad.x_star), rel=1e-12)
    np.testing.assert_allclose(res.y, quad.y_star(res.x), atol=1e-9)
    assert res.oracle_calls["lower_grad"] > 0 and res.nit > 0
    assert len(res.history["fun"]) == len(res.history["grad_norm"]) > 0


def test_alternating_ignores_the_implicit_term(quad, quad_problem):
    """The baseline converges to the zero of grad_x f(x, y*(x)) = mu x + h, not to x*."""
    res = mlo.minimize_bilevel(quad_problem, np.zeros(3), np.zeros(6), method="alternating",
                               step=1.0, maxiter=500, tol=1e-10, T=200)
    assert res.success
    np.testing.assert_allclose(res.x, -quad.h / quad.mu, atol=1e-6)
    assert np.linalg.norm(res.x - quad.x_star) > 1e-2


def test_bounds_and_scipy_agree(quad):
    lo, hi = -0.5, 0.5
    p = quad.problem(bounds=(lo, hi))
    res = mlo.minimize_bilevel(p, np.zeros(3), np.zeros(6), maxiter=500, tol=1e-10)
    assert res.success, res.message
    assert np.all(res.x >= lo) and np.all(res.x <= hi)
    fobj = mlo.HyperObjective(p, np.zeros(6))
    ref = so.minimize(fobj, np.zeros(3), jac=True, method="L-BFGS-B", bounds=[(lo, hi)] * 3,
                      options={"gtol": 1e-12, "ftol": 1e-15})
    assert ref.success
    np.testing.assert_allclose(res.x, ref.x, atol=1e-6)
    # KKT: the projected gradient vanishes at the constrained optimum
    g = quad.hypergrad(res.x)
    np.testing.assert_allclose(res.x - np.clip(res.x - g, lo, hi), 0.0, atol=1e-8)


def test_user_projection(quad):
    radius = 0.3
    proj = lambda x: x if np.linalg.norm(x) <= radius else radius * x / np.linalg.norm(x)
    p = quad.problem(project=proj)
    res = mlo.minimize_bilevel(p, np.zeros(3), np.zeros(6), maxiter=500, tol=1e-10)
    assert res.success and np.linalg.norm(res.x) <= radius + 1e-12
    # at the optimum on the sphere, -grad F is normal to it: parallel to x
    g = quad.hypergrad(res.x)
    cos = -(g @ res.x) / (np.linalg.norm(g) * np.linalg.norm(res.x))
    assert cos == pytest.approx(1.0, abs=1e-6)


def test_hyperobjective_warm_starts(quad, quad_problem):
    fobj = mlo.HyperObjective(quad_problem, np.zeros(6))
    x = np.array([0.1, 0.2, 0.3])
    f1, g1 = fobj(x)
    calls1 = fobj.oracle_calls["lower_grad"]
    f2, g2 = fobj(x)
    assert fobj.oracle_calls["lower_grad"] - calls1 == 1  # already solved: one check
    assert f1 == pytest.approx(quad.F(x), rel=1e-12)
    np.testing.assert_allclose(g2, quad.hypergrad(x), rtol=1e-9)
    res = so.minimize(fobj, np.zeros(3), jac=True, method="L-BFGS-B",
                      options={"gtol": 1e-10})
    np.testing.assert_allclose(res.x, quad.x_star, atol=1e-7)


def test_callback_and_stop_iteration(quad_problem):
    seen = []

    def callback(intermediate_result):
        seen.append(intermediate_result.nit)
        assert intermediate_result.x.shape == (3,) and np.isfinite(intermediate_result.fun)
        if intermediate_result.nit >= 3:
            raise StopIteration

    res = mlo.minimize_bilevel(quad_problem, np.zeros(3), np.zeros(6), callback=callback)
    assert res.status == 99 and not res.success and res.nit == 3
    assert seen == [1, 2, 3]


def test_maxiter_and_errors(quad, quad_problem):
    res = mlo.minimize_bilevel(quad_problem, np.zeros(3), np.zeros(6), maxiter=2, tol=0.0)
    assert not res.success and res.status == 10 and res.nit == 2
    res = mlo.minimize_bilevel(quad_problem, np.zeros(3), np.zeros(6), maxiter=0)
    assert not res.success and res.nit == 0
    no_value = quad.problem(value=False)
    with pytest.raises(ValueError, match="value callback"):
        mlo.minimize_bilevel(no_value, np.zeros(3), np.zeros(6))
    with pytest.raises(ValueError, match="unknown method"):
        mlo.minimize_bilevel(quad_problem, np.zeros(3), np.zeros(6), method="sgd")


def test_indefinite_lower_level_stops_with_message():
    q = DenseQuadratic(eigs=[1.0, 2.0, -1.0, 3.0, 4.0, 5.0])
    res = mlo.minimize_bilevel(q.problem(), np.zeros(3), np.zeros(6))
    assert not res.success and "positive definite" in res.message


def test_bounds_forms_give_lb_and_ub():
    q = DenseQuadratic(dx=2, dy=3)
    p = q.problem(bounds=[(0.0, 1.0), (-2.0, 3.0)])  # one pair per coordinate
    np.testing.assert_array_equal(p.lb, [0.0, -2.0])
    np.testing.assert_array_equal(p.ub, [1.0, 3.0])
    p = q.problem(bounds=(-1.0, None))  # one pair for all, None = unbounded
    np.testing.assert_array_equal(p.lb, [-1.0, -1.0])
    assert np.all(np.isinf(p.ub))


def test_hyperobjective_fun_and_jac_share_the_lower_solve(quad_problem):
    """fun then jac at one x: one lower solve, the oracle calls and values of one call
    (bit for bit: the same kernels from the same warm starts); repeated fun or jac at that
    x costs nothing; a call after fun reuses its solve."""
    x = np.array([0.1, -0.2, 0.3])
    shared, plain = mlo.HyperObjective(quad_problem, np.zeros(6)), \
        mlo.HyperObjective(quad_problem, np.zeros(6))
    f, g = shared.fun(x), shared.jac(x)
    fp, gp = plain(x)
    assert f == fp and np.array_equal(g, gp)
    assert shared.oracle_calls == plain.oracle_calls
    assert (shared.nsolves, shared.ncalls) == (1, 1)
    assert shared.fun(x) == f and np.array_equal(shared.jac(x), g)
    assert shared.oracle_calls == plain.oracle_calls
    x2 = x + 0.05
    f2 = shared.fun(x2)
    f2c, g2c = shared(x2)
    assert f2c == f2 and shared.nsolves == 2 and shared.ncalls == 2
    fp2, gp2 = plain(x2)
    assert f2 == pytest.approx(fp2, rel=1e-12)
    np.testing.assert_allclose(g2c, gp2, rtol=1e-9, atol=1e-12)


def test_scipy_with_separate_fun_and_jac(quad, quad_problem):
    """scipy calls fun and jac at the same points: one lower solve and one hypergradient
    per point, the run of jac=True."""
    fobj = mlo.HyperObjective(quad_problem, np.zeros(6))
    res = so.minimize(fobj.fun, np.zeros(3), jac=fobj.jac, method="L-BFGS-B",
                      options={"gtol": 1e-10})
    assert fobj.nsolves == fobj.ncalls == res.nfev == res.njev
    ref_obj = mlo.HyperObjective(quad_problem, np.zeros(6))
    ref = so.minimize(ref_obj, np.zeros(3), jac=True, method="L-BFGS-B",
                      options={"gtol": 1e-10})
    np.testing.assert_array_equal(res.x, ref.x)
    assert fobj.oracle_calls == ref_obj.oracle_calls
    np.testing.assert_allclose(res.x, quad.x_star, atol=1e-7)


def test_lbfgsb_on_the_breast_cancer_penalties_reaches_the_optimum():
    """The demo's run (one penalty per feature in [-8, 8], cond(H_yy) up to ~3e6): its 78th
    objective call raised, a lower Newton-CG step failing its line search after its CG
    stopped at the iteration budget (test_hypergrad.py has that solve). Converged, checked
    by the projected gradient and against minimize_bilevel's own L-BFGS loop."""
    pytest.importorskip("sklearn")
    from mlocore.problems import load_breast_cancer_logistic
    bc = load_breast_cancer_logistic(seed=0)
    d = bc.n_features
    x0 = np.full(d, -2.0)
    fobj = mlo.HyperObjective(bc.problem, np.zeros(d), method="cg", tol=1e-10)
    out = so.minimize(fobj, x0, jac=True, method="L-BFGS-B", bounds=[(-8.0, 8.0)] * d,
                      options={"maxiter": 200, "gtol": 1e-7})
    assert out.success, out.message
    g = bc.hypergrad(out.x)
    assert np.linalg.norm(out.x - np.clip(out.x - g, -8.0, 8.0)) < 1e-4
    ref = mlo.minimize_bilevel(mlo.BilevelProblem(bc.problem.upper, bc.problem.lower,
                                                  dims=bc.problem.dims, bounds=(-8.0, 8.0)),
                               x0, np.zeros(d), method="aid")
    assert out.fun <= ref.fun + 1e-4  # 0.07733 against 0.0776
