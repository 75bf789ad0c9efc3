"""Benchmark bilevel problems with known solutions, used by tests, benchmarks and examples.

Every problem is written over the joint vector ``z = concat(x, y)`` with module-level
``@numba.njit(cache=True)`` callbacks that receive their data through ``args``.

Problems
--------
make_quadratic(dx=5, dy=10, n_outer=50, n_inner=100, seed=0, ridge=0.1)
    -> QuadraticBilevel. Stochastic quadratic bilevel problem (benchopt's ``simulated``,
    ALGORITHMS.md section 4): rank-one per-sample curvatures plus a ridge. Deterministic
    (``.problem``) and stochastic (``.stochastic_problem``, callbacks take sample indices)
    forms, closed forms ``y_star(x)``, ``jacobian``, ``F(x)``, ``hypergrad(x)``, ``Q``,
    ``x_star``, ``F_star``.
make_logistic(n_train=200, n_val=200, n_features=10, seed=0)
    -> LogisticHyperparameter. One l2 penalty ``exp(lam_j)`` per feature of a logistic
    regression (lower: penalized training log-loss; upper: validation log-loss), on synthetic
    standardized data.
load_breast_cancer_logistic(val_fraction=0.25, test_fraction=0.25, seed=0)
    -> LogisticHyperparameter on scikit-learn's breast cancer data set (train/val/test
    split, standardized with training statistics; needs ``pip install "mlocore[data]"``).

Multilevel problems (``mlocore.problems.multilevel``; ``.problem`` is a ``MultilevelProblem``
over ``z = concat(x_1, .., x_n)``, every level with grad, hvp, value and tvp callbacks):

make_trilevel_quadratic(dim=1, seed=42)
    -> TrilevelQuadratic. Giovannelli, Kent & Vicente's trilevel quadratic (ALGORITHMS.md
    section 3): ``y* = x``, ``z* = x + y``, ``grad F = c + 7x``, ``x* = -c/7``,
    ``F* = -|c|^2/14``.
make_nlevel_quadratic(n=3, dims=None, seed=0, cond=4.0)
    -> NLevelQuadratic. Random n-level quadratic with strongly convex reduced levels: affine
    best responses (``response_maps``, ``total_maps``), ``best_response(x_1)``, ``F``,
    ``hypergrad``, ``x_star``, ``F_star``; ``as_bilevel()`` for n = 2.
make_nonquadratic_trilevel(dims=(2, 2, 2), seed=0, scale=1.0)
    -> NonquadraticTrilevel. Log-cosh levels with a nonlinear innermost best response (the
    best-response curvature terms matter); nested reference solver ``solve_all``, ``F``,
    ``hypergrad_fd``, ``dy_dx_fd``, ``implicit_derivatives``.
load_poisoning_trilevel(n_train=8, n_val=40, features=("bmi", "bp", "s5"), seed=0)
    -> PoisoningTrilevel. Trilevel hyperparameter learning with data poisoning (Sato et al.)
    on scikit-learn's diabetes data; same reference solver.
"""
from .logistic import LogisticHyperparameter, load_breast_cancer_logistic, make_logistic
from .multilevel import (NLevelQuadratic, NonquadraticTrilevel, PoisoningTrilevel,
                         TrilevelQuadratic, load_poisoning_trilevel, make_nlevel_quadratic,
                         make_nonquadratic_trilevel, make_trilevel_quadratic)
from .quadratic import QuadraticBilevel, make_quadratic

__all__ = ["QuadraticBilevel", "make_quadratic", "LogisticHyperparameter", "make_logistic",
           "load_breast_cancer_logistic",
           "TrilevelQuadratic", "make_trilevel_quadratic", "NLevelQuadratic",
           "make_nlevel_quadratic", "NonquadraticTrilevel", "make_nonquadratic_trilevel",
           "PoisoningTrilevel", "load_poisoning_trilevel"]
