"""Block oracles in the CPU stochastic loops: every method calls the sample blocks
(``grad_y``, ``hvp_yy``, ``hvp_xy`` of the lower objective, ``grad_x``/``grad_y`` of the
upper one) where a step needs one block, with the same random streams as with the joint
callbacks (the same iterates from the same seed), counted per block; wrong sample blocks
are rejected once, naming the callback. Tiny sizes (dx=2, dy=3, 8 samples per level)."""
import numba
import numpy as np
import pytest

import mlocore as mlo
from mlocore._callbacks import CallbackError
from mlocore.problems import make_quadratic
from mlocore.problems.quadratic import (quad_sample_grad, quad_sample_grad_y, quad_sample_hvp,
                                        quad_sample_hvp_xy, quad_sample_hvp_yy,
                                        quad_sample_value)
from mlocore.stochastic import STOCHASTIC_METHODS
from oracle_helpers import joint_only, strip_blocks

DX, DY, N = 2, 3, 8
T, Q, MAXITER = 2, 3, 4
OPTIONS = {"bsa": dict(inner_steps=T, neumann_terms=Q), "stocbio": dict(inner_steps=T,
           neumann_terms=Q), "aid": dict(inner_steps=T, neumann_terms=Q),
           "ttsa": dict(neumann_terms=Q), "sustain": dict(neumann_terms=Q),
           "mrbo": dict(neumann_terms=Q), "vrbo": dict(neumann_terms=Q),
           "hessian-free": dict(inner_steps=T, directions=2),
           "penalty": dict(inner_steps=T), "primal-dual": dict(inner_steps=T),
           "alternating": dict(inner_steps=T), "stable": dict(hessian_floor=0.1)}


@pytest.fixture(scope="module")
def q():
    return make_quadratic(dx=DX, dy=DY, n_outer=N, n_inner=N, seed=3, ridge=1.0)


def _run(problem, method):
    return mlo.minimize_bilevel(problem, np.zeros(DX), np.zeros(DY), method=method,
                                batch_size=4, step=0.1, inner_step=0.2, maxiter=MAXITER,
                                eval_every=2, seed=7, average=0.0, **OPTIONS.get(method, {}))


