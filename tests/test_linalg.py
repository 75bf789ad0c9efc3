"""Linear solvers against dense references, scipy's cg and the truncated Neumann series."""
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from hypothesis import given, settings, strategies as st
from numba import njit

from mlocore import linalg


def random_spd(n, cond, seed):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * np.geomspace(1.0, cond, n)) @ Q.T
    return 0.5 * (A + A.T), rng.standard_normal(n)


@njit(cache=True)
def dense_matvec(p, A):
    return A @ p


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(1, 40), log_cond=st.floats(0.0, 4.0), seed=st.integers(0, 2**31))
def test_cg_matches_dense_solve(n, log_cond, seed):
    A, b = random_spd(n, 10.0 ** log_cond, seed)
    x, info = linalg.cg(A, b, rtol=1e-12, maxiter=20 * n)
    assert info == 0
    ref = np.linalg.solve(A, b)
    # CG residual bound -> error bound |x - x*| <= cond * rtol * |x*| (plus round-off)
    assert np.linalg.norm(x - ref) <= 1e-12 * 10.0 ** log_cond * np.linalg.norm(ref) * 10 + 1e-13


@pytest.mark.parametrize("kind", ["dense", "njit", "python", "linop", "sparse"])
def test_cg_operator_kinds_agree(kind):
    A, b = random_spd(15, 100.0, 1)
    if kind == "dense":
        op, args = A, ()
    elif kind == "njit":
        op, args = dense_matvec, (A,)
    elif kind == "python":
        op, args = (lambda p, M: M @ p), (A,)
    elif kind == "linop":
        op, args = spla.aslinearoperator(A), ()
    else:
        op, args = sp.csr_matrix(A), ()
    x, info, out = linalg.cg(op, b, rtol=1e-11, args=args, full_output=True)
    assert info == 0 and out.success
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
    assert out.n_matvec == out.nit  # zero warm start: one product per iteration


def test_cg_matches_scipy_iterates():
    A, b = random_spd(30, 1e3, 2)
    for maxiter in (3, 10):
        ours, info = linalg.cg(A, b, rtol=0.0, maxiter=maxiter)
        ref, ref_info = spla.cg(A, b, rtol=0.0, atol=0.0, maxiter=maxiter)
        assert info == maxiter and ref_info == maxiter
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)


def test_cg_warm_start_and_callback():
    A, b = random_spd(25, 50.0, 3)
    x_ref = np.linalg.solve(A, b)
    _, _, cold = linalg.cg(A, b, rtol=1e-10, full_output=True)
    x0 = x_ref + 1e-6 * np.ones(25)
    x0_copy = x0.copy()
    _, _, warm = linalg.cg(A, b, x0=x0, rtol=1e-10, full_output=True)
    assert warm.nit < cold.nit
    np.testing.assert_array_equal(x0, x0_copy)  # caller's array untouched
    seen = []
    x, info = linalg.cg(A, b, rtol=1e-10, callback=lambda xk: seen.append(xk.copy()))
    assert info == 0 and len(seen) == cold.nit
    np.testing.assert_allclose(seen[-1], x)


def test_cg_preconditioner():
    A, b = random_spd(20, 1e3, 4)
    D = np.diag(np.arange(1.0, 21.0) ** 2)
    A2 = D @ A @ D  # badly scaled
    _, _, plain = linalg.cg(A2, b, rtol=1e-10, maxiter=2000, full_output=True)
    x, info, pre = linalg.cg(A2, b, rtol=1e-10, maxiter=2000, M=1.0 / np.diag(A2),
                             full_output=True)
    assert info == 0 and pre.nit < plain.nit
    np.testing.assert_allclose(A2 @ x, b, atol=1e-8 * np.linalg.norm(b))


def test_cg_reports_negative_curvature_and_breakdown():
    A = np.diag([1.0, -2.0, 3.0])
    x, info = linalg.cg(A, np.ones(3))
    assert info == -2
    assert np.all(np.isfinite(x))
    x, info = linalg.cg(np.zeros((3, 3)), np.ones(3))
    assert info == -1 and np.all(np.isfinite(x))


def test_cg_maxiter_zero_is_not_success():
    A, b = random_spd(5, 10.0, 5)
    x, info = linalg.cg(A, b, maxiter=0)
    assert info == 1  # not converged; 0 would read as success
    np.testing.assert_array_equal(x, 0.0)


