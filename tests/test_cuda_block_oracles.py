"""Block oracles on the CUDA backend (``DeviceObjective(..., grad_y=, hvp_yy=, hvp_xy=)``):
the device library problems with blocks give the results of their joint callbacks, call the
same blocks as the CPU (identical oracle counts), and block callbacks that write the wrong
size or disagree with the joint ones get errors naming them. Tiny sizes (the simulator is
slow)."""
import numpy as np
import pytest
from numba import cuda

import mlocore as mlo
from mlocore import CallbackError
from mlocore.cuda import DeviceBilevelProblem, DeviceMultilevelProblem, DeviceObjective
from mlocore.cuda import _linalg as dl
from mlocore.problems import make_cleaning, make_logistic, make_quadratic
from mlocore.problems.cuda_callbacks import (cleaning_device_problem, logistic_device_problem,
                                             quad_grad_device, quad_hvp_device,
                                             quad_hvp_xy_device, quad_hvp_yy_device,
                                             quad_value_device, quadratic_device_problem)
from mlocore.problems.quadratic import quad_grad, quad_hvp_xy, quad_hvp_yy, quad_value
from oracle_helpers import device_joint_only

pytestmark = pytest.mark.cuda

ROUNDOFF = 1e-12  # relative; the device blocks sum in the joint kernels' order


def _close(a, b, rtol=ROUNDOFF):
    return np.linalg.norm(a - b) <= rtol * (1.0 + np.linalg.norm(b))


def _library():
    rng = np.random.default_rng(0)
    q = make_quadratic(dx=2, dy=3, seed=0)
    lh = make_logistic(n_train=8, n_val=6, n_features=2, seed=0)
    dc = make_cleaning(n_train=5, n_val=4, n_features=2, n_classes=3, seed=0)
    return {"quadratic": (q, quadratic_device_problem, rng.normal(size=2),
                          rng.normal(size=3)),
            "logistic": (lh, logistic_device_problem, rng.uniform(-1, 0, 2),
                         0.1 * rng.normal(size=2)),
            "cleaning": (dc, cleaning_device_problem, rng.normal(size=5),
                         0.1 * rng.normal(size=dc.dy))}


LIBRARY = _library()


@pytest.fixture(scope="module", params=sorted(LIBRARY))
def case(request):
    """(CPU problem with blocks, device problem with blocks, its joint-only twin, x, y)."""
    lib, build, x, y = LIBRARY[request.param]
    dev = build(lib)
    assert dev.lower.blocks == ("grad_y", "hvp_yy", "hvp_xy")
    assert dev.upper.blocks == (() if request.param == "cleaning" else ("grad_x", "grad_y"))
    return lib.problem, dev, device_joint_only(dev), x, y


def _agree_with_cpu(res, ref):
    """Device and CPU runs with blocks: the same calls of every oracle and block."""
    assert res.oracle_calls == ref.oracle_calls
    assert res.status == ref.status and res.nit == ref.nit


@pytest.mark.parametrize("method", ["cg", "neumann", "direct"])
def test_implicit_blocks_match_joint_and_cpu(case, method):
    cpu, blk, jnt, x, y = case
    kw = dict(method=method, tol=1e-12, lower_tol=1e-12)
    rb, rj = mlo.hypergrad(blk, x, y, **kw), mlo.hypergrad(jnt, x, y, **kw)
    assert rb.success and rj.success, (rb.message, rj.message)
    assert _close(rb.grad, rj.grad) and _close(rb.y, rj.y)
    cb, cj = rb.oracle_calls, rj.oracle_calls
    # only blocks of the lower objective: H_yy products, one cross product H_xy v
    assert cb["lower_grad"] == cb["lower_hvp"] == 0 and cb["lower_hvp_xy"] == 1
    assert cb["lower_grad_y"] == cj["lower_grad"]
    assert cb["lower_hvp_yy"] + 1 == cj["lower_hvp"]
    assert rb.ngrad == rj.ngrad and rb.nhvp == rj.nhvp
    ref = mlo.hypergrad(cpu, x, y, **kw)
    _agree_with_cpu(rb, ref)
    assert rb.ngrad == ref.ngrad and rb.nhvp == ref.nhvp
    np.testing.assert_allclose(rb.grad, ref.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["newton-cg", "agd", "gd"])
