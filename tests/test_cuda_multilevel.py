"""CUDA backend: n-level implicit hypergradients on the device (docs/mathematics.md section 3).

The device recursion (:mod:`mlocore.cuda._multilevel`) against the CPU engine
(``mlocore.hypergrad(cpu_problem, xs, method=...)``) to 1e-10 and against closed forms. Runs
under numba's CUDA simulator (tests/conftest.py): tiny dims (1-2 per level); the n = 4 cases
start from the closed-form solution so that only one level is re-solved. method="itd" (the
unrolled baseline, :class:`mlocore.cuda._multilevel.DeviceUnrolledEngine`) runs T <= 4 steps
per level (its cost grows like T_2 ... T_n).
"""

import numpy as np
import pytest
from numba import cuda

import mlocore as mlo
from mlocore._callbacks import CallbackError
from mlocore.cuda import _linalg as dl
from mlocore.cuda._device import is_device_array
from mlocore.cuda._multilevel import DeviceMultilevelProblem, multilevel_hypergrad
from mlocore.cuda._problem import DeviceObjective
from mlocore.problems.nlevel_quadratic import (NLevelQuadratic, make_nlevel_quadratic,
                                               nlevel_quadratic_device_problem,
                                               quadform_grad_device, quadform_hvp_device)
from mlocore.problems.nonquadratic_trilevel import (logcosh_quad_grad, logcosh_quad_hvp,
                                                    logcosh_quad_value,
                                                    make_nonquadratic_trilevel,
                                                    nonquadratic_trilevel_device_problem)
from mlocore.problems.trilevel_quadratic import (make_trilevel_quadratic,
                                                 trilevel_quadratic_device_problem)

# CPU references of n-level runs take the matrix-free recursion, as the device does
pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("matrix_free_levels")]

READ_BYTES = 8 * dl.N_SCALARS  # one scalar read-back: the whole scalars array




def _check_against_cpu(res, ref, atol=1e-10):
    assert res.success and ref.success, (res.message, ref.message)
    assert isinstance(res.grad, np.ndarray)
    np.testing.assert_allclose(res.grad, ref.grad, rtol=0, atol=atol)
    np.testing.assert_allclose(res.z, ref.z, rtol=0, atol=atol)
    for a, b in zip(res.xs, ref.xs):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    np.testing.assert_array_equal(res.lower_nit, ref.lower_nit)
    np.testing.assert_array_equal(res.lower_solves, ref.lower_solves)
    assert res.nit == ref.nit and res.method == ref.method


def _check_transfers_numpy(res, n_inputs, d1, size):
    """Inputs copied once each; every other read-back is one scalars array, except grad and
    z at the end: no vector leaves the device during the recursion."""
    t = res.transfers
    assert t["h2d"] == n_inputs and t["h2d_bytes"] == 8 * size
    assert t["d2h_bytes"] == READ_BYTES * (t["d2h"] - 2) + 8 * (d1 + size)


def _starts(dims, x1):
    return [np.asarray(x1, dtype=float)] + [np.zeros(d) for d in dims[1:]]


@pytest.mark.parametrize("method", ["truncated", "exact"])
def test_trilevel_quadratic_matches_cpu_and_closed_form(method):
    tq = make_trilevel_quadratic(dim=1)
    dp = trilevel_quadratic_device_problem(tq)
    assert dp.transfers["h2d"] == 6 and dp.n == 3 and dp.dims == (1, 1, 1)
    xs = _starts(dp.dims, [0.3])
    xs0 = [x.copy() for x in xs]
    res = mlo.hypergrad(dp, xs, method=method)
    ref = mlo.hypergrad(tq.problem, xs, method=method)
    _check_against_cpu(res, ref)
    np.testing.assert_allclose(res.grad, tq.hypergrad(xs[0]), rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.z, tq.best_response(xs[0]), rtol=0, atol=1e-10)
    assert res.fun == pytest.approx(tq.F(xs[0]), abs=1e-10)
    calls, ref_calls = res.oracle_calls, ref.oracle_calls
    # the device has no tvp callback: each CPU third-order product is two device hvps
    assert calls["level3"]["tvp"] == 0
    assert calls["level3"]["hvp"] == ref_calls["level3"]["hvp"] + 2 * ref_calls["level3"]["tvp"]
    for k in ("level1", "level2"):
        assert calls[k] == ref_calls[k]
    assert res.ngrad == ref.ngrad
    _check_transfers_numpy(res, 3, 1, 3)
    for x, x0 in zip(xs, xs0):
        np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("method", ["truncated", "exact"])
