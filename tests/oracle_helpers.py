"""Shared by the test files: library problems with their block oracles removed."""
import mlocore as mlo


def joint_only(problem):
    """The same bilevel problem with the block oracles removed (the joint callbacks only)."""
    def strip(o):
        return mlo.Objective(o.grad, hvp=o.hvp, value=o.value, tvp=o.tvp, args=o.args,
                             n_samples=o.n_samples)
    return mlo.BilevelProblem(strip(problem.upper), strip(problem.lower), problem.dims)


def device_joint_only(problem):
    """The same :class:`mlocore.cuda.DeviceBilevelProblem` with the block oracles removed
    (the same device args, so no new transfer)."""
    from mlocore.cuda import DeviceBilevelProblem, DeviceObjective

    def strip(o):
        return DeviceObjective(o.grad, hvp=o.hvp, value=o.value, args=o.args,
                               n_samples=o.n_samples)
    return DeviceBilevelProblem(strip(problem.upper), strip(problem.lower), problem.dims)
