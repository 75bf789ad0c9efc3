"""Shared by the test files: library problems with their block oracles removed."""
import copy

import mlocore as mlo


def strip_blocks(objective):
    """The same objective with the block oracles removed (the joint callbacks only)."""
    o = objective
    return mlo.Objective(o.grad, hvp=o.hvp, value=o.value, tvp=o.tvp, args=o.args,
                         n_samples=o.n_samples)


def joint_only(problem):
    """The same bilevel problem with the block oracles removed (the joint callbacks only)."""
    return mlo.BilevelProblem(strip_blocks(problem.upper), strip_blocks(problem.lower),
                              problem.dims)


def joint_twin(library_problem):
    """A shallow copy of a library problem (``make_quadratic(...)`` and the like) whose CPU
    ``problem`` and ``stochastic_problem`` (where it has one) give the joint callbacks only,
    as its device problems do, so that CPU and device runs can be compared call for call
    (the same oracle counts)."""
    twin = copy.copy(library_problem)
    twin.problem = joint_only(library_problem.problem)
    if getattr(library_problem, "stochastic_problem", None) is not None:
        twin.stochastic_problem = joint_only(library_problem.stochastic_problem)
    return twin
