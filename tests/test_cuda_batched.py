"""Batched CUDA mode: many small bilevel problems, one thread block each, one launch.

Runs under numba's CUDA simulator (tests/conftest.py), which costs milliseconds per
``syncthreads``: 3 problems, dx=2, dy=4, blocks of at most 32 threads, few launches (the
shared launches are module-scoped fixtures).
"""
import numpy as np
import pytest
from numba import cuda, njit

import mlocore as mlo
from mlocore.cuda._batched import (BatchedBilevelProblem, batched_hypergrad,
                                   batched_minimize, batched_shared_bytes)
from mlocore.problems import make_quadratic
from mlocore.problems.cuda_batched import (make_batched_quadratic, quad_component_grad,
                                           quad_component_hvp, quadratic_row)

pytestmark = pytest.mark.cuda

DX, DY, N_PROBLEMS = 2, 4, 3
THREADS = 4


@pytest.fixture(scope="module")
def batch():
    # different seeds: different matrices in every row (one launch, different data)
    return make_batched_quadratic([make_quadratic(dx=DX, dy=DY, n_outer=20, n_inner=30, seed=s)
                                   for s in range(N_PROBLEMS)])


@pytest.fixture(scope="module")
def points():
    rng = np.random.default_rng(42)
    return rng.standard_normal((N_PROBLEMS, DX)), rng.standard_normal((N_PROBLEMS, DY))


@pytest.fixture(scope="module")
def result(batch, points):
    x, y0 = points
    x_before, y_before = x.copy(), y0.copy()
    up_before, lo_before = batch.upper_data.copy(), batch.lower_data.copy()
    res = batched_hypergrad(batch.problem, x, y0, batch.upper_data, batch.lower_data,
                            threads=THREADS)
    # the caller's arrays are never modified
    for after, before in ((x, x_before), (y0, y_before), (batch.upper_data, up_before),
                          (batch.lower_data, lo_before)):
        np.testing.assert_array_equal(after, before)
    return res


def test_batched_matches_cpu_hypergrad(batch, points, result):
    x, y0 = points
    assert result.success.tolist() == [True] * N_PROBLEMS, result.message
    assert result.message == f"All {N_PROBLEMS} problems converged."
    for b, q in enumerate(batch.quads):
        ref = mlo.hypergrad(q.problem, x[b], y0[b])
        assert ref.success
        np.testing.assert_allclose(result.grad[b], ref.grad, rtol=0, atol=1e-10)
        np.testing.assert_allclose(result.y[b], ref.y, rtol=0, atol=1e-10)
        np.testing.assert_allclose(result.v[b], ref.v, rtol=0, atol=1e-10)
        assert result.fun[b] == pytest.approx(ref.fun, rel=1e-12)
        # same algorithm, same stopping rules: the same iteration counts
        assert result.nit[b] == ref.nit
        assert result.lower_nit[b] == ref.lower_nit
        assert result.info[b] == ref.lin_info == 0
        assert result.lin_residual[b] <= 1e-10 * np.linalg.norm(
            quadratic_grad_y_upper(q, x[b], ref.y))


def quadratic_grad_y_upper(q, x, y):
    F, _, K, f_y, _ = q.upper_means
    return F @ y + K.T @ x + f_y


def test_batched_matches_closed_form(batch, points, result):
    x, _ = points
    np.testing.assert_allclose(result.y, batch.y_star(x), rtol=0, atol=1e-9)
    np.testing.assert_allclose(result.v, batch.adjoint(x), rtol=0, atol=1e-9)
    np.testing.assert_allclose(result.grad, batch.hypergrad(x), rtol=0, atol=1e-9)
    # the rows really differ: every problem has its own data
    assert np.min(np.abs(np.diff(result.grad, axis=0))) > 1e-3


def test_transfers_counted_exactly(result, batch):
    # host inputs: x, y0, upper_data, lower_data once each; outputs: grad, y, v and the two
    # per-problem statistics arrays (float, int) once each
    n_in = N_PROBLEMS * (DX + DY) + batch.upper_data.size + batch.lower_data.size
    n_out = N_PROBLEMS * (DX + 2 * DY) + N_PROBLEMS * (3 + 6)
    assert result.transfers == {"h2d": 4, "d2h": 5, "h2d_bytes": 8 * n_in,
                                "d2h_bytes": 8 * n_out}


