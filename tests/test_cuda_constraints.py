"""CUDA backend: bounds and projections on device problems.

``DeviceBilevelProblem(..., bounds=..., project=...)`` and ``DeviceMultilevelProblem(...)``
validate their constraints as the CPU problems do; the device ``minimize_bilevel`` ("aid",
"itd", "alternating") and ``minimize_multilevel`` take the CPU's projected steps (x on the
host), so their iterates match the CPU run on the same problem to 1e-10; the stochastic
device loops project x on the device (bounds, Ball) or by a round trip (a user project)
where the CPU kernels project, and match the CPU's full-batch runs to 1e-10. Runs under numba's
CUDA simulator (tests/conftest.py): tiny sizes, few iterations.
"""
import numpy as np
import pytest
import scipy.optimize as so

from numba import njit

import mlocore as mlo
from mlocore._callbacks import CallbackError
from mlocore.cuda import DeviceBilevelProblem, DeviceMultilevelProblem
from mlocore.problems import make_quadratic
from mlocore.problems.cuda_callbacks import quadratic_device_problem
from mlocore.problems.cuda_multilevel import trilevel_quadratic_device_problem
from mlocore.problems.multilevel import make_trilevel_quadratic
from oracle_helpers import joint_stochastic_twin

# CPU references of n-level runs take the matrix-free recursion, as the device does
pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("matrix_free_levels")]

DX, DY = 2, 3


@pytest.fixture(scope="module")
def quadratic():
    """(q, device problem): x* = q.x_star is about (1.0, -0.5)."""
    q = make_quadratic(dx=DX, dy=DY, seed=0)
    return q, quadratic_device_problem(q)


def _pair(q, dp, **constraints):
    """The same constrained problem on the CPU and on the device (the builders' objectives)."""
    cpu = mlo.BilevelProblem(q.problem.upper, q.problem.lower, (DX, DY), **constraints)
    dev = DeviceBilevelProblem(dp.upper, dp.lower, (DX, DY), **constraints)
    return cpu, dev


