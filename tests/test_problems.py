"""Tests of the problem library: callbacks against finite differences, closed forms, loaders."""
import sys

import numpy as np
import pytest

import mlocore as mlo
from mlocore.problems import (LogisticHyperparameter, QuadraticBilevel,
                              load_breast_cancer_logistic, make_logistic, make_quadratic)
from mlocore.problems import logistic as lmod
from mlocore.problems import quadratic as qmod


# ---------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim():
    return make_quadratic(dx=4, dy=7, n_outer=30, n_inner=40, seed=3)


@pytest.fixture(scope="module")
def logi():
    return make_logistic(n_train=120, n_val=80, n_features=6, seed=2)


def fd_grad(value, z, h):
    g = np.empty_like(z)
    for j in range(z.size):
        e = np.zeros_like(z)
        e[j] = h
        g[j] = (value(z + e) - value(z - e)) / (2 * h)
    return g


def fd_dir(grad, z, v, h):
    return (grad(z + h * v) - grad(z - h * v)) / (2 * h)


def _oracles(case, sim, logi):
    """(grad, hvp, value, n, h) closures over one level's callbacks, for a named case.

    h: finite-difference step. The quadratics are exact for any h (central differences of a
    quadratic have no truncation error), so a large step keeps rounding error small.
    """
    kind, level = case.split("-")
    if kind == "quad":
        args = sim.upper_means if level == "upper" else sim.lower_means
        return (lambda z: qmod.quad_grad(z, *args),
                lambda z, v: qmod.quad_hvp(z, v, *args),
                lambda z: qmod.quad_value(z, *args), sim.dx + sim.dy, 1e-2)
    if kind in ("squad", "squadbatch"):
        samples = sim.upper_samples if level == "upper" else sim.lower_samples
        args = samples + (sim.ridge,)
        n = samples[0].shape[0]
        if kind == "squad":
            idx = np.arange(n, dtype=np.int64)
        else:  # a minibatch with a repeated index
            idx = np.array([3, 0, 3, n - 1, 7], dtype=np.int64)
        return (lambda z: qmod.quad_sample_grad(z, idx, *args),
                lambda z, v: qmod.quad_sample_hvp(z, v, idx, *args),
                lambda z: qmod.quad_sample_value(z, idx, *args), sim.dx + sim.dy, 1e-2)
    if level == "upper":
        args = (logi.X_val, logi.t_val)
        return (lambda z: lmod.logistic_upper_grad(z, *args),
                lambda z, v: lmod.logistic_upper_hvp(z, v, *args),
                lambda z: lmod.logistic_upper_value(z, *args), 2 * logi.n_features, 1e-5)
    args = (logi.X_train, logi.t_train)
    return (lambda z: lmod.logistic_lower_grad(z, *args),
            lambda z, v: lmod.logistic_lower_hvp(z, v, *args),
            lambda z: lmod.logistic_lower_value(z, *args), 2 * logi.n_features, 1e-5)


CASES = ["quad-upper", "quad-lower", "squad-upper", "squad-lower", "squadbatch-upper",
         "squadbatch-lower", "logistic-upper", "logistic-lower"]


# ---------------------------------------------------------------------------------------
# Every callback against finite differences
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_grad_matches_finite_differences_of_value(case, sim, logi):
    grad, _, value, n, h = _oracles(case, sim, logi)
    rng = np.random.default_rng(11)
    for _ in range(3):
        z = rng.standard_normal(n)
        g = grad(z)
        assert g.shape == (n,) and g.dtype == np.float64
        fd = fd_grad(value, z, h)
        scale = max(1.0, np.max(np.abs(g)))
        # quadratics: rounding only (|f| eps / h ~ 1e-13); logistic: h^2 f''' ~ 1e-10
        np.testing.assert_allclose(g, fd, rtol=0, atol=1e-8 * scale)


@pytest.mark.parametrize("case", CASES)
def test_hvp_matches_finite_differences_of_grad(case, sim, logi):
    grad, hvp, _, n, h = _oracles(case, sim, logi)
    rng = np.random.default_rng(12)
    for _ in range(3):
        z = rng.standard_normal(n)
        v = rng.standard_normal(n)
        hv = hvp(z, v)
        assert hv.shape == (n,) and hv.dtype == np.float64
        fd = fd_dir(grad, z, v, h)
        scale = max(1.0, np.max(np.abs(hv)))
        np.testing.assert_allclose(hv, fd, rtol=0, atol=1e-8 * scale)


