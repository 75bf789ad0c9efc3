"""Shared test problems. Callbacks are module-level ``@njit(cache=True)`` functions so that
every test reuses one compilation (and CI's later runs load it from numba's disk cache).

CUDA: the suite runs numba's CUDA simulator (set here, before numba is imported) unless
``MLOCORE_TEST_GPU=1``, which runs the CUDA tests on the real GPU (README, "CUDA backend").
Tests marked ``gpu`` need a real GPU and are skipped under the simulator.
"""
import os

if os.environ.get("MLOCORE_TEST_GPU", "0") != "1":
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np
import pytest
from numba import njit

import mlocore as mlo


def _thread_safe_simulated_shared_arrays():
    """numba's simulator creates a static ``cuda.shared.array`` at its first use in a block
    by check-then-create without a lock (``FakeCUDAShared.array``): two threads can each get
    a private array, which corrupts a block reduction (rarely: a wrong sum, an iteration
    count off by one). Same lookup (the caller's file and line), under a lock. Shape 0
    (dynamic shared memory) is left to numba."""
    import sys
    import threading

    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support
    original = kernelapi.FakeCUDAShared.array
    lock = threading.Lock()

    def array(self, shape, dtype):
        if shape == 0:
            return original(self, shape, dtype)
        if isinstance(dtype, numba.core.types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            res = self._allocations.get(key)
            if res is None:
                res = self._allocations[key] = np.empty(shape, dtype)
        return res

    kernelapi.FakeCUDAShared.array = array


if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    import numba.core.types
    _thread_safe_simulated_shared_arrays()


# g(x, y) = 0.5 y.A y + y.C x + a.y ;  f(x, y) = 0.5 |y - t|^2 + 0.5 mu |x|^2 + h.x
@njit(cache=True)
def quad_lower_grad(z, A, C, a):
    dx = C.shape[1]
    out = np.empty_like(z)
    out[:dx] = C.T @ z[dx:]
    out[dx:] = A @ z[dx:] + C @ z[:dx] + a
    return out


@njit(cache=True)
def quad_lower_hvp(z, v, A, C, a):
    dx = C.shape[1]
    out = np.empty_like(z)
    out[:dx] = C.T @ v[dx:]
    out[dx:] = A @ v[dx:] + C @ v[:dx]
    return out


@njit(cache=True)
def quad_lower_value(z, A, C, a):
    dx = C.shape[1]
    y = z[dx:]
    return 0.5 * y @ (A @ y) + y @ (C @ z[:dx]) + a @ y


@njit(cache=True)
def quad_upper_grad(z, t, mu, h):
    dx = h.shape[0]
    out = np.empty_like(z)
    out[:dx] = mu * z[:dx] + h
    out[dx:] = z[dx:] - t
    return out


@njit(cache=True)
def quad_upper_value(z, t, mu, h):
    dx = h.shape[0]
    r = z[dx:] - t
    return 0.5 * r @ r + 0.5 * mu * z[:dx] @ z[:dx] + h @ z[:dx]


class DenseQuadratic:
    """A small bilevel quadratic with closed forms (tests' reference)."""

    def __init__(self, dx=3, dy=6, cond=20.0, mu=0.1, seed=0, eigs=None):
        rng = np.random.default_rng(seed)
        Q, _ = np.linalg.qr(rng.standard_normal((dy, dy)))
        if eigs is None:
            eigs = np.geomspace(1.0, cond, dy)
        self.eigs = np.asarray(eigs, dtype=float)
        self.A = np.ascontiguousarray((Q * self.eigs) @ Q.T)
        self.A = 0.5 * (self.A + self.A.T)
        self.C = np.ascontiguousarray(rng.standard_normal((dy, dx)))
        self.a = rng.standard_normal(dy)
        self.t = rng.standard_normal(dy)
        self.h = rng.standard_normal(dx)
        self.mu = mu
        self.dx, self.dy = dx, dy
        self.J = -np.linalg.solve(self.A, self.C)
        self.y0 = -np.linalg.solve(self.A, self.a)

    def problem(self, hvp=True, value=True, **kw):
        upper = mlo.Objective(quad_upper_grad, value=quad_upper_value if value else None,
                              args=(self.t, self.mu, self.h))
        lower = mlo.Objective(quad_lower_grad, hvp=quad_lower_hvp if hvp else None,
                              value=quad_lower_value, args=(self.A, self.C, self.a))
        return mlo.BilevelProblem(upper, lower, dims=(self.dx, self.dy), **kw)

    def y_star(self, x):
        return self.y0 + self.J @ x

    def F(self, x):
        r = self.y_star(x) - self.t
        return 0.5 * r @ r + 0.5 * self.mu * x @ x + self.h @ x

    def hypergrad(self, x):
        return self.mu * x + self.h + self.J.T @ (self.y_star(x) - self.t)

    @property
    def x_star(self):
        H = self.J.T @ self.J + self.mu * np.eye(self.dx)
        return -np.linalg.solve(H, self.h + self.J.T @ (self.y0 - self.t))


@pytest.fixture(scope="session")
def quad():
    return DenseQuadratic()


@pytest.fixture(scope="session")
def quad_problem(quad):
    return quad.problem()


def _check_stochastic_convergence(res, q, bound):
    """A stochastic run on a QuadraticBilevel ``q`` (x0 = 0, reference=q) ran its budget,
    ended within ``bound`` of x*, and its F - F* over the last checkpoints (noisy around a
    noise ball) is well below the start's."""
    d = res.history["dist_to_x_star"]
    assert res.success and res.status == 20, res.message
    assert d[0] == pytest.approx(np.linalg.norm(q.x_star))
    assert d[-1] < bound, d
    gap = res.history["F"] - q.F_star
    assert np.mean(gap[-5:]) < 0.5 * gap[0], gap


@pytest.fixture
def matrix_free_levels(monkeypatch):
    """CPU n-level engines take the matrix-free recursion, as the device engine does, so
    that CPU references compare with device runs call for call (the same oracle counts)."""
    monkeypatch.setattr("mlocore._multilevel.DENSE_LEVELS_MAX_SIZE", 0)


@pytest.fixture(scope="session")
def check_stochastic_convergence():
    return _check_stochastic_convergence


@pytest.fixture(scope="session", autouse=True)
def fast_simulator_barriers():
    """The CUDA simulator's syncthreads polls under the GIL: a shorter switch interval makes
    its shared-memory reductions about 4x faster (restored after the session)."""
    import sys
    from numba import config as numba_config
    if not numba_config.ENABLE_CUDASIM:
        yield
        return
    old = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)
    yield
    sys.setswitchinterval(old)


def pytest_collection_modifyitems(config, items):
    from numba import config as numba_config
    if not numba_config.ENABLE_CUDASIM:
        return
    skip = pytest.mark.skip(reason="needs a real GPU (run with MLOCORE_TEST_GPU=1 on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
