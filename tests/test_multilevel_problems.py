"""Multilevel benchmark problems (mlocore.problems.multilevel): callbacks against finite
differences, closed forms against nested numerical solutions, reference solvers."""
import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy.optimize import brentq

import mlocore as mlo
from mlocore.problems import (load_poisoning_trilevel, make_nlevel_quadratic,
                              make_nonquadratic_trilevel, make_trilevel_quadratic)
from mlocore.problems.nlevel_quadratic import NLevelQuadratic
from mlocore.problems.trilevel_quadratic import tq_lower_grad, tq_middle_value, tq_upper_value


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def _cb(obj, name, *vecs):
    return getattr(obj, name)(*[np.ascontiguousarray(v, dtype=np.float64) for v in vecs],
                              *obj.args)


def check_callbacks(problem, z, rng, h=1e-5, rtol=1e-6, n_dirs=3):
    """grad vs CD of value, hvp vs CD of grad, tvp vs CD of hvp, symmetries; every level."""
    N = problem.size
    assert z.shape == (N,)
    for k, obj in enumerate(problem.levels, start=1):
        g = _cb(obj, "grad", z)
        assert g.shape == (N,), k
        scale_g = 1.0 + np.abs(g).max()
        for _ in range(n_dirs):
            u, v, w = rng.standard_normal((3, N))
            dval = (_cb(obj, "value", z + h * v) - _cb(obj, "value", z - h * v)) / (2 * h)
            assert abs(dval - g @ v) <= rtol * scale_g * np.abs(v).sum(), (k, dval, g @ v)
            Hv = _cb(obj, "hvp", z, v)
            dgrad = (_cb(obj, "grad", z + h * v) - _cb(obj, "grad", z - h * v)) / (2 * h)
            assert_allclose(Hv, dgrad, rtol=rtol, atol=rtol * (1.0 + np.abs(Hv).max()),
                            err_msg=f"level {k} hvp")
            assert_allclose(u @ Hv, v @ _cb(obj, "hvp", z, u), rtol=1e-10, atol=1e-10,
                            err_msg=f"level {k} hvp symmetry")
            T = _cb(obj, "tvp", z, u, w)
            dhvp = (_cb(obj, "hvp", z + h * u, w) - _cb(obj, "hvp", z - h * u, w)) / (2 * h)
            assert_allclose(T, dhvp, rtol=rtol, atol=rtol * (1.0 + np.abs(dhvp).max()),
                            err_msg=f"level {k} tvp")
            assert_allclose(T, _cb(obj, "tvp", z, w, u), rtol=1e-10, atol=1e-12,
                            err_msg=f"level {k} tvp symmetry")


def fd_grad(F, x, h=1e-4):
    out = np.empty_like(x)
    for j in range(x.size):
        e = np.zeros_like(x)
        e[j] = h
        out[j] = (F(x + e) - F(x - e)) / (2 * h)
    return out


# ---------------------------------------------------------------------------------------
# Callbacks of every problem
# ---------------------------------------------------------------------------------------
_FACTORIES = {
    "trilevel-quadratic-1": lambda: make_trilevel_quadratic(1),
    "trilevel-quadratic-4": lambda: make_trilevel_quadratic(4, seed=3),
    "nlevel-2": lambda: make_nlevel_quadratic(2, seed=2),
    "nlevel-3": lambda: make_nlevel_quadratic(3, seed=3),
    "nlevel-5": lambda: make_nlevel_quadratic(5, seed=5),
    "nonquadratic-222": lambda: make_nonquadratic_trilevel(),
    "nonquadratic-123": lambda: make_nonquadratic_trilevel((1, 2, 3), seed=1, scale=2.0),
}


@pytest.mark.parametrize("name", list(_FACTORIES))
def test_callbacks_match_finite_differences(name):
    obj = _FACTORIES[name]()
    rng = np.random.default_rng(0)
    for _ in range(2):
        z = rng.standard_normal(obj.problem.size)
        check_callbacks(obj.problem, z, rng)


def test_poisoning_callbacks_match_finite_differences():
    pytest.importorskip("sklearn")
    pt = load_poisoning_trilevel(n_train=4, n_val=10, features=("bmi", "bp"))
    rng = np.random.default_rng(1)
    assert pt.problem.dims == (1, 8, 2)
    for _ in range(2):
        z = 0.5 * rng.standard_normal(pt.problem.size)
        check_callbacks(pt.problem, z, rng)