def test_device_inputs_and_device_output(batch, points, result):
    x, y0 = points
    d_in = [cuda.to_device(a) for a in (x, y0, batch.upper_data, batch.lower_data)]
    # 2 threads for 4 components: every thread owns several components of every vector
    res = batched_hypergrad(batch.problem, *d_in, threads=2, output="device")
    assert res.transfers["h2d"] == 0          # device inputs are used in place
    assert res.transfers["d2h"] == 2          # only the per-problem statistics came back
    for name in ("grad", "y", "v"):
        assert hasattr(res[name], "copy_to_host"), name
        np.testing.assert_allclose(res[name].copy_to_host(), result[name], rtol=0, atol=1e-12)
    assert res.success.all()
    np.testing.assert_array_equal(d_in[0].copy_to_host(), x)  # inputs only read
    np.testing.assert_array_equal(d_in[1].copy_to_host(), y0)


def test_one_problem_full_warp(batch, points):
    """n_problems = 1 with 32 threads (more threads than components), warm v0."""
    x, _ = points
    q = batch.quads[1]
    y0 = batch.y_star(x)[1:2] + 1e-3
    v0 = batch.adjoint(x)[1:2]
    res = batched_hypergrad(batch.problem, x[1:2], y0, batch.upper_data[1:2],
                            batch.lower_data[1:2], v0=v0, threads=32)
    ref = mlo.hypergrad(q.problem, x[1], y0[0], v0=v0[0])
    assert res.success[0], res.message
    np.testing.assert_allclose(res.grad[0], ref.grad, rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.v[0], ref.v, rtol=0, atol=1e-10)
    assert res.transfers["h2d"] == 5  # v0 too


@pytest.fixture(scope="module")
def indefinite_batch(batch):
    """Problem 1's lower Hessian A replaced by an indefinite matrix (eigenvalues -1..2)."""
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.standard_normal((DY, DY)))
    A_bad = (Q * np.array([-1.0, 0.5, 1.0, 2.0])) @ Q.T
    A_bad = 0.5 * (A_bad + A_bad.T)
    q = batch.quads[1]
    means = (A_bad,) + tuple(q.lower_means[1:])
    lower_data = batch.lower_data.copy()
    lower_data[1] = quadratic_row(means)
    cpu_problem = mlo.BilevelProblem(
        upper=q.problem.upper,
        lower=mlo.Objective(q.problem.lower.grad, hvp=q.problem.lower.hvp, args=means),
        dims=(DX, DY))
    return lower_data, cpu_problem


def test_indefinite_lower_hessian_is_flagged(batch, points, result, indefinite_batch):
    x, y0 = points
    lower_data, cpu_problem = indefinite_batch
    res = batched_hypergrad(batch.problem, x, y0, batch.upper_data, lower_data,
                            threads=THREADS)
    assert res.success.tolist() == [True, False, True]
    assert res.info[1] == -2 and res.status[1] == 3 and res.lower_status[1] == 3
    assert "problem [1]" in res.message and "1 did not" in res.message
    assert "negative curvature" in res.message
    assert np.all(np.isfinite(res.grad)) and np.all(np.isfinite(res.y))
    assert np.all(np.isfinite(res.v))
    ref = mlo.hypergrad(cpu_problem, x[1], y0[1])
    assert not ref.success and ref.status == res.status[1]
    # the other problems are untouched by their neighbour's failure
    for b in (0, 2):
        np.testing.assert_array_equal(res.grad[b], result.grad[b])
        np.testing.assert_array_equal(res.y[b], result.y[b])


def test_indefinite_adjoint_solve_is_flagged(batch, points, indefinite_batch):
    """lower_solved=True: the adjoint CG meets the negative curvature (status 5, info -2)."""
    x, _ = points
    lower_data, cpu_problem = indefinite_batch
    y = batch.y_star(x)
    res = batched_hypergrad(batch.problem, x, y, batch.upper_data, lower_data,
                            lower_solved=True, threads=THREADS)
    ref = mlo.hypergrad(cpu_problem, x[1], y[1], lower_solved=True)
    assert ref.lin_info == -2
    assert res.success.tolist() == [True, False, True]
    assert res.status[1] == 5 and res.info[1] == -2
    assert np.all(np.isfinite(res.grad)) and np.all(np.isfinite(res.v))
    np.testing.assert_allclose(res.v[1], ref.v, rtol=0, atol=1e-10)  # same last iterate
    assert np.isnan(res.lower_grad_norm).all()  # no lower solve ran