@pytest.mark.parametrize("method", STOCHASTIC_METHODS)
def test_blocks_give_the_joint_iterates(q, method):
    """Blocks vs joint callbacks: the same iterates (round-off), the calls moved from the
    joint counters to the block counters (the same number of upper gradients and of lower
    gradient calls, no joint upper gradient or lower HVP left)."""
    blk = _run(q.stochastic_problem, method)
    jnt = _run(joint_only(q.stochastic_problem), method)
    assert blk.status == jnt.status
    np.testing.assert_allclose(blk.x, jnt.x, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(blk.y, jnt.y, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(blk.state["work"], jnt.state["work"], rtol=1e-12, atol=1e-14)
    cb, cj = blk.oracle_calls, jnt.oracle_calls
    for k in ("upper_grad_x", "upper_grad_y", "lower_grad_y", "lower_hvp_yy", "lower_hvp_xy"):
        assert cj[k] == 0
    assert cb["upper_grad"] == cb["lower_hvp"] == 0
    assert cb["upper_grad_x"] == cb["upper_grad_y"] == cj["upper_grad"] > 0
    assert blk.oracle_samples["upper_grad_x"] == jnt.oracle_samples["upper_grad"]
    assert cb["lower_grad_y"] + cb["lower_grad"] == cj["lower_grad"]
    assert cb["lower_value"] == cj["lower_value"]
    # every joint lower HVP became one or two block products
    assert cj["lower_hvp"] <= cb["lower_hvp_yy"] + cb["lower_hvp_xy"] <= 2 * cj["lower_hvp"]


#: exact block counts over MAXITER iterations (dy = 3: STABLE builds H from dy columns)
EXACT = {
    "soba": dict(upper_grad_x=MAXITER, lower_grad_y=MAXITER, lower_hvp_yy=MAXITER,
                 lower_hvp_xy=MAXITER),
    "stocbio": dict(upper_grad_x=MAXITER, lower_grad_y=T * MAXITER,
                    lower_hvp_yy=(Q - 1) * MAXITER, lower_hvp_xy=MAXITER),
    "stable": dict(upper_grad_x=MAXITER, lower_grad_y=MAXITER, lower_hvp_yy=DY * MAXITER,
                   lower_hvp_xy=DY * MAXITER),
    "hessian-free": dict(upper_grad_x=MAXITER, lower_grad_y=T * 3 * MAXITER, lower_hvp_yy=0,
                         lower_hvp_xy=0),
    "alternating": dict(upper_grad_x=MAXITER, lower_grad_y=T * MAXITER, lower_hvp_yy=0,
                        lower_hvp_xy=0),
}


@pytest.mark.parametrize("method", sorted(EXACT))
def test_exact_block_counts(q, method):
    res = _run(q.stochastic_problem, method)
    for k, n in EXACT[method].items():
        assert res.oracle_calls[k] == n, k
    assert res.oracle_samples["lower_grad_y"] == 4 * res.oracle_calls["lower_grad_y"]


def test_partial_blocks_fall_back_to_the_joint_callbacks(q):
    """Only ``hvp_yy`` on the lower level: the Neumann products use it, ``H_xy v`` and the
    gradients the joint callbacks; the iterates are unchanged."""
    sp = q.stochastic_problem
    lo = sp.lower
    lower = mlo.Objective(lo.grad, hvp=lo.hvp, value=lo.value, args=lo.args,
                          n_samples=lo.n_samples, hvp_yy=quad_sample_hvp_yy)
    part = mlo.BilevelProblem(strip_blocks(sp.upper), lower, sp.dims)
    r = _run(part, "stocbio")
    j = _run(joint_only(sp), "stocbio")
    np.testing.assert_allclose(r.x, j.x, rtol=1e-12, atol=1e-14)
    assert r.oracle_calls["lower_hvp_yy"] == (Q - 1) * MAXITER
    assert r.oracle_calls["lower_hvp"] == MAXITER  # the cross term H_xy v
    assert r.oracle_calls["lower_grad"] == T * MAXITER


def test_deterministic_objectives_with_blocks(q):
    """Blocks of objectives without n_samples (no idx) run the stochastic loops too."""
    blk = _run(q.problem, "soba")
    jnt = _run(joint_only(q.problem), "soba")
    np.testing.assert_allclose(blk.x, jnt.x, rtol=1e-12, atol=1e-14)
    assert blk.oracle_calls["lower_hvp_yy"] == MAXITER


@numba.njit(cache=True)
def _grad_y_long(z, idx, U, W, C, a, b, ridge):
    return np.zeros(U.shape[1] + 1)


@numba.njit(cache=True)
def _grad_y_scaled(z, idx, U, W, C, a, b, ridge):
    return 1.5 * quad_sample_grad_y(z, idx, U, W, C, a, b, ridge)


@numba.njit(cache=True)
def _hvp_xy_full_batch(z, v, idx, U, W, C, a, b, ridge):
    # ignores idx: agrees with the joint callback on the full batch only
    return quad_sample_hvp_xy(z, v, np.arange(U.shape[0]), U, W, C, a, b, ridge)


def _with_lower_block(q, **block):
    sp = q.stochastic_problem
    lower = mlo.Objective(quad_sample_grad, hvp=quad_sample_hvp, value=quad_sample_value,
                          args=sp.lower.args, n_samples=N, **block)
    return mlo.BilevelProblem(sp.upper, lower, sp.dims)


@pytest.mark.parametrize("block, match", [
    (dict(grad_y=_grad_y_long), r"lower\.grad_y returned shape \(4,\)"),
    (dict(grad_y=_grad_y_scaled), r"lower\.grad_y disagrees with the joint callback"),
    (dict(hvp_xy=_hvp_xy_full_batch), r"lower\.hvp_xy disagrees .* minibatch of 4 samples"),
])
def test_wrong_sample_blocks_are_rejected(q, block, match):
    with pytest.raises(CallbackError, match=match):
        _run(_with_lower_block(q, **block), "soba")


def _library_problems():
    from mlocore.problems import make_cleaning, make_logistic
    return {"logistic": make_logistic(n_train=40, n_val=30, n_features=4, seed=2),
            "cleaning": make_cleaning(n_train=24, n_val=15, n_features=3, n_classes=3,
                                      seed=1)}


@pytest.mark.parametrize("name", ["logistic", "cleaning"])
@pytest.mark.parametrize("method", ["soba", "stocbio"])
def test_library_sample_blocks_give_the_joint_iterates(name, method):
    """The logistic and data-cleaning stochastic problems' sample blocks: the same iterates
    as their joint callbacks, with block calls instead of joint HVPs."""
    sp = _library_problems()[name].stochastic_problem
    x0, y0 = np.zeros(sp.dx), np.zeros(sp.dy)
    kw = dict(method=method, batch_size=5, step=0.05, inner_step=0.1, maxiter=3, seed=2,
              **OPTIONS.get(method, {}))
    if method == "stocbio":
        kw["neumann_step"] = 0.1
    blk = mlo.minimize_bilevel(sp, x0, y0, **kw)
    jnt = mlo.minimize_bilevel(joint_only(sp), x0, y0, **kw)
    np.testing.assert_allclose(blk.x, jnt.x, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(blk.y, jnt.y, rtol=1e-10, atol=1e-12)
    assert blk.oracle_calls["lower_hvp"] == 0 and blk.oracle_calls["lower_hvp_yy"] > 0
