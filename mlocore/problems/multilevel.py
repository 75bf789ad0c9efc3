"""The multilevel benchmark problems, one module per family (this module re-exports them).

Levels k = 1..n, x_1 outermost. Every level's objective f_k is written over the joint vector
``z = concat(x_1, ..., x_n)`` with module-level ``@numba.njit(cache=True)`` callbacks
``grad(z, *args)``, ``hvp(z, v, *args)``, ``value(z, *args)`` and the third-order product
``tvp(z, u, w, *args) = d/ds hvp(z + s u, w)`` at s = 0; data go through ``args``.

- :mod:`mlocore.problems.trilevel_quadratic`: ``make_trilevel_quadratic`` (Giovannelli, Kent
  & Vicente's trilevel quadratic, closed forms);
- :mod:`mlocore.problems.nlevel_quadratic`: ``make_nlevel_quadratic`` (random n-level
  quadratics, closed forms; the shared ``quadform_*`` callbacks, and ``quadblock_*`` with
  the block oracles ``hvp_block`` / ``grad_block``);
- :mod:`mlocore.problems.nonquadratic_trilevel`: ``make_nonquadratic_trilevel`` (log-cosh
  levels, nonlinear innermost best response; the ``logcosh_quad_*`` callbacks);
- :mod:`mlocore.problems.nlevel_logcosh`: ``make_nlevel_logcosh`` (n log-cosh levels, every
  best response nonlinear; reference by central differences of F);
- :mod:`mlocore.problems.poisoning`: ``load_poisoning_trilevel`` (trilevel hyperparameter
  learning with data poisoning).

Their device callbacks sit beside them; :mod:`mlocore.problems.cuda_multilevel` re-exports
those.
"""
from __future__ import annotations

from .trilevel_quadratic import (TrilevelQuadratic, make_trilevel_quadratic, tq_upper_value,
                                 tq_upper_grad, tq_upper_hvp, tq_upper_tvp, tq_middle_value,
                                 tq_middle_grad, tq_middle_hvp, tq_lower_value, tq_lower_grad,
                                 tq_lower_hvp, tq_tvp)
from .nlevel_quadratic import (NLevelQuadratic, make_nlevel_quadratic, quadform_grad,
                               quadform_hvp, quadform_value, quadform_tvp, quadblock_grad,
                               quadblock_hvp, quadblock_value, quadblock_tvp,
                               quadblock_hvp_block, quadblock_grad_block)
from .nonquadratic_trilevel import (NonquadraticTrilevel, make_nonquadratic_trilevel,
                                    logcosh_quad_grad, logcosh_quad_hvp, logcosh_quad_value,
                                    logcosh_quad_tvp)
from .nlevel_logcosh import NLevelLogcosh, make_nlevel_logcosh
from .poisoning import (PoisoningTrilevel, load_poisoning_trilevel, poison_lower_value,
                        poison_lower_grad, poison_lower_hvp, poison_lower_tvp, poison_middle_value,
                        poison_middle_grad, poison_middle_hvp, poison_middle_tvp,
                        poison_upper_value, poison_upper_grad, poison_upper_hvp, poison_upper_tvp)

__all__ = ["TrilevelQuadratic", "make_trilevel_quadratic", "tq_upper_value", "tq_upper_grad",
           "tq_upper_hvp", "tq_upper_tvp", "tq_middle_value", "tq_middle_grad",
           "tq_middle_hvp", "tq_lower_value", "tq_lower_grad", "tq_lower_hvp", "tq_tvp",
           "NLevelQuadratic", "make_nlevel_quadratic", "quadform_grad", "quadform_hvp",
           "quadform_value", "quadform_tvp", "quadblock_grad", "quadblock_hvp",
           "quadblock_value", "quadblock_tvp", "quadblock_hvp_block", "quadblock_grad_block",
           "NonquadraticTrilevel",
           "make_nonquadratic_trilevel", "logcosh_quad_grad", "logcosh_quad_hvp",
           "logcosh_quad_value", "logcosh_quad_tvp", "NLevelLogcosh", "make_nlevel_logcosh",
           "PoisoningTrilevel",
           "load_poisoning_trilevel", "poison_lower_value", "poison_lower_grad",
           "poison_lower_hvp", "poison_lower_tvp", "poison_middle_value",
           "poison_middle_grad", "poison_middle_hvp", "poison_middle_tvp",
           "poison_upper_value", "poison_upper_grad", "poison_upper_hvp",
           "poison_upper_tvp"]
