"""Linear operators inside kernels, resolved at compile time by the operator's tuple type.

Solvers call ``apply_op(op, p)``; ``op`` is one of

- ``(A,)`` with A a 2-D float64 array: ``A @ p``;
- ``(fn, args)`` with fn a first-class function: ``fn(p, *args)`` (a user's matvec);
- ``(lfns, largs, flags, z, dx, counts)``: the y-block ``H_yy p`` of the lower Hessian at
  z: the ``hvp_yy`` callback, or one joint Hessian-vector product (see
  :func:`oracles.lower_yy_matvec`).

Passing njit functions as *values* inside compiled code would make the kernels uncacheable
(numba stores them as dynamic globals), hence this compile-time dispatch with ``@overload``.
The plain-Python bodies below are what the interpreted path (``core.py_func``) runs, with
``op = (python_callable,)``: scipy LinearOperators and per-iteration Python callbacks.
"""
from numba import types
from numba.extending import overload

from .oracles import lower_yy_matvec


def apply_op(op, p):
    """Interpreted path: ``op = (matvec,)`` with a Python ``matvec(p)``."""
    return op[0](p)


@overload(apply_op, jit_options={"cache": True})
def _apply_op_compiled(op, p):
    if not isinstance(op, types.BaseTuple):
        return None
    if len(op) == 1 and isinstance(op[0], types.Array):
        return lambda op, p: op[0] @ p
    if len(op) == 2:
        return lambda op, p: op[0](p, *op[1])
    if len(op) == 6:
        return lambda op, p: lower_yy_matvec(p, op[0], op[1], op[2], op[3], op[4], op[5])
    return None


def notify(callback, xk):
    """Interpreted path: call the user's per-iteration callback."""
    if callback is not None:
        callback(xk)


@overload(notify, jit_options={"cache": True})
def _notify_compiled(callback, xk):
    if callback is None or isinstance(callback, types.NoneType):
        return lambda callback, xk: None
    return None


def apply_precond(M, r):
    """Interpreted path: ``M = ()`` (none), ``(array,)`` or ``(python_callable,)``."""
    if len(M) == 0:
        return r.copy()
    m = M[0]
    if callable(m):
        return m(r)
    return m * r if m.ndim == 1 else m @ r


@overload(apply_precond, jit_options={"cache": True})
def _apply_precond_compiled(M, r):
    """Compiled: ``M = ()`` none, ``(d,)`` a 1-D diagonal (``d * r``), ``(P,)`` 2-D (``P @ r``)."""
    if not isinstance(M, types.BaseTuple):
        return None
    if len(M) == 0:
        return lambda M, r: r.copy()
    if len(M) == 1 and isinstance(M[0], types.Array) and M[0].ndim == 1:
        return lambda M, r: M[0] * r
    if len(M) == 1 and isinstance(M[0], types.Array) and M[0].ndim == 2:
        return lambda M, r: M[0] @ r
    return None
