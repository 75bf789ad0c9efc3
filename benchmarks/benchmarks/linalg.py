"""``mlocore.linalg.cg`` against ``scipy.sparse.linalg.cg`` on the SPD matrix A of the
quadratic problem (eigenvalues in [1, 100]), right-hand side grad_y f, rtol = 1e-8."""
import numba
import numpy as np
import scipy.sparse.linalg as spla

import mlocore as mlo

from .common import get_case

RTOL = 1e-8


@numba.njit(cache=True)
def dense_matvec(p, A):
    return A @ p


class CG:
    params = ([10, 100, 1000],
              ["mlocore-dense", "mlocore-njit-matvec", "mlocore-linearoperator", "scipy-dense",
               "scipy-linearoperator"])
    param_names = ["n", "solver"]
    timeout = 300

    def setup(self, n, solver):
        d = get_case(n).data
        A, b = d.A, d.r
        self.x_true = d.v_star
        op = spla.aslinearoperator(A)
        if solver == "mlocore-dense":
            self.solve = lambda: mlo.linalg.cg(A, b, rtol=RTOL)[0]
        elif solver == "mlocore-njit-matvec":
            self.solve = lambda: mlo.linalg.cg(dense_matvec, b, rtol=RTOL, args=(A,))[0]
        elif solver == "mlocore-linearoperator":
            self.solve = lambda: mlo.linalg.cg(op, b, rtol=RTOL)[0]
        elif solver == "scipy-dense":
            self.solve = lambda: spla.cg(A, b, rtol=RTOL, atol=0.0)[0]
        else:
            self.solve = lambda: spla.cg(op, b, rtol=RTOL, atol=0.0)[0]
        self.solve()  # warm-up (compile / cache load)

    def time_cg(self, n, solver):
        self.solve()

    def track_relerr(self, n, solver):
        x = self.solve()
        return float(np.linalg.norm(x - self.x_true) / np.linalg.norm(self.x_true))

    track_relerr.unit = "relative error"