@pytest.mark.parametrize("case", CASES)
def test_callbacks_do_not_modify_inputs(case, sim, logi):
    grad, hvp, value, n, _ = _oracles(case, sim, logi)
    rng = np.random.default_rng(13)
    z, v = rng.standard_normal(n), rng.standard_normal(n)
    z0, v0 = z.copy(), v.copy()
    grad(z)
    hvp(z, v)
    value(z)
    np.testing.assert_array_equal(z, z0)
    np.testing.assert_array_equal(v, v0)


def test_lower_hessian_cross_terms_of_logistic(logi):
    """Check the full Hessian column by column (the lam-lam, lam-w and w-lam blocks)."""
    d = logi.n_features
    args = (logi.X_train, logi.t_train)
    rng = np.random.default_rng(14)
    z = rng.standard_normal(2 * d)
    H = np.column_stack([lmod.logistic_lower_hvp(z, e, *args) for e in np.eye(2 * d)])
    np.testing.assert_allclose(H, H.T, rtol=0, atol=1e-14 * np.abs(H).max())
    e, w = np.exp(z[:d]), z[d:]
    np.testing.assert_allclose(np.diag(H[:d, :d]), 0.5 * e * w * w, rtol=1e-13)
    np.testing.assert_allclose(H[:d, d:], np.diag(e * w), rtol=1e-13, atol=1e-300)
    Hfd = np.column_stack([fd_dir(lambda u: lmod.logistic_lower_grad(u, *args), z, ej, 1e-5)
                           for ej in np.eye(2 * d)])
    np.testing.assert_allclose(H, Hfd, rtol=0, atol=1e-8 * np.abs(H).max())


def test_logistic_value_is_stable_for_large_logits(logi):
    d = logi.n_features
    z = np.concatenate([np.zeros(d), np.full(d, 300.0)])  # logits of several thousands
    X, t = logi.X_val, logi.t_val
    m = X @ z[d:]
    ref = np.mean(np.logaddexp(0.0, m) - t * m)
    val = lmod.logistic_upper_value(z, X, t)
    assert np.isfinite(val) and np.isfinite(ref)
    assert val == pytest.approx(ref, rel=1e-12)
    assert np.all(np.isfinite(lmod.logistic_upper_grad(z, X, t)))
    assert np.all(np.isfinite(lmod.logistic_upper_hvp(z, z, X, t)))


def test_quadratic_tvp_is_zero(sim):
    n = sim.dx + sim.dy
    rng = np.random.default_rng(15)
    out = qmod.quad_tvp(rng.standard_normal(n), rng.standard_normal(n),
                        rng.standard_normal(n), *sim.lower_means)
    assert out.shape == (n,) and not np.any(out)


