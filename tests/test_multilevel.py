"""n-level hypergradients and the multilevel gradient method (docs/mathematics.md section 3)."""
import numpy as np
import pytest
from numba import njit

import mlocore as mlo
from mlocore import CallbackError
from mlocore.problems import (make_nlevel_logcosh, make_nlevel_quadratic,
                              make_nonquadratic_trilevel, make_trilevel_quadratic)
from mlocore.problems.nlevel_quadratic import quadform_grad, quadform_hvp, quadform_value

from conftest import DenseQuadratic

MODES = ["exact", "fd", "truncated"]


def starts(problem, x1):
    return [np.asarray(x1, float)] + [np.zeros(d) for d in problem.dims[1:]]


def test_two_levels_equal_bilevel(quad, quad_problem):
    x = np.array([0.3, -1.0, 2.0])
    bi = mlo.hypergrad(quad_problem, x, np.zeros(quad.dy), method="cg", tol=1e-12)
    ml = mlo.MultilevelProblem([quad_problem.upper, quad_problem.lower], dims=quad_problem.dims)
    for mode in MODES:
        res = mlo.hypergrad(ml, [x, np.zeros(quad.dy)], method=mode, tol=1e-12)
        assert res.success, res.message
        np.testing.assert_allclose(res.grad, bi.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES + ["exact-declared", "truncated-declared"])
@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_modes_on_nlevel_quadratics(n, mode):
    """Closed forms for n = 2..6; "-declared": the levels declared quadratic, so that the
    curvature terms are skipped (the others evaluate them, by nested differences below
    level n - 1)."""
    mode, _, declared = mode.partition("-")
    q = make_nlevel_quadratic(n=n, dims=tuple(range(2, 2 + n)) if n < 6 else (2,) * n, seed=n,
                              declare_quadratic=bool(declared))
    x1 = np.linspace(-1.0, 1.0, q.dims[0]) if hasattr(q, "dims") else np.ones(2)
    res = mlo.hypergrad(q.problem, starts(q.problem, x1), method=mode, tol=1e-12,
                        lower_tol=1e-10)
    assert res.success, res.message
    exact = q.hypergrad(x1)
    # best responses are affine: every mode is exact up to the solver tolerance (exact,
    # truncated) or to central-difference round-off (fd, about 1e-7 relative per level)
    rtol = 1e-6 if mode == "fd" else 1e-8
    np.testing.assert_allclose(res.grad, exact, rtol=rtol, atol=rtol * np.abs(exact).max())
    np.testing.assert_allclose(np.concatenate(res.xs), q.best_response(x1), atol=1e-8)


@pytest.mark.parametrize("dim, F_star", [(1, -55.57051898), (50, -1446.28489290)])
def test_trilevel_quadratic_optimum(dim, F_star):
    tq = make_trilevel_quadratic(dim=dim)
    p = tq.problem
    x = np.linspace(-1.0, 1.0, dim)
    res = mlo.hypergrad(p, starts(p, x), method="exact")
    c = tq.c if hasattr(tq, "c") else None
    np.testing.assert_allclose(res.grad, tq.hypergrad(x), rtol=1e-9, atol=1e-9)
    opt = mlo.minimize_multilevel(p, starts(p, np.zeros(dim)), maxiter=200, tol=1e-10)
    assert opt.success, opt.message
    np.testing.assert_allclose(opt.x, tq.x_star, rtol=1e-8, atol=1e-8 * np.abs(tq.x_star).max())
    assert opt.fun == pytest.approx(F_star, rel=1e-8)
    assert len(opt.history["oracle_calls"]) == len(opt.history["fun"])
    # fixed step 1/L (L = 7, the Hessian of F): Theorem 4.1's step condition holds
    fixed = mlo.minimize_multilevel(p, starts(p, np.zeros(dim)), step=1.0 / 7.0, maxiter=50,
                                    tol=1e-10)
    assert fixed.success
    np.testing.assert_allclose(fixed.x, tq.x_star, rtol=1e-8)


@pytest.fixture(scope="module")
def nonquad():
    return make_nonquadratic_trilevel(dims=(2, 2, 2), seed=0)


def central_F(nq, x, h=1e-5):
    return np.array([(nq.F(x + h * e) - nq.F(x - h * e)) / (2 * h) for e in np.eye(x.size)])