def test_nlevel_quadratic_n3_matches_cpu_and_closed_form(method):
    q = make_nlevel_quadratic(3, dims=(1, 2, 1), seed=1)
    dp = nlevel_quadratic_device_problem(q)
    assert dp.transfers["h2d"] == 6
    x1 = np.array([0.5])
    xs = _starts(q.dims, x1)
    res = mlo.hypergrad(dp, xs, method=method)
    ref = mlo.hypergrad(q.problem, xs, method=method)
    _check_against_cpu(res, ref)
    np.testing.assert_allclose(res.grad, q.hypergrad(x1), rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.z, q.best_response(x1), rtol=0, atol=1e-10)
    assert res.fun == pytest.approx(q.F(x1), abs=1e-10)
    if method == "truncated":
        assert res.oracle_calls == ref.oracle_calls
    _check_transfers_numpy(res, 3, 1, 4)


@pytest.mark.parametrize("method", ["truncated", "exact"])
def test_nlevel_quadratic_n4_from_solved_point(method):
    """n = 4 with the joint closed-form solution as one vector: "exact" differences adjoints
    with re-solved lower levels (levels 3 and 4); "truncated" re-solves from a solved warm
    start (its exact-mode solver runs, converged at once)."""
    q = make_nlevel_quadratic(4, dims=(1, 1, 1, 1), seed=3)
    dp = nlevel_quadratic_device_problem(q)
    x1 = np.array([0.7])
    z = q.best_response(x1)
    z0 = z.copy()
    lower_solved = method == "exact"
    res = mlo.hypergrad(dp, z, method=method, lower_solved=lower_solved)
    ref = mlo.hypergrad(q.problem, z, method=method, lower_solved=lower_solved)
    _check_against_cpu(res, ref)
    np.testing.assert_allclose(res.grad, q.hypergrad(x1), rtol=0, atol=1e-10)
    if method == "exact":
        assert list(res.lower_nit[2:]) != [0, 0]  # the shifted points were re-solved
    _check_transfers_numpy(res, 1, 1, 4)
    np.testing.assert_array_equal(z, z0)


def test_declared_quadratic_levels_on_the_device():
    """Levels declared quadratic (DeviceObjective(quadratic=True)): "exact" skips the
    curvature terms on the device as on the CPU (same levels solved, same per-level
    counts), with fewer oracle calls than the undeclared problem and the closed form."""
    q = make_nlevel_quadratic(4, dims=(1, 1, 1, 1), seed=3, declare_quadratic=True)
    dp = nlevel_quadratic_device_problem(q)
    assert all(o.quadratic for o in dp.levels)
    xs = _starts(q.dims, [0.7])
    res = mlo.hypergrad(dp, xs, method="exact")
    ref = mlo.hypergrad(q.problem, xs, method="exact")
    _check_against_cpu(res, ref)
    assert res.oracle_calls == ref.oracle_calls
    np.testing.assert_allclose(res.grad, q.hypergrad(xs[0]), rtol=0, atol=1e-10)
    und = mlo.hypergrad(make_nlevel_quadratic(4, dims=(1, 1, 1, 1), seed=3).problem, xs,
                        method="exact")       # the CPU's matrix-free count, as the device's
    assert und.success and und.nhvp > res.nhvp
    with pytest.raises(TypeError, match="quadratic must be True or False"):
        DeviceObjective(quadform_grad_device, quadratic=1)


