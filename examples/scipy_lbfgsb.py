"""Bilevel hyperparameter learning inside a SciPy pipeline.

``mlocore.HyperObjective`` hands ``(F(x), grad F(x))`` to ``scipy.optimize.minimize(...,
jac=True)``; the lower solution and the adjoint are warm-started between calls, so each
L-BFGS-B iteration costs a short inner solve. Run: ``python examples/scipy_lbfgsb.py``.
"""
import numpy as np
import scipy.optimize as so

import mlocore as mlo
from mlocore.problems import make_logistic

data = make_logistic(n_train=300, n_val=300, n_features=15, seed=1)
fobj = mlo.HyperObjective(data.problem, y0=np.zeros(data.n_features), method="cg", tol=1e-10)
x0 = np.full(data.n_features, -1.0)
f0, _ = fobj(x0)
res = so.minimize(fobj, x0, jac=True, method="L-BFGS-B",
                  bounds=[(-6.0, 6.0)] * data.n_features, options={"gtol": 1e-8})
print(res.message)
print(f"validation loss: {f0:.5f} at lambda0 -> {res.fun:.5f} at the learned lambda")
print(f"{res.nit} L-BFGS-B iterations, {fobj.ncalls} hypergradients, oracle calls "
      f"{fobj.oracle_calls}")
