"""Oracle calls inside kernels: counted, shape-checked, with finite-difference HVPs.

An objective reaches a kernel as ``fns`` (first-class functions, slots below), its ``args``
tuple and ``flags``, an int64 bit set saying which optional callbacks are real (the others
are placeholders that are never called). Counters live in one int64 array (slots below).

Block callbacks (``z = (x, y)``, ``dx = len(x)``):

- ``grad_x(z) = grad_x f``, ``grad_y(z) = grad_y f`` (lengths dx and dy);
- ``hvp_yy(z, v_y) = H_yy v_y`` (length dy) and ``hvp_xy(z, v_y) = H_xy v_y =
  d/dx <grad_y g, v_y>`` (length dx).

A kernel that needs one block calls the block callback when it is given and otherwise slices
the joint one (``grad``, or ``hvp`` with direction ``(0, v_y)``, or central differences of
``grad`` without an ``hvp``).
"""
import operator

import numpy as np
from numba import njit, types
from numba.experimental import structref
from numba.extending import overload

from .._config import FD_REL_STEP

# counter slots
UPPER_GRAD = 0
UPPER_VALUE = 1
UPPER_HVP = 2
LOWER_GRAD = 3
LOWER_HVP = 4
LOWER_VALUE = 5
UPPER_GRAD_X = 6
UPPER_GRAD_Y = 7
LOWER_GRAD_Y = 8
LOWER_HVP_YY = 9
LOWER_HVP_XY = 10
N_COUNTERS = 11

COUNTER_NAMES = ("upper_grad", "upper_value", "upper_hvp", "lower_grad", "lower_hvp",
                 "lower_value", "upper_grad_x", "upper_grad_y", "lower_grad_y",
                 "lower_hvp_yy", "lower_hvp_xy")

# slots of ``fns`` (the same for every objective; absent callbacks are placeholders)
FN_GRAD, FN_HVP, FN_VALUE, FN_GRAD_X, FN_GRAD_Y, FN_HVP_YY, FN_HVP_XY = 0, 1, 2, 3, 4, 5, 6
FN_NAMES = ("grad", "hvp", "value", "grad_x", "grad_y", "hvp_yy", "hvp_xy")


# ---------------------------------------------------------------------------------------
# The callbacks of one objective as one compiled object
# ---------------------------------------------------------------------------------------
@structref.register
class OracleBundleType(types.StructRef):
    """Numba type of :class:`OracleBundle` (its ``funcs`` field: a tuple of first-class
    functions, one per slot of :data:`FN_NAMES`)."""

    def preprocess_fields(self, fields):
        return tuple((name, types.unliteral(t)) for name, t in fields)


class OracleBundle(structref.StructRefProxy):
    """An objective's compiled callbacks, built once per objective (:func:`make_bundle`).

    Passing a tuple of first-class functions to a kernel makes numba look up every
    function's address in Python at each call (about 2 us per function); a bundle is
    unboxed as one pointer. Kernels index it like the tuple: ``fns[FN_GRAD](z, *args)``.
    """


structref.define_proxy(OracleBundle, OracleBundleType, ["funcs"])


@overload(operator.getitem, jit_options={"cache": True})
def _bundle_getitem(bundle, i):
    if isinstance(bundle, OracleBundleType):
        return lambda bundle, i: bundle.funcs[i]
    return None


@njit(cache=True)
def make_bundle(funcs):
    """The :class:`OracleBundle` holding ``funcs`` (a tuple of first-class functions)."""
    return OracleBundle(funcs)


# bits of ``flags``: which optional callbacks are given
HAS_HVP = 1
HAS_VALUE = 2
HAS_GRAD_X = 4
HAS_GRAD_Y = 8
HAS_HVP_YY = 16
HAS_HVP_XY = 32
#: both lower Hessian blocks: products with direction (0, v) use them instead of the joint hvp
HAS_LOWER_BLOCKS = HAS_HVP_YY | HAS_HVP_XY


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
def hvp_of(fns, args, flags, z, v, counts, slot_hvp, slot_grad):
    """Hessian (over z) times v: the user's hvp, or central differences of grad.

    The difference step is ``FD_REL_STEP * (1 + |z|) / |v|`` (FD_REL_STEP ~ eps^(1/3), the
    optimum for central differences); each product then costs two gradient calls.
    """
    if flags & HAS_HVP:
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
def lower_grad_y_at(lfns, largs, flags, z, dx, counts):
    """``grad_y g`` at z: the ``grad_y`` callback, or the y-block of the joint gradient."""
    if flags & HAS_GRAD_Y:
        counts[LOWER_GRAD_Y] += 1
        g = lfns[FN_GRAD_Y](z, *largs)
        if g.shape[0] != z.shape[0] - dx:
            raise ValueError("callback lower.grad_y returned an array whose size differs "
                             "from y")
        return g
    g = grad_of(lfns, largs, z, counts, LOWER_GRAD)
    return g[dx:].copy()


@njit(cache=True)
def lower_yy_matvec(p, lfns, largs, flags, z, dx, counts):
    """``H_yy p``: the ``hvp_yy`` callback, or the y-block of one joint Hessian-vector
    product with direction (0, p)."""
    if flags & HAS_HVP_YY:
        counts[LOWER_HVP_YY] += 1
        h = lfns[FN_HVP_YY](z, p, *largs)
        if h.shape[0] != p.shape[0]:
            raise ValueError("callback lower.hvp_yy returned an array whose size differs "
                             "from y")
        return h
    w = np.zeros(z.shape[0])
    w[dx:] = p
    h = hvp_of(lfns, largs, flags, z, w, counts, LOWER_HVP, LOWER_GRAD)
    return h[dx:].copy()


@njit(cache=True)
def lower_xy_matvec(p, lfns, largs, flags, z, dx, counts):
    """``H_xy p`` (length dx): the ``hvp_xy`` callback, or the x-block of one joint
    Hessian-vector product with direction (0, p)."""
    if flags & HAS_HVP_XY:
        counts[LOWER_HVP_XY] += 1
        h = lfns[FN_HVP_XY](z, p, *largs)
        if h.shape[0] != dx:
            raise ValueError("callback lower.hvp_xy returned an array whose size differs "
                             "from x")
        return h
    w = np.zeros(z.shape[0])
    w[dx:] = p
    h = hvp_of(lfns, largs, flags, z, w, counts, LOWER_HVP, LOWER_GRAD)
    return h[:dx].copy()


@njit(cache=True)
def lower_cross_pair(p, lfns, largs, flags, z, dx, counts):
    """``(H_xy p, H_yy p)``: the two block callbacks when both are given, else one joint
    Hessian-vector product with direction (0, p) (cheaper than two joint products)."""
    if (flags & HAS_LOWER_BLOCKS) == HAS_LOWER_BLOCKS:
        return (lower_xy_matvec(p, lfns, largs, flags, z, dx, counts),
                lower_yy_matvec(p, lfns, largs, flags, z, dx, counts))
    w = np.zeros(z.shape[0])
    w[dx:] = p
    h = hvp_of(lfns, largs, flags, z, w, counts, LOWER_HVP, LOWER_GRAD)
    return h[:dx].copy(), h[dx:].copy()


@njit(cache=True)
def all_finite(a):
    for v in a:
        if not np.isfinite(v):
            return False
    return True
