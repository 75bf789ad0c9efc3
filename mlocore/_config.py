"""Tunables in one place (tests may patch them) and the process-wide backend default."""
from __future__ import annotations

import contextlib
import os

#: relative step for central-difference Hessian-vector products: eps**(1/3)
FD_REL_STEP = 6.0e-6
#: power-iteration steps used to estimate the largest Hessian eigenvalue
POWER_ITERS = 30
#: safety factor applied to power-iteration estimates (they approach lambda_max from below)
LIPSCHITZ_SAFETY = 1.05

_backend = os.environ.get("MLOCORE_BACKEND", "cpu")


def get_backend() -> str:
    """The process-wide default backend: ``MLOCORE_BACKEND`` (read at import, default
    "cpu") until :func:`set_backend` or :func:`backend` changes it."""
    if _backend not in ("cpu", "cuda"):
        raise ValueError(f"MLOCORE_BACKEND must be 'cpu' or 'cuda', got {_backend!r}")
    return _backend


def set_backend(name: str) -> None:
    """Set the process-wide default backend ("cpu" or "cuda"; "cuda" is checked when an
    entry point runs, with a clear error where no GPU or simulator is there)."""
    global _backend
    from ._validation import check_choice
    _backend = check_choice("backend", name, ("cpu", "cuda"))


@contextlib.contextmanager
def backend(name: str):
    """Context manager: use ``name`` as the default backend inside the block."""
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)
