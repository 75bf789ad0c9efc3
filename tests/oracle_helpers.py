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


def device_joint_only(problem):
    """The same :class:`mlocore.cuda.DeviceBilevelProblem` with the block oracles removed
    (the same device args, so no new transfer)."""
    from mlocore.cuda import DeviceBilevelProblem, DeviceObjective

    def strip(o):
        return DeviceObjective(o.grad, hvp=o.hvp, value=o.value, args=o.args,
                               n_samples=o.n_samples)
    return DeviceBilevelProblem(strip(problem.upper), strip(problem.lower), problem.dims)


def joint_stochastic_twin(library_problem):
    """A shallow copy of a library problem (``make_quadratic(...)`` and the like) whose CPU
    ``stochastic_problem`` gives the joint callbacks only, as the device stochastic problems
    do (the device stochastic loops take no blocks), so that CPU and device stochastic runs
    can be compared call for call (the same oracle counts)."""
    twin = copy.copy(library_problem)
    twin.stochastic_problem = joint_only(library_problem.stochastic_problem)
    return twin
