"""mlocore's CUDA backend (``backend="cuda"``): numba.cuda kernels behind the same API.

Two modes (issue 5, DESIGN.md "Layers"):

* one large problem: vectors stay on the device for the whole solve; user callbacks take
  and write device arrays (:mod:`mlocore.cuda._device` counts every host/device copy);
* many small problems at once: one thread block per problem, user callbacks are
  ``cuda.jit(device=True)`` functions.

Kernels are tested under numba's simulator (``NUMBA_ENABLE_CUDASIM=1``) in CI and on a real
GPU where one is available (README, "CUDA backend").
"""
from ._device import (CudaUnavailableError, Transfers, cuda_available, device_info,
                      is_device_array, require_cuda, simulator_enabled, to_device, to_host)

__all__ = ["CudaUnavailableError", "Transfers", "cuda_available", "device_info",
           "is_device_array", "require_cuda", "simulator_enabled", "to_device", "to_host"]