def test_neumann_is_truncated_series():
    A, b = random_spd(8, 10.0, 6)
    eta = 0.5 / np.linalg.eigvalsh(A).max()
    for k in (1, 5, 20):
        x, info = linalg.neumann(A, b, eta=eta, rtol=0.0, maxiter=k)
        M = np.eye(8) - eta * A
        series = eta * sum(np.linalg.matrix_power(M, q) @ b for q in range(k))
        np.testing.assert_allclose(x, series, rtol=1e-12, atol=1e-14)
        assert info == k


def test_neumann_default_step_converges_and_detects_divergence():
    A, b = random_spd(10, 20.0, 7)
    x, info, out = linalg.neumann(A, b, rtol=1e-10, full_output=True)
    assert info == 0
    lam = np.linalg.eigvalsh(A).max()
    assert 0.5 / lam < out.eta <= 1.0 / lam  # from power iteration with a safety factor
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-7)
    x, info = linalg.neumann(A, b, eta=3.0 / lam, maxiter=500)
    assert info == -3 and np.all(np.isfinite(x))


def test_power_iteration_bounds_lambda_max():
    A, _ = random_spd(30, 100.0, 8)
    lam = linalg.largest_eigenvalue(A)
    true = np.linalg.eigvalsh(A).max()
    assert lam <= true * (1 + 1e-12) and lam >= 0.9 * true


def test_solve_direct():
    A, b = random_spd(12, 1e4, 9)
    x, info = linalg.solve_direct(A, b)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-8)
    x, info = linalg.solve_direct(np.diag([1.0, -1.0]), np.ones(2))
    assert info == -4
    x, info = linalg.solve_direct(dense_matvec, b, args=(A,))
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-8)


@pytest.mark.parametrize("A, b, exc, match", [
    (np.ones((3, 2)), np.ones(3), ValueError, "square"),
    (np.eye(3), np.ones(4), ValueError, "shape"),
    (np.eye(3), np.array([1.0, np.nan, 0.0]), ValueError, "finite"),
    (np.eye(3), np.ones(3, dtype=complex), TypeError, "dtype"),
    (np.eye(3), np.ones((3, 1)), ValueError, "1-D"),
    ("matrix", np.ones(3), TypeError, "LinearOperator"),
])
def test_linalg_bad_input(A, b, exc, match):
    with pytest.raises(exc, match=match):
        linalg.cg(A, b)


def test_linalg_bad_options():
    with pytest.raises(ValueError, match="maxiter"):
        linalg.cg(np.eye(2), np.ones(2), maxiter=-1)
    with pytest.raises(ValueError, match="rtol"):
        linalg.cg(np.eye(2), np.ones(2), rtol=-1.0)
    with pytest.raises(ValueError, match="M must"):
        linalg.cg(np.eye(2), np.ones(2), M=np.ones(3))
    with pytest.raises(ValueError, match="eta"):
        linalg.neumann(np.eye(2), np.ones(2), eta=0.0)


@pytest.mark.parametrize("kind", ["dense", "linop", "sparse", "callable"])
def test_cg_preconditioner_forms_agree(kind):
    A, b = random_spd(20, 1e3, 4)
    D = np.diag(np.arange(1.0, 21.0) ** 2)
    A2 = D @ A @ D
    Minv = np.diag(1.0 / np.diag(A2))
    M = {"dense": Minv, "linop": spla.aslinearoperator(Minv), "sparse": sp.csr_matrix(Minv),
         "callable": (lambda r: Minv @ r)}[kind]
    x, info, out = linalg.cg(A2, b, rtol=1e-10, maxiter=2000, M=M, full_output=True)
    ref, _, ref_out = linalg.cg(A2, b, rtol=1e-10, maxiter=2000, M=np.diag(Minv),
                                full_output=True)
    assert info == 0 and out.nit == ref_out.nit
    np.testing.assert_allclose(x, ref, rtol=1e-9)


def test_power_iteration_finds_an_alternating_top_eigenvector():
    n = 40
    u = np.where(np.arange(n) % 2 == 0, 1.0, -1.0) / np.sqrt(n)
    A = np.eye(n) + 99.0 * np.outer(u, u)  # lambda_max = 100 along the alternating vector
    assert linalg.largest_eigenvalue(A) == pytest.approx(100.0, rel=1e-3)


def test_solve_direct_reports_a_nonfinite_operator():
    A = np.eye(3)
    A[1, 1] = np.nan
    x, info = linalg.solve_direct(lambda p, M: M @ p, np.ones(3), args=(A,))
    assert info == -1


def test_operator_args_may_be_a_list():
    A = np.diag([1.0, 2.0, 4.0])
    x, info = linalg.cg(lambda p, M: M @ p, np.ones(3), args=[A], rtol=1e-12)
    assert info == 0
    np.testing.assert_allclose(x, [1.0, 0.5, 0.25])