@pytest.mark.parametrize("mode", ["exact", "fd"])
def test_nonquadratic_against_central_differences(nonquad, mode):
    x = np.array([0.3, -0.4])
    fd = central_F(nonquad, x)
    res = mlo.hypergrad(nonquad.problem, starts(nonquad.problem, x), method=mode, tol=1e-12,
                        lower_tol=1e-12)
    assert res.success, res.message
    np.testing.assert_allclose(res.grad, fd, rtol=1e-6, atol=1e-7 * np.abs(fd).max())


def test_exact_mode_without_tvp_uses_differences_of_hvp(nonquad):
    x = np.array([0.3, -0.4])
    levels = [mlo.Objective(o.grad, hvp=o.hvp, value=o.value, args=o.args)
              for o in nonquad.problem.levels]
    p = mlo.MultilevelProblem(levels, nonquad.problem.dims)
    res = mlo.hypergrad(p, starts(p, x), method="exact", tol=1e-12, lower_tol=1e-12)
    assert res.oracle_calls["level3"]["tvp"] == 0
    np.testing.assert_allclose(res.grad, central_F(nonquad, x), rtol=1e-6)


def test_truncated_mode_is_biased_on_nonlinear_best_responses(nonquad):
    """Documents the bias of dropping the curvature terms (what most libraries do)."""
    x = np.array([0.3, -0.4])
    fd = central_F(nonquad, x)
    res = mlo.hypergrad(nonquad.problem, starts(nonquad.problem, x), method="truncated",
                        tol=1e-12, lower_tol=1e-12)
    assert res.success
    rel = np.linalg.norm(res.grad - fd) / np.linalg.norm(fd)
    assert rel > 1e-4  # far above the 1e-6 of the exact modes


def test_unrolled_baseline_converges_with_T(nonquad):
    x = np.array([0.3, -0.4])
    exact = mlo.hypergrad(nonquad.problem, starts(nonquad.problem, x), method="exact",
                          tol=1e-12, lower_tol=1e-12).grad
    errs = []
    for T in (2, 8, 32):
        res = mlo.hypergrad(nonquad.problem, starts(nonquad.problem, x), method="itd", T=T)
        assert res.success, res.message
        errs.append(np.linalg.norm(res.grad - exact) / np.linalg.norm(exact))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-5


def test_unrolled_baseline_is_gradient_of_the_unrolled_map():
    """Three levels of quadratics: reverse mode through nested loops vs central differences
    of x -> f_1(x, X(x)) with the same fixed steps and starts."""
    tq = make_trilevel_quadratic(dim=2)
    p = tq.problem
    x = np.array([0.5, -1.0])
    T, steps = 3, [0.1, 0.3]
    res = mlo.hypergrad(p, starts(p, x), method="itd", T=T, step=steps)

    def F_unrolled(xx):
        return mlo.hypergrad(p, starts(p, xx), method="itd", T=T, step=steps).fun

    h = 1e-5
    fd = np.array([(F_unrolled(x + h * e) - F_unrolled(x - h * e)) / (2 * h)
                   for e in np.eye(2)])
    np.testing.assert_allclose(res.grad, fd, rtol=1e-6)
    assert np.linalg.norm(res.grad - tq.hypergrad(x)) > 1e-3  # T = 3 is a rough unroll


def test_minimize_multilevel_modes_and_callback():
    tq = make_trilevel_quadratic(dim=3)
    p = tq.problem
    seen = []

    def callback(r):
        seen.append(r.nit)
        assert len(r.xs) == 3
        if r.nit == 2:
            raise StopIteration

    res = mlo.minimize_multilevel(p, starts(p, np.zeros(3)), callback=callback)
    assert res.status == 99 and seen == [1, 2]
    for method in ("fd", "truncated", "itd"):
        res = mlo.minimize_multilevel(p, starts(p, np.zeros(3)), method=method, T=30,
                                      maxiter=200, tol=1e-8)
        assert res.success, (method, res.message)
        np.testing.assert_allclose(res.x, tq.x_star, rtol=1e-6)


