"""Methods without Hessian inverses: SABA, Hessian-free (PZOBO), value-function penalty and primal-dual.

Each entry is a :class:`mlocore._stochastic.MethodSpec` (see that module).
"""
FREE_METHODS = {}
