"""Stochastic problems of the library: logistic hyperparameter selection (idx callbacks,
ijcnn1-like generator), data cleaning, and their reference evaluation (F, hypergrad, x_star).

Sizes are tiny: every check is on the callbacks' mathematics, which does not depend on size.
"""
import numpy as np
import pytest

import mlocore as mlo
from mlocore.problems import (BilevelReference, DataCleaning, LogisticHyperparameter,
                              load_breast_cancer_logistic, load_digits_cleaning,
                              make_cleaning, make_logistic, make_logistic_ijcnn1_like)
from mlocore.problems import cleaning as cmod
from mlocore.problems import logistic as lmod

TIGHT = {"lower_tol": 1e-12, "lin_tol": 1e-12}


# ---------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def logi():
    return make_logistic(n_train=40, n_val=30, n_features=4, seed=2)


@pytest.fixture(scope="module")
def ij():
    return make_logistic_ijcnn1_like(n_train=300, n_val=200, n_features=5, seed=1)


@pytest.fixture(scope="module")
def clean():
    return make_cleaning(n_train=24, n_val=15, n_features=3, n_classes=3, seed=1,
                         reference_options=TIGHT)


def fd_grad(value, z, h):
    g = np.empty_like(z)
    for j in range(z.size):
        e = np.zeros_like(z)
        e[j] = h
        g[j] = (value(z + e) - value(z - e)) / (2 * h)
    return g


def fd_dir(grad, z, v, h):
    return (grad(z + h * v) - grad(z - h * v)) / (2 * h)


STOCH = {
    "logistic-lower": (lmod.logistic_sample_lower_grad, lmod.logistic_sample_lower_hvp,
                       lmod.logistic_sample_lower_value),
    "logistic-upper": (lmod.logistic_sample_upper_grad, lmod.logistic_sample_upper_hvp,
                       lmod.logistic_sample_upper_value),
    "cleaning-lower": (cmod.cleaning_lower_grad, cmod.cleaning_lower_hvp,
                       cmod.cleaning_lower_value),
    "cleaning-upper": (cmod.cleaning_upper_grad, cmod.cleaning_upper_hvp,
                       cmod.cleaning_upper_value),
}
CASES = list(STOCH)


def _level(case, logi, clean):
    """(grad, hvp, value, args, n_samples, size of z) of one level's idx-callbacks."""
    kind, level = case.split("-")
    prob = (logi if kind == "logistic" else clean).stochastic_problem
    obj = getattr(prob, level)
    grad, hvp, value = STOCH[case]
    assert (obj.grad, obj.hvp, obj.value) == (grad, hvp, value)
    return grad, hvp, value, obj.args, obj.n_samples, prob.dx + prob.dy


def _point(case, rng, n, logi):
    z = rng.standard_normal(n)
    if case.startswith("logistic"):
        z[:logi.n_features] -= 1.0  # penalties exp(lam) around 0.4
    return z


def _batches(n_samples):
    return [np.arange(n_samples, dtype=np.int64),
            np.array([3, 0, 3, n_samples - 1, 7, 3], dtype=np.int64),  # repeats
            np.array([5], dtype=np.int64)]


# ---------------------------------------------------------------------------------------
# Every idx-callback against finite differences (full batch, minibatch with repeats, one
# sample). Central differences with h = 1e-5: truncation h^2 |f'''| ~ 1e-10 and rounding
# eps |f| / h ~ 1e-11, hence rtol 1e-6 with a 1e-8 absolute floor relative to the scale.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_grad_matches_finite_differences_of_value(case, logi, clean):
    grad, _, value, args, n_samples, n = _level(case, logi, clean)
    rng = np.random.default_rng(1)
    for idx in _batches(n_samples):
        z = _point(case, rng, n, logi)
        g = grad(z, idx, *args)
        assert g.shape == (n,) and g.dtype == np.float64
        fd = fd_grad(lambda u: value(u, idx, *args), z, 1e-5)
        scale = max(1.0, np.abs(g).max())
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8 * scale)