def test_multilevel_bad_input(nonquad):
    p = nonquad.problem
    x = np.array([0.3, -0.4])
    with pytest.raises(ValueError, match="at least 2 levels"):
        mlo.MultilevelProblem([p.levels[0]], dims=(2,))
    with pytest.raises(ValueError, match="dims has 2 entries"):
        mlo.MultilevelProblem(p.levels, dims=(2, 2))
    with pytest.raises(ValueError, match="one per level"):
        mlo.hypergrad(p, [x, np.zeros(2)])
    with pytest.raises(ValueError, match=r"xs\[1\] must have shape \(2,\)"):
        mlo.hypergrad(p, [x, np.zeros(3), np.zeros(2)])
    with pytest.raises(ValueError, match="unknown method 'cg'; expected one of 'exact', "
                       "'fd', 'truncated', 'itd'"):
        mlo.hypergrad(p, starts(p, x), method="cg")
    with pytest.raises(ValueError, match="unknown method 3"):  # not a string
        mlo.hypergrad(p, starts(p, x), method=3)
    with pytest.raises(TypeError, match="no y"):
        mlo.hypergrad(p, x, np.zeros(2))
    # dims that do not match what the callbacks expect of z
    wrong = mlo.MultilevelProblem(p.levels, dims=(2, 2, 3))
    with pytest.raises(CallbackError, match="level1.grad raised ValueError"):
        mlo.hypergrad(wrong, [x, np.zeros(2), np.zeros(3)])


def test_lower_level_failure_is_reported_per_level(nonquad):
    res = mlo.hypergrad(nonquad.problem, starts(nonquad.problem, np.array([0.3, -0.4])),
                        lower_maxiter=1, lower_tol=1e-14)
    assert not res.success
    assert "level" in res.message


def test_indefinite_middle_level():
    q = DenseQuadratic(eigs=[1.0, 2.0, -1.0, 3.0, 4.0, 5.0])
    p = q.problem()
    ml = mlo.MultilevelProblem([p.upper, p.lower], dims=p.dims)
    res = mlo.hypergrad(ml, [np.zeros(3), np.zeros(6)])
    assert not res.success and "positive definite" in res.message


# four logcosh-quadratic levels of dimension 1: "exact" needs differences of adjoints below
# level n - 1, "truncated" must still solve the middle levels of the problem itself


def four_level_logcosh():
    return make_nlevel_logcosh(4, seed=1).problem


def _four_level_exact(p, x1):
    return mlo.hypergrad(p, [np.array([x1]), np.zeros(1), np.zeros(1), np.zeros(1)],
                         method="exact", tol=1e-12, lower_tol=1e-11)


def test_truncated_mode_solves_the_same_lower_levels_as_exact_for_n4():
    p = four_level_logcosh()
    xs = [np.array([0.3]), np.zeros(1), np.zeros(1), np.zeros(1)]
    exact = _four_level_exact(p, 0.3)
    trunc = mlo.hypergrad(p, xs, method="truncated", tol=1e-12, lower_tol=1e-11)
    assert exact.success and trunc.success
    np.testing.assert_allclose(np.concatenate(trunc.xs), np.concatenate(exact.xs), atol=1e-8)
    assert trunc.fun == pytest.approx(exact.fun, rel=1e-10)


def test_exact_mode_matches_central_differences_of_F_for_n4():
    """... and "truncated", which drops the curvature terms (here of order 2 to 4 of the
    lower best responses), misses them by more than 1e-3 relative."""
    p = four_level_logcosh()
    exact = _four_level_exact(p, 0.3)
    assert exact.success, exact.message
    h = 1e-4
    fd = (_four_level_exact(p, 0.3 + h).fun - _four_level_exact(p, 0.3 - h).fun) / (2 * h)
    assert exact.grad[0] == pytest.approx(fd, rel=1e-5)
    trunc = mlo.hypergrad(p, [np.array([0.3]), np.zeros(1), np.zeros(1), np.zeros(1)],
                          method="truncated", tol=1e-12, lower_tol=1e-11)
    assert trunc.success
    assert abs(trunc.grad[0] - fd) > 1e-3 * abs(fd)


def test_lower_maxiter_with_fixed_step_fails_with_a_finite_x():
    p = four_level_logcosh()
    res = mlo.minimize_multilevel(p, [np.array([0.3]), np.zeros(1), np.zeros(1), np.zeros(1)],
                                  step=0.1, lower_maxiter=1, lower_tol=1e-14)
    assert not res.success and res.status == 1
    assert np.all(np.isfinite(res.x)) and "level" in res.message


def test_nested_newton_solves_quadratic_levels_in_few_steps():
    """Nested solves take their Newton directions from the truncated reduced Hessian, which
    is exact for quadratic levels: the middle level of a 4-level quadratic chain, started
    far from its best response, converges to 1e-10 in at most 3 iterations (the first CG
    solve stops at relative residual 1e-2), and the hypergradient is the closed form."""
    q = make_nlevel_quadratic(n=4, dims=(3, 3, 3, 3), seed=11)
    rng = np.random.default_rng(5)
    xs = [rng.normal(size=3) * 10 for _ in range(4)]
    res = mlo.hypergrad(q.problem, xs, method="exact", tol=1e-10)
    assert res.success, res.message
    assert res.lower_nit[1] <= 3
    g = q.hypergrad(xs[0])
    assert np.linalg.norm(res.grad - g) <= 1e-8 * np.linalg.norm(g)