def test_batched_minimize_matches_cpu_steps(batch, points):
    x0, y0 = points
    step, steps = 0.1, 3
    res = batched_minimize(batch.problem, x0, y0, batch.upper_data, batch.lower_data,
                           step=step, maxiter=steps, gtol=1e-12, threads=THREADS)
    assert res.status.tolist() == [10] * N_PROBLEMS and not res.success.any()
    assert res.nit.tolist() == [steps] * N_PROBLEMS
    assert "Maximum number of iterations" in res.message
    for b, q in enumerate(batch.quads):  # the same steps with the CPU hypergradient
        x, y, v = x0[b].copy(), y0[b].copy(), None
        for _ in range(steps):
            h = mlo.hypergrad(q.problem, x, y, v0=v)
            x, y, v = x - step * h.grad, h.y, h.v
        h = mlo.hypergrad(q.problem, x, y, v0=v)
        np.testing.assert_allclose(res.x[b], x, rtol=0, atol=1e-10)
        np.testing.assert_allclose(res.jac[b], h.grad, rtol=0, atol=1e-10)
        np.testing.assert_allclose(res.y[b], h.y, rtol=0, atol=1e-10)
        assert res.fun[b] == pytest.approx(q.F(x), rel=1e-9)


def test_batched_minimize_stops_at_gtol(batch):
    x_star = batch.x_star
    res = batched_minimize(batch.problem, x_star, batch.y_star(x_star), batch.upper_data,
                           batch.lower_data, step=0.1, maxiter=50, gtol=1e-8,
                           threads=THREADS)
    assert res.success.all() and res.nit.tolist() == [0] * N_PROBLEMS, res.message
    np.testing.assert_array_equal(res.x, x_star)
    assert np.abs(res.grad).max() < 1e-8


@cuda.jit(device=True)
def _zero_grad(i, z, data):
    return 0.0


@njit
def _cpu_grad(i, z, data):
    return 0.0


def test_problem_errors():
    with pytest.raises(TypeError, match="upper_grad must be a numba.cuda.jit.device=True"):
        BatchedBilevelProblem(_cpu_grad, _zero_grad, quad_component_hvp, dims=(2, 4))
    with pytest.raises(TypeError, match="lower_hvp"):
        BatchedBilevelProblem(_zero_grad, _zero_grad, lambda i, z, v, d: 0.0, dims=(2, 4))
    with pytest.raises(ValueError, match="dims must be positive integers, got dy="):
        BatchedBilevelProblem(_zero_grad, _zero_grad, quad_component_hvp, dims=(2, 0))
    with pytest.raises(ValueError, match="dims must be a pair"):
        BatchedBilevelProblem(_zero_grad, _zero_grad, quad_component_hvp, dims=3)
    p = BatchedBilevelProblem(quad_component_grad, quad_component_grad, quad_component_hvp,
                              dims=(2, 4))
    assert p.dims == (2, 4) and "quad_component_grad" in repr(p)


