"""Multilevel block oracles (``Objective(hvp_block=, grad_block=)``): the same n-level
hypergradients as the joint callbacks, block calls counted separately, and clear errors for
block callbacks of the wrong shape or disagreeing with the joint ones."""
import numpy as np
import pytest
from numba import njit

import mlocore as mlo
from mlocore import CallbackError
from mlocore.problems import make_nlevel_quadratic
from mlocore.problems.nlevel_quadratic import (quadblock_grad, quadblock_grad_block,
                                               quadblock_hvp, quadblock_hvp_block,
                                               quadblock_value)

ROUNDOFF = 1e-10  # relative: the same products computed blockwise


# f(z) = z.P z / 2 + q.z + c sum log cosh(z): nonquadratic levels (z-dependent Hessian, so a
# block product evaluated at a wrong point shows), args (P, q, c, off)
@njit(cache=True)
def lc_value(z, P, q, c, off):
    return 0.5 * (z @ (P @ z)) + q @ z + c * np.sum(np.log(np.cosh(z)))


@njit(cache=True)
def lc_grad(z, P, q, c, off):
    return P @ z + q + c * np.tanh(z)


@njit(cache=True)
def lc_hvp(z, v, P, q, c, off):
    return P @ v + c * v / np.cosh(z) ** 2


@njit(cache=True)
def lc_tvp(z, u, w, P, q, c, off):
    return -2.0 * c * np.tanh(z) / np.cosh(z) ** 2 * u * w


@njit(cache=True)
def lc_hvp_block(z, v, i, j, P, q, c, off):
    lo, hi, a, b = off[i - 1], off[i], off[j - 1], off[j]
    out = np.ascontiguousarray(P[lo:hi, a:b]) @ v
    if i == j:
        out += c * v / np.cosh(z[lo:hi]) ** 2
    return out


@njit(cache=True)
def lc_grad_block(z, i, P, q, c, off):
    lo, hi = off[i - 1], off[i]
    return np.ascontiguousarray(P[lo:hi]) @ z + q[lo:hi] + c * np.tanh(z[lo:hi])


@njit(cache=True)
def bad_shape_hvp_block(z, v, i, j, P, q, off):
    return np.zeros(v.shape[0] + 1)


@njit(cache=True)
def bad_cross_hvp_block(z, v, i, j, P, q, off):  # the cross blocks twice too large
    out = quadblock_hvp_block(z, v, i, j, P, q, off)
    return out if i == j else 2.0 * out


@njit(cache=True)
def bad_grad_block(z, i, P, q, off):
    return quadblock_grad_block(z, i, P, q, off) + 1.0


def logcosh_chain(n, dims, blocks, seed=0, c=0.5):
    """n nonquadratic levels from a random n-level quadratic (strongly convex: P_k SPD)."""
    q = make_nlevel_quadratic(n=n, dims=dims, seed=seed)
    off = np.array(q.offsets, dtype=np.int64)
    extra = dict(hvp_block=lc_hvp_block, grad_block=lc_grad_block) if blocks else {}
    levels = [mlo.Objective(lc_grad, hvp=lc_hvp, value=lc_value, tvp=lc_tvp,
                            args=(P, qq, c, off), **extra) for P, qq in zip(q.P, q.q)]
    return mlo.MultilevelProblem(levels, dims)


CASES = {"quadratic-3": (3, (2, 3, 2)), "quadratic-4": (4, (2, 3, 2, 3)),
         "logcosh-3": (3, (2, 2, 3)), "logcosh-4": (4, (2, 2, 3, 2))}


def pair(name):
    n, dims = CASES[name]
    if name.startswith("quadratic"):
        return (make_nlevel_quadratic(n=n, dims=dims, seed=n).problem,
                make_nlevel_quadratic(n=n, dims=dims, seed=n, block_oracles=True).problem)
    return logcosh_chain(n, dims, False, seed=n), logcosh_chain(n, dims, True, seed=n)


def starts(problem):
    rng = np.random.default_rng(3)
    return [rng.normal(size=d) for d in problem.dims]