def _same_bilevel_run(res, ref, atol=1e-10):
    assert (res.status, res.nit, res.nfev) == (ref.status, ref.nit, ref.nfev), res.message
    assert res.message == ref.message
    assert res.oracle_calls == ref.oracle_calls
    np.testing.assert_allclose(res.x, ref.x, rtol=0, atol=atol)
    np.testing.assert_allclose(res.jac, ref.jac, rtol=0, atol=atol)
    np.testing.assert_allclose(res.y, ref.y, rtol=0, atol=atol)
    assert res.fun == pytest.approx(ref.fun, abs=atol)
    for key in ("fun", "grad_norm"):
        np.testing.assert_allclose(res.history[key], ref.history[key], rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------
# DeviceBilevelProblem: attributes and validation
# ---------------------------------------------------------------------------------------
def test_bilevel_constraints_attributes(quadratic):
    q, dp = quadratic
    assert not dp.constrained and dp.lb is None and dp.ub is None
    x = np.array([3.0, -4.0])
    np.testing.assert_array_equal(dp.project(x), x)
    cpu, dev = _pair(q, dp, bounds=so.Bounds([-1.0, 0.0], [1.0, np.inf]))
    assert dev.constrained
    np.testing.assert_array_equal(dev.lb, cpu.lb)
    np.testing.assert_array_equal(dev.ub, cpu.ub)
    np.testing.assert_array_equal(dev.project(x), [1.0, 0.0])
    _, dev = _pair(q, dp, bounds=[(None, 0.5), (-2.0, None)])  # dx pairs, None = unbounded
    np.testing.assert_array_equal(dev.lb, [-np.inf, -2.0])
    np.testing.assert_array_equal(dev.ub, [0.5, np.inf])
    ball = mlo.Ball(2.0, [1.0, 0.0])
    cpu, dev = _pair(q, dp, project=ball)
    assert dev.constrained and dev.lb is None
    np.testing.assert_allclose(dev.project(x), cpu.project(x), rtol=0, atol=0)
    np.testing.assert_array_equal(x, [3.0, -4.0])  # not modified


def _errors_match(make_cpu, make_dev, exc, **kw):
    with pytest.raises(exc) as cpu_err:
        make_cpu(**kw)
    with pytest.raises(exc) as dev_err:
        make_dev(**kw)
    assert str(dev_err.value) == str(cpu_err.value)
    return dev_err


BAD_CONSTRAINTS = [  # (constraints, the error they raise)
    (dict(bounds=(-1.0, 1.0), project=lambda x: x), ValueError),  # both
    (dict(project=3.0), TypeError),                               # not callable
    (dict(bounds=(1.0, -1.0)), ValueError),                       # lo > hi
    (dict(bounds=(np.inf, np.inf)), ValueError),                  # infeasible
    (dict(bounds=(np.zeros(DX + 1), np.ones(DX + 1))), ValueError),  # wrong length
    (dict(bounds=(np.nan, 1.0)), ValueError),
    (dict(bounds=[(0.0, 1.0)] * 3), ValueError),                  # neither dx pairs nor one
    (dict(bounds=5.0), ValueError),
]


@pytest.mark.parametrize("kw, exc", BAD_CONSTRAINTS)
def test_bilevel_validation_as_cpu(quadratic, kw, exc):
    q, dp = quadratic
    _errors_match(lambda **k: mlo.BilevelProblem(q.problem.upper, q.problem.lower, (DX, DY),
                                                 **k),
                  lambda **k: DeviceBilevelProblem(dp.upper, dp.lower, (DX, DY), **k), exc,
                  **kw)


def test_bad_user_projection_errors_as_cpu(quadratic):
    q, dp = quadratic
    x0, y0 = np.ones(DX), np.zeros(DY)

    def boom(x):
        raise RuntimeError("no")

    for proj, match in ((lambda x: x[:1], "callback project returned shape"),
                        (lambda x: np.full(DX, np.nan), "non-finite"),
                        (boom, "callback project raised RuntimeError: no")):
        cpu, dev = _pair(q, dp, project=proj)
        with pytest.raises(CallbackError, match=match) as cpu_err:
            mlo.minimize_bilevel(cpu, x0, y0, step=0.1, maxiter=1)
        with pytest.raises(CallbackError, match=match) as dev_err:
            mlo.minimize_bilevel(dev, x0, y0, step=0.1, maxiter=1)
        assert str(dev_err.value) == str(cpu_err.value)


# ---------------------------------------------------------------------------------------
# Device minimize_bilevel against the CPU
# ---------------------------------------------------------------------------------------
def test_box_bounds_aid_solution_on_the_bound(quadratic):
    """Box with x*_1 outside: the constrained optimum sits on the bound x_1 = 0.5; the
    device line-search run matches the CPU's, and satisfies x = P(x - grad F(x))."""
    q, dp = quadratic
    lo, hi = np.array([-1.0, -1.0]), np.array([0.5, 5.0])
    cpu, dev = _pair(q, dp, bounds=so.Bounds(lo, hi))  # (lo, hi) would be dx = 2 pairs
    x0, y0 = np.array([-3.0, 0.5]), np.zeros(DY)     # x0 infeasible: projected first
    res = mlo.minimize_bilevel(dev, x0, y0, method="aid", tol=1e-9, maxiter=50)
    ref = mlo.minimize_bilevel(cpu, x0, y0, method="aid", tol=1e-9, maxiter=50)
    assert res.success and res.nit > 2, res.message
    _same_bilevel_run(res, ref)
    np.testing.assert_allclose(res.v, ref.v, rtol=0, atol=1e-10)
    assert res.x[0] == 0.5 and lo[1] < res.x[1] < hi[1]        # on the bound, x_2 free
    g = q.hypergrad(res.x)
    assert g[0] < -1e-3                                       # the bound is active
    np.testing.assert_allclose(res.x - np.clip(res.x - g, lo, hi), 0.0, atol=1e-8)
    assert abs(g[1]) < 1e-8
    assert res.history["grad_norm"][-1] <= 1e-9
    # each new upper point (the projected x0 and every trial) copied in once, plus y0
    assert res.transfers["h2d"] == 1 + res.nfev
    np.testing.assert_array_equal(x0, [-3.0, 0.5])


@pytest.mark.parametrize("method, kw", [
    ("itd", dict(step=0.3, T=6, K=4, inner_step=0.3)),
    ("alternating", dict(step=0.2, T=3)),
])
def test_box_bounds_fixed_steps(quadratic, method, kw):
    q, dp = quadratic
    cpu, dev = _pair(q, dp, bounds=[(-0.5, 0.5), (None, 1.0)])
    x0, y0 = np.array([0.3, 2.0]), np.zeros(DY)
    res = mlo.minimize_bilevel(dev, x0, y0, method=method, maxiter=4, tol=0.0, **kw)
    ref = mlo.minimize_bilevel(cpu, x0, y0, method=method, maxiter=4, tol=0.0, **kw)
    assert res.status == 10 and res.nit == 4
    _same_bilevel_run(res, ref)
    assert res.x[1] <= 1.0 and -0.5 <= res.x[0] <= 0.5


def test_ball_aid_matches_cpu_and_optimality(quadratic):
    """A Ball not containing x*: the optimum is on the sphere, where -grad F is normal to it
    (parallel to x - center)."""
    q, dp = quadratic
    center = np.array([0.5, 0.0])
    ball = mlo.Ball(0.5, center)
    cpu, dev = _pair(q, dp, project=ball)
    x0, y0 = np.zeros(DX), np.zeros(DY)
    res = mlo.minimize_bilevel(dev, x0, y0, method="aid", tol=1e-8, maxiter=30)
    ref = mlo.minimize_bilevel(cpu, x0, y0, method="aid", tol=1e-8, maxiter=30)
    assert res.success, res.message
    _same_bilevel_run(res, ref)
    d = res.x - center
    assert np.linalg.norm(d) == pytest.approx(0.5, abs=1e-12)
    g = q.hypergrad(res.x)
    cos = -(g @ d) / (np.linalg.norm(g) * np.linalg.norm(d))
    assert cos == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(res.x - ball(res.x - g), 0.0, atol=1e-7)


@pytest.mark.parametrize("method, kw", [
    ("itd", dict(step=0.3, T=5, inner_step=0.3)),
    ("aid", dict(step=0.3, lower_tol=1e-8)),
])
def test_user_projection_matches_cpu(quadratic, method, kw):
    """A user projection (a host function of x): the half-plane x_1 + x_2 <= 1."""
    q, dp = quadratic
    a = np.array([1.0, 1.0])
    seen = []

    def halfplane(x):
        seen.append(type(x))
        s = a @ x - 1.0
        return x - max(s, 0.0) / (a @ a) * a

    cpu, dev = _pair(q, dp, project=halfplane)
    x0, y0 = np.array([2.0, 1.0]), np.zeros(DY)
    res = mlo.minimize_bilevel(dev, x0, y0, method=method, maxiter=5, tol=0.0, **kw)
    ref = mlo.minimize_bilevel(cpu, x0, y0, method=method, maxiter=5, tol=0.0, **kw)
    _same_bilevel_run(res, ref)
    assert a @ res.x <= 1.0 + 1e-12
    assert seen and all(t is np.ndarray for t in seen)  # called with host arrays


def test_hyperobjective_with_scipy_bounds(quadratic):
    """DeviceHyperObjective ignores the problem's constraints (as the CPU's): scipy's
    L-BFGS-B takes its bounds itself, and gives the projected-descent solution."""
    q, dp = quadratic
    lo, hi = [-1.0, -1.0], [0.5, 5.0]
    cpu, dev = _pair(q, dp, bounds=so.Bounds(lo, hi))
    hd = mlo.HyperObjective(dev, np.zeros(DY))
    hc = mlo.HyperObjective(cpu, np.zeros(DY))
    f, g = hd(np.array([0.2, 0.1]))
    fc, gc = hc(np.array([0.2, 0.1]))
    assert f == pytest.approx(fc, rel=1e-12)
    np.testing.assert_allclose(g, gc, rtol=0, atol=1e-10)
    opts = {"gtol": 1e-10, "ftol": 1e-15, "maxiter": 30}
    res = so.minimize(hd, np.zeros(DX), jac=True, method="L-BFGS-B",
                      bounds=list(zip(lo, hi)), options=opts)
    ref = so.minimize(hc, np.zeros(DX), jac=True, method="L-BFGS-B",
                      bounds=list(zip(lo, hi)), options=opts)
    assert res.nit == ref.nit
    np.testing.assert_allclose(res.x, ref.x, rtol=0, atol=1e-10)
    assert res.x[0] == 0.5
    g = q.hypergrad(res.x)
    np.testing.assert_allclose(res.x - np.clip(res.x - g, lo, hi), 0.0, atol=1e-7)


# ---------------------------------------------------------------------------------------
# DeviceMultilevelProblem and the device minimize_multilevel
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trilevel():
    tq = make_trilevel_quadratic(dim=2)  # x* = -c / 7, about (-2.0, -2.7)
    return tq, trilevel_quadratic_device_problem(tq)


def _ml_pair(tq, dp, **constraints):
    cpu = mlo.MultilevelProblem(tq.problem.levels, tq.problem.dims, **constraints)
    dev = DeviceMultilevelProblem(dp.levels, dp.dims, **constraints)
    return cpu, dev


def _same_multilevel_run(res, ref, atol=1e-10):
    assert (res.nit, res.status, res.success) == (ref.nit, ref.status, ref.success)
    assert res.message == ref.message
    for key in ("x", "z", "jac"):
        np.testing.assert_allclose(res[key], ref[key], rtol=0, atol=atol)
    assert res.fun == pytest.approx(ref.fun, abs=atol)
    for key in ("fun", "grad_norm"):
        np.testing.assert_allclose(res.history[key], ref.history[key], rtol=0, atol=atol)
    for k in ("level1", "level2"):
        assert res.oracle_calls[k] == ref.oracle_calls[k]


def test_multilevel_attributes_and_validation(trilevel):
    tq, dp = trilevel
    assert not dp.constrained and dp.lb is None
    cpu, dev = _ml_pair(tq, dp, bounds=(0.0, [1.0, 2.0]))
    assert dev.constrained and dev.dx == 2
    np.testing.assert_array_equal(dev.lb, cpu.lb)
    np.testing.assert_array_equal(dev.ub, cpu.ub)
    np.testing.assert_array_equal(dev.project(np.array([-1.0, 3.0])), [0.0, 2.0])
    for kw, exc in BAD_CONSTRAINTS:
        if isinstance(kw.get("bounds"), list):
            kw = dict(bounds=[(0.0, 1.0)] * 3)
        _errors_match(lambda **k: mlo.MultilevelProblem(tq.problem.levels, tq.problem.dims,
                                                        **k),
                      lambda **k: DeviceMultilevelProblem(dp.levels, dp.dims, **k), exc, **kw)


def test_multilevel_box_line_search_solution_on_the_bound(trilevel):
    tq, dp = trilevel
    lo, hi = np.array([-1.0, -5.0]), np.array([1.0, 5.0])
    cpu, dev = _ml_pair(tq, dp, bounds=so.Bounds(lo, hi))
    xs = [np.array([2.0, 0.5]), np.zeros(2), np.zeros(2)]   # x_1 infeasible: projected
    res = mlo.minimize_multilevel(dev, xs, method="exact", maxiter=20, tol=1e-9)
    ref = mlo.minimize_multilevel(cpu, xs, method="exact", maxiter=20, tol=1e-9)
    assert res.success, res.message
    _same_multilevel_run(res, ref)
    # closed form: grad F = c + 7 x; with x_1 >= -1 active, x = (-1, -c_2 / 7)
    np.testing.assert_allclose(res.x, [-1.0, -tq.c[1] / 7.0], rtol=0, atol=1e-9)
    g = tq.c + 7.0 * res.x
    assert g[0] > 1e-3
    np.testing.assert_allclose(res.x - np.clip(res.x - g, lo, hi), 0.0, atol=1e-9)
    np.testing.assert_array_equal(xs[0], [2.0, 0.5])


def test_multilevel_ball_and_projection_fixed_steps(trilevel):
    tq, dp = trilevel
    xs = [np.array([0.3, -0.2]), np.zeros(2), np.zeros(2)]
    for kw in (dict(project=mlo.Ball(1.0, [0.0, 0.5])),
               dict(project=lambda x: np.maximum(x, -0.5))):
        cpu, dev = _ml_pair(tq, dp, **kw)
        res = mlo.minimize_multilevel(dev, xs, method="truncated", step=0.02, maxiter=4,
                                      tol=0.0)
        ref = mlo.minimize_multilevel(cpu, xs, method="truncated", step=0.02, maxiter=4,
                                      tol=0.0)
        assert res.nit >= 2  # the half-plane run ends at the corner (-0.5, -0.5): pg = 0
        _same_multilevel_run(res, ref)
        np.testing.assert_allclose(res.x, cpu.project(res.x), rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------
# The stochastic device loops: bounds and Ball by a kernel, a user project by a round trip
# ---------------------------------------------------------------------------------------
@njit(cache=True)
def _cap_second(x):
    """A user projection onto ``x_2 <= -2.5`` (the CPU compiles it into its loop; the
    device calls it on x's host copy)."""
    out = x.copy()
    if out[1] > -2.5:
        out[1] = -2.5
    return out


@pytest.fixture(scope="module")
def stoch():
    """(q, device problem): the stochastic quadratic (n = 8 samples per level, ridge 1) of
    tests/test_cuda_stochastic.py; x* = q.x_star is about (-0.09, 0.30)."""
    from mlocore.problems.cuda_stochastic import stochastic_quadratic_device_problem
    q = joint_stochastic_twin(make_quadratic(dx=2, dy=3, n_outer=8, n_inner=8, seed=3, ridge=1.0))
    return q, stochastic_quadratic_device_problem(q)


#: x0 = (2, -2) and x* = (-0.09, 0.30) are outside the box; x* lies beyond its corner
#: (2.5, -2.5), where both bounds are active from the first projection on
BOX = (np.array([2.5, -3.0]), np.array([3.0, -2.5]))
SX0, SY0 = np.array([2.0, -2.0]), np.array([0.5, 0.0, -0.5])
STOCH_OPTIONS = {"soba": {}, "stocbio": dict(inner_steps=2, neumann_terms=3, neumann_step=0.3),
                 "mrbo": dict(neumann_terms=3, neumann_step=0.3),
                 "stable": dict(hessian_floor=0.1),
                 "hessian-free": dict(inner_steps=2, directions=2),
                 "penalty": dict(inner_steps=2)}


def _stoch_pair(stoch, **constraints):
    q, dp = stoch
    cpu = mlo.BilevelProblem(q.stochastic_problem.upper, q.stochastic_problem.lower,
                             (DX, DY), **constraints)
    return cpu, DeviceBilevelProblem(dp.upper, dp.lower, (DX, DY), **constraints)


def _stoch_runs(stoch, method, cpu, dev, **kw):
    """The full batch (batch_size = n_samples: the deterministic algorithm), both backends."""
    kw = {**dict(batch_size=8, step=0.2, inner_step=0.3, maxiter=6, eval_every=3, seed=5,
                 reference=stoch[0]), **STOCH_OPTIONS[method], **kw}
    return (mlo.minimize_bilevel(dev, SX0, SY0, method=method, **kw),
            mlo.minimize_bilevel(cpu, SX0, SY0, method=method, **kw))


def _same_stochastic_run(r, c, atol=1e-10):
    assert (r.status, r.nit) == (c.status, c.nit), r.message
    np.testing.assert_allclose(r.x, c.x, rtol=0, atol=atol)
    np.testing.assert_allclose(r.y, c.y, rtol=0, atol=atol)
    for key in ("F", "grad_norm_sq", "grad_mapping_sq", "dist_to_x_star"):
        np.testing.assert_allclose(r.history[key], c.history[key], rtol=1e-10, atol=1e-12)
    assert r.oracle_calls == c.oracle_calls


@pytest.mark.parametrize("method", list(STOCH_OPTIONS))
def test_stochastic_box_bounds_match_cpu(stoch, method):
    """Full batch, box bounds active from the first step (x0 = (2, -2) is outside): the
    device run is the CPU run to 1e-10, for a projection at the end of the iteration
    (SOBA, StocBiO, MRBO, Hessian-free, penalty) and in its middle (STABLE: the lower
    correction uses the projected x_{k+1} - x_k). Bounds copied in once each (h2d 2 + 2)."""
    cpu, dev = _stoch_pair(stoch, bounds=list(zip(*BOX)))
    r, c = _stoch_runs(stoch, method, cpu, dev)
    _same_stochastic_run(r, c)
    assert np.all(r.x >= BOX[0]) and np.all(r.x <= BOX[1])
    np.testing.assert_array_equal(r.x, [2.5, -2.5])  # the corner: both bounds active
    assert r.transfers["h2d"] == 2 + 2


def test_stochastic_ball_and_user_projection_match_cpu(stoch):
    """A Ball (kernel; its centre copied once) and a user projection (a host round trip of
    x per iteration and for x0: h2d and d2h 7 more each than without constraints), SOBA
    on the full batch: the CPU runs to 1e-10; the Ball is active (x* is 2.1 away from its
    centre, x0 1.1)."""
    ball = mlo.Ball(1.0, np.array([1.0, -1.5]))
    cpu, dev = _stoch_pair(stoch, project=ball)
    r, c = _stoch_runs(stoch, "soba", cpu, dev)
    _same_stochastic_run(r, c)
    # the last iterate is on the sphere (the tail average r.x lies just inside the ball)
    assert np.linalg.norm(r.x_last - ball.center) == pytest.approx(1.0, abs=1e-12)
    assert r.transfers["h2d"] == 2 + 1
    cpu, dev = _stoch_pair(stoch, project=_cap_second)
    r, c = _stoch_runs(stoch, "soba", cpu, dev)
    _same_stochastic_run(r, c)
    assert r.x[1] == -2.5 and abs(r.x[0] - SX0[0]) > 0.1  # x_2 held at its cap, x_1 free
    free = _stoch_runs(stoch, "soba", *_stoch_pair(stoch))[0]
    assert r.transfers["h2d"] - free.transfers["h2d"] == 7
    assert r.transfers["d2h"] - free.transfers["d2h"] == 7


def test_stochastic_bad_user_projection_is_a_callback_error(stoch):
    def wrong_size(x):
        return np.zeros(3)
    _, dev = _stoch_pair(stoch, project=wrong_size)
    with pytest.raises(CallbackError, match=r"callback project returned shape \(3,\)"):
        mlo.minimize_bilevel(dev, SX0, SY0, method="soba", batch_size=8, step=0.2,
                             inner_step=0.3, maxiter=2, seed=0)


def test_stochastic_tol_uses_the_gradient_mapping_with_constraints(stoch):
    """With bounds active at the optimum, grad F does not vanish there: ``tol`` is compared
    with the projected-gradient mapping (CPU and device alike), so the run stops (status 0)
    while |grad F|^2 stays large."""
    cpu, dev = _stoch_pair(stoch, bounds=list(zip(*BOX)))
    kw = dict(tol=1e-8, maxiter=400, eval_every=20)
    r, c = _stoch_runs(stoch, "soba", cpu, dev, **kw)
    assert c.status == 0 and c.nit < 400
    _same_stochastic_run(r, c)
    assert r.history["grad_mapping_sq"][-1] <= 1e-8 < 1e-2 < r.history["grad_norm_sq"][-1]
