"""Oracle calls inside kernels: counted, shape-checked, with finite-difference HVPs.

An objective reaches a kernel as ``fns = (grad, hvp, value)`` (first-class functions), its
``args`` tuple and a ``has_hvp`` flag. Counters live in one int64 array (slots below).
"""
import numpy as np
from numba import njit

from .._config import FD_REL_STEP

# counter slots
UPPER_GRAD = 0
UPPER_VALUE = 1
UPPER_HVP = 2
LOWER_GRAD = 3
LOWER_HVP = 4
LOWER_VALUE = 5
N_COUNTERS = 6

COUNTER_NAMES = ("upper_grad", "upper_value", "upper_hvp", "lower_grad", "lower_hvp",
                 "lower_value")


@njit(cache=True)
def joint(x, y):
    z = np.empty(x.shape[0] + y.shape[0])
    z[:x.shape[0]] = x
    z[x.shape[0]:] = y
    return z


@njit(cache=True)
def grad_of(fns, args, z, counts, slot):
    counts[slot] += 1
    g = fns[0](z, *args)
    if g.shape[0] != z.shape[0]:
        if slot == UPPER_GRAD:
            raise ValueError("callback upper.grad returned an array whose size differs from z")
        raise ValueError("callback lower.grad returned an array whose size differs from z")
    return g


@njit(cache=True)
def value_of(fns, args, z, counts, slot):
    counts[slot] += 1
    return float(fns[2](z, *args))


@njit(cache=True)
def hvp_of(fns, args, has_hvp, z, v, counts, slot_hvp, slot_grad):
    """Hessian (over z) times v: the user's hvp, or central differences of grad.

    The difference step is ``FD_REL_STEP * (1 + |z|) / |v|`` (FD_REL_STEP ~ eps^(1/3), the
    optimum for central differences); each product then costs two gradient calls.
    """
    if has_hvp:
        counts[slot_hvp] += 1
        h = fns[1](z, v, *args)
        if h.shape[0] != z.shape[0]:
            if slot_hvp == UPPER_HVP:
                raise ValueError("callback upper.hvp returned an array whose size differs "
                                 "from z")
            raise ValueError("callback lower.hvp returned an array whose size differs from z")
        return h
    vn = np.sqrt(v @ v)
    if vn == 0.0:
        return np.zeros(z.shape[0])
    eps = FD_REL_STEP * (1.0 + np.sqrt(z @ z)) / vn
    counts[slot_grad] += 2
    gp = fns[0](z + eps * v, *args)
    gm = fns[0](z - eps * v, *args)
    if gp.shape[0] != z.shape[0] or gm.shape[0] != z.shape[0]:
        raise ValueError("callback grad (in a difference HVP) returned an array whose size "
                         "differs from z")
    return (gp - gm) / (2.0 * eps)


@njit(cache=True)
def lower_yy_matvec(p, lfns, largs, has_hvp, z, dx, counts):
    """``H_yy p`` from one joint Hessian-vector product with direction (0, p)."""
    w = np.zeros(z.shape[0])
    w[dx:] = p
    h = hvp_of(lfns, largs, has_hvp, z, w, counts, LOWER_HVP, LOWER_GRAD)
    return h[dx:].copy()


@njit(cache=True)
def all_finite(a):
    for v in a:
        if not np.isfinite(v):
            return False
    return True