def test_nonquadratic_trilevel_curvature_terms():
    """A nonlinear innermost best response: "exact" keeps the curvature terms (third-order
    products by differences of the device hvp), matching the CPU with the same differences
    (no tvp callback) to 1e-10, the CPU's analytic tvp and central differences of F to
    difference accuracy; "truncated" drops them; "fd" matches the CPU's "fd"."""
    nt = make_nonquadratic_trilevel(dims=(1, 1, 1), seed=0, scale=2.0)
    dp = nonquadratic_trilevel_device_problem(nt)
    assert dp.transfers["h2d"] == 15
    cpu_fd_tvp = mlo.MultilevelProblem(
        [mlo.Objective(logcosh_quad_grad, hvp=logcosh_quad_hvp, value=logcosh_quad_value,
                       args=p) for p in nt.params], nt.dims)
    xs = _starts(nt.dims, [0.4])
    out = {}
    for method in ("exact", "truncated", "fd"):
        res = mlo.hypergrad(dp, xs, method=method)
        ref = mlo.hypergrad(cpu_fd_tvp, xs, method=method)
        _check_against_cpu(res, ref)
        assert res.fun == pytest.approx(ref.fun, abs=1e-10)
        assert res.oracle_calls == ref.oracle_calls
        assert res.ngrad == ref.ngrad and res.nhvp == ref.nhvp
        out[method] = res.grad
    exact_tvp = mlo.hypergrad(nt.problem, xs, method="exact").grad
    np.testing.assert_allclose(out["exact"], exact_tvp, rtol=0, atol=1e-8)
    reference = nt.hypergrad_fd(xs[0])
    np.testing.assert_allclose(out["exact"], reference, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["fd"], reference, rtol=0, atol=1e-6)
    # the dropped terms matter here: truncated is off by far more than exact
    err_truncated = abs(out["truncated"][0] - reference[0])
    assert err_truncated > 1e-5
    assert abs(out["exact"][0] - reference[0]) < 0.05 * err_truncated


def test_device_inputs_and_output_exact_transfer_counts():
    """n = 2, solved point given as one device vector, device output: nothing is copied in,
    and the read-backs are exactly: 4 callback checks (first call only; grad and hvp of each
    level), the level-2 CG (|b| and |r0|, then one per iteration: 1 for d_2 = 1) and the
    finiteness check of grad."""
    q = make_nlevel_quadratic(2, dims=(1, 1), seed=1)
    dp = nlevel_quadratic_device_problem(q)
    x1 = np.array([0.7])
    z_host = q.best_response(x1)
    z = cuda.to_device(z_host)
    expected = [4 + 2 + 1, 2 + 1]
    for d2h in expected:
        res = multilevel_hypergrad(dp, z, "truncated", lower_solved=True, output="device")
        assert res.success, res.message
        assert res.transfers == {"h2d": 0, "d2h": d2h, "h2d_bytes": 0,
                                 "d2h_bytes": READ_BYTES * d2h}
        assert is_device_array(res.grad) and is_device_array(res.z)
        assert all(is_device_array(x) for x in res.xs)
        np.testing.assert_allclose(res.grad.copy_to_host(), q.hypergrad(x1), rtol=0,
                                   atol=1e-10)
        np.testing.assert_allclose(res.xs[1].copy_to_host(), z_host[1:], rtol=0, atol=0)
    np.testing.assert_array_equal(z.copy_to_host(), z_host)
    ref = mlo.hypergrad(q.problem, z_host, method="truncated", lower_solved=True)
    np.testing.assert_allclose(res.grad.copy_to_host(), ref.grad, rtol=0, atol=1e-10)


def test_level_failure_is_reported_not_raised():
    q = make_nlevel_quadratic(3, dims=(1, 1, 1), seed=2)
    dp = nlevel_quadratic_device_problem(q)
    res = mlo.hypergrad(dp, _starts(q.dims, [1.0]), method="truncated", lower_maxiter=0)
    ref = mlo.hypergrad(q.problem, _starts(q.dims, [1.0]), method="truncated",
                        lower_maxiter=0)
    assert not res.success and res.status == ref.status == 1  # lower maxiter
    assert res.message == ref.message
    assert np.all(np.isnan(res.grad))


def _quad_level(P, q):
    return DeviceObjective(quadform_grad_device, hvp=quadform_hvp_device, args=(P, q))


