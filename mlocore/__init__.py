"""mlocore: bilevel and multilevel optimization by implicit differentiation, compiled with Numba.

Public API at a glance::

    Objective(grad, hvp=None, value=None, tvp=None, args=(), n_samples=None)
    BilevelProblem(upper, lower, dims=(dx, dy), bounds=None, project=None)
    solve_lower(problem, x, y0, method="newton-cg")
    hypergrad(problem, x, y, method="cg" | "direct" | "neumann" | "itd-reverse" | "itd-forward")
    minimize_bilevel(problem, x0, y0, method="aid" | "itd" | "alternating")
    minimize_bilevel(problem, x0, y0, method="soba" | "stocbio" | ..., batch_size=, seed=)
    MultilevelProblem(levels=[f_1, .., f_n], dims=(d_1, .., d_n))
    hypergrad(problem, xs, method="exact" | "fd" | "truncated")      # n levels
    minimize_multilevel(problem, x0s, method="exact")
    HyperObjective(problem, y0)            # (F(x), grad F(x)) for scipy.optimize.minimize
    mlocore.linalg.cg / neumann / solve_direct
    compare_methods(problem, x0, y0, ["soba", "det-aid", ..], budget=, seeds=)  # .table(), .plot()
    mlocore.problems                        # benchmark problems with known solutions
"""
from ._callbacks import CallbackError
from ._backend import backend, get_backend, set_backend
from ._hypergrad import hypergrad, solve_lower
from ._minimize import HyperObjective, minimize_bilevel, minimize_multilevel
from ._problem import Ball, BilevelProblem, MultilevelProblem, Objective
from .stochastic import Schedule
from ._results import HypergradResult
from .compare import Comparison, compare_methods
from . import linalg

__version__ = "0.1.0"

__all__ = ["Objective", "BilevelProblem", "MultilevelProblem", "hypergrad", "solve_lower", "HypergradResult",
           "minimize_bilevel", "minimize_multilevel", "HyperObjective", "Ball", "Schedule",
           "CallbackError", "linalg", "backend", "get_backend", "set_backend",
           "compare_methods", "Comparison"]