def test_problems_are_multilevel_problems():
    for make in _FACTORIES.values():
        p = make().problem
        assert isinstance(p, mlo.MultilevelProblem)
        assert all(o.tvp is not None and o.hvp is not None and o.value is not None
                   for o in p.levels)


# ---------------------------------------------------------------------------------------
# 1. The trilevel quadratic of Giovannelli, Kent & Vicente
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,F_star", [(1, -55.57051898), (50, -1446.28489290)])
def test_trilevel_quadratic_F_star(dim, F_star):
    tq = make_trilevel_quadratic(dim)
    assert_allclose(tq.F_star, F_star, rtol=1e-8, atol=0)
    assert_allclose(tq.F(tq.x_star), F_star, rtol=1e-8, atol=0)
    assert_allclose(tq.x_star, -tq.c / 7.0)
    assert_allclose(tq.hypergrad(tq.x_star), 0.0, atol=1e-12)


def test_trilevel_quadratic_draws():
    np.random.seed(42)
    hx, hy, hz = (np.random.uniform(0, 10, 3) for _ in range(3))
    tq = make_trilevel_quadratic(3, seed=42)
    assert_allclose(tq.hx, hx)
    assert_allclose(tq.hy, hy)
    assert_allclose(tq.hz, hz)
    assert_allclose(tq.c, hx + hy + 2 * hz)


def test_trilevel_quadratic_best_responses_are_optimal():
    tq = make_trilevel_quadratic(3)
    d = tq.dim
    rng = np.random.default_rng(0)
    p = tq.problem
    for _ in range(3):
        x, y = rng.standard_normal((2, d))
        w = tq.z_star(x, y)
        assert_allclose(w, x + y)
        z = np.concatenate([x, y, w])
        assert_allclose(_cb(p.levels[2], "grad", z)[p.block(3)], 0.0, atol=1e-12)
        # phi_2(x, y) = f2(x, y, x + y) is minimized at y = x: its gradient vanishes there
        phi2 = lambda yy: tq_middle_value(np.concatenate([x, yy, tq.z_star(x, yy)]))
        assert_allclose(fd_grad(phi2, tq.y_star(x)), 0.0, atol=1e-8)
        assert_allclose(tq.best_response(x), np.concatenate([x, x, 2 * x]))


def test_trilevel_quadratic_hypergrad_fd():
    tq = make_trilevel_quadratic(5, seed=7)
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = 3.0 * rng.standard_normal(5)
        assert_allclose(tq.hypergrad(x), tq.c + 7 * x)
        assert_allclose(fd_grad(tq.F, x), tq.c + 7 * x, rtol=1e-8)


def test_trilevel_quadratic_nested_numerical_minimization_dim1():
    """Brute force, independent of the closed forms: each level by 1-D root finding."""
    tq = make_trilevel_quadratic(1)
    hx, hy, hz = tq.hx, tq.hy, tq.hz
    B = 1e3

    def w_star(x, y):  # root of d f3 / dw (exact gradient callback)
        return brentq(lambda w: tq_lower_grad(np.array([x, y, w]))[2], -10 * B, 10 * B,
                      xtol=1e-14)

    def phi2(x, y):
        return tq_middle_value(np.array([x, y, w_star(x, y)]))

    def y_star(x):  # root of d phi2 / dy by central differences (exact up to rounding)
        return brentq(lambda y: (phi2(x, y + 1e-3) - phi2(x, y - 1e-3)) / 2e-3, -B, B,
                      xtol=1e-13)

    def F(x):
        y = y_star(x)
        return tq_upper_value(np.array([x, y, w_star(x, y)]), hx, hy, hz)

    x = 0.7
    assert_allclose(y_star(x), x, rtol=1e-9)
    assert_allclose(w_star(x, -0.3), x - 0.3, rtol=1e-9)
    assert_allclose((F(x + 1e-3) - F(x - 1e-3)) / 2e-3, tq.c[0] + 7 * x, rtol=1e-7)
    x_num = brentq(lambda x: (F(x + 1e-3) - F(x - 1e-3)) / 2e-3, -100, 100, xtol=1e-12)
    assert_allclose(x_num, tq.x_star[0], rtol=1e-7)
    assert_allclose(F(x_num), -55.57051898, rtol=1e-8)


