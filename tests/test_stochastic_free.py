"""SABA, Hessian-free (PZOBO), value-function penalty and primal-dual
(``mlocore/stochastic/{saba,hessian_free,penalty,primal_dual}.py``): convergence on the stochastic quadratic with a closed
form, full-batch runs against independent NumPy recursions, SABA's memory tables, and
reproducibility."""
import numpy as np
import pytest

import mlocore as mlo
from mlocore import BilevelProblem, Objective
from mlocore.problems import make_quadratic
from mlocore.problems.quadratic import quad_sample_grad, quad_sample_value

DX, DY = 5, 10
X0, Y0 = np.zeros(DX), np.zeros(DY)


@pytest.fixture(scope="module")
def q():
    return make_quadratic(dx=DX, dy=DY, n_outer=200, n_inner=200, seed=0)


def run(q, method, problem=None, **kw):
    kw.setdefault("seed", 1)
    kw.setdefault("batch_size", 32)
    kw.setdefault("average", 0.0)  # these tests follow the last iterate
    return mlo.minimize_bilevel(q.stochastic_problem if problem is None else problem,
                                X0, Y0, method=method, reference=q, **kw)


def dist(q, res):
    return float(np.linalg.norm(res.x - q.x_star))


# ---------------------------------------------------------------------------------------
# Dense full-batch pieces (block layout of quadratic.quad_grad: grad_x = B x + C y + b,
# grad_y = A y + C^T x + a; (H_xy v, H_yy v) = (C v, A v)).
# ---------------------------------------------------------------------------------------
def grads(means, x, y):
    A, B, C, a, b = means
    return B @ x + C @ y + b, A @ y + C.T @ x + a


def value(means, x, y):
    A, B, C, a, b = means
    return 0.5 * y @ A @ y + 0.5 * x @ B @ x + x @ C @ y + a @ y + b @ x


def splitmix_normals(seed):
    """The kernels' random stream (SplitMix64 + Box-Muller), re-implemented in Python."""
    state = int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0])
    mask = (1 << 64) - 1

    def u64():
        nonlocal state
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    def unif():
        return (u64() >> 11) * (1.0 / 9007199254740992.0)

    while True:
        u = 1.0 - unif()
        v = unif()
        yield np.sqrt(-2.0 * np.log(u)) * np.cos(2.0 * np.pi * v)


def assert_rel(a, b, rtol=1e-10):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.max(np.abs(b)))


# ---------------------------------------------------------------------------------------
# SABA
# ---------------------------------------------------------------------------------------
# SAGA estimates need the lower step below about 1/(3 L_g) (L_g = 1.585 here): the
# driver's default 1/L_g diverges at batch size 32, see the report / MethodSpec docs.
SABA_STEPS = dict(step=0.1, inner_step=0.2)


def test_saba_converges_linearly_to_x_star(q):
    res = run(q, "saba", maxiter=2000, **SABA_STEPS)
    d = res.history["dist_to_x_star"]
    assert res.status == 20
    assert d[-1] < 1e-6          # measured 1e-13: exact convergence, no noise ball
    # SOBA/StocBiO stall at distance 1-3 at this batch size (noise ball)


def test_saba_refuses_uniform_sampler(q):
    with pytest.raises(ValueError, match="sampler='batches'"):
        run(q, "saba", maxiter=5, sampler="uniform", **SABA_STEPS)


def test_saba_full_batch_matches_numpy(q):
    n, alpha, beta = 6, 0.1, 0.3
    res = run(q, "saba", batch_size=200, maxiter=n, step=alpha, inner_step=beta)
    x, y, v = X0.copy(), Y0.copy(), np.zeros(DY)
    Al, _, Cl, _, _ = q.lower_means
    for _ in range(n):
        _, gy = grads(q.lower_means, x, y)
        fx, fy = grads(q.upper_means, x, y)
        hx, hy = Cl @ v, Al @ v
        x, y, v = x - alpha * (fx - hx), y - beta * gy, v - beta * (hy - fy)
    assert_rel(res.x, x)
    assert_rel(res.y, y)
    assert_rel(res.state["work"][:DY], v)
    # one initial pass (memory_init="full") + one call per iteration
    # (the library problem's blocks: grad_y g, and grad f as its two blocks)
    assert res.oracle_calls["lower_grad_y"] == n + 1 and res.oracle_calls["upper_grad_x"] == n + 1


