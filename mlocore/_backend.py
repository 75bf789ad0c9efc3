"""The backend seam: which backend runs an entry point, and whether CUDA can run here.

Every public entry point resolves its ``backend`` argument here
(:func:`mlocore._validation.check_backend`); the CPU kernels (``mlocore._kernels``) and the
CUDA kernels (``mlocore.cuda``) never decide it. ``numba.cuda`` is imported only when a
question about CUDA is asked, so the CPU backend never pays for it.
"""
from __future__ import annotations

import contextlib
import os

__all__ = ["BACKENDS", "get_backend", "set_backend", "backend", "CudaUnavailableError",
           "simulator_enabled", "cuda_available", "require_cuda", "device_info"]

BACKENDS = ("cpu", "cuda")

_backend = os.environ.get("MLOCORE_BACKEND", "cpu")


def _check_name(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of "
                         + ", ".join(repr(c) for c in BACKENDS))
    return name


def get_backend() -> str:
    """The process-wide default backend: ``MLOCORE_BACKEND`` (read at import, default
    "cpu") until :func:`set_backend` or :func:`backend` changes it."""
    if _backend not in BACKENDS:
        raise ValueError(f"MLOCORE_BACKEND must be 'cpu' or 'cuda', got {_backend!r}")
    return _backend


def set_backend(name: str) -> None:
    """Set the process-wide default backend ("cpu" or "cuda"; "cuda" is checked when an
    entry point runs, with a clear error where no GPU or simulator is there)."""
    global _backend
    _backend = _check_name(name)


@contextlib.contextmanager
def backend(name: str):
    """Context manager: use ``name`` as the default backend inside the block."""
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


class CudaUnavailableError(RuntimeError):
    """``backend="cuda"`` was requested where no GPU (and no simulator) can run it."""


def simulator_enabled() -> bool:
    """True when numba's CUDA simulator is on (``NUMBA_ENABLE_CUDASIM=1`` at import)."""
    from numba import config
    return bool(config.ENABLE_CUDASIM)


def cuda_available() -> bool:
    """True when CUDA kernels can run here: a usable GPU and driver, or the simulator."""
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:  # a broken driver install: treat as unavailable, say why elsewhere
        return False


def _why_unavailable() -> str:
    try:
        from numba import cuda
        cuda.detect()  # prints to stdout; only its failure matters here
    except Exception as exc:  # pragma: no cover - depends on the machine
        return " ".join(f"{type(exc).__name__}: {exc}".split())
    return "numba.cuda.is_available() is False (no NVIDIA driver or GPU found)"


def require_cuda(where: str) -> None:
    """Raise :class:`CudaUnavailableError` unless CUDA kernels can run here."""
    if cuda_available():
        return
    raise CudaUnavailableError(
        f"{where}: backend='cuda' was requested, but no CUDA device is available "
        f"({_why_unavailable()}) and numba's CUDA simulator is off. mlocore never falls back "
        "to the CPU silently: use backend='cpu' (or unset MLOCORE_BACKEND), run on a machine "
        "with an NVIDIA GPU, or set NUMBA_ENABLE_CUDASIM=1 before numba is imported to run "
        "the kernels in the (slow) simulator.")


def device_info() -> str:
    """One line naming the device the kernels run on (or the simulator)."""
    if simulator_enabled():
        return "numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
    if not cuda_available():
        return "no CUDA device"
    from numba import cuda
    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    return f"{name} (compute capability {dev.compute_capability[0]}.{dev.compute_capability[1]})"