def test_bad_input_errors():
    P, qv = np.eye(3), np.zeros(3)
    lev = _quad_level(P, qv)
    with pytest.raises(ValueError, match="at least 2 levels, got 1"):
        DeviceMultilevelProblem([lev], dims=(3,))
    with pytest.raises(TypeError, match="level 2 must be an mlocore.cuda.DeviceObjective.*"
                                        "got Objective"):
        DeviceMultilevelProblem([lev, mlo.Objective(logcosh_quad_grad)], dims=(1, 2))
    with pytest.raises(ValueError, match="dims has 3 entries but there are 2 levels"):
        DeviceMultilevelProblem([lev, lev], dims=(1, 1, 1))
    with pytest.raises(ValueError, match=r"positive integers, got d_2=0"):
        DeviceMultilevelProblem([lev, lev], dims=(3, 0))
    with pytest.raises(ValueError, match="sequence of 2 integers"):
        DeviceMultilevelProblem([lev, lev], dims=3)
    dp = DeviceMultilevelProblem([lev, lev, lev], dims=(1, 1, 1))
    assert repr(dp) == "DeviceMultilevelProblem(n=3, dims=(1, 1, 1))"
    good = [np.zeros(1)] * 3
    with pytest.raises(ValueError, match="must hold 3 arrays .* got 2"):
        mlo.hypergrad(dp, [np.zeros(1)] * 2)
    with pytest.raises(ValueError, match=r"xs\[1\] must have shape \(1,\), got shape \(2,\)"):
        mlo.hypergrad(dp, [np.zeros(1), np.zeros(2), np.zeros(1)])
    with pytest.raises(ValueError, match=r"xs\[2\] contains non-finite"):
        mlo.hypergrad(dp, [np.zeros(1), np.zeros(1), np.array([np.nan])])
    with pytest.raises(ValueError, match="one joint vector of length 3, got ndarray of shape"):
        mlo.hypergrad(dp, np.zeros(4))
    with pytest.raises(TypeError, match=r"list of 3 arrays \(one per level, sizes \(1, 1, 1\)\) "
                                        "or one joint vector of length 3, got int"):
        mlo.hypergrad(dp, 3)
    with pytest.raises(ValueError, match="unknown method 'cg'; expected one of 'exact', 'fd', "
                                         "'truncated'"):
        mlo.hypergrad(dp, good, method="cg")
    with pytest.raises(ValueError, match="T must be >= 1, got 0"):
        mlo.hypergrad(dp, good, method="itd", T=0)
    with pytest.raises(TypeError, match="CUDA backend only, got backend='cpu'"):
        mlo.hypergrad(dp, good, backend="cpu")
    with pytest.raises(TypeError, match="options eta, v0 do not apply to method='exact'"):
        mlo.hypergrad(dp, good, v0=np.zeros(1), eta=0.1)
    with pytest.raises(TypeError, match="pass xs, .* and no y"):
        mlo.hypergrad(dp, good, np.zeros(1))
    with pytest.raises(ValueError, match="output must be 'numpy' or 'device', got 'gpu'"):
        multilevel_hypergrad(dp, good, output="gpu")
    with pytest.raises(TypeError, match="must be a DeviceMultilevelProblem for backend=.cuda., got str"):
        multilevel_hypergrad("problem", good)
    with pytest.raises(TypeError, match="expects an NLevelQuadratic .* got TrilevelQuadratic"):
        nlevel_quadratic_device_problem(make_trilevel_quadratic())
    with pytest.raises(TypeError, match="expects a TrilevelQuadratic .* got str"):
        trilevel_quadratic_device_problem("tq")
    with pytest.raises(TypeError, match="expects a NonquadraticTrilevel .* got str"):
        nonquadratic_trilevel_device_problem("nt")


def test_callback_errors_name_the_level():
    def broken_grad(z, out, P, q):
        raise RuntimeError("boom")

    P, qv = np.eye(2), np.zeros(2)
    dp = DeviceMultilevelProblem([_quad_level(P, qv),
                                  DeviceObjective(broken_grad, args=(P, qv))], dims=(1, 1))
    with pytest.raises(CallbackError, match="callback level2.grad raised RuntimeError: boom"):
        mlo.hypergrad(dp, [np.zeros(1), np.zeros(1)])


