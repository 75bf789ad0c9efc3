"""mlocore's CUDA backend (``backend="cuda"``): numba.cuda kernels behind the same API.

Two modes:

* one large problem (:class:`DeviceBilevelProblem`, :class:`DeviceMultilevelProblem`):
  vectors stay on the device for the whole solve; user callbacks take and write device
  arrays; ``mlocore.hypergrad`` (implicit incl. "direct", unrolled, n-level),
  ``mlocore.solve_lower``, ``mlocore.minimize_bilevel`` (deterministic, and every stochastic
  method, :data:`DEVICE_STOCHASTIC_METHODS`, minibatches drawn on the device),
  ``mlocore.minimize_multilevel``, ``mlocore.HyperObjective`` and ``mlocore.linalg.cg`` /
  ``neumann`` / ``solve_direct`` run fused kernels;
* many small problems at once (:class:`BatchedBilevelProblem`): one thread block per
  problem, user callbacks are ``cuda.jit(device=True)`` functions computing one component.

Every host/device copy is counted (:class:`Transfers`, ``res.transfers``). Kernels are tested
under numba's simulator (``NUMBA_ENABLE_CUDASIM=1``) in CI and on a real GPU with
``MLOCORE_TEST_GPU=1`` (README, "CUDA backend").
"""
from ._device import (CudaUnavailableError, Transfers, cuda_available, device_info,
                      is_device_array, require_cuda, simulator_enabled, to_device, to_host)
from ._problem import DeviceBilevelProblem, DeviceObjective
from ._implicit import hypergrad, solve_lower
from ._unrolled import unrolled_hypergrad
from ._minimize import minimize_bilevel
from ._multilevel import DeviceMultilevelProblem, multilevel_hypergrad
from ._direct import direct_device, solve_direct
from ._drivers import DeviceHyperObjective, minimize_multilevel
from ._linalg import cg_device, neumann_device, power_iteration_device
from ._batched import (BatchedBilevelProblem, batched_hypergrad, batched_minimize,
                       batched_shared_bytes)

__all__ = ["CudaUnavailableError", "Transfers", "cuda_available", "device_info",
           "is_device_array", "require_cuda", "simulator_enabled", "to_device", "to_host",
           "DeviceBilevelProblem", "DeviceObjective", "hypergrad", "solve_lower",
           "unrolled_hypergrad", "minimize_bilevel", "DeviceMultilevelProblem",
           "multilevel_hypergrad", "minimize_stochastic", "DEVICE_STOCHASTIC_METHODS",
           "direct_device", "solve_direct", "DeviceHyperObjective", "minimize_multilevel",
           "cg_device", "neumann_device", "power_iteration_device",
           "BatchedBilevelProblem", "batched_hypergrad", "batched_minimize",
           "batched_shared_bytes"]


def __getattr__(name):
    """``minimize_stochastic`` and ``DEVICE_STOCHASTIC_METHODS``: the device entry point of
    the stochastic methods and their list. They live in :mod:`mlocore.stochastic`, a layer
    above this backend (it imports the backend), so this namespace resolves them on first
    access instead of importing them here."""
    if name in ("minimize_stochastic", "DEVICE_STOCHASTIC_METHODS"):
        from .. import stochastic
        return stochastic.minimize_device if name == "minimize_stochastic" \
            else stochastic.DEVICE_STOCHASTIC_METHODS
    raise AttributeError(f"module 'mlocore.cuda' has no attribute {name!r}")