@pytest.mark.parametrize("mode", ["truncated", "exact"])
@pytest.mark.parametrize("family", ["nonquadratic-3", "logcosh-4", "quadratic-5"])
def test_dense_recursion_equals_the_matrix_free_one(family, mode, nonquad, monkeypatch):
    """Small problems take the recursion in dense form (reduced Hessian blocks formed by
    reduced products on unit vectors, Cholesky solves); the matrix-free recursion (forced by
    a zero size limit) gives the same hypergradient and the same solved levels. In "exact"
    mode for n >= 4 both take curvature terms by central differences (of different
    vectors), so they agree to the differences' accuracy there."""
    if family == "nonquadratic-3":
        p, xs = nonquad.problem, [np.array([0.4, -0.2]), np.zeros(2), np.zeros(2)]
    elif family == "logcosh-4":
        p, xs = four_level_logcosh(), [np.array([0.3]), np.zeros(1), np.zeros(1), np.zeros(1)]
    else:
        q = make_nlevel_quadratic(n=5, dims=(2, 2, 2, 2, 2), seed=4)
        p, xs = q.problem, [np.random.default_rng(2).normal(size=2) for _ in range(5)]
    kw = dict(method=mode, tol=1e-12, lower_tol=1e-11)
    dense = mlo.hypergrad(p, xs, **kw)
    monkeypatch.setattr("mlocore._multilevel.DENSE_LEVELS_MAX_SIZE", 0)
    free = mlo.hypergrad(p, xs, **kw)
    assert dense.success and free.success, (dense.message, free.message)
    rtol = 1e-6 if (mode, family) == ("exact", "logcosh-4") else 1e-8
    np.testing.assert_allclose(dense.grad, free.grad, rtol=rtol, atol=1e-10)
    np.testing.assert_allclose(dense.z, free.z, atol=1e-9)
    if family == "quadratic-5":
        g = q.hypergrad(xs[0])
        assert np.linalg.norm(dense.grad - g) <= 1e-9 * np.linalg.norm(g)


def test_dense_truncated_recursion_reports_an_indefinite_level():
    q = DenseQuadratic(eigs=[1.0, 2.0, -1.0, 3.0, 4.0, 5.0])
    p = q.problem()
    ml = mlo.MultilevelProblem([p.upper, p.lower], dims=p.dims)
    res = mlo.hypergrad(ml, [np.zeros(3), np.zeros(6)], method="truncated")
    assert not res.success and "positive definite" in res.message


def test_exact_mode_matches_central_differences_of_F_for_n5():
    """n = 5 non-quadratic levels (no closed form): the curvature terms hold derivatives of
    the best responses up to order 5, by nested central differences; the reference is
    central differences of F with the levels solved to 1e-11."""
    lc = make_nlevel_logcosh(5, seed=2)
    x1 = np.array([0.2])
    res = mlo.hypergrad(lc.problem, [x1] + [np.zeros(1)] * 4, method="exact", tol=1e-12,
                        lower_tol=1e-11)
    assert res.success, res.message
    np.testing.assert_allclose(res.grad, lc.hypergrad_fd(x1), rtol=1e-5)


def test_declared_quadratic_lower_levels_skip_exactly_zero_terms():
    """Levels 1-2 log-cosh, levels 3-4 quadratic and declared so: x_>2* is affine, every
    curvature term the hypergradient needs is zero and is skipped (no third-order products,
    no differences); the hypergradient is that of the same problem
    undeclared (nested differences) and central differences of F."""
    lc = make_nlevel_logcosh(4, seed=1)
    rng = np.random.default_rng(3)
    quads = []
    for _ in range(2):
        A = rng.standard_normal((4, 4))
        quads.append((A @ A.T + 4.0 * np.eye(4), rng.standard_normal(4)))

    def problem(declared):
        lv = lc.problem.levels[:2] + [
            mlo.Objective(quadform_grad, hvp=quadform_hvp, value=quadform_value, args=a,
                          quadratic=declared) for a in quads]
        return mlo.MultilevelProblem(lv, (1, 1, 1, 1))

    xs = [np.array([0.3]), np.zeros(1), np.zeros(1), np.zeros(1)]
    kw = dict(method="exact", tol=1e-12, lower_tol=1e-11)
    dec, und = mlo.hypergrad(problem(True), xs, **kw), mlo.hypergrad(problem(False), xs, **kw)
    assert dec.success and und.success
    assert dec.nhvp < und.nhvp        # no products at points shifted for differences
    np.testing.assert_allclose(dec.grad, und.grad, rtol=1e-7)
    h = 1e-4

    def F(x):
        return mlo.hypergrad(problem(True), [np.array([x])] + xs[1:], **kw).fun

    assert dec.grad[0] == pytest.approx((F(0.3 + h) - F(0.3 - h)) / (2 * h), rel=1e-6)
    with pytest.raises(TypeError, match="quadratic must be True or False"):
        mlo.Objective(quadform_grad, quadratic="yes")