def test_trilevel_quadratic_matches_generic_solutions():
    tq = make_trilevel_quadratic(4, seed=1)
    nl = tq.as_nlevel()
    x = np.linspace(-1, 2, 4)
    assert_allclose(nl.best_response(x), tq.best_response(x), atol=1e-12)
    assert_allclose(nl.hypergrad(x), tq.hypergrad(x), rtol=1e-12)
    assert_allclose(nl.x_star, tq.x_star, rtol=1e-12)
    assert_allclose(nl.F_star, tq.F_star, rtol=1e-12)
    # nested Newton reference and dense implicit differentiation (curvature terms vanish)
    assert_allclose(tq.solve_all(x), tq.best_response(x), atol=1e-10)
    for curv in (True, False):
        d = tq.implicit_derivatives(x, curvature=curv)
        assert_allclose(d["dy_dx"], np.eye(4), atol=1e-12)
        assert_allclose(d["dz_dx"], 2 * np.eye(4), atol=1e-12)
        assert_allclose(d["grad_F"], tq.hypergrad(x), rtol=1e-10)


def test_trilevel_quadratic_validation():
    with pytest.raises(ValueError, match="dim"):
        make_trilevel_quadratic(0)
    with pytest.raises(ValueError, match="shape"):
        make_trilevel_quadratic(2).F(np.zeros(3))


# ---------------------------------------------------------------------------------------
# 2. n-level quadratics
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_nlevel_best_responses_solve_each_level(n):
    p = make_nlevel_quadratic(n, seed=10 + n)
    rng = np.random.default_rng(n)
    off = p.offsets
    for k in range(2, n + 1):
        for _ in range(2):
            above = rng.standard_normal(off[k - 1])
            xk = p.response(k, above)
            u = np.concatenate([above, xk])
            z = p.complete(u)
            # total maps agree with composing the local responses level by level
            v = u.copy()
            for j in range(k + 1, n + 1):
                v = np.concatenate([v, p.response(j, v)])
            assert_allclose(z, v, atol=1e-12)
            # first-order condition of phi_k in x_k, by the chain rule ...
            g = _cb(p.problem.levels[k - 1], "grad", z)
            if k < n:
                M = p.total_maps[k][0]
                red = g[p.block(k)] + M[:, off[k - 1]:off[k]].T @ g[off[k]:]
            else:
                red = g[p.block(k)]
            assert_allclose(red, 0.0, atol=1e-10)
            # ... and by central differences of phi_k with the lower levels re-solved
            phik = lambda xx: p.phi(k, np.concatenate([above, xx]))
            assert_allclose(fd_grad(phik, xk), 0.0, atol=1e-7)
            # x_k* minimizes phi_k: perturbing it increases phi_k
            f0 = phik(xk)
            for _ in range(5):
                assert phik(xk + 0.1 * rng.standard_normal(xk.size)) > f0


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_nlevel_hypergrad_and_optimum(n):
    p = make_nlevel_quadratic(n, seed=n)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal(p.dims[0])
        assert_allclose(p.hypergrad(x), fd_grad(p.F, x), rtol=1e-7, atol=1e-8)
        assert_allclose(p.hypergrad(x), p.Q @ x + p.r, rtol=1e-10, atol=1e-12)
    assert p.F_convex
    assert_allclose(p.hypergrad(p.x_star), 0.0, atol=1e-10)
    assert_allclose(fd_grad(p.F, p.x_star), 0.0, atol=1e-8)
    assert_allclose(p.F(p.x_star), p.F_star)
    for _ in range(5):
        assert p.F(p.x_star + 0.1 * rng.standard_normal(p.dims[0])) > p.F_star
    z = p.best_response(p.x_star)
    assert z.shape == (p.size,) and z.flags.c_contiguous
    assert_allclose(z, p.z_intercept + np.concatenate([np.eye(p.dims[0]), p.jacobian])
                    @ p.x_star, atol=1e-12)


