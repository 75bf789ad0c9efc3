"""Device callbacks of the multilevel problem families (CUDA backend, "one large problem"
mode), re-exported from the family modules beside their CPU problems:
:mod:`mlocore.problems.nlevel_quadratic` (``quadform_*_device``,
``nlevel_quadratic_device_problem``), :mod:`mlocore.problems.trilevel_quadratic`
(``trilevel_quadratic_device_problem``) and :mod:`mlocore.problems.nonquadratic_trilevel`
(``logcosh_quad_*_device``, ``nonquadratic_trilevel_device_problem``).
"""
from __future__ import annotations

from .trilevel_quadratic import trilevel_quadratic_device_problem
from .nlevel_quadratic import (quadform_grad_device, quadform_hvp_device, quadform_value_device,
                               nlevel_quadratic_device_problem)
from .nonquadratic_trilevel import (logcosh_quad_grad_device, logcosh_quad_hvp_device,
                                    logcosh_quad_value_device,
                                    nonquadratic_trilevel_device_problem)

__all__ = ["trilevel_quadratic_device_problem", "quadform_grad_device", "quadform_hvp_device",
           "quadform_value_device", "nlevel_quadratic_device_problem",
           "logcosh_quad_grad_device", "logcosh_quad_hvp_device",
           "logcosh_quad_value_device", "nonquadratic_trilevel_device_problem"]