def test_input_errors(batch, points):
    x, y0 = points
    up, lo = batch.upper_data, batch.lower_data
    P = batch.problem

    def call(*args, **kw):
        return batched_hypergrad(*args, threads=kw.pop("threads", THREADS), **kw)

    with pytest.raises(TypeError, match="must be a BatchedBilevelProblem"):
        call(batch.quads[0].problem, x, y0, up, lo)
    with pytest.raises(ValueError, match=r"x must be a 2-D array .* got shape \(2,\)"):
        call(P, x[0], y0, up, lo)
    with pytest.raises(ValueError, match=r"x must have shape \(3, 2\), got shape \(3, 3\)"):
        call(P, np.zeros((3, 3)), y0, up, lo)
    with pytest.raises(ValueError, match=r"y0 must have shape \(3, 4\), got shape \(2, 4\)"):
        call(P, x, y0[:2], up, lo)
    with pytest.raises(ValueError, match=r"lower_data must have shape \(3, n_data >= 1\).*"
                                         r"got shape \(2, "):
        call(P, x, y0, up, lo[:2])
    with pytest.raises(TypeError, match="x must be a real array, got dtype complex128"):
        call(P, x + 0j, y0, up, lo)
    bad = y0.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="y0 contains non-finite values"):
        call(P, x, bad, up, lo)
    with pytest.raises(TypeError, match="dtype float64, got a device array of dtype float32"):
        call(P, cuda.to_device(x.astype(np.float32)), y0, up, lo)
    with pytest.raises(ValueError, match="threads must be a power of two"):
        call(P, x, y0, up, lo, threads=3)
    with pytest.raises(ValueError, match="output must be 'numpy' or 'device'"):
        call(P, x, y0, up, lo, output="cupy")
    with pytest.raises(ValueError, match=r"tol must be >= 0 and finite, got -1.0"):
        call(P, x, y0, up, lo, tol=-1.0)
    with pytest.raises(TypeError, match="lower_solved must be a bool"):
        call(P, x, y0, up, lo, lower_solved="yes")
    with pytest.raises(ValueError, match=r"step must be > 0 and finite, got 0.0"):
        batched_minimize(P, x, y0, up, lo, step=0.0)
    big = BatchedBilevelProblem(quad_component_grad, quad_component_grad, quad_component_hvp,
                                dims=(2, 1000))
    assert batched_shared_bytes((2, 1000), 256) > 48 * 1024
    with pytest.raises(ValueError, match="bytes of shared memory per block"):
        batched_hypergrad(big, np.zeros((1, 2)), np.zeros((1, 1000)), np.ones((1, 1)),
                          np.ones((1, 1)))


def test_make_batched_quadratic_errors(batch):
    from mlocore.problems.cuda_batched import make_batched_quadratic as make
    with pytest.raises(ValueError, match="same \\(dx, dy\\)"):
        make([batch.quads[0], make_quadratic(dx=2, dy=3, seed=0)])
    with pytest.raises(TypeError, match="expected a QuadraticBilevel"):
        make([batch.quads[0], "not a problem"])
    with pytest.raises(ValueError, match="at least one"):
        make([])
    assert batch.upper_data.shape == (N_PROBLEMS, 2 + DY * DY + DX * DX + DX * DY + DY + DX)


_PTX_SCRIPT = r"""
import sys
from numba import cuda, types
from numba.cuda.cudadrv.error import CudaSupportError, NvvmSupportError
from numba.cuda.cudadrv.nvvm import NvvmError
import numba.cuda.dispatcher as dispatcher


class _Device:  # device functions ask the current device for its compute capability
    compute_capability = (8, 0)


dispatcher.get_current_device = lambda: _Device()
from mlocore.cuda._batched import _build_kernels
from mlocore.problems.cuda_batched import (quad_component_grad, quad_component_hvp,
                                           quad_component_value)
A2, I2, f8, i8, b1 = types.float64[:, ::1], types.int64[:, ::1], types.float64, types.int64, \
    types.boolean
hyper, minimize = _build_kernels(quad_component_grad, quad_component_grad, quad_component_hvp,
                                 quad_component_value)
sigs = {hyper: (A2, A2, A2, b1, A2, A2, b1, f8, i8, f8, f8, i8, A2, A2, A2, A2, I2),
        minimize: (A2, A2, A2, b1, A2, A2, f8, i8, f8, f8, i8, f8, f8, i8, A2, A2, A2, A2, A2,
                   I2)}
for kernel, sig in sigs.items():
    try:
        cuda.compile_ptx(kernel.py_func, types.void(*sig), cc=(8, 0))
    except (CudaSupportError, NvvmSupportError, NvvmError, OSError) as exc:
        if "Failed to verify" in str(exc) and "unsupported option" not in str(exc):
            raise
        print("NVVM unavailable:", exc)
        sys.exit(77)
print("ok")
"""


def test_kernels_compile_for_a_real_gpu():
    """The simulator accepts code the GPU target rejects: compile both kernels to PTX
    (sm_80) with the real CUDA target when libNVVM is installed (no GPU needed)."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