def test_nlevel_two_levels_is_bilevel_quadratic():
    p = make_nlevel_quadratic(2, dims=(3, 4), seed=5)
    P2, q2 = p.P[1], p.q[1]
    sx, sy = p.block(1), p.block(2)
    A, a = p.response_maps[2]
    assert_allclose(A, -np.linalg.solve(P2[sy, sy], P2[sy, sx]), rtol=1e-12)
    assert_allclose(a, -np.linalg.solve(P2[sy, sy], q2[sy]), rtol=1e-12)
    assert_allclose(p.jacobian, A)
    x = np.array([0.5, -1.0, 2.0])
    z = p.best_response(x)
    g1 = p.P[0] @ z + p.q[0]
    assert_allclose(p.hypergrad(x), g1[sx] + A.T @ g1[sy], rtol=1e-12)
    res = mlo.hypergrad(p.as_bilevel(), x, z[sy].copy(), method="direct", lower_solved=True)
    assert_allclose(res.grad, p.hypergrad(x), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="n = 2"):
        make_nlevel_quadratic(3).as_bilevel()


def test_nlevel_defaults_and_validation():
    p = make_nlevel_quadratic()
    assert p.dims == (2, 3, 4) and p.n == 3 and p.problem.dims == (2, 3, 4)
    assert make_nlevel_quadratic(5).dims == (2, 3, 4, 2, 3)
    assert make_nlevel_quadratic(4, dims=(1, 1, 1, 1)).size == 4
    with pytest.raises(ValueError, match="n"):
        make_nlevel_quadratic(1)
    with pytest.raises(ValueError, match="dims"):
        make_nlevel_quadratic(3, dims=(2, 3))
    with pytest.raises(ValueError, match="cond"):
        make_nlevel_quadratic(3, cond=0.5)
    # a level whose reduced problem is not strongly convex
    P = [np.eye(2), np.diag([1.0, -1.0])]
    with pytest.raises(ValueError, match="positive definite"):
        NLevelQuadratic(P, [np.zeros(2), np.zeros(2)], (1, 1))
    with pytest.raises(ValueError, match="symmetric"):
        NLevelQuadratic([np.eye(2), np.array([[1.0, 1.0], [0.0, 1.0]])],
                        [np.zeros(2), np.zeros(2)], (1, 1))


# ---------------------------------------------------------------------------------------
# 3. Non-quadratic trilevel
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nq():
    return make_nonquadratic_trilevel()


def test_nonquadratic_solve_all_optimality(nq):
    p = nq.problem
    rng = np.random.default_rng(2)
    for _ in range(2):
        x = rng.standard_normal(2)
        z = nq.solve_all(x)
        x_, y, w = z[p.block(1)], z[p.block(2)], z[p.block(3)]
        assert_allclose(x_, x)
        assert np.linalg.norm(_cb(p.levels[2], "grad", z)[p.block(3)]) <= 1e-11
        r, _ = nq.reduced_grad2(x, y, w)
        assert np.linalg.norm(r) <= 1e-11
        # the reduced gradient agrees with central differences of phi_2 (level 3 re-solved)
        assert_allclose(fd_grad(lambda yy: nq.phi2(x, yy, w), y), 0.0, atol=1e-8)
        f0 = nq.phi2(x, y, w)
        for _ in range(4):
            assert nq.phi2(x, y + 0.05 * rng.standard_normal(2), w) > f0
        assert_allclose(nq.F(x), _cb(p.levels[0], "value", z))


def test_nonquadratic_phi2_strongly_convex(nq):
    """mu makes d2 phi_2/dy2 >= S_2 (eigenvalues >= 1) everywhere; check at a few points."""
    rng = np.random.default_rng(3)
    for _ in range(3):
        x = 2.0 * rng.standard_normal(2)
        d = nq.implicit_derivatives(x)
        assert np.linalg.eigvalsh(d["phi_yy"])[0] >= 1.0 - 1e-8


def test_nonquadratic_best_response_is_nonlinear(nq):
    a, b = np.array([0.3, -0.7, 0.2, 0.1]), np.array([-0.5, 0.4, -0.6, 0.8])
    z_mid = nq.z_star((a[:2] + b[:2]) / 2, (a[2:] + b[2:]) / 2)
    z_avg = (nq.z_star(a[:2], a[2:]) + nq.z_star(b[:2], b[2:])) / 2
    assert np.linalg.norm(z_mid - z_avg) > 1e-3


