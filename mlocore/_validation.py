"""Input validation shared by the public entry points. Kernels never see bad input."""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import _backend

__all__ = ["as_vector", "check_positive", "check_int", "check_choice", "check_backend"]


_FLOAT64 = np.dtype(np.float64)  # arrays from compiled code carry equal, not identical, dtypes


def as_vector(name: str, value, size: int | None = None) -> np.ndarray:
    """Return a fresh C-contiguous float64 copy of a finite 1-D array.

    Real integer and floating inputs are converted; complex, boolean, object and string
    inputs are refused with a message that says what was received and what is expected.
    The copy means the caller's array is never modified.
    """
    if type(value) is np.ndarray and value.dtype == _FLOAT64 and value.ndim == 1 \
            and (size is None or value.shape[0] == size):
        out = value.copy()  # fast path: only the copy and one finiteness test
        # a finite sum (small arrays: of Python floats, cheaper than a BLAS call) or a finite
        # |out|^2 implies every entry finite; an overflow falls through to the full test
        if out.shape[0] <= 64:
            if math.isfinite(sum(out.tolist())):
                return out
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                if math.isfinite(out.dot(out)):
                    return out
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be a real float64 array, got dtype={arr.dtype}; "
                        f"convert it with np.asarray({name}, dtype=np.float64)")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape={arr.shape}")
    if size is not None and arr.shape[0] != size:
        raise ValueError(f"{name} must have shape ({size},), got shape={arr.shape}")
    out = np.array(arr, dtype=np.float64, order="C", copy=True)
    if not np.all(np.isfinite(out)):
        bad = np.flatnonzero(~np.isfinite(out))
        raise ValueError(f"{name} must be finite, got {out[bad[0]]} at index {bad[0]}"
                         f" ({bad.size} non-finite entries)")
    return out


def check_positive(name: str, value, allow_none: bool = False, allow_zero: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, "
                         f"got {value!r}")
    return value


def check_int(name: str, value, minimum: int = 0, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of "
                         + ", ".join(repr(c) for c in choices))
    return value


def check_backend(backend, where="this function"):
    """Resolve ``backend`` (None: the process-wide default, see :mod:`mlocore._backend`) to
    "cpu" or "cuda". "cuda" raises :class:`mlocore.cuda.CudaUnavailableError` where no GPU
    (and no simulator) can run it: never a silent CPU run."""
    if backend is None:
        backend = _backend.get_backend()
    check_choice("backend", backend, _backend.BACKENDS)
    if backend == "cuda":
        _backend.require_cuda(where)
    return backend


def check_cpu_output(output):
    """On the CPU path results are NumPy: ``output`` must be "numpy" ("device" needs the
    CUDA backend)."""
    if output == "numpy":
        return output
    if output == "device":
        raise ValueError("output='device' returns CUDA device arrays and needs the CUDA "
                         "backend (backend='cuda' or a device problem)")
    raise ValueError(f"output must be 'numpy' or 'device', got {output!r}")