# ---------------------------------------------------------------------------------------
# method="itd": the n-level unrolled baseline (Sato et al. 2021) on the device
# ---------------------------------------------------------------------------------------
ITD_STEPS = [0.47, 0.95]  # below 1/L (0.5, 1) of levels 2, 3 of the dim-1 trilevel quadratic


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.maximum(np.abs(b), 1e-300)))


def _check_itd_against_cpu(res, ref, rtol=1e-10):
    assert res.success and ref.success, (res.message, ref.message)
    assert isinstance(res.grad, np.ndarray) and res.method == ref.method == "itd"
    assert _rel(res.grad, ref.grad) <= rtol
    np.testing.assert_allclose(res.z, ref.z, rtol=rtol, atol=1e-14)
    for a, b in zip(res.xs, ref.xs):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-14)
    assert res.fun == pytest.approx(ref.fun, rel=rtol)
    assert res.T == ref.T and res.nit == ref.nit
    np.testing.assert_allclose(np.array(res.step, dtype=float), np.array(ref.step, dtype=float),
                               rtol=1e-10)
    assert res.oracle_calls == ref.oracle_calls
    assert res.ngrad == ref.ngrad and res.nhvp == ref.nhvp
    assert res.message == ref.message


@pytest.mark.parametrize("case", ["trilevel-default-steps", "nonquadratic-steps",
                                  "bilevel-default-steps"])
def test_itd_matches_cpu(case):
    """Device itd against the CPU's: grad, unrolled outputs, F~, steps, oracle counts; the
    transfers are the inputs, one start vector per estimated step, scalar read-backs and the
    outputs (grad and z)."""
    if case.startswith("trilevel"):
        tq = make_trilevel_quadratic(dim=1)
        dp, cpu, x1 = trilevel_quadratic_device_problem(tq), tq.problem, [0.3]
    elif case.startswith("nonquadratic"):
        nt = make_nonquadratic_trilevel(dims=(1, 1, 1), seed=0, scale=2.0)
        dp, cpu, x1 = nonquadratic_trilevel_device_problem(nt), nt.problem, [0.4]
    else:
        q = make_nlevel_quadratic(2, dims=(1, 2), seed=1)
        dp, cpu, x1 = nlevel_quadratic_device_problem(q), q.problem, [0.5]
    steps = None if case.endswith("default-steps") else ITD_STEPS
    T = 4 if dp.n == 2 else [2, 1] if steps is None else 2
    xs = _starts(dp.dims, x1)
    xs0 = [x.copy() for x in xs]
    res = mlo.hypergrad(dp, xs, method="itd", T=T, step=steps)
    ref = mlo.hypergrad(cpu, xs, method="itd", T=T, step=steps)
    _check_itd_against_cpu(res, ref)
    estimated = 0 if steps is not None else dp.n - 1
    t = res.transfers
    assert t["h2d"] == dp.n + estimated
    assert t["h2d_bytes"] == 8 * dp.size + (8 * sum(dp.dims[1:]) if estimated else 0)
    assert t["d2h_bytes"] == READ_BYTES * (t["d2h"] - 2) + 8 * (dp.dims[0] + dp.size)
    for x, x0 in zip(xs, xs0):
        np.testing.assert_array_equal(x, x0)
    # passing the steps used back gives the same approximation, without power iterations
    again = mlo.hypergrad(dp, xs, method="itd", T=T, step=list(res.step))
    assert _rel(again.grad, res.grad) <= 1e-12 and again.transfers["h2d"] == dp.n


def test_itd_approaches_exact_as_T_grows():
    """Trilevel quadratic, fixed inner steps: the unrolled gradient tends to the device's
    exact hypergradient (relative errors ~8e-2, 6e-3, 3e-4 for T = 1, 2, 3)."""
    tq = make_trilevel_quadratic(dim=1)
    dp = trilevel_quadratic_device_problem(tq)
    xs = _starts(dp.dims, [0.3])
    exact = mlo.hypergrad(dp, xs, method="exact").grad
    errs = []
    for T in (1, 2, 3):
        res = mlo.hypergrad(dp, xs, method="itd", T=T, step=ITD_STEPS)
        assert res.success, res.message
        errs.append(_rel(res.grad, exact))
    assert 1e-2 < errs[0] < 0.5
    assert errs[1] < 0.1 * errs[0] and errs[2] < 0.1 * errs[1]
    assert errs[2] < 1e-3


