"""Benchmark bilevel problems with known solutions, used by tests, benchmarks and examples.

Every problem is written over the joint vector ``z = concat(x, y)`` with module-level
``@numba.njit(cache=True)`` callbacks that receive their data through ``args``.

Problems
--------
make_quadratic(dx=5, dy=10, n_outer=50, n_inner=100, seed=0, ridge=0.1)
    -> QuadraticBilevel. Stochastic quadratic bilevel problem (benchopt's ``simulated``,
    docs/mathematics.md section 4): rank-one per-sample curvatures plus a ridge. Deterministic
    (``.problem``) and stochastic (``.stochastic_problem``, callbacks take sample indices)
    forms, closed forms ``y_star(x)``, ``jacobian``, ``F(x)``, ``hypergrad(x)``, ``Q``,
    ``x_star``, ``F_star``.
make_logistic(n_train=200, n_val=200, n_features=10, seed=0)
    -> LogisticHyperparameter. One l2 penalty ``exp(lam_j)`` per feature of a logistic
    regression (lower: penalized training log-loss; upper: validation log-loss), on synthetic
    standardized data. Deterministic (``.problem``) and stochastic (``.stochastic_problem``:
    lower n_samples = n_train, upper n_samples = n_val) forms; reference ``F(lam)``,
    ``hypergrad(lam)``, ``x_star`` (lazy, often None) by mlocore's deterministic solvers.
make_logistic_ijcnn1_like(n_train=49990, n_val=91701, n_features=22, pos_fraction=0.1,
                          label_noise=0.02, seed=0)
    -> LogisticHyperparameter on synthetic data with the shape of LIBSVM's ijcnn1 (sizes of
    its train/test sets, ~10% positives, a constant bias column among the 22 features).
load_breast_cancer_logistic(val_fraction=0.25, test_fraction=0.25, seed=0)
    -> LogisticHyperparameter on scikit-learn's breast cancer data set (train/val/test
    split, standardized with training statistics; needs ``pip install "mlocore[data]"``).
load_digits_cleaning(n_train=500, n_val=500, corruption=0.5, reg=1e-2, seed=0)
    -> DataCleaning. Per-sample weights ``sigmoid(x_i)`` of a softmax regression trained on
    scikit-learn's digits with half of the training labels corrupted (mask ``.corrupted``);
    upper: clean validation cross-entropy. ``.problem``, ``.stochastic_problem``, reference
    ``F``, ``hypergrad``, ``x_star`` (None unless ``upper_reg > 0``), ``accuracy``,
    ``detection_auc``.
make_cleaning(n_train=200, n_val=100, n_features=5, n_classes=3, corruption=0.5, reg=1e-2)
    -> DataCleaning on synthetic Gaussian classes.
BilevelReference(problem, y0)
    Reference ``F``, ``hypergrad``, ``x_star`` of any BilevelProblem by the deterministic
    solvers (what the logistic and cleaning problems use).

Multilevel problems (``mlocore.problems.multilevel``; ``.problem`` is a ``MultilevelProblem``
over ``z = concat(x_1, .., x_n)``, every level with grad, hvp, value and tvp callbacks):

make_trilevel_quadratic(dim=1, seed=42)
    -> TrilevelQuadratic. Giovannelli, Kent & Vicente's trilevel quadratic (docs/mathematics.md
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
make_nlevel_logcosh(n=4, dims=None, seed=1)
    -> NLevelLogcosh. n log-cosh plus quadratic levels, every best response nonlinear (the
    curvature terms matter at every depth); reference ``F`` by nested solves and
    ``hypergrad_fd`` (central differences of F).
load_poisoning_trilevel(n_train=8, n_val=40, features=("bmi", "bp", "s5"), seed=0)
    -> PoisoningTrilevel. Trilevel hyperparameter learning with data poisoning (Sato et al.)
    on scikit-learn's diabetes data; same reference solver.
"""
from .cleaning import DataCleaning, load_digits_cleaning, make_cleaning
from .logistic import (BilevelReference, LogisticHyperparameter, load_breast_cancer_logistic,
                       make_logistic, make_logistic_ijcnn1_like)
from .nlevel_logcosh import NLevelLogcosh, make_nlevel_logcosh
from .nlevel_quadratic import NLevelQuadratic, make_nlevel_quadratic
from .nonquadratic_trilevel import NonquadraticTrilevel, make_nonquadratic_trilevel
from .poisoning import PoisoningTrilevel, load_poisoning_trilevel
from .quadratic import QuadraticBilevel, make_quadratic
from .trilevel_quadratic import TrilevelQuadratic, make_trilevel_quadratic

__all__ = ["QuadraticBilevel", "make_quadratic", "LogisticHyperparameter", "make_logistic",
           "make_logistic_ijcnn1_like", "load_breast_cancer_logistic", "DataCleaning",
           "load_digits_cleaning", "make_cleaning", "BilevelReference",
           "TrilevelQuadratic", "make_trilevel_quadratic", "NLevelQuadratic",
           "make_nlevel_quadratic", "NLevelLogcosh", "make_nlevel_logcosh",
           "NonquadraticTrilevel", "make_nonquadratic_trilevel",
           "PoisoningTrilevel", "load_poisoning_trilevel"]