def test_solve_lower_blocks_match_joint_and_cpu(case, method):
    cpu, blk, jnt, x, y = case
    kw = dict(method=method, tol=1e-9, maxiter=3000)
    rb, rj = mlo.solve_lower(blk, x, y, **kw), mlo.solve_lower(jnt, x, y, **kw)
    assert rb.success and rj.success
    assert rb.nit == rj.nit and _close(rb.y, rj.y)
    cb, cj = rb.oracle_calls, rj.oracle_calls
    assert cb["lower_grad"] == cb["lower_hvp"] == 0
    assert cb["lower_grad_y"] == cj["lower_grad"] and cb["lower_hvp_yy"] == cj["lower_hvp"]
    ref = mlo.solve_lower(cpu, x, y, **kw)
    _agree_with_cpu(rb, ref)
    np.testing.assert_allclose(rb.y, ref.y, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["itd-reverse", "itd-forward"])
def test_unrolled_blocks_match_joint_and_cpu(case, method):
    cpu, blk, jnt, x, y = case
    kw = dict(method=method, T=4, K=3)
    rb, rj = mlo.hypergrad(blk, x, y, **kw), mlo.hypergrad(jnt, x, y, **kw)
    assert rb.success and rj.success
    assert rb.step == rj.step
    assert _close(rb.grad, rj.grad) and _close(rb.y, rj.y)
    cb = rb.oracle_calls
    assert cb["lower_grad"] == 0 and cb["lower_grad_y"] == 4
    if method == "itd-reverse":  # one (H_xy a, H_yy a) pair per differentiated step
        assert cb["lower_hvp_xy"] == 3 and cb["lower_hvp"] == 0
    else:  # forward mode needs H_yx e_j: joint products, dx per differentiated step
        assert cb["lower_hvp"] == 3 * x.shape[0] and cb["lower_hvp_xy"] == 0
    ref = mlo.hypergrad(cpu, x, y, **kw)
    _agree_with_cpu(rb, ref)
    np.testing.assert_allclose(rb.grad, ref.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["aid", "itd", "alternating"])
def test_minimize_bilevel_blocks_match_cpu(method):
    """Fixed steps (no line search), so that the iterations are the same on both backends
    and the oracle counts agree call for call."""
    q, build, x, y = LIBRARY["quadratic"]
    kw = dict(method=method, step=0.1, maxiter=3, T=3)
    res = mlo.minimize_bilevel(build(q), x, y, **kw)
    ref = mlo.minimize_bilevel(q.problem, x, y, **kw)
    assert res.oracle_calls == ref.oracle_calls and res.nit == ref.nit
    np.testing.assert_allclose(res.x, ref.x, rtol=1e-9, atol=1e-12)
    if method != "alternating":
        assert res.oracle_calls["lower_grad"] == res.oracle_calls["lower_hvp"] == 0


def test_hyperobjective_blocks_match_cpu():
    q, build, x, y = LIBRARY["quadratic"]
    dev, cpu = mlo.HyperObjective(build(q), y), mlo.HyperObjective(q.problem, y)
    for xx in (x, 0.5 * x):
        (f, g), (fr, gr) = dev(xx), cpu(xx)
        np.testing.assert_allclose(g, gr, rtol=1e-9, atol=1e-12)
        assert f == pytest.approx(fr, rel=1e-12)
    assert dev.oracle_calls == cpu.oracle_calls


# -- errors ------------------------------------------------------------------------------
@cuda.jit
def _first_entry_kernel(v, out):
    if cuda.grid(1) == 0:
        out[0] = v[0]


def _hvp_yy_first_entry_only(z, v, out, A, B, C, a, b):
    _first_entry_kernel[1, 1](v, out)


def _hvp_xy_doubled(z, v, out, A, B, C, a, b):
    quad_hvp_xy_device(z, v, out, A, B, C, a, b)
    dl.scale_into(out, 2.0, out)


def _quad_with(hvp=quad_hvp_device, **blocks):
    q = LIBRARY["quadratic"][0]
    upper = DeviceObjective(quad_grad_device, value=quad_value_device, args=q.upper_means)
    lower = DeviceObjective(quad_grad_device, hvp=hvp, value=quad_value_device,
                            args=q.lower_means, **blocks)
    return DeviceBilevelProblem(upper, lower, (q.dx, q.dy)), np.ones(q.dx), np.zeros(q.dy)