@pytest.mark.parametrize("case", CASES)
def test_hvp_matches_finite_differences_of_grad(case, logi, clean):
    grad, hvp, _, args, n_samples, n = _level(case, logi, clean)
    rng = np.random.default_rng(2)
    for idx in _batches(n_samples):
        z = _point(case, rng, n, logi)
        v = rng.standard_normal(n)
        hv = hvp(z, v, idx, *args)
        assert hv.shape == (n,) and hv.dtype == np.float64
        fd = fd_dir(lambda u: grad(u, idx, *args), z, v, 1e-5)
        scale = max(1.0, np.abs(hv).max())
        np.testing.assert_allclose(hv, fd, rtol=1e-6, atol=1e-8 * scale)


@pytest.mark.parametrize("case", CASES)
def test_callbacks_do_not_modify_inputs(case, logi, clean):
    grad, hvp, value, args, n_samples, n = _level(case, logi, clean)
    rng = np.random.default_rng(3)
    z, v = rng.standard_normal(n), rng.standard_normal(n)
    idx = _batches(n_samples)[1]
    saved = [a.copy() for a in (z, v, idx)]
    grad(z, idx, *args)
    hvp(z, v, idx, *args)
    value(z, idx, *args)
    for a, b in zip((z, v, idx), saved):
        np.testing.assert_array_equal(a, b)


def test_cleaning_hessian_blocks(clean):
    """Full lower Hessian column by column: symmetric, x-x block diagonal, W-W block
    >= reg (strong convexity in W), every entry against finite differences."""
    args = clean.stochastic_problem.lower.args
    idx = np.arange(clean.n_train, dtype=np.int64)
    n, dx = clean.dx + clean.dy, clean.dx
    rng = np.random.default_rng(4)
    z = rng.standard_normal(n)
    H = np.column_stack([cmod.cleaning_lower_hvp(z, e, idx, *args) for e in np.eye(n)])
    np.testing.assert_allclose(H, H.T, rtol=0, atol=1e-13 * np.abs(H).max())
    off = H[:dx, :dx] - np.diag(np.diag(H[:dx, :dx]))
    assert not np.any(off)
    assert np.linalg.eigvalsh(H[dx:, dx:])[0] >= clean.reg * (1 - 1e-10)
    assert np.abs(H[:dx, dx:]).max() > 1e-3  # the x-W coupling is there
    Hfd = np.column_stack([fd_dir(lambda u: cmod.cleaning_lower_grad(u, idx, *args), z, e,
                                  1e-5) for e in np.eye(n)])
    np.testing.assert_allclose(H, Hfd, rtol=0, atol=1e-8 * np.abs(H).max())


def test_cleaning_value_matches_numpy(clean):
    rng = np.random.default_rng(5)
    x, W = rng.standard_normal(clean.dx), rng.standard_normal(clean.dy)
    z = np.concatenate([x, W])
    idx = np.arange(clean.n_train, dtype=np.int64)
    s = 1 / (1 + np.exp(-x))
    M = clean.A_train @ W.reshape(clean.n_features, clean.n_classes)
    lse = np.log(np.exp(M).sum(axis=1))
    ce = lse - M[np.arange(clean.n_train), clean.t_train]
    ref = np.mean(s * ce) + 0.5 * clean.reg * W @ W
    val = cmod.cleaning_lower_value(z, idx, *clean.stochastic_problem.lower.args)
    assert val == pytest.approx(ref, rel=1e-12)
    up = cmod.cleaning_upper_value(z, np.arange(clean.n_val), *clean.problem.upper.args)
    assert up == pytest.approx(clean.loss(W, "val"), rel=1e-12)