def test_false_quadratic_declaration_is_a_clear_error():
    """A log-cosh level declared quadratic would make the recursion skip curvature terms
    that are not zero (a wrong hypergradient): the first-point probe refuses it, naming
    the level; the same level undeclared works."""
    lc = make_nlevel_logcosh(3, seed=1)
    lv = lc.problem.levels
    xs = [np.array([0.3]), np.zeros(1), np.zeros(1)]
    for k in (1, 2):
        wrong = list(lv)
        o = lv[k]
        wrong[k] = mlo.Objective(o.grad, hvp=o.hvp, value=o.value, args=o.args,
                                 quadratic=True)
        with pytest.raises(mlo.CallbackError, match=rf"level{k + 1} is declared quadratic"):
            mlo.hypergrad(mlo.MultilevelProblem(wrong, lc.problem.dims), xs)
    assert mlo.hypergrad(lc.problem, xs).success


# counting callbacks: every call increments the level's counter array (passed in args)
@njit
def _cq_grad(z, P, q, cnt):
    cnt[0] += 1
    return P @ z + q


@njit
def _cq_hvp(z, v, P, q, cnt):
    cnt[1] += 1
    return P @ v


@njit
def _cq_tvp(z, u, w, P, q, cnt):
    cnt[2] += 1
    return np.zeros(z.shape[0])


@njit
def _cq_value(z, P, q, cnt):
    cnt[3] += 1
    return 0.5 * (z @ (P @ z)) + q @ z


@pytest.mark.parametrize("declared", [False, True])
def test_per_level_oracle_counts_and_solve_statistics(declared):
    """The per-level oracle counts of every method equal what counting callbacks saw; the
    per-level solve statistics of a quadratic chain started away from its solution: with
    the levels declared quadratic, one Newton step per middle level (exact directions),
    level k solved k - 1 times (the trial points start from the first-order prediction,
    exact here, so the levels below only check), each final |grad phi_k| <= lower_tol."""
    q = make_nlevel_quadratic(n=4, dims=(2, 2, 2, 2), seed=7)
    counters = [np.zeros(4, dtype=np.int64) for _ in range(4)]
    p = mlo.MultilevelProblem(
        [mlo.Objective(_cq_grad, hvp=_cq_hvp, tvp=_cq_tvp, value=_cq_value,
                       args=(P, qq, c), quadratic=declared)
         for P, qq, c in zip(q.P, q.q, counters)], q.dims)
    xs = [np.random.default_rng(4).normal(size=2) for _ in range(4)]
    g = q.hypergrad(xs[0])
    for method in ("exact", "truncated", "fd", "itd"):
        kw = dict(T=4) if method == "itd" else dict(lower_tol=1e-10)
        mlo.hypergrad(p, xs, method=method, **kw)       # the one-time callback checks
        for c in counters:
            c[:] = 0
        res = mlo.hypergrad(p, xs, method=method, **kw)
        assert res.success, (method, res.message)
        for k, c in enumerate(counters, 1):
            assert res.oracle_calls[f"level{k}"] == dict(zip(("grad", "hvp", "tvp", "value"),
                                                          c.tolist())), (method, k)
        assert res.lower_nit.shape == res.lower_solves.shape == (4,)
        if method == "itd":
            assert list(res.lower_nit[1:]) == [4 * s for s in res.lower_solves[1:]]
            continue
        assert np.linalg.norm(res.grad - g) <= (1e-6 if method == "fd" else 1e-9) * \
            np.linalg.norm(g)
        assert np.isnan(res.lower_grad_norm[0])
        assert np.all(res.lower_grad_norm[1:] <= 1e-10)
        if declared and method != "fd":
            assert list(res.lower_nit[1:3]) == [1, 1]
            assert list(res.lower_solves) == [0, 1, 2, 3]
            assert all(c[2] == 0 for c in counters)    # no third-order products