# ---------------------------------------------------------------------------------------
# Stochastic form: sample means
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["upper", "lower"])
def test_full_batch_equals_deterministic(sim, level):
    samples = sim.upper_samples if level == "upper" else sim.lower_samples
    means = sim.upper_means if level == "upper" else sim.lower_means
    args = samples + (sim.ridge,)
    idx = np.arange(samples[0].shape[0], dtype=np.int64)
    rng = np.random.default_rng(16)
    n = sim.dx + sim.dy
    z, v = rng.standard_normal(n), rng.standard_normal(n)
    np.testing.assert_allclose(qmod.quad_sample_grad(z, idx, *args), qmod.quad_grad(z, *means),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(qmod.quad_sample_hvp(z, v, idx, *args),
                               qmod.quad_hvp(z, v, *means), rtol=1e-12, atol=1e-12)
    assert qmod.quad_sample_value(z, idx, *args) == pytest.approx(qmod.quad_value(z, *means),
                                                                   rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("level", ["upper", "lower"])
def test_per_sample_callbacks_average_to_the_minibatch(sim, level):
    samples = sim.upper_samples if level == "upper" else sim.lower_samples
    args = samples + (sim.ridge,)
    n_samples = samples[0].shape[0]
    rng = np.random.default_rng(17)
    n = sim.dx + sim.dy
    z, v = rng.standard_normal(n), rng.standard_normal(n)
    for idx in (np.arange(n_samples, dtype=np.int64), np.array([5, 1, 5, 2], dtype=np.int64)):
        one = [np.array([i], dtype=np.int64) for i in idx]
        g = np.mean([qmod.quad_sample_grad(z, i, *args) for i in one], axis=0)
        hv = np.mean([qmod.quad_sample_hvp(z, v, i, *args) for i in one], axis=0)
        f = np.mean([qmod.quad_sample_value(z, i, *args) for i in one])
        np.testing.assert_allclose(qmod.quad_sample_grad(z, idx, *args), g, rtol=1e-12,
                                   atol=1e-12)
        np.testing.assert_allclose(qmod.quad_sample_hvp(z, v, idx, *args), hv, rtol=1e-12,
                                   atol=1e-12)
        assert qmod.quad_sample_value(z, idx, *args) == pytest.approx(f, rel=1e-12, abs=1e-12)


def test_single_sample_matches_its_formula(sim):
    """phi_i(x, y) = y.A_i y/2 + x.B_i x/2 + x.C_i y + a_i.y + b_i.x, rank-one plus ridge."""
    U, W, C, a, b = sim.lower_samples
    i = 4
    rng = np.random.default_rng(18)
    x, y = rng.standard_normal(sim.dx), rng.standard_normal(sim.dy)
    A_i = np.outer(U[i], U[i]) + sim.ridge * np.eye(sim.dy)
    B_i = np.outer(W[i], W[i]) + sim.ridge * np.eye(sim.dx)
    ref = y @ A_i @ y / 2 + x @ B_i @ x / 2 + x @ C[i] @ y + a[i] @ y + b[i] @ x
    val = qmod.quad_sample_value(np.concatenate([x, y]), np.array([i]), *sim.lower_samples,
                                 sim.ridge)
    assert val == pytest.approx(ref, rel=1e-12)


# ---------------------------------------------------------------------------------------
# Quadratic problem: construction and closed forms
# ---------------------------------------------------------------------------------------
def test_quadratic_structure(sim):
    assert isinstance(sim, QuadraticBilevel)
    assert sim.problem.dims == (4, 7) and sim.stochastic_problem.dims == (4, 7)
    assert sim.stochastic_problem.upper.n_samples == 30
    assert sim.stochastic_problem.lower.n_samples == 40
    assert sim.problem.upper.n_samples is None and sim.problem.upper.tvp is not None
    shapes = [(40, 7), (40, 4), (40, 4, 7), (40, 7), (40, 4)]
    for arr, shape in zip(sim.lower_samples, shapes):
        assert arr.shape == shape
    for arr in sim.lower_samples + sim.upper_samples + sim.lower_means + sim.upper_means:
        assert arr.dtype == np.float64 and arr.flags.c_contiguous
    assert sim.jacobian.shape == (7, 4) and sim.Q.shape == (4, 4)
    assert sim.ridge == sim.ridge_requested == 0.1
    # rank-one plus ridge: A = mean u u^T + ridge I
    U = sim.lower_samples[0]
    np.testing.assert_allclose(sim.lower_means[0], U.T @ U / 40 + 0.1 * np.eye(7), rtol=1e-14)


def test_quadratic_is_reproducible():
    q1 = make_quadratic(dx=2, dy=3, n_outer=5, n_inner=6, seed=5)
    q2 = make_quadratic(dx=2, dy=3, n_outer=5, n_inner=6, seed=5)
    q3 = make_quadratic(dx=2, dy=3, n_outer=5, n_inner=6, seed=6)
    np.testing.assert_array_equal(q1.lower_samples[2], q2.lower_samples[2])
    np.testing.assert_array_equal(q1.x_star, q2.x_star)
    assert not np.array_equal(q1.lower_samples[2], q3.lower_samples[2])


def test_y_star_solves_the_lower_problem(sim):
    rng = np.random.default_rng(19)
    for _ in range(3):
        x = rng.standard_normal(sim.dx)
        g = qmod.quad_grad(sim.z_star(x), *sim.lower_means)
        assert np.max(np.abs(g[sim.dx:])) < 1e-12 * max(1.0, np.abs(g).max())
    # y* is affine with slope J
    x, u = rng.standard_normal(sim.dx), rng.standard_normal(sim.dx)
    np.testing.assert_allclose(sim.y_star(x + u) - sim.y_star(x), sim.jacobian @ u,
                               rtol=1e-12, atol=1e-12)
    A, _, C, _, _ = sim.lower_means
    np.testing.assert_allclose(A @ sim.jacobian, -C.T, rtol=1e-12, atol=1e-12)


def test_hypergrad_and_Q_match_finite_differences_of_F(sim):
    rng = np.random.default_rng(20)
    x = rng.standard_normal(sim.dx)
    hg = sim.hypergrad(x)
    np.testing.assert_allclose(hg, fd_grad(sim.F, x, 1e-2), rtol=1e-9, atol=1e-10)
    Hfd = np.column_stack([fd_dir(sim.hypergrad, x, e, 1e-2) for e in np.eye(sim.dx)])
    np.testing.assert_allclose(sim.Q, Hfd, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(hg, sim.Q @ x + sim.r, rtol=1e-10, atol=1e-12)


def test_x_star_is_the_minimizer(sim):
    assert np.linalg.norm(sim.hypergrad(sim.x_star)) < 1e-10 * max(1.0, np.abs(sim.r).max())
    assert sim.F_star == pytest.approx(sim.F(sim.x_star))
    rng = np.random.default_rng(21)
    for _ in range(5):
        assert sim.F(sim.x_star + 0.1 * rng.standard_normal(sim.dx)) > sim.F_star


def test_Q_is_positive_definite(sim):
    np.testing.assert_allclose(sim.Q, sim.Q.T, rtol=0, atol=1e-14 * np.abs(sim.Q).max())
    ev = np.linalg.eigvalsh(sim.Q)
    assert ev[0] > 0 and ev[0] >= qmod.Q_MIN_RATIO * ev[-1]
    # the check is on Q, not on benchopt's (KJ + (KJ)^T)/2: rebuild Q from its definition
    F, G, K = sim.upper_means[0], sim.upper_means[1], sim.upper_means[2]
    J = sim.jacobian
    np.testing.assert_allclose(sim.Q, J.T @ F @ J + G + K @ J + (K @ J).T, rtol=1e-12,
                               atol=1e-12)


def test_ridge_is_increased_until_Q_is_positive_definite():
    found = None
    for seed in range(60):
        try:
            make_quadratic(seed=seed, adjust_ridge=False)
        except ValueError as exc:
            assert "Q = J^T F J" in str(exc)
            found = seed
            break
    assert found is not None, "expected some seed with an indefinite Q at ridge=0.1"
    # the same data with the default adjust_ridge=True: a larger ridge, Q positive definite
    q = make_quadratic(seed=found)
    assert q.ridge > q.ridge_requested == 0.1
    ev = np.linalg.eigvalsh(q.Q)
    assert ev[0] >= qmod.Q_MIN_RATIO * ev[-1] > 0
    assert np.linalg.norm(q.hypergrad(q.x_star)) < 1e-10 * max(1.0, np.abs(q.r).max())
    # ... and the ridge is the smallest power-of-two multiple that works
    with pytest.raises(ValueError, match=r"Q = J\^T F J .*\(need lambda_min >= "):
        make_quadratic(seed=found, ridge=q.ridge / 2, adjust_ridge=False)
    make_quadratic(seed=found, ridge=q.ridge, adjust_ridge=False)


def test_singular_lower_hessian_without_ridge():
    # fewer inner samples than dy and no ridge: A = mean u u^T is singular
    with pytest.raises(ValueError, match="lower Hessian A"):
        make_quadratic(dx=2, dy=6, n_inner=3, ridge=0.0, adjust_ridge=False)
    q = make_quadratic(dx=2, dy=6, n_inner=3, ridge=0.0)
    assert q.ridge > 0
    assert np.linalg.eigvalsh(q.lower_means[0])[0] > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"dx": 0}, "dx must be a positive integer, got 0"),
    ({"dy": 2.5}, "dy must be a positive integer, got 2.5"),
    ({"n_inner": True}, "n_inner must be a positive integer, got True"),
    ({"ridge": -1.0}, "ridge must be a finite number >= 0, got -1.0"),
    ({"ridge": np.inf}, "ridge must be a finite number >= 0, got inf"),
])
def test_make_quadratic_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_quadratic(**kwargs)