def _close(a, b, rtol=ROUNDOFF):
    return np.linalg.norm(a - b) <= rtol * (1.0 + np.linalg.norm(b))


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "matrix-free"])
@pytest.mark.parametrize("method", ["exact", "truncated", "fd", "itd"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_block_and_joint_callbacks_agree(name, method, dense, monkeypatch):
    if not dense:
        monkeypatch.setattr("mlocore._multilevel.DENSE_LEVELS_MAX_SIZE", 0)
    joint, block = pair(name)
    xs = starts(joint)
    kw = dict(method=method, tol=1e-12, lower_tol=1e-11)
    if method == "itd":
        kw = dict(method="itd", T=5)
    rj = mlo.hypergrad(joint, xs, **kw)
    rb = mlo.hypergrad(block, xs, **kw)
    assert rj.success and rb.success, (rj.message, rb.message)
    # "fd": the lower solves stop at lower_tol, and their noise is divided by the step;
    # "itd", n >= 4: the HVPs of level n - 1 are central differences (step 1e-4) of
    # reverse passes, which divide the round-off of the blockwise sums by the step
    rtol = 1e-7 if method == "fd" else 1e-8 if (method, joint.n) == ("itd", 4) else ROUNDOFF
    assert _close(rb.grad, rj.grad, rtol), (rb.grad, rj.grad)
    assert _close(rb.z, rj.z, 1e-9)
    n = joint.n
    cj, cb = rj.oracle_calls[f"level{n}"], rb.oracle_calls[f"level{n}"]
    assert "hvp_block" not in cj and cb["hvp_block"] > 0 and cb["grad_block"] > 0
    # level n: its Hessian products and gradients in the recursion are all block calls
    assert cb["hvp"] == 0 and cb["grad"] < cj["grad"]
    # the levels above keep their joint products (compositions through the levels below)
    for k in range(1, n):
        assert rb.oracle_calls[f"level{k}"]["hvp_block"] == 0
    if name.startswith("quadratic") and method != "itd":
        exact = make_nlevel_quadratic(n=n, dims=joint.dims, seed=n).hypergrad(xs[0])
        rtol = 1e-6 if method == "fd" else 1e-8
        assert _close(rb.grad, exact, rtol)


def test_minimize_multilevel_with_blocks():
    joint, block = pair("quadratic-3")
    x0s = [np.zeros(d) for d in joint.dims]
    rj = mlo.minimize_multilevel(joint, x0s, maxiter=5)
    rb = mlo.minimize_multilevel(block, x0s, maxiter=5)
    assert _close(rb.x, rj.x, 1e-9) and rb.nit == rj.nit
    assert rb.oracle_calls["level3"]["hvp_block"] > 0
    assert rb.oracle_calls["level3"]["hvp"] == 0 and rj.oracle_calls["level3"]["hvp"] > 0


def _quad_levels(n, dims, **blocks):
    q = make_nlevel_quadratic(n=n, dims=dims, seed=1)
    off = np.array(q.offsets, dtype=np.int64)
    levels = [mlo.Objective(quadblock_grad, hvp=quadblock_hvp, value=quadblock_value,
                            args=(P, qq, off)) for P, qq in zip(q.P, q.q)]
    levels[-1] = mlo.Objective(quadblock_grad, hvp=quadblock_hvp, value=quadblock_value,
                               args=(q.P[-1], q.q[-1], off), **blocks)
    return mlo.MultilevelProblem(levels, dims)


@pytest.mark.parametrize("blocks, match", [
    (dict(hvp_block=bad_shape_hvp_block),
     r"level3\.hvp_block returned shape \(3,\) for i=1, j=1; expected \(2,\), the size of x_1"),
    (dict(hvp_block=bad_cross_hvp_block),
     r"level3\.hvp_block disagrees with the joint callback .* for i=2, j=1"),
    (dict(hvp_block=quadblock_hvp_block, grad_block=bad_grad_block),
     r"level3\.grad_block disagrees with the joint callback .* for i=1"),
])
def test_bad_block_oracles_are_named(blocks, match):
    dims = (2, 3, 2)
    p = _quad_levels(3, dims, **blocks)
    with pytest.raises(CallbackError, match=match):
        mlo.hypergrad(p, [np.ones(d) for d in dims], method="exact")


def test_block_oracles_checked_against_differences_without_hvp():
    """Without an ``hvp`` the blocks are checked against differences of ``grad`` and the
    recursion uses them for level n."""
    dims = (2, 2, 3)
    q = make_nlevel_quadratic(n=3, dims=dims, seed=2)
    off = np.array(q.offsets, dtype=np.int64)
    levels = [mlo.Objective(quadblock_grad, value=quadblock_value, args=(P, qq, off),
                            hvp_block=quadblock_hvp_block) for P, qq in zip(q.P, q.q)]
    p = mlo.MultilevelProblem(levels, dims)
    x1 = np.array([0.5, -1.0])
    res = mlo.hypergrad(p, [x1, np.zeros(2), np.zeros(3)], method="exact", tol=1e-12,
                        lower_tol=1e-11)
    assert res.success, res.message
    exact = q.hypergrad(x1)
    assert _close(res.grad, exact, 1e-6)
    assert res.oracle_calls["level3"]["hvp_block"] > 0
    p_bad = _quad_levels(3, dims, hvp_block=bad_cross_hvp_block)
    p_bad.levels[-1].hvp = None
    with pytest.raises(CallbackError, match="by central differences of grad"):
        mlo.hypergrad(p_bad, [np.ones(d) for d in dims], method="exact")


def test_block_oracles_of_the_wrong_problem_kind_are_rejected():
    dims = (2, 3, 2)
    q = make_nlevel_quadratic(n=2, dims=(2, 3), seed=0, block_oracles=True)
    bilevel = mlo.BilevelProblem(q.problem.levels[0], q.problem.levels[1], dims=(2, 3))
    with pytest.raises(ValueError, match=r"multilevel block oracles \(hvp_block, grad_block\)"):
        mlo.hypergrad(bilevel, np.zeros(2), np.zeros(3), method="cg")
    p = _quad_levels(3, dims)
    p.levels[1].hvp_yy = quadblock_hvp
    with pytest.raises(ValueError, match="give the levels of a multilevel problem hvp_block"):
        mlo.hypergrad(p, [np.zeros(d) for d in dims], method="exact")


# a last level usable at any number of levels (equal sizes d): 0.5 |x_n - A x_1|^2 + 0.5
# sum log cosh(x_n), args (A, d); its blocks are found from z's length
@njit(cache=True)
def any_n_grad(z, A, d):
    g = np.zeros(z.shape[0])
    r = z[-d:] - A @ z[:d]
    g[:d] = -(A.T @ r)
    g[-d:] += r + 0.5 * np.tanh(z[-d:])
    return g


@njit(cache=True)
def any_n_hvp(z, v, A, d):
    h = np.zeros(z.shape[0])
    r = v[-d:] - A @ v[:d]
    h[:d] = -(A.T @ r)
    h[-d:] += r + 0.5 * v[-d:] / np.cosh(z[-d:]) ** 2
    return h


@njit(cache=True)
def any_n_hvp_block(z, v, i, j, A, d):
    n = z.shape[0] // d
    h = np.zeros(z.shape[0])
    w = np.zeros(z.shape[0])
    w[(j - 1) * d:j * d] = v
    h = any_n_hvp(z, w, A, d)
    return h[(i - 1) * d:i * d].copy() if (i == 1 or i == n) else np.zeros(d)


@njit(cache=True)
def any_n_grad_block(z, i, A, d):
    return any_n_grad(z, A, d)[(i - 1) * d:i * d].copy()


@njit(cache=True)
def any_n_upper(z, A, d):  # levels 1..n-1: 0.5 |z - 1|^2
    return z - 1.0


@njit(cache=True)
def any_n_upper_hvp(z, v, A, d):
    return v.copy()


def test_one_block_objective_in_problems_of_different_depth():
    """A level objective's compiled block wrappers depend on the layout of the problem it is
    the last level of: reusing it at another depth must not reuse the first layout."""
    d, A = 2, np.array([[1.0, 0.5], [-0.3, 0.8]])
    last_blocks = mlo.Objective(any_n_grad, hvp=any_n_hvp, args=(A, d),
                                hvp_block=any_n_hvp_block, grad_block=any_n_grad_block)
    last_joint = mlo.Objective(any_n_grad, hvp=any_n_hvp, args=(A, d))
    for n in (2, 3, 2):
        upper = [mlo.Objective(any_n_upper, hvp=any_n_upper_hvp, args=(A, d))
                 for _ in range(n - 1)]
        xs = [np.full(d, 0.5)] * n
        rb = mlo.hypergrad(mlo.MultilevelProblem(upper + [last_blocks], [d] * n), xs)
        rj = mlo.hypergrad(mlo.MultilevelProblem(upper + [last_joint], [d] * n), xs)
        assert rb.success and rj.success, (n, rb.message, rj.message)
        assert _close(rb.grad, rj.grad), (n, rb.grad, rj.grad)
        assert rb.oracle_calls[f"level{n}"]["grad_block"] > 0