def _saba_kernel_inputs(q, batch_size, memory_init, x0, y0, v0, seed=3):
    """The kernel's arguments as the driver builds them, with zero steps."""
    from mlocore._hypergrad import _compiled
    from mlocore._kernels.oracles import N_COUNTERS
    from mlocore.stochastic import METHODS
    from mlocore.stochastic._spec import Context
    from mlocore.stochastic._driver import (_kernel_args, _level_sampling,
                                     _projection)
    prob = q.stochastic_problem
    spec = METHODS["saba"]
    comp = _compiled(prob, x0, y0)
    np_rng = np.random.default_rng(seed)
    samp_u, n_u, bs_u = _level_sampling(prob.upper, "upper", batch_size, "batches", np_rng)
    samp_l, n_l, bs_l = _level_sampling(prob.lower, "lower", batch_size, "batches", np_rng)
    ctx = Context(prob, x0, y0, n_u, n_l, bs_u, bs_l, None)
    ctx.sampler = "batches"
    work, fx, ix = spec.setup(ctx, {"memory_init": memory_init})
    work[:DY] = v0
    fpar = np.zeros(7)            # alpha0 = beta0 = 0: the point (x, y, v) never moves
    ipar = np.array([1, 1] + ix, dtype=np.int64)
    args = [comp.upper.fns, _kernel_args(prob.upper, comp.upper), comp.lower.fns,
            _kernel_args(prob.lower, comp.lower), comp.upper.has_hvp, comp.lower.has_hvp,
            x0.copy(), y0.copy(), work, fpar, ipar, samp_u, samp_l,
            np.array([seed], dtype=np.uint64), _projection(prob)]
    counts = np.zeros(2 * N_COUNTERS, dtype=np.int64)
    return spec.kernel, args, counts, samp_l, samp_u, ctx


def _batch_rows(q, x, y, v, idx_l, idx_u):
    args_l = q.lower_samples + (q.ridge,)
    args_u = q.upper_samples + (q.ridge,)
    z = np.concatenate([x, y])
    from mlocore.problems.quadratic import quad_sample_hvp
    gl = quad_sample_grad(z, idx_l, *args_l)
    h = quad_sample_hvp(z, np.concatenate([np.zeros(DX), v]), idx_l, *args_l)
    gu = quad_sample_grad(z, idx_u, *args_u)
    return np.concatenate([gl[DX:], h[DX:], h[:DX]]), np.concatenate([gu[DX:], gu[:DX]])


@pytest.mark.parametrize("memory_init", ["zeros", "full"])
def test_saba_tables_exact_after_an_epoch(q, memory_init):
    from mlocore._callbacks import call_kernel
    from mlocore.stochastic import saba_tables
    rng = np.random.default_rng(7)
    x0, y0, v0 = rng.standard_normal(DX), rng.standard_normal(DY), rng.standard_normal(DY)
    kernel, args, counts, samp_l, samp_u, ctx = _saba_kernel_inputs(q, 32, memory_init,
                                                                     x0, y0, v0)
    nb_l, nb_u = ctx.n_batches_lower, ctx.n_batches_upper
    assert (nb_l, nb_u) == (7, 7)     # 6 batches of 32 and one of 8: unequal weights
    n_iter = nb_l if memory_init == "zeros" else 1   # one epoch visits every batch once
    st, done = call_kernel(kernel, *args, 0, n_iter, counts)
    assert (st, done) == (0, n_iter)
    t = saba_tables(args[8], DX, DY, nb_l, nb_u)
    assert t["filled"]
    np.testing.assert_array_equal(args[6], x0)        # zero steps: nothing moved
    full_l, full_u = _batch_rows(q, x0, y0, v0, np.arange(200), np.arange(200))
    for b in range(nb_l):
        idx = samp_l[1][32 * b:32 * (b + 1)]
        row_l, _ = _batch_rows(q, x0, y0, v0, idx, idx)
        assert_rel(t["table_lower"][b], row_l, 1e-12)
    for b in range(nb_u):
        idx = samp_u[1][32 * b:32 * (b + 1)]
        _, row_u = _batch_rows(q, x0, y0, v0, idx, idx)
        assert_rel(t["table_upper"][b], row_u, 1e-12)
    assert_rel(t["mean_lower"], full_l, 1e-12)
    assert_rel(t["mean_upper"], full_u, 1e-12)


def test_saba_running_mean_does_not_drift(q):
    from mlocore.stochastic import saba_tables
    res = run(q, "saba", maxiter=3000, step=0.05, inner_step=0.1)
    t = saba_tables(res.state["work"], DX, DY, 7, 7)
    w = np.array([32] * 6 + [8]) / 200.0      # sample-weighted rows (batch 6 is the short one)
    assert_rel(t["mean_lower"], w @ t["table_lower"], 1e-10)
    assert_rel(t["mean_upper"], w @ t["table_upper"], 1e-10)
    assert np.ptp(t["table_lower"], axis=0).max() > 1e-3   # rows differ: the test has teeth