@pytest.mark.parametrize("which", ["problem", "stochastic_problem"])
@pytest.mark.parametrize("method", ["direct", "cg"])
def test_mlocore_hypergrad_matches_closed_form(sim, which, method):
    problem = getattr(sim, which)
    rng = np.random.default_rng(22)
    x = rng.standard_normal(sim.dx)
    res = mlo.hypergrad(problem, x, np.zeros(sim.dy), method=method, tol=1e-12)
    assert res.success, res.message
    exact = sim.hypergrad(x)
    assert np.linalg.norm(res.grad - exact) <= 1e-10 * np.linalg.norm(exact)
    np.testing.assert_allclose(res.y, sim.y_star(x), rtol=1e-9, atol=1e-11)


def test_mlocore_solve_lower_matches_y_star(sim):
    x = np.linspace(-1.0, 1.0, sim.dx)
    res = mlo.solve_lower(sim.problem, x, np.zeros(sim.dy), tol=1e-12)
    assert res.success, res.message
    np.testing.assert_allclose(res.y, sim.y_star(x), rtol=1e-10, atol=1e-12)


def test_default_quadratic_sizes():
    q = make_quadratic()
    assert (q.dx, q.dy, q.n_outer, q.n_inner) == (5, 10, 50, 100)
    res = mlo.hypergrad(q.problem, q.x_star, np.zeros(q.dy), method="direct")
    assert np.linalg.norm(res.grad) < 1e-8


