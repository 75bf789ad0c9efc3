"""CUDA backend against the CPU backend (needs a GPU: every benchmark is skipped without one).

The problems are those of ``benchmarks/cuda_ratios.py`` (dense and tridiagonal lower
Hessians, dx = 10; batched small quadratics), imported from it so that the two agree.
"""
import os
import sys

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _require_gpu():
    from mlocore.cuda import cuda_available, simulator_enabled
    if simulator_enabled() or not cuda_available():
        raise NotImplementedError("needs a CUDA GPU")  # asv: skipped


def _ratios_module():
    sys.path.insert(0, os.path.join(_ROOT, "benchmarks"))
    import cuda_ratios
    return cuda_ratios


class Hypergrad:
    """``mlocore.hypergrad(method="cg")`` on each backend, per lower size dy."""

    params = (["tridiagonal", "dense"], [1000, 10000, 100000, 1000000], ["cpu", "cuda"])
    param_names = ["hessian", "dy", "backend"]
    timeout = 600

    def setup(self, hessian, dy, backend):
        _require_gpu()
        if hessian == "dense" and dy > 10000:
            raise NotImplementedError("dense A beyond dy = 1e4 does not fit")
        cr = _ratios_module()
        build = cr.dense_problems if hessian == "dense" else cr.structured_problems
        cpu, dev = build(dy, np.random.default_rng(dy))
        self.problem = cpu if backend == "cpu" else dev
        self.x, self.y0 = np.ones(cr.DX), np.zeros(dy)
        self.run()  # compile / cache load outside the timing

    def run(self):
        import mlocore as mlo
        return mlo.hypergrad(self.problem, self.x, self.y0, method="cg")

    def time_hypergrad(self, hessian, dy, backend):
        self.run()


class Batched:
    """Problems per second: one batched launch against a CPU loop (small quadratics)."""

    params = ([256, 4096], ["batched-cuda", "cpu-loop"])
    param_names = ["n_problems", "how"]
    timeout = 600

    def setup(self, n, how):
        _require_gpu()
        from mlocore.problems import make_quadratic
        from mlocore.problems.cuda_batched import make_batched_quadratic
        self.quads = [make_quadratic(dx=2, dy=8, n_outer=10, n_inner=10, seed=s)
                      for s in range(n)]
        self.bq = make_batched_quadratic(self.quads)
        self.x = np.random.default_rng(n).standard_normal((n, 2))
        self.y0 = np.zeros((n, 8))
        self.time_throughput(n, how)

    def time_throughput(self, n, how):
        import mlocore as mlo
        from mlocore.cuda import batched_hypergrad
        if how == "batched-cuda":
            batched_hypergrad(self.bq.problem, self.x, self.y0, self.bq.upper_data,
                              self.bq.lower_data)
        else:
            for q, x, y in zip(self.quads, self.x, self.y0):
                mlo.hypergrad(q.problem, x, y)
