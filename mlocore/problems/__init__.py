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
"""
from .logistic import LogisticHyperparameter, load_breast_cancer_logistic, make_logistic
from .quadratic import QuadraticBilevel, make_quadratic

__all__ = ["QuadraticBilevel", "make_quadratic", "LogisticHyperparameter", "make_logistic",
           "load_breast_cancer_logistic"]