# ---------------------------------------------------------------------------------------
# Logistic hyperparameter problem
# ---------------------------------------------------------------------------------------
def test_logistic_structure(logi):
    assert isinstance(logi, LogisticHyperparameter)
    assert logi.problem.dims == (6, 6) and logi.n_features == 6
    assert logi.X_train.shape == (120, 6) and logi.X_val.shape == (80, 6)
    for arr in (logi.X_train, logi.t_train, logi.X_val, logi.t_val):
        assert arr.dtype == np.float64 and arr.flags.c_contiguous
    assert set(np.unique(logi.t_train)) <= {0.0, 1.0}
    np.testing.assert_allclose(logi.X_train.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(logi.X_train.std(axis=0), 1.0, rtol=1e-12)
    assert logi.X_test is None
    with pytest.raises(ValueError, match="no test split"):
        logi.accuracy(np.zeros(6), split="test")
    with pytest.raises(ValueError, match="unknown split"):
        logi.loss(np.zeros(6), split="nope")


def test_logistic_helpers(logi):
    d = logi.n_features
    rng = np.random.default_rng(23)
    w = rng.standard_normal(d)
    z = np.concatenate([rng.standard_normal(d), w])
    assert logi.val_loss(w) == pytest.approx(
        lmod.logistic_upper_value(z, logi.X_val, logi.t_val), rel=1e-12)
    assert logi.val_loss(np.zeros(d)) == pytest.approx(np.log(2.0), rel=1e-14)
    acc = logi.accuracy(w, split="train")
    pred = (logi.X_train @ w > 0).astype(float)
    assert acc == pytest.approx(np.mean(pred == logi.t_train))
    # the fitted weights do better than chance on the validation set
    res = mlo.solve_lower(logi.problem, np.zeros(d), np.zeros(d), tol=1e-10)
    assert res.success
    assert logi.accuracy(res.y) > 0.6
    assert logi.val_loss(res.y) < np.log(2.0)


@pytest.mark.parametrize("method", ["cg", "direct"])
def test_logistic_hypergrad_matches_finite_differences(logi, method):
    d = logi.n_features
    problem = logi.problem
    rng = np.random.default_rng(24)
    lam = rng.normal(-1.0, 0.5, size=d)
    w0 = np.zeros(d)

    def F(lam_):
        res = mlo.solve_lower(problem, lam_, w0, tol=1e-12)
        assert res.success, res.message
        return logi.val_loss(res.y)

    res = mlo.hypergrad(problem, lam, w0, method=method, tol=1e-12)
    assert res.success, res.message
    fd = fd_grad(F, lam, 1e-4)
    # errors: h^2 F''' ~ 1e-9, lower-solve error / h ~ 1e-8
    assert np.linalg.norm(res.grad - fd) <= 1e-6 * np.linalg.norm(fd)
    assert np.linalg.norm(fd) > 1e-4  # a non-trivial check


def test_make_logistic_reproducible_and_validates():
    a = make_logistic(n_train=20, n_val=10, n_features=3, seed=4)
    b = make_logistic(n_train=20, n_val=10, n_features=3, seed=4)
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.t_val, b.t_val)
    with pytest.raises(ValueError, match="n_features must be an integer >= 1, got 0"):
        make_logistic(n_features=0)
    with pytest.raises(ValueError, match="n_train must be an integer >= 2, got 1"):
        make_logistic(n_train=1)