@pytest.mark.parametrize("x", [[0.3, -0.7], [-1.0, 0.5]])
def test_nonquadratic_curvature_terms_matter(nq, x):
    x = np.array(x)
    fd = nq.dy_dx_fd(x)
    exact = nq.implicit_derivatives(x, curvature=True)
    trunc = nq.implicit_derivatives(x, curvature=False)
    # with the curvature terms (third derivatives from tvp), the implicit formulas of
    # docs/mathematics.md section 3 reproduce finite differences of the nested solutions ...
    assert_allclose(exact["dy_dx"], fd, rtol=1e-6, atol=1e-8)
    # ... without them they do not, by far more than the finite-difference error
    err_trunc = np.abs(trunc["dy_dx"] - fd).max()
    err_exact = np.abs(exact["dy_dx"] - fd).max()
    assert err_trunc > 1e-4 and err_trunc > 1e3 * err_exact
    # the same for grad F against central differences of F
    g_fd = nq.hypergrad_fd(x)
    assert_allclose(exact["grad_F"], g_fd, rtol=1e-6, atol=1e-8)
    assert np.abs(trunc["grad_F"] - g_fd).max() > 1e2 * np.abs(exact["grad_F"] - g_fd).max()


def test_nonquadratic_validation():
    with pytest.raises(ValueError, match="dims"):
        make_nonquadratic_trilevel((2, 2))
    with pytest.raises(ValueError, match="scale"):
        make_nonquadratic_trilevel(scale=-1.0)
    with pytest.raises(ValueError, match="shape"):
        make_nonquadratic_trilevel().solve_all(np.zeros(3))


# ---------------------------------------------------------------------------------------
# 4. Poisoning trilevel (scikit-learn diabetes data)
# ---------------------------------------------------------------------------------------
def test_poisoning_trilevel_reference():
    pytest.importorskip("sklearn")
    pt = load_poisoning_trilevel(n_train=6, n_val=30)
    p = pt.problem
    assert p.dims == (1, 18, 3)
    x = np.array([-1.0])
    z = pt.solve_all(x)
    assert np.linalg.norm(_cb(p.levels[2], "grad", z)[p.block(3)]) <= 1e-11
    r, _ = pt.reduced_grad2(x, z[p.block(2)], z[p.block(3)])
    assert np.linalg.norm(r) <= 1e-11
    assert pt.poison(z).shape == (6, 3)
    d = pt.implicit_derivatives(x)
    assert np.linalg.eigvalsh(d["phi_yy"])[0] > 0
    assert_allclose(d["grad_F"], pt.hypergrad_fd(x), rtol=1e-6)
    trunc = pt.implicit_derivatives(x, curvature=False)
    assert not np.allclose(trunc["grad_F"], d["grad_F"], rtol=1e-4)
    with pytest.raises(ValueError, match="features"):
        load_poisoning_trilevel(features=("nope",))


def test_multilevel_modules_reexport_the_families():
    """``mlocore.problems.multilevel`` and ``.cuda_multilevel`` re-export the family modules'
    objects (the same objects, so numba's caches and isinstance checks are shared)."""
    import importlib
    from mlocore.problems import cuda_multilevel, multilevel
    families = [importlib.import_module(f"mlocore.problems.{m}") for m in
                ("trilevel_quadratic", "nlevel_quadratic", "nonquadratic_trilevel",
                 "nlevel_logcosh", "poisoning")]
    owner = {name: mod for mod in families for name in mod.__all__}
    for shim in (multilevel, cuda_multilevel):
        assert shim.__all__
        for name in shim.__all__:
            assert getattr(shim, name) is getattr(owner[name], name), name
    assert set(multilevel.__all__) | set(cuda_multilevel.__all__) == set(owner)


def test_family_modules_import_without_gpu_or_simulator():
    """The family modules define their device kernels at import without a GPU or the CUDA
    simulator (kernels compile at their first launch)."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    code = ("import sys, mlocore.problems.cuda_multilevel as m; "
            "assert callable(m.nlevel_quadratic_device_problem); "
            "from numba import config; assert not config.ENABLE_CUDASIM")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
