"""Shared by the test files: library problems with their block oracles removed."""
import copy

import mlocore as mlo


def joint_only(problem):
    """The same bilevel problem with the block oracles removed (the joint callbacks only)."""
    def strip(o):
        return mlo.Objective(o.grad, hvp=o.hvp, value=o.value, tvp=o.tvp, args=o.args,
                             n_samples=o.n_samples)
    return mlo.BilevelProblem(strip(problem.upper), strip(problem.lower), problem.dims)


def joint_twin(library_problem):
    """A shallow copy of a library problem (``make_quadratic(...)`` and the like) whose CPU
    ``problem`` gives the joint callbacks only, as its device problem does, so that CPU and
    device runs can be compared call for call (the same oracle counts)."""
    twin = copy.copy(library_problem)
    twin.problem = joint_only(library_problem.problem)
    return twin