def test_breast_cancer_loads():
    pytest.importorskip("sklearn")
    bc = load_breast_cancer_logistic(seed=0)
    assert bc.n_features == 30 and bc.problem.dims == (30, 30)
    sizes = [bc.X_train.shape[0], bc.X_val.shape[0], bc.X_test.shape[0]]
    assert sum(sizes) == 569
    assert abs(sizes[0] / 569 - 0.5) < 0.01 and abs(sizes[1] / 569 - 0.25) < 0.01
    for arr in (bc.X_train, bc.t_train, bc.X_val, bc.t_val, bc.X_test, bc.t_test):
        assert arr.dtype == np.float64 and arr.flags.c_contiguous
    np.testing.assert_allclose(bc.X_train.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(bc.X_train.std(axis=0), 1.0, rtol=1e-10)
    # stratified: class balance ~ 357 / 569 in every split
    for t in (bc.t_train, bc.t_val, bc.t_test):
        assert abs(t.mean() - 357 / 569) < 0.01
    # no sample in two splits (compare raw rows through the standardization)
    rows = {tuple(np.round(r, 8)) for r in np.vstack([bc.X_train, bc.X_val, bc.X_test])}
    assert len(rows) == 569
    assert len(bc.feature_names) == 30
    res = mlo.solve_lower(bc.problem, np.zeros(30), np.zeros(30), tol=1e-10)
    assert res.success
    assert bc.accuracy(res.y, split="test") > 0.9
    two = load_breast_cancer_logistic(val_fraction=0.5, test_fraction=0.0)
    assert two.X_test is None and two.X_train.shape[0] + two.X_val.shape[0] == 569
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction < 1"):
        load_breast_cancer_logistic(val_fraction=0.6, test_fraction=0.5)


def test_breast_cancer_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r'pip install "mlocore\[data\]"'):
        load_breast_cancer_logistic()


def test_logistic_curvature_cache_is_exact():
    """The lower callbacks of LogisticHyperparameter.problem keep D = s (1 - s) / n between
    products at one w: bit for bit the plain callbacks, at points visited in any order
    (a changed w, a changed lam with the same w, back to an earlier w)."""
    from mlocore.problems import logistic as lg
    data = make_logistic(n_train=40, n_val=20, n_features=4, seed=3)
    X, t = data.X_train, data.t_train
    cache = lg.new_curvature_cache(X)
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=8), rng.normal(size=8)
    z3 = z1.copy()
    z3[:4] += 1.0  # same w, other lam: the cache must serve it (D depends on w only)
    for z in (z1, z1, z2, z3, z1, z2):
        v = rng.normal(size=8)
        np.testing.assert_array_equal(lg.logistic_lower_hvp_yy_cached(z, v[4:], X, t, cache),
                                      lg.logistic_lower_hvp_yy(z, v[4:], X, t))
        np.testing.assert_array_equal(lg.logistic_lower_hvp_cached(z, v, X, t, cache),
                                      lg.logistic_lower_hvp(z, v, X, t))
        np.testing.assert_array_equal(cache[1:5], z[4:])  # the cache holds the last w
    plain = mlo.BilevelProblem(
        data.problem.upper,
        mlo.Objective(lg.logistic_lower_grad, hvp=lg.logistic_lower_hvp,
                      value=lg.logistic_lower_value, args=(X, t),
                      grad_y=lg.logistic_lower_grad_y, hvp_yy=lg.logistic_lower_hvp_yy,
                      hvp_xy=lg.logistic_lower_hvp_xy), dims=(4, 4))
    with pytest.raises(ValueError, match="does not fit X"):
        lg.logistic_lower_hvp_yy_cached(z1, z1[4:], X, t, np.zeros(5))
    with pytest.raises(ValueError, match="2-D data matrix.*got shape \\(40,\\)"):
        lg.new_curvature_cache(X[:, 0])
    for lam in (np.zeros(4), np.linspace(-2, 1, 4)):
        a = mlo.hypergrad(data.problem, lam, np.zeros(4))
        b = mlo.hypergrad(plain, lam, np.zeros(4))
        np.testing.assert_array_equal(a.grad, b.grad)
        np.testing.assert_array_equal(a.y, b.y)