# ---------------------------------------------------------------------------------------
# Hessian-free (PZOBO)
# ---------------------------------------------------------------------------------------
def test_hessian_free_converges(q):
    res = run(q, "hessian-free", maxiter=5000)
    assert res.status == 20
    assert dist(q, res) < 4.5     # measured 3.2 (from 15.2); stochastic bias, see docs
    c = res.oracle_calls
    assert c["lower_hvp"] == c["lower_hvp_yy"] == c["lower_hvp_xy"] == c["upper_hvp"] == 0
    assert c["lower_grad_y"] == 5000 * 20 * (5 + 1)  # the library problem's grad_y block


def test_hessian_free_without_hvp_callbacks(q):
    up = Objective(grad=quad_sample_grad, value=quad_sample_value,
                   args=q.upper_samples + (q.ridge,), n_samples=200)
    lo = Objective(grad=quad_sample_grad, value=quad_sample_value,
                   args=q.lower_samples + (q.ridge,), n_samples=200)
    prob = BilevelProblem(upper=up, lower=lo, dims=(DX, DY))
    res = run(q, "hessian-free", problem=prob, maxiter=1000)
    ref = run(q, "hessian-free", maxiter=1000)
    assert res.oracle_calls["lower_hvp"] == 0
    # gradients only: the same run either way (up to the compiled code's rounding)
    np.testing.assert_allclose(res.x, ref.x, rtol=1e-6)
    assert dist(q, res) < 0.5 * np.linalg.norm(q.x_star)


def test_hessian_free_full_batch_matches_numpy(q):
    n, alpha, beta, T, Q, mu = 4, 0.1, 0.4, 3, 2, 1e-3
    res = run(q, "hessian-free", batch_size=200, maxiter=n, step=mlo.Schedule(alpha),
              inner_step=mlo.Schedule(beta), inner_steps=T, directions=Q, smoothing=mu)
    normals = splitmix_normals(1)
    x, y = X0.copy(), Y0.copy()

    def inner(xx, yy):
        for _ in range(T):
            yy = yy - beta * grads(q.lower_means, xx, yy)[1]
        return yy

    for _ in range(n):
        yT = inner(x, y)
        U = np.array([[next(normals) for _ in range(DX)] for _ in range(Q)])
        D = np.array([(inner(x + mu * u, y) - yT) / mu for u in U])
        fx, fy = grads(q.upper_means, x, yT)
        x, y = x - alpha * (fx + U.T @ (D @ fy) / Q), yT
    assert_rel(res.x, x)
    assert_rel(res.y, y)


# ---------------------------------------------------------------------------------------
# Value-function penalty and primal-dual
# ---------------------------------------------------------------------------------------
def test_penalty_converges_to_its_biased_solution(q):
    res = run(q, "penalty", maxiter=5000)
    assert res.oracle_calls["lower_hvp"] == 0 and res.oracle_calls["lower_value"] == 10000
    assert dist(q, res) < 7.0     # measured 4.9 (rho = 10: bias O(1/rho), see docs)


def test_penalty_bias_shrinks_with_rho(q):
    const = dict(batch_size=200, maxiter=20000, step=mlo.Schedule(0.1145),
                 inner_step=mlo.Schedule(0.6))
    d10 = dist(q, run(q, "penalty", rho=10.0, **const))
    d100 = dist(q, run(q, "penalty", rho=100.0, **const))
    assert 5.5 < d10 < 7.5        # measured 6.36: the converged rho = 10 solution
    assert d100 < 1.0             # measured 0.46 (still converging towards ~0.5 / rho-limit)
    assert d100 < 0.2 * d10


def _vf_reference(q, n, alpha, beta, T, rho, a1=0.0, a2=0.0, dual=False, ds=0.0, eps=0.0,
                  gam=0.0):
    """The penalty loop; ``dual``: c at the running averages ybar, yhbar (weight gam) and
    dual ascent on rho."""
    x, y = X0.copy(), Y0.copy()
    yh, ybar, yhbar = Y0.copy(), Y0.copy(), Y0.copy()
    for _ in range(n):
        for _t in range(T - 1):
            yh = yh - beta * (grads(q.lower_means, x, yh)[1] + a1 * yh)
        fx, fy = grads(q.upper_means, x, y)
        yc, yhc = (ybar, yhbar) if dual else (y, yh)
        c = value(q.lower_means, x, yc) - value(q.lower_means, x, yhc) \
            - 0.5 * a1 * yhc @ yhc - a2
        w = rho if (dual or c > 0 or (a1 == 0 and a2 == 0)) else 0.0
        gx, gy = grads(q.lower_means, x, y)
        hx, hy = grads(q.lower_means, x, yh)   # the last yhat step: simultaneous
        x, y, yh = (x - alpha * (fx + w * (gx - hx)) / (1 + rho),
                    y - beta * (fy + w * gy) / (1 + rho), yh - beta * (hy + a1 * yh))
        if dual:
            ybar, yhbar = ybar + gam * (y - ybar), yhbar + gam * (yh - yhbar)
            rho = max(0.0, rho + ds * (c - eps))
    return x, y, yh, ybar, yhbar, rho