def test_itd_bilevel_converges_to_exact_device_arrays():
    """n = 2 (cost linear in T): T = 16 matches the exact hypergradient to 1e-10; device
    input and output, the steps given: nothing is copied in, every read-back is scalars."""
    q = make_nlevel_quadratic(2, dims=(1, 1), seed=1)
    dp = nlevel_quadratic_device_problem(q)
    x1 = np.array([0.5])
    z_host = np.array([0.5, 0.0])
    z = cuda.to_device(z_host)
    exact = q.hypergrad(x1)
    ref = mlo.hypergrad(q.problem, z_host, method="itd", T=16)
    res = multilevel_hypergrad(dp, z, "itd", T=16, step=ref.step, output="device")
    assert res.success, res.message
    assert is_device_array(res.grad) and is_device_array(res.z)
    assert all(is_device_array(x) for x in res.xs)
    assert res.transfers["h2d"] == 0
    assert res.transfers["d2h_bytes"] == READ_BYTES * res.transfers["d2h"]
    grad = res.grad.copy_to_host()
    assert _rel(grad, exact) < 1e-10
    assert _rel(grad, ref.grad) < 1e-10
    np.testing.assert_array_equal(z.copy_to_host(), z_host)


@pytest.mark.filterwarnings("ignore:.*overflow:RuntimeWarning",
                            "ignore:.*invalid value:RuntimeWarning")
def test_itd_diverging_steps_report_failure():
    """A huge inner step: success False with the CPU's status and message, grad NaN, no
    exception (the simulator's NumPy scalars warn on overflow; a GPU does not); at level 3
    (the device GD) and at level 2 (the outer loop's finiteness test, on a problem whose
    level 3 does not see x_2)."""
    tq = make_trilevel_quadratic(dim=1)
    dp = trilevel_quadratic_device_problem(tq)
    xs = _starts(dp.dims, [0.3])
    res = mlo.hypergrad(dp, xs, method="itd", T=3, step=1e150)
    ref = mlo.hypergrad(tq.problem, xs, method="itd", T=3, step=1e150)
    assert not res.success and res.status == ref.status == 2
    assert res.message == ref.message and "level 3: unrolled iterates diverged" in res.message
    assert np.all(np.isnan(res.grad)) and np.isnan(res.fun)
    assert res.oracle_calls == ref.oracle_calls
    P2 = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.0]])
    P3 = np.diag([0.0, 0.0, 1.0])
    q = NLevelQuadratic([np.eye(3), P2, P3], [np.ones(3), np.zeros(3), np.zeros(3)], (1, 1, 1))
    dq = nlevel_quadratic_device_problem(q)
    xs = _starts(q.dims, [1.0])
    res = mlo.hypergrad(dq, xs, method="itd", T=3, step=[1e200, 0.5])
    ref = mlo.hypergrad(q.problem, xs, method="itd", T=3, step=[1e200, 0.5])
    assert not res.success and res.status == ref.status == 2
    assert res.message == ref.message and "level 2: unrolled iterates diverged" in res.message
    assert np.all(np.isnan(res.grad))