BAD_BLOCKS = {
    # the joint product as hvp_yy reads v past its dy entries (an IndexError here)
    "wrong size": (quad_hvp_device, {"hvp_yy": quad_hvp_device},
                   r"callback lower\.hvp_yy raised"),
    "unwritten entries": (quad_hvp_device, {"hvp_yy": _hvp_yy_first_entry_only},
                          r"lower\.hvp_yy wrote non-finite values .* all 3 entries of out"),
    "disagrees": (quad_hvp_device, {"hvp_xy": _hvp_xy_doubled},
                  r"lower\.hvp_xy disagrees with the joint"),
    "disagrees with differences": (None, {"hvp_xy": _hvp_xy_doubled},
                                   "by central differences of grad"),
}


@pytest.mark.parametrize("kind", sorted(BAD_BLOCKS))
def test_bad_block_is_named(kind):
    hvp, blocks, match = BAD_BLOCKS[kind]
    p, x, y = _quad_with(hvp=hvp, **blocks)
    with pytest.raises(CallbackError, match=match):
        mlo.hypergrad(p, x, y)


def test_blocks_without_joint_hvp():
    """Blocks checked against differences of grad; the solve then makes no difference
    quotient at all."""
    q = LIBRARY["quadratic"][0]
    p, x, y = _quad_with(hvp=None, hvp_yy=quad_hvp_yy_device, hvp_xy=quad_hvp_xy_device)
    res = mlo.hypergrad(p, x, y, tol=1e-12, lower_tol=1e-12)
    assert res.success
    np.testing.assert_allclose(res.grad, q.hypergrad(x), rtol=1e-8, atol=1e-10)
    assert res.oracle_calls["lower_hvp"] == 0
    lower = mlo.Objective(quad_grad, value=quad_value, args=q.lower_means,
                          hvp_yy=quad_hvp_yy, hvp_xy=quad_hvp_xy)
    upper = mlo.Objective(quad_grad, value=quad_value, args=q.upper_means)
    ref = mlo.hypergrad(mlo.BilevelProblem(upper, lower, (q.dx, q.dy)), x, y, tol=1e-12,
                        lower_tol=1e-12)
    assert res.oracle_calls == ref.oracle_calls  # no difference quotient on either


def test_non_callable_block_is_a_type_error():
    with pytest.raises(TypeError, match="DeviceObjective hvp_yy must be callable"):
        DeviceObjective(quad_grad_device, hvp_yy=3.0)


def test_multilevel_rejects_block_oracles():
    q = LIBRARY["quadratic"][0]
    top = DeviceObjective(quad_grad_device, hvp=quad_hvp_device, args=q.upper_means)
    low = DeviceObjective(quad_grad_device, hvp=quad_hvp_device, args=q.lower_means,
                          hvp_yy=quad_hvp_yy_device)
    with pytest.raises(ValueError, match=r"level 2 has block oracles \(hvp_yy\)"):
        DeviceMultilevelProblem([top, low], (q.dx, q.dy))


def _ignoring_idx(fn, nvec):
    """``fn`` with the index array of a finite-sum objective (after the vectors) dropped."""
    def wrapped(*a):
        return fn(*a[:nvec], *a[nvec + 1:])
    return wrapped


def test_finite_sum_blocks_run_on_the_full_batch():
    """With ``n_samples`` the blocks take idx after the vectors, as the joint callbacks;
    the deterministic solvers call them on the full batch."""
    q, build, x, y = LIBRARY["quadratic"]
    dev = build(q)
    lo = dev.lower
    lower = DeviceObjective(_ignoring_idx(lo.grad, 1), hvp=_ignoring_idx(lo.hvp, 2),
                            args=lo.args, n_samples=3, grad_y=_ignoring_idx(lo.grad_y, 1),
                            hvp_yy=_ignoring_idx(lo.hvp_yy, 2),
                            hvp_xy=_ignoring_idx(lo.hvp_xy, 2))
    assert lower.full_batch().blocks == ("grad_y", "hvp_yy", "hvp_xy")
    res = mlo.hypergrad(DeviceBilevelProblem(dev.upper, lower, dev.dims), x, y)
    ref = mlo.hypergrad(dev, x, y)
    assert res.oracle_calls == ref.oracle_calls
    np.testing.assert_array_equal(res.grad, ref.grad)
