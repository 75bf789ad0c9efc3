"""Hypergradients against closed forms; unrolled against implicit; oracle bookkeeping."""
import numpy as np
import pytest

import mlocore as mlo

from conftest import DenseQuadratic

IMPLICIT = ["direct", "cg", "neumann"]


@pytest.mark.parametrize("method", IMPLICIT)
def test_implicit_matches_closed_form(quad, quad_problem, method):
    x = np.array([0.3, -1.0, 2.0])
    y = np.zeros(quad.dy)
    res = mlo.hypergrad(quad_problem, x, y, method=method, tol=1e-12)
    assert res.success, res.message
    exact = quad.hypergrad(x)
    # error bound: cond(A) * tol relative, well below 1e-9 for cond = 20
    np.testing.assert_allclose(res.grad, exact, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(res.y, quad.y_star(x), atol=1e-11)
    np.testing.assert_allclose(quad.A @ res.v, res.y - quad.t, atol=1e-9)  # H_yy v = grad_y f
    assert res.fun == pytest.approx(quad.F(x), rel=1e-12)


@pytest.mark.parametrize("method", ["itd-reverse", "itd-forward"])
def test_unrolled_converges_to_implicit(quad, quad_problem, method):
    x = np.array([0.3, -1.0, 2.0])
    res = mlo.hypergrad(quad_problem, x, quad.y_star(x), method=method, T=800)
    assert res.success
    np.testing.assert_allclose(res.grad, quad.hypergrad(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("K", [None, 7])
def test_forward_equals_reverse(quad, quad_problem, K):
    x = np.array([1.0, 0.5, -0.5])
    y0 = np.ones(quad.dy)  # not the solution: the unrolled map itself is differentiated
    fwd = mlo.hypergrad(quad_problem, x, y0, method="itd-forward", T=25, K=K)
    rev = mlo.hypergrad(quad_problem, x, y0, method="itd-reverse", T=25, K=K)
    np.testing.assert_allclose(fwd.grad, rev.grad, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(fwd.y, rev.y)
    assert fwd.step == rev.step


def test_reverse_itd_is_gradient_of_unrolled_map(quad, quad_problem):
    """Central differences of x -> f(x, y_T(x)) (y_T by the same T steps) equal reverse ITD."""
    x = np.array([1.0, 0.5, -0.5])
    y0 = np.ones(quad.dy)
    T = 15
    res = mlo.hypergrad(quad_problem, x, y0, method="itd-reverse", T=T)
    beta = res.step

    def unrolled_F(xx):
        y = y0.copy()
        for _ in range(T):
            y = y - beta * (quad.A @ y + quad.C @ xx + quad.a)
        r = y - quad.t
        return 0.5 * r @ r + 0.5 * quad.mu * xx @ xx + quad.h @ xx

    h = 1e-5
    fd = np.array([(unrolled_F(x + h * e) - unrolled_F(x - h * e)) / (2 * h)
                   for e in np.eye(3)])
    np.testing.assert_allclose(res.grad, fd, rtol=1e-7, atol=1e-8)


def test_itd_error_decays_geometrically():
    q = DenseQuadratic(dx=2, dy=5, eigs=[1.0, 2.0, 3.0, 5.0, 10.0], seed=3)
    p = q.problem()
    x = np.array([0.5, -0.2])
    y0 = q.y_star(x)  # start at the solution: the error is then the truncated adjoint series
    beta = 0.05  # contraction factor of the slowest mode: 1 - beta * lambda_min = 0.95
    errs = []
    Ts = [20, 40, 80]
    for T in Ts:
        r = mlo.hypergrad(p, x, y0, method="itd-reverse", T=T, step=beta)
        errs.append(np.linalg.norm(r.grad - q.hypergrad(x)))
    rho = 1 - beta * 1.0
    for (T1, e1), (T2, e2) in zip(zip(Ts, errs), zip(Ts[1:], errs[1:])):
        # the slowest mode dominates: the ratio is rho^(T2-T1) up to a modest factor
        assert e2 / e1 == pytest.approx(rho ** (T2 - T1), rel=0.3)


def test_truncated_reverse_is_biased_but_consistent(quad, quad_problem):
    x = np.array([0.3, -1.0, 2.0])
    y0 = quad.y_star(x)
    full = mlo.hypergrad(quad_problem, x, y0, method="itd-reverse", T=300)
    trunc = mlo.hypergrad(quad_problem, x, y0, method="itd-reverse", T=300, K=3)
    err_full = np.linalg.norm(full.grad - quad.hypergrad(x))
    err_trunc = np.linalg.norm(trunc.grad - quad.hypergrad(x))
    assert err_trunc > 100 * err_full
    assert trunc.oracle_calls["lower_hvp"] < full.oracle_calls["lower_hvp"]


def test_finite_difference_hvp_matches_exact_hvp(quad):
    x = np.array([0.3, -1.0, 2.0])
    p = quad.problem(hvp=False)
    res = mlo.hypergrad(p, x, np.zeros(quad.dy), method="cg", tol=1e-10)
    assert res.success and res.oracle_calls["lower_hvp"] == 0
    assert res.oracle_calls["lower_grad"] > 0
    # central differences on a quadratic are exact up to round-off ~ eps / step
    np.testing.assert_allclose(res.grad, quad.hypergrad(x), rtol=1e-7, atol=1e-7)


def test_lower_solved_and_warm_start(quad, quad_problem):
    x = np.array([0.3, -1.0, 2.0])
    ys = quad.y_star(x)
    res = mlo.hypergrad(quad_problem, x, ys, method="cg", lower_solved=True, tol=1e-12)
    assert res.lower_nit == 0 and res.oracle_calls["lower_grad"] == 0
    np.testing.assert_allclose(res.grad, quad.hypergrad(x), rtol=1e-9)
    warm = mlo.hypergrad(quad_problem, x, ys, method="cg", lower_solved=True, tol=1e-12,
                         v0=res.v)
    assert warm.nit < res.nit


def test_inputs_are_not_modified(quad, quad_problem):
    x = np.array([0.3, -1.0, 2.0])
    y = np.ones(quad.dy)
    xc, yc = x.copy(), y.copy()
    args_before = [a.copy() for a in quad_problem.lower.args]
    for method in mlo._hypergrad.HYPERGRAD_METHODS:
        mlo.hypergrad(quad_problem, x, y, method=method, T=10)
    np.testing.assert_array_equal(x, xc)
    np.testing.assert_array_equal(y, yc)
    for a, b in zip(quad_problem.lower.args, args_before):
        np.testing.assert_array_equal(a, b)


def test_oracle_counts_of_reverse_itd(quad, quad_problem):
    x = np.zeros(3)
    res = mlo.hypergrad(quad_problem, x, np.zeros(quad.dy), method="itd-reverse", T=12, K=5,
                        step=0.01)
    calls = res.oracle_calls
    assert calls["lower_grad"] == 12 and calls["lower_hvp"] == 5
    assert calls["upper_grad"] == 1


@pytest.mark.parametrize("method", ["gd", "agd", "newton-cg"])
def test_solve_lower_methods(quad, quad_problem, method):
    x = np.array([0.3, -1.0, 2.0])
    res = mlo.solve_lower(quad_problem, x, np.zeros(quad.dy), method=method, tol=1e-10,
                          maxiter=5000)
    assert res.success, res.message
    assert res.grad_norm <= 1e-10
    np.testing.assert_allclose(res.y, quad.y_star(x), atol=1e-9)


def test_agd_needs_fewer_iterations_than_gd():
    q = DenseQuadratic(dx=2, dy=8, cond=300.0, seed=5)
    p = q.problem()
    x = np.ones(2)
    gd = mlo.solve_lower(p, x, np.zeros(8), method="gd", tol=1e-8, maxiter=100000)
    agd = mlo.solve_lower(p, x, np.zeros(8), method="agd", tol=1e-8, maxiter=100000)
    assert gd.success and agd.success
    assert agd.nit < gd.nit / 3


def test_neumann_default_iterations_follow_conditioning_not_size():
    """dy = 10 but kappa = 100: the series needs ~kappa log(1/tol) terms, more than 100 dy."""
    q = DenseQuadratic(dx=2, dy=10, cond=100.0, seed=7)
    x = np.array([0.4, -0.3])
    res = mlo.hypergrad(q.problem(), x, q.y_star(x), method="neumann", lower_solved=True)
    assert res.success, res.message
    assert res.nit > 1000
    np.testing.assert_allclose(res.grad, q.hypergrad(x), rtol=1e-7)


def test_loose_tol_does_not_loosen_the_lower_solve(quad, quad_problem):
    x = np.array([0.3, -1.0, 2.0])
    res = mlo.hypergrad(quad_problem, x, np.zeros(quad.dy), method="cg", tol=1e-3)
    assert res.lower_grad_norm <= 1e-10


def test_lower_tolerance_is_scale_invariant():
    """Scaling g by 1e7 leaves y*(x), F and grad F unchanged: so must the answer."""
    q = DenseQuadratic(seed=4)
    big = DenseQuadratic(seed=4)
    big.A, big.C, big.a = 1e7 * q.A, 1e7 * q.C, 1e7 * q.a
    x = np.array([0.3, -1.0, 2.0])
    res = mlo.hypergrad(big.problem(), x, np.zeros(6), method="cg")
    assert res.success, res.message
    np.testing.assert_allclose(res.grad, q.hypergrad(x), rtol=1e-7)


# a point of the demo's L-BFGS-B run on the breast-cancer penalties (11 of 30 at a bound of
# [-8, 8], cond(H_yy) = 2.6e6) and the previous lower solution, its warm start
_BC_X = np.array([
    4.47539184393178, 5.193946481975259, 2.750843749927119, -3.516235899554309,
    -4.840552106379247, -8.0, 5.127032317647912, -6.651623493284303, -8.0, 7.149438128350101,
    -8.0, -8.0, 5.464244812099675, 3.2336437386081625, 3.4816460285293096, -5.21232717118795,
    7.86255275956267, 6.918537118511866, -8.0, 8.0, -2.915587715510035, -8.0,
    4.4002434229387495, 6.131904079694109, -8.0, -8.0, 4.411461728564989, -8.0, -8.0,
    6.460855014075946])
_BC_Y0 = np.array([
    -1.566018470195394e-05, 7.358095793323188e-06, -0.00014969234551659848,
    -0.39224488326574264, 0.18900633781125759, 1.9568348508190552, -1.8349862433390823e-05,
    -3.758972267791454, 0.6749408954506645, 3.33562907162087e-06, -3.677136337137816,
    1.203205367353335, -1.00974050458097e-05, -0.0001648906149975137, -0.0001398422249526752,
    0.5037978844344526, 1.7434593251926033e-06, 2.3480089561566474e-06, 0.27154689534398085,
    4.338741920863935e-06, -0.20392480370882055, -2.7577132933583828, -5.3517648382674234e-05,
    -8.277846838364171e-06, -0.368936305026266, -0.5092315986963438, -2.881499244537823e-05,
    -2.4024661199725412, -1.1838326952397253, 4.108371427170211e-06])


def test_newton_cg_retries_a_step_whose_cg_stopped_at_its_budget():
    """From this warm start, Newton-CG's 2 dy + 20 CG iterations stopped with a residual of
    ~0.3 and the line search on |grad_y g| failed (status 4 at |grad| = 1.7e-8); the step is
    retried with a longer CG. The solution is checked against dense Newton steps."""
    pytest.importorskip("sklearn")
    from mlocore.problems import load_breast_cancer_logistic
    p = load_breast_cancer_logistic(seed=0).problem
    res = mlo.solve_lower(p, _BC_X, _BC_Y0, tol=1e-10)
    assert res.success and res.status == 0, res.message
    lo, d = p.lower, p.dy
    y = _BC_Y0.copy()
    for _ in range(6):  # dense Newton: quadratic convergence from this start (|g| 2e-2)
        z = np.concatenate([_BC_X, y])
        H = np.column_stack([lo.hvp_yy(z, e, *lo.args) for e in np.eye(d)])
        y = y - np.linalg.solve(H, lo.grad_y(z, *lo.args))
    np.testing.assert_allclose(res.y, y, rtol=0, atol=1e-8 * np.linalg.norm(y))


@pytest.mark.parametrize("n", [11, 22])
def test_count_fields_match_counter_names(n):
    from mlocore._kernels.oracles import COUNTER_NAMES
    from mlocore._results import add_counts, counts_dict

    counts = np.arange(1, n + 1, dtype=np.int64) ** 2
    calls = dict(zip(COUNTER_NAMES, counts.tolist()))
    assert counts_dict(counts) == calls and list(counts_dict(counts)) == list(COUNTER_NAMES)
    out = add_counts(mlo.HypergradResult(), counts)
    assert out.oracle_calls == calls
    assert out.ngrad == sum(c for k, c in calls.items() if "grad" in k)
    assert out.nhvp == sum(c for k, c in calls.items() if "hvp" in k)


def test_repeated_call_with_int_and_float_options(quad, quad_problem):
    # validated options carry the kernel's argument types: tol=1 (int) and maxiter as a
    # NumPy integer run the float / int kernel slots as their Python float / int values
    x = np.array([0.3, -1.0, 2.0])
    y = quad.y_star(x) + 0.1
    pairs = [((0.5, 3), (0.5, np.int64(3))), ((1.0, 3), (1, 3)), ((1e-3, 2), (1e-3, np.int32(2)))]
    for (tol_a, it_a), (tol_b, it_b) in pairs:
        a = mlo.hypergrad(quad_problem, x, y, lower_solved=True, tol=tol_a, maxiter=it_a)
        b = mlo.hypergrad(quad_problem, x, y, lower_solved=True, tol=tol_b, maxiter=it_b)
        assert list(a) == list(b) and a.nit == b.nit and a.lin_info == b.lin_info
        np.testing.assert_array_equal(a.grad, b.grad)
        np.testing.assert_array_equal(a.v, b.v)
        assert a.oracle_calls == b.oracle_calls and a.message == b.message