def test_itd_option_errors_as_cpu():
    tq = make_trilevel_quadratic(dim=1)
    dp = trilevel_quadratic_device_problem(tq)
    xs = _starts(dp.dims, [0.3])
    bad = [(dict(T=0), ValueError), (dict(T=1.5), TypeError), (dict(T=[2]), ValueError),
           (dict(T=[2, 0]), ValueError), (dict(step=-1.0), ValueError),
           (dict(step=[0.1]), ValueError), (dict(step=[0.1, 0.0]), ValueError),
           (dict(step=np.nan), ValueError)]
    for kw, exc in bad:
        with pytest.raises(exc) as cpu_err:
            mlo.hypergrad(tq.problem, xs, method="itd", **kw)
        with pytest.raises(exc) as dev_err:
            mlo.hypergrad(dp, xs, method="itd", **kw)
        assert str(dev_err.value) == str(cpu_err.value), kw
        inner = dict(T=kw["T"]) if "T" in kw else dict(inner_step=kw["step"])
        with pytest.raises(exc) as cpu_err:
            mlo.minimize_multilevel(tq.problem, xs, method="itd", step=0.1, **inner)
        with pytest.raises(exc) as dev_err:
            mlo.minimize_multilevel(dp, xs, method="itd", step=0.1, **inner)
        assert str(dev_err.value) == str(cpu_err.value), kw
    for kw in (dict(K=2), dict(lower_tol=1e-8), dict(lower_solved=True), dict(v0=np.zeros(1))):
        name = next(iter(kw))
        with pytest.raises(TypeError, match=f"{name} does not apply to method='itd'"):
            mlo.hypergrad(tq.problem, xs, method="itd", **kw)
        with pytest.raises(TypeError, match=f"{name} does not apply to method='itd'"):
            mlo.hypergrad(dp, xs, method="itd", **kw)
    with pytest.raises(ValueError, match="fd_step must be > 0"):
        mlo.hypergrad(dp, xs, method="itd", fd_step=0.0)
    from mlocore.cuda._multilevel import unrolled_multilevel_hypergrad
    with pytest.raises(TypeError, match="needs device callbacks.*got an mlocore.Multilevel"):
        unrolled_multilevel_hypergrad(tq.problem, xs)


def _same_itd_run(res, ref, rtol=1e-10):
    assert res.status == ref.status and res.nit == ref.nit and res.method == "itd"
    assert res.message == ref.message
    np.testing.assert_allclose(res.x, ref.x, rtol=rtol, atol=1e-14)
    np.testing.assert_allclose(res.z, ref.z, rtol=rtol, atol=1e-14)
    for a, b in zip(res.xs, ref.xs):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-14)
    np.testing.assert_allclose(res.jac, ref.jac, rtol=rtol, atol=1e-14)
    assert res.fun == pytest.approx(ref.fun, rel=rtol)
    np.testing.assert_allclose(res.history["grad_norm"], ref.history["grad_norm"], rtol=rtol)
    assert res.oracle_calls == ref.oracle_calls
    np.testing.assert_array_equal(res.history["oracle_calls"], ref.history["oracle_calls"])


def test_minimize_itd_matches_cpu():
    """Fixed steps on the trilevel quadratic (starts move to the unrolled outputs), and
    Barzilai-Borwein steps with the Armijo search on F~ on a 2-level one (default inner
    step, fixed at the first call); iterates, nit, F~ and oracle counts as on the CPU."""
    tq = make_trilevel_quadratic(dim=1)
    dp = trilevel_quadratic_device_problem(tq)
    xs = _starts(dp.dims, [0.3])
    res = mlo.minimize_multilevel(dp, xs, method="itd", step=0.05, maxiter=2, tol=0.0, T=2,
                                  inner_step=ITD_STEPS)
    ref = mlo.minimize_multilevel(tq.problem, xs, method="itd", step=0.05, maxiter=2, tol=0.0,
                                  T=2, inner_step=ITD_STEPS)
    _same_itd_run(res, ref)
    assert res.status == 10 and res.nit == 2
    t = res.transfers  # x0s, then x_1 once per hypergradient (3: x_0, x_1, x_2)
    assert t["h2d"] == 3 + 3
    # vectors read back: x_1 of x0s, the 3 hypergradients (d_1 = 1) and z at the end
    assert t["d2h_bytes"] == READ_BYTES * (t["d2h"] - 5) + 8 * (1 + 3 * 1 + 3)
    q = make_nlevel_quadratic(2, dims=(1, 1), seed=1)
    dq = nlevel_quadratic_device_problem(q)
    xs = _starts(q.dims, [0.5])
    res = mlo.minimize_multilevel(dq, xs, method="itd", maxiter=3, tol=0.0, T=8)
    ref = mlo.minimize_multilevel(q.problem, xs, method="itd", maxiter=3, tol=0.0, T=8)
    _same_itd_run(res, ref)
    assert res.nit == 3


@pytest.mark.filterwarnings("ignore:.*overflow:RuntimeWarning",
                            "ignore:.*invalid value:RuntimeWarning")