def test_cleaning_is_stable_for_large_logits(clean):
    z = np.concatenate([np.full(clean.dx, 800.0), np.full(clean.dy, 300.0)])
    z[clean.dx::4] = -500.0
    for case in ("cleaning-lower", "cleaning-upper"):
        grad, hvp, value, args, n_samples, _ = _level(case, None, clean)
        idx = np.arange(n_samples, dtype=np.int64)
        assert np.isfinite(value(z, idx, *args))
        assert np.all(np.isfinite(grad(z, idx, *args)))
        assert np.all(np.isfinite(hvp(z, z, idx, *args)))


# ---------------------------------------------------------------------------------------
# Sample means
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_partition_means_recombine(case, logi, clean):
    """(|A| grad(A) + |B| grad(B)) / n == grad(all) for a partition A u B: the sample-free
    regularizers, added in full on each call, recombine since (|A| + |B|) / n = 1."""
    grad, hvp, value, args, n_samples, n = _level(case, logi, clean)
    rng = np.random.default_rng(6)
    z, v = _point(case, rng, n, logi), rng.standard_normal(n)
    perm = rng.permutation(n_samples).astype(np.int64)
    for cut in (1, n_samples // 3, n_samples - 1):
        a, b = np.ascontiguousarray(perm[:cut]), np.ascontiguousarray(perm[cut:])
        full = np.arange(n_samples, dtype=np.int64)
        for fn, extra in ((grad, ()), (hvp, (v,))):
            both = (a.size * fn(z, *extra, a, *args) + b.size * fn(z, *extra, b, *args))
            ref = fn(z, *extra, full, *args)
            np.testing.assert_allclose(both / n_samples, ref, rtol=0,
                                       atol=1e-12 * max(1.0, np.abs(ref).max()))
        both = (a.size * value(z, a, *args) + b.size * value(z, b, *args)) / n_samples
        assert both == pytest.approx(value(z, full, *args), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_minibatch_is_the_mean_of_single_samples(case, logi, clean):
    grad, hvp, value, args, n_samples, n = _level(case, logi, clean)
    rng = np.random.default_rng(7)
    z, v = _point(case, rng, n, logi), rng.standard_normal(n)
    idx = _batches(n_samples)[1]
    one = [np.array([i], dtype=np.int64) for i in idx]
    np.testing.assert_allclose(grad(z, idx, *args),
                               np.mean([grad(z, i, *args) for i in one], axis=0),
                               rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(hvp(z, v, idx, *args),
                               np.mean([hvp(z, v, i, *args) for i in one], axis=0),
                               rtol=1e-12, atol=1e-13)
    assert value(z, idx, *args) == pytest.approx(np.mean([value(z, i, *args) for i in one]),
                                                 rel=1e-12)


@pytest.mark.parametrize("level", ["lower", "upper"])
def test_logistic_full_batch_equals_deterministic(logi, level):
    det = getattr(logi.problem, level)
    sto = getattr(logi.stochastic_problem, level)
    rng = np.random.default_rng(8)
    z, v = rng.standard_normal(2 * logi.n_features), rng.standard_normal(2 * logi.n_features)
    idx = np.arange(sto.n_samples, dtype=np.int64)
    np.testing.assert_allclose(sto.grad(z, idx, *sto.args), det.grad(z, *det.args),
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sto.hvp(z, v, idx, *sto.args), det.hvp(z, v, *det.args),
                               rtol=1e-12, atol=1e-14)
    assert sto.value(z, idx, *sto.args) == pytest.approx(det.value(z, *det.args), rel=1e-12)
    # what mlocore's deterministic methods call: the compiled form prepends arange(n)
    cs, cd = sto.compiled(f"s{level}"), det.compiled(f"d{level}")
    np.testing.assert_allclose(cs.grad(z, *cs.args), cd.grad(z, *cd.args), rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("level", ["lower", "upper"])
def test_cleaning_problem_is_the_full_batch(clean, level):
    det = getattr(clean.problem, level)
    sto = getattr(clean.stochastic_problem, level)
    assert det is not sto and det.n_samples == sto.n_samples
    assert det.n_samples == (clean.n_train if level == "lower" else clean.n_val)
    rng = np.random.default_rng(9)
    z = rng.standard_normal(clean.dx + clean.dy)
    cd = det.compiled(f"d{level}")
    np.testing.assert_array_equal(cd.args[0], np.arange(det.n_samples))
    np.testing.assert_array_equal(cd.grad(z, *cd.args),
                                  sto.grad(z, np.arange(sto.n_samples), *sto.args))


# ---------------------------------------------------------------------------------------
# Structure and generators
# ---------------------------------------------------------------------------------------
def test_logistic_stochastic_structure(logi):
    sp = logi.stochastic_problem
    assert isinstance(logi, LogisticHyperparameter)
    assert sp.dims == logi.problem.dims == (4, 4)
    assert sp.lower.n_samples == logi.n_train == 40
    assert sp.upper.n_samples == logi.n_val == 30
    assert logi.problem.lower.n_samples is None
    assert sp.lower.args[0] is logi.X_train and sp.upper.args[0] is logi.X_val
    assert isinstance(logi.reference, BilevelReference)
    assert "n_train=40" in repr(logi)


def test_ijcnn1_like_generator(ij):
    assert ij.n_features == 5 and ij.X_train.shape == (300, 5) and ij.X_val.shape == (200, 5)
    assert ij.stochastic_problem.lower.n_samples == 300
    np.testing.assert_array_equal(ij.X_train[:, -1], 1.0)  # the bias column
    np.testing.assert_allclose(ij.X_train[:, :-1].mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(ij.X_train[:, :-1].std(axis=0), 1.0, rtol=1e-12)
    # the intercept makes the mean label probability 0.1; 500 draws: sd 0.013
    t = np.concatenate([ij.t_train, ij.t_val])
    assert abs(t.mean() - 0.1) < 0.05 and set(np.unique(t)) == {0.0, 1.0}
    again = make_logistic_ijcnn1_like(n_train=300, n_val=200, n_features=5, seed=1)
    np.testing.assert_array_equal(again.X_val, ij.X_val)
    np.testing.assert_array_equal(again.t_train, ij.t_train)
    nob = make_logistic_ijcnn1_like(n_train=50, n_val=20, n_features=3, seed=1, bias=False)
    np.testing.assert_allclose(nob.X_train.mean(axis=0), 0.0, atol=1e-12)


def test_ijcnn1_like_default_shape():
    """The defaults have ijcnn1's shape: 49,990 / 91,701 samples, 22 features, ~10%
    positives (generation is cheap; nothing is solved here)."""
    big = make_logistic_ijcnn1_like()
    assert big.X_train.shape == (49990, 22) and big.X_val.shape == (91701, 22)
    assert abs(big.t_train.mean() - 0.1) < 0.01 and abs(big.t_val.mean() - 0.1) < 0.01
    assert big.stochastic_problem.upper.n_samples == 91701


@pytest.mark.parametrize("kwargs", [{"n_features": 1}, {"pos_fraction": 0.0},
                                    {"pos_fraction": 1.5}, {"label_noise": -0.1},
                                    {"n_train": 1}, {"n_val": 0}])
def test_ijcnn1_like_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        make_logistic_ijcnn1_like(**{"n_train": 20, "n_val": 10, **kwargs})


def test_breast_cancer_has_a_stochastic_form():
    pytest.importorskip("sklearn")
    bc = load_breast_cancer_logistic(seed=0)
    sp = bc.stochastic_problem
    assert sp.lower.n_samples == bc.X_train.shape[0] and sp.upper.n_samples == bc.X_val.shape[0]
    assert sp.lower.grad is lmod.logistic_sample_lower_grad
    rng = np.random.default_rng(10)
    z = rng.standard_normal(60)
    idx = np.arange(sp.lower.n_samples, dtype=np.int64)
    np.testing.assert_allclose(sp.lower.grad(z, idx, *sp.lower.args),
                               bc.problem.lower.grad(z, *bc.problem.lower.args), rtol=1e-12,
                               atol=1e-14)
    lam = np.full(30, -2.0)
    assert bc.F(lam) == pytest.approx(bc.val_loss(bc.w_star(lam)), rel=1e-12)


def test_cleaning_structure(clean):
    assert isinstance(clean, DataCleaning)
    assert clean.problem.dims == clean.stochastic_problem.dims == (24, 4 * 3)
    assert clean.stochastic_problem.lower.n_samples == 24
    assert clean.stochastic_problem.upper.n_samples == 15
    np.testing.assert_array_equal(clean.A_train[:, -1], 1.0)
    for arr in (clean.A_train, clean.A_val):
        assert arr.dtype == np.float64 and arr.flags.c_contiguous
    for arr in (clean.t_train, clean.t_val, clean.t_train_clean):
        assert arr.dtype == np.int64 and arr.min() >= 0 and arr.max() < 3
    assert clean.A_test is None and "n_train=24" in repr(clean)
    rng = np.random.default_rng(11)
    W = rng.standard_normal(clean.dy)
    pred = np.argmax(clean.A_val @ W.reshape(4, 3), axis=1)
    assert clean.accuracy(W) == pytest.approx(np.mean(pred == clean.t_val))
    assert clean.accuracy(W.reshape(4, 3), "train_clean") == pytest.approx(
        np.mean(np.argmax(clean.A_train @ W.reshape(4, 3), axis=1) == clean.t_train_clean))
    assert clean.loss(np.zeros(clean.dy), "train") == pytest.approx(np.log(3.0), rel=1e-14)
    with pytest.raises(ValueError, match="no test split"):
        clean.accuracy(W, "test")
    with pytest.raises(ValueError, match="shape"):
        clean.loss(np.zeros(5))


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
def test_corruption_mask_has_the_requested_fraction(fraction):
    prob = make_cleaning(n_train=40, n_val=5, n_classes=4, corruption=fraction, seed=3)
    assert prob.corrupted.sum() == round(fraction * 40)
    # every corrupted label is wrong, every other one untouched
    np.testing.assert_array_equal(prob.t_train != prob.t_train_clean, prob.corrupted)


def test_digits_corruption_and_split():
    pytest.importorskip("sklearn")
    prob = load_digits_cleaning(n_train=100, n_val=50, corruption=0.25, seed=2, pool=4)
    assert prob.corrupted.sum() == 25
    np.testing.assert_array_equal(prob.t_train != prob.t_train_clean, prob.corrupted)
    assert prob.n_features == 5 and prob.n_classes == 10
    assert prob.problem.dims == (100, 50)
    assert prob.A_test.shape == (1797 - 150, 5)
    assert prob.A_train.min() >= 0 and prob.A_train.max() <= 1
    full = load_digits_cleaning(n_train=100, n_val=50, corruption=0.25, seed=2)
    assert full.n_features == 65 and full.problem.dims == (100, 650)
    np.testing.assert_array_equal(full.corrupted, prob.corrupted)  # same draws


def test_digits_default_sizes():
    pytest.importorskip("sklearn")
    prob = load_digits_cleaning()
    assert prob.problem.dims == (500, 650)
    assert (prob.n_train, prob.n_val, prob.A_test.shape[0]) == (500, 500, 797)
    assert prob.corrupted.sum() == 250 and prob.reg == 1e-2
    assert prob.x_star is None and prob.reference.x_star_info["reason"] == "find_star=False"


@pytest.mark.parametrize("kwargs", [{"corruption": 1.5}, {"reg": 0.0}, {"n_train": 0},
                                    {"upper_reg": -1.0}, {"n_classes": 1}])
def test_make_cleaning_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        make_cleaning(**kwargs)


def test_load_digits_cleaning_rejects_bad_arguments():
    pytest.importorskip("sklearn")
    with pytest.raises(ValueError):
        load_digits_cleaning(n_train=1500, n_val=400)
    with pytest.raises(ValueError):
        load_digits_cleaning(pool=3)


def test_detection_auc(clean):
    perfect = clean.ideal_x()
    assert clean.detection_auc(perfect) == 1.0
    assert clean.detection_auc(-perfect) == 0.0
    assert clean.detection_auc(np.zeros(clean.dx)) == 0.5
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    x = np.round(np.random.default_rng(12).standard_normal(clean.dx), 1)  # with ties
    ref = sklearn_metrics.roc_auc_score(clean.corrupted, -x)
    assert clean.detection_auc(x) == pytest.approx(ref, rel=1e-12)


def test_clean_weights_beat_uniform_weights():
    """Sanity check that the problem is meaningful: weight 1 on clean samples and ~0 on
    corrupted ones gives a lower validation loss (and F) than uniform weights."""
    pytest.importorskip("sklearn")
    prob = load_digits_cleaning(n_train=200, n_val=100, seed=0, pool=2)
    uniform = np.zeros(prob.dx)
    ideal = prob.ideal_x(30.0)  # sigmoid(+-30): weights 1 - 1e-13 and 1e-13
    W_u, W_i = prob.W_star(uniform), prob.W_star(ideal)
    assert prob.loss(W_i, "val") < prob.loss(W_u, "val") - 0.1
    assert prob.F(ideal) == pytest.approx(prob.loss(W_i, "val"), rel=1e-12)
    assert prob.accuracy(W_i, "test") > prob.accuracy(W_u, "test")
    # and the hypergradient at uniform weights points the right way: it lowers corrupted
    # samples' weights (positive components) more than clean ones
    assert prob.detection_auc(-prob.hypergrad(uniform)) > 0.8


# ---------------------------------------------------------------------------------------
# Reference evaluation
# ---------------------------------------------------------------------------------------
def _check_hypergrad_against_fd(prob, x, h=1e-4, rtol=1e-5):
    hg = prob.hypergrad(x)
    fd = fd_grad(prob.F, x, h)
    # truncation h^2 |F'''| ~ 1e-9; lower solves (|grad| <= 1e-12) give ~1e-12 / h
    assert np.linalg.norm(fd) > 1e-4  # a non-trivial check
    assert np.linalg.norm(hg - fd) <= rtol * np.linalg.norm(fd)
    return hg


def test_logistic_reference_hypergrad(logi):
    x = np.array([-1.0, -2.0, 0.5, -0.3])
    logi.reference.lower_tol = 1e-12
    hg = _check_hypergrad_against_fd(logi, x)
    # agrees with a cold mlocore.hypergrad on the deterministic problem
    res = mlo.hypergrad(logi.problem, x, np.zeros(4), method="direct", tol=1e-12)
    np.testing.assert_allclose(hg, res.grad, rtol=1e-8, atol=1e-14)
    assert logi.F(x) == pytest.approx(res.fun, rel=1e-12)


def test_ijcnn1_like_reference_hypergrad(ij):
    ij.reference.lower_tol = 1e-12
    _check_hypergrad_against_fd(ij, np.full(ij.n_features, -3.0))


def test_cleaning_reference_hypergrad(clean):
    rng = np.random.default_rng(13)
    x = rng.standard_normal(clean.dx)
    hg = _check_hypergrad_against_fd(clean, x)
    # W* solves the lower problem
    z = np.concatenate([x, clean.W_star(x)])
    g = cmod.cleaning_lower_grad(z, np.arange(clean.n_train), *clean.problem.lower.args)
    assert np.abs(g[clean.dx:]).max() < 1e-11
    assert hg.shape == (clean.dx,)


def test_reference_warm_starts_do_not_change_results(clean):
    rng = np.random.default_rng(14)
    x1, x2 = rng.standard_normal(clean.dx), rng.standard_normal(clean.dx)
    a = clean.hypergrad(x1)
    clean.hypergrad(x2)
    b = clean.hypergrad(x1)  # warm-started from x2's solution
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)
    fresh = make_cleaning(n_train=24, n_val=15, n_features=3, n_classes=3, seed=1,
                          reference_options=TIGHT)
    np.testing.assert_allclose(fresh.hypergrad(x1), a, rtol=1e-9, atol=1e-13)
    with pytest.raises(ValueError, match="shape"):
        clean.F(np.zeros(3))


def test_logistic_x_star_when_F_has_a_minimizer():
    """Few training samples: every penalty has an interior optimum (checked: the
    finite-difference Hessian of F is positive definite there)."""
    prob = make_logistic(n_train=20, n_val=200, n_features=3, seed=3)
    xs = prob.x_star
    assert xs is not None, prob.reference.x_star_info
    info = prob.reference.x_star_info
    assert info["accepted"] and info["lambda_min"] > 0 and info["error_bound"] < 1e-4
    assert np.linalg.norm(prob.hypergrad(xs)) <= 1e-8
    assert prob.F_star == pytest.approx(prob.F(xs))
    rng = np.random.default_rng(15)
    for _ in range(4):
        assert prob.F(xs + 0.05 * rng.standard_normal(3)) > prob.F_star
    assert prob.x_star is not xs and np.array_equal(prob.x_star, xs)  # cached, copies


def test_logistic_x_star_is_none_when_F_is_flat():
    """Here the search ends where some penalties have run off (F flat along them): the
    curvature check rejects the point rather than report a meaningless x_star."""
    prob = make_logistic(n_train=20, n_val=200, n_features=3, seed=0)
    assert prob.x_star is None and prob.F_star is None
    info = prob.reference.x_star_info
    assert not info["accepted"] and info["reason"]


def test_x_star_search_stops_when_a_coordinate_runs_off(logi):
    prob = LogisticHyperparameter(logi.X_train, logi.t_train, logi.X_val, logi.t_val,
                                  reference_options={"star_bound": 0.5, "star_patience": 2})
    assert prob.x_star is None
    res, info = prob.reference.x_star_result, prob.reference.x_star_info
    assert res.status == 99 and "stayed beyond |x_j| = 0.5 for 2 iterations" in info["reason"]
    assert logi.reference.star_bound == lmod.LAM_BOUND == 20.0


def test_cleaning_x_star_with_upper_ridge():
    prob = make_cleaning(n_train=12, n_val=15, n_features=2, n_classes=3, seed=4,
                         upper_reg=0.05)
    assert prob.reference.find_star
    xs = prob.x_star
    assert xs is not None, prob.reference.x_star_info
    assert np.linalg.norm(prob.hypergrad(xs)) <= 1e-8
    assert prob.reference.x_star_info["lambda_min"] > 0


def test_bilevel_reference_on_a_quadratic(quad):
    """BilevelReference reproduces a closed form (conftest's DenseQuadratic)."""
    ref = BilevelReference(quad.problem(), np.zeros(quad.dy), lower_tol=1e-12)
    rng = np.random.default_rng(16)
    x = rng.standard_normal(quad.dx)
    assert ref.F(x) == pytest.approx(quad.F(x), rel=1e-10)
    np.testing.assert_allclose(ref.hypergrad(x), quad.hypergrad(x), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(ref.y_star(x), quad.y_star(x), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ref.x_star, quad.x_star, rtol=1e-6, atol=1e-8)
    assert ref.x_star_info["accepted"]
    assert BilevelReference(quad.problem(), np.zeros(quad.dy), find_star=False).x_star is None
