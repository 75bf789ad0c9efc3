"""Compile time, measured apart from steady state: first calls in fresh processes.

``timeraw_*`` benchmarks return ``(stmt, setup)``; asv runs each sample in a new Python
process, times ``stmt`` once, and not ``setup`` (imports, data).

- ``new-problem``: callbacks the process has never seen (plain ``@njit``, no cache): the
  cost a user pays for each new problem (callback compilation; mlocore's kernels come from
  numba's disk cache).
- ``cached-problem``: the benchmark problem of :mod:`.common`, whose callbacks are
  ``@njit(cache=True)``: only cache loads.
- ``cold-cache``: a new problem with an empty ``NUMBA_CACHE_DIR``: everything is compiled,
  mlocore's kernels included (the first call after installation).
"""
import os

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))

_DATA = """
import numpy as np
rng = np.random.default_rng(0)
dx, dy = 5, 100
M = rng.standard_normal((dy, dy))
A = M @ M.T / dy + np.eye(dy)
C = rng.standard_normal((dy, dx))
yt = rng.standard_normal(dy)
x = rng.standard_normal(dx)
y = np.linalg.solve(A, -C @ x)
"""

_NEW_CALLBACKS = """
import numba
import mlocore as mlo

@numba.njit
def g_grad(z, A, C):
    dx = C.shape[1]
    out = np.empty(z.shape[0])
    out[:dx] = C.T @ z[dx:]
    out[dx:] = A @ z[dx:] + C @ z[:dx]
    return out

@numba.njit
def g_hvp(z, v, A, C):
    dx = C.shape[1]
    out = np.empty(z.shape[0])
    out[:dx] = C.T @ v[dx:]
    out[dx:] = A @ v[dx:] + C @ v[:dx]
    return out

@numba.njit
def f_grad(z, yt, mu):
    dx = z.shape[0] - yt.shape[0]
    out = np.empty(z.shape[0])
    out[:dx] = mu * z[:dx]
    out[dx:] = z[dx:] - yt
    return out
"""

_NEW_PROBLEM = """
p = mlo.BilevelProblem(mlo.Objective(f_grad, args=(yt, 0.1)),
                       mlo.Objective(g_grad, hvp=g_hvp, args=(A, C)), dims=(dx, dy))
r = mlo.hypergrad(p, x, y, method={method!r}, lower_solved=True, T=10)
assert r.success, r.message
"""

_COLD = """
import atexit, os, shutil, tempfile
_cache = tempfile.mkdtemp(prefix="mlocore-bench-numba-cache-")
atexit.register(shutil.rmtree, _cache, True)
os.environ["NUMBA_CACHE_DIR"] = _cache
"""

_CACHED_SETUP = """
import sys
sys.path.insert(0, {parent!r})
from benchmarks import common
data = common.QuadData(100)
"""

_CACHED_PROBLEM = """
p = common.make_problem(data)
r = common.mlo.hypergrad(p, data.x, data.y_star, method={method!r}, lower_solved=True, T=10)
assert r.success, r.message
"""


class FirstCall:
    params = (["new-problem", "cached-problem", "cold-cache"], ["cg", "itd-reverse"])
    param_names = ["kind", "method"]
    number = 1
    repeat = (1, 3, 60.0)
    timeout = 600

    def timeraw_first_hypergrad(self, kind, method):
        if kind == "cached-problem":
            setup = _CACHED_SETUP.format(parent=os.path.dirname(BENCH_DIR))
            return _CACHED_PROBLEM.format(method=method), setup
        setup = (_COLD if kind == "cold-cache" else "") + _DATA + _NEW_CALLBACKS
        return _NEW_PROBLEM.format(method=method), setup


def timeraw_import_mlocore():
    return "import mlocore"