def test_minimize_itd_diverging_inner_step_fails_cleanly():
    tq = make_trilevel_quadratic(dim=1)
    dp = trilevel_quadratic_device_problem(tq)
    xs = _starts(dp.dims, [0.3])
    res = mlo.minimize_multilevel(dp, xs, method="itd", step=0.05, maxiter=3, T=2,
                                  inner_step=1e150)
    ref = mlo.minimize_multilevel(tq.problem, xs, method="itd", step=0.05, maxiter=3, T=2,
                                  inner_step=1e150)
    assert not res.success and res.status == ref.status == 2
    assert res.message == ref.message and "diverged" in res.message
    assert res.nit == ref.nit == 0 and np.isnan(res.fun)


# ---------------------------------------------------------------------------------------
# One recursion, two backends
# ---------------------------------------------------------------------------------------
_RECURSION = {"solve_from", "solve_block", "block_product", "grad_reduced", "adjoint",
              "tangent", "hvp_reduced", "curvature", "_shifted", "hypergrad_at"}
_UNROLLED = {"step_size", "forward", "grad_unrolled", "hvp_unrolled", "vjp", "core",
             "hypergrad_at"}


def test_cpu_and_device_engines_subclass_one_recursion():
    """The CPU and device engines subclass the one recursion (implicit and unrolled) and
    redefine none of its steps: they supply only oracles, solves and vector operations."""
    from mlocore._multilevel import (LevelRecursion, MultilevelEngine, UnrolledEngine,
                                     UnrolledRecursion)
    from mlocore.cuda._multilevel import DeviceMultilevelEngine, DeviceUnrolledEngine
    for base, backends, steps in ((LevelRecursion, (MultilevelEngine, DeviceMultilevelEngine),
                                   _RECURSION),
                                  (UnrolledRecursion, (UnrolledEngine, DeviceUnrolledEngine),
                                   _UNROLLED)):
        for cls in backends:
            assert issubclass(cls, base)
            assert not steps & set(vars(cls)), (cls.__name__, steps & set(vars(cls)))
            assert all(getattr(cls, name) is getattr(base, name) for name in steps)


@pytest.mark.parametrize("method", ["exact", "truncated", "fd", "itd"])
def test_cpu_and_device_engines_agree_in_every_mode(method):
    """One 4-level quadratic (dims 1), every mode: the device hypergradient is the CPU's to
    1e-10, and the closed form for the implicit modes ("fd": to its difference error)."""
    q = make_nlevel_quadratic(4, dims=(1, 1, 1, 1), seed=3)
    dp = nlevel_quadratic_device_problem(q)
    x1 = np.array([0.7])
    if method == "itd":
        xs = _starts(q.dims, x1)
        res = mlo.hypergrad(dp, xs, method="itd", T=1, step=0.2)
        ref = mlo.hypergrad(q.problem, xs, method="itd", T=1, step=0.2)
        _check_itd_against_cpu(res, ref)
        np.testing.assert_allclose(res.grad, ref.grad, rtol=0, atol=1e-10)
        return
    z = q.best_response(x1)
    res = mlo.hypergrad(dp, z, method=method, lower_solved=True)
    ref = mlo.hypergrad(q.problem, z, method=method, lower_solved=True)
    _check_against_cpu(res, ref)
    np.testing.assert_allclose(res.grad, q.hypergrad(x1), rtol=0,
                               atol=1e-6 if method == "fd" else 1e-10)


def test_false_quadratic_declaration_is_refused_on_the_device():
    """The device check of DeviceObjective(quadratic=True) is the CPU's probe (gradient
    affine along a probe direction): a log-cosh level declared quadratic is refused,
    naming the level, before any curvature term is skipped."""
    nt = make_nonquadratic_trilevel(dims=(1, 1, 1), seed=0, scale=2.0)
    dp = nonquadratic_trilevel_device_problem(nt)
    lv = list(dp.levels)
    o = lv[2]
    lv[2] = DeviceObjective(o.grad, hvp=o.hvp, value=o.value, args=o.args, quadratic=True)
    wrong = DeviceMultilevelProblem(lv, nt.dims)
    with pytest.raises(CallbackError, match="level3 is declared quadratic"):
        mlo.hypergrad(wrong, _starts(nt.dims, [0.4]), method="exact")
