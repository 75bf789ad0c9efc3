"""Device plumbing of the CUDA backend: availability, and explicit, counted transfers.

Every host <-> device copy the backend makes goes through :func:`to_device` / :func:`to_host`
with a :class:`Transfers` counter, so that results can report what moved (``res.transfers``).
Arrays that are already on the device (numba device arrays, or anything exposing
``__cuda_array_interface__``) are used in place: no copy, no count.

Under ``NUMBA_ENABLE_CUDASIM=1`` (set before numba is imported) numba's simulator runs the
same kernels on the CPU, one Python thread per simulated thread: slow, but it is how CI
tests this backend. The simulator accepts code a real GPU rejects, so the suite must also
run on a GPU where one is lent (README, "CUDA backend").
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from .._backend import (CudaUnavailableError, cuda_available, device_info, require_cuda,
                        simulator_enabled)

__all__ = ["CudaUnavailableError", "Transfers", "cuda_available", "simulator_enabled",
           "require_cuda", "is_device_array", "to_device", "to_host", "device_info"]


class Transfers:
    """Counts host -> device and device -> host copies (calls and bytes)."""

    __slots__ = ("h2d", "d2h", "h2d_bytes", "d2h_bytes")

    def __init__(self):
        self.h2d = self.d2h = self.h2d_bytes = self.d2h_bytes = 0

    def as_dict(self) -> dict:
        return {"h2d": self.h2d, "d2h": self.d2h, "h2d_bytes": self.h2d_bytes,
                "d2h_bytes": self.d2h_bytes}

    def __repr__(self):
        return f"Transfers({self.as_dict()})"


def is_device_array(a) -> bool:
    """True for numba device arrays (real or simulated) and ``__cuda_array_interface__``
    objects (CuPy, PyTorch CUDA tensors, ...)."""
    if hasattr(a, "__cuda_array_interface__"):
        return True
    if simulator_enabled():
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        return isinstance(a, FakeCUDAArray)
    return False


def _check_device_vector(name, a, n):
    if not simulator_enabled() and not hasattr(a, "copy_to_host"):
        a = cuda.as_cuda_array(a)  # a foreign __cuda_array_interface__ object: zero-copy view
    if a.dtype != np.float64:
        raise TypeError(f"{name} must have dtype float64, got a device array of dtype {a.dtype}")
    shape = (n,) if isinstance(n, int) else n
    if n is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got a device array of shape "
                         f"{tuple(a.shape)}")
    return a


def to_device(name, a, counter: Transfers, n=None):
    """``a`` on the device as float64 (copied and counted when it is a host array; used in
    place when it already is a device array). ``n``: the expected length (or shape)."""
    if is_device_array(a):
        return _check_device_vector(name, a, n)
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real array, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    shape = (n,) if isinstance(n, int) else n
    if n is not None and arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    counter.h2d += 1
    counter.h2d_bytes += arr.nbytes
    return cuda.to_device(arr)


def to_host(d, counter: Transfers):
    """A NumPy copy of device array ``d`` (counted)."""
    out = d.copy_to_host()
    counter.d2h += 1
    counter.d2h_bytes += out.nbytes
    return out