def test_penalty_full_batch_matches_numpy(q):
    n, alpha, beta, T, rho, a1 = 8, 0.1, 0.5, 2, 3.0, 0.01
    res = run(q, "penalty", batch_size=200, maxiter=n, step=mlo.Schedule(alpha),
              inner_step=mlo.Schedule(beta), inner_steps=T, rho=rho, a1=a1, a2=0.05)
    x, y, yh, _, _, _ = _vf_reference(q, n, alpha, beta, T, rho, a1=a1, a2=0.05)
    assert_rel(res.x, x)
    assert_rel(res.y, y)
    assert_rel(res.state["work"], yh)


def test_primal_dual_full_batch_matches_numpy(q):
    n, alpha, beta, T = 8, 0.1, 0.5, 2
    res = run(q, "primal-dual", batch_size=200, maxiter=n, step=mlo.Schedule(alpha),
              inner_step=mlo.Schedule(beta), inner_steps=T, dual_step=0.5,
              constraint_tol=0.01, rho0=2.0, a1=0.01, constraint_average=0.3)
    x, y, yh, ybar, yhbar, rho = _vf_reference(q, n, alpha, beta, T, 2.0, a1=0.01, dual=True,
                                               ds=0.5, eps=0.01, gam=0.3)
    assert_rel(res.x, x)
    assert_rel(res.y, y)
    work = res.state["work"]                     # [yhat, ybar, yhatbar, rho]
    assert work.shape == (3 * DY + 1,)
    assert_rel(work[:DY], yh)
    assert_rel(work[DY:2 * DY], ybar)
    assert_rel(work[2 * DY:3 * DY], yhbar)
    assert_rel(work[-1], rho)                    # the multiplier's documented position
    assert abs(rho - 2.0) > 1e-3                 # the dual ascent moved it


def test_primal_dual_converges(q):
    res = run(q, "primal-dual", maxiter=5000)
    rho = res.state["work"][-1]
    assert dist(q, res) < 3.0     # measured 1.76 (from 15.2)
    assert 1.0 < rho < 100.0      # measured 53.4: a finite multiplier


def test_value_function_methods_need_lower_value(q):
    lo = Objective(grad=quad_sample_grad, args=q.lower_samples + (q.ridge,), n_samples=200)
    prob = BilevelProblem(upper=q.stochastic_problem.upper, lower=lo, dims=(DX, DY))
    with pytest.raises(ValueError, match="value"):
        run(q, "penalty", problem=prob, maxiter=2)


# ---------------------------------------------------------------------------------------
# Reproducibility and option checks
# ---------------------------------------------------------------------------------------
REPRO = {"saba": SABA_STEPS, "hessian-free": {}, "penalty": {}, "primal-dual": {}}


@pytest.mark.parametrize("method", sorted(REPRO))
def test_same_seed_and_eval_every_bit_identical(q, method):
    kw = dict(REPRO[method], maxiter=60)
    a = run(q, method, eval_every=60, **kw)
    b = run(q, method, eval_every=60, **kw)
    c = run(q, method, eval_every=7, **kw)
    d = run(q, method, eval_every=60, **dict(kw, seed=2))
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.x, c.x)
    np.testing.assert_array_equal(a.state["work"], c.state["work"])
    assert not np.array_equal(a.x, d.x)


@pytest.mark.parametrize("method, bad", [
    ("saba", {"memory_init": "ones"}), ("hessian-free", {"directions": 0}),
    ("hessian-free", {"smoothing": -1.0}), ("penalty", {"rho": -1.0}),
    ("primal-dual", {"dual_step": 0.0}), ("primal-dual", {"a1": -0.1}),
    ("primal-dual", {"constraint_average": 0.0}), ("primal-dual", {"constraint_average": 1.5})])
def test_invalid_options(q, method, bad):
    with pytest.raises(ValueError):
        run(q, method, maxiter=1, **bad)


def test_unused_common_options_refused(q):
    with pytest.raises(TypeError, match="neumann_terms"):
        run(q, "hessian-free", maxiter=1, neumann_terms=3)
    with pytest.raises(TypeError, match="inner_steps"):
        run(q, "saba", maxiter=1, inner_steps=3)
