"""The deterministic quadratic of :mod:`mlocore.problems.quadratic` in batched CUDA form.

Device callbacks (``numba.cuda.jit(device=True)``, one component per call; see
:mod:`mlocore.cuda._batched`, "Callback convention") for the quadratic

    phi(x, y) = y.A y / 2 + x.B x / 2 + x.C y + a.y + b.x,     z = concat(x, y),

shared by both levels (as ``quad_grad`` / ``quad_hvp`` / ``quad_value`` on the CPU), and
:func:`make_batched_quadratic`, which packs a list of :func:`make_quadratic` problems of
the same (dx, dy) into the ``(n_problems, n_data)`` arrays of :func:`batched_hypergrad`.

Data row layout (float64, one row per problem and level; :func:`quadratic_row`)::

    [dx, dy, A (dy*dy, row-major), B (dx*dx), C (dx*dy, C[p, q] at p*dy + q), a (dy), b (dx)]

The two leading entries make a row self-describing, so that one compiled kernel serves every
(dx, dy); they are small integers, exact in float64.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from ..cuda._batched import BatchedBilevelProblem
from .quadratic import QuadraticBilevel

__all__ = ["quad_component_grad", "quad_component_hvp", "quad_component_value",
           "quadratic_row", "quadratic_row_length", "quadratic_batched_problem", "BatchedQuadratic",
           "make_batched_quadratic"]

HEADER = 2  #: leading (dx, dy) entries of a data row


def quadratic_row_length(dx, dy):
    """Length of one data row for sizes (dx, dy)."""
    return HEADER + dy * dy + dx * dx + dx * dy + dy + dx


def quadratic_row(means):
    """One data row from the mean matrices ``(A, B, C, a, b)`` of a level."""
    A, B, C, a, b = (np.asarray(m, dtype=np.float64) for m in means)
    dy, dx = A.shape[0], B.shape[0]
    if A.shape != (dy, dy) or B.shape != (dx, dx) or C.shape != (dx, dy) \
            or a.shape != (dy,) or b.shape != (dx,):
        raise ValueError(f"quadratic_row: expected A (dy, dy), B (dx, dx), C (dx, dy), a (dy,), "
                         f"b (dx,), got shapes {A.shape}, {B.shape}, {C.shape}, {a.shape}, "
                         f"{b.shape}")
    return np.concatenate([[float(dx), float(dy)], A.ravel(), B.ravel(), C.ravel(), a, b])


@cuda.jit(device=True)
def _row_layout(data):
    """``(dx, dy)`` and the offsets of A, B, C, a, b in a :func:`quadratic_row`."""
    dx = int(data[0])
    dy = int(data[1])
    o_a = HEADER
    o_b = o_a + dy * dy
    o_c = o_b + dx * dx
    o_va = o_c + dx * dy
    return dx, dy, o_a, o_b, o_c, o_va, o_va + dy


@cuda.jit(device=True)
def _quad_affine_component(i, w, data, lin):
    """Component i of (B x + C y + lin b, A y + C^T x + lin a) at w = (x, y)."""
    dx, dy, o_a, o_b, o_c, o_va, o_vb = _row_layout(data)
    s = 0.0
    if i < dx:
        p = i
        for q in range(dx):
            s += data[o_b + p * dx + q] * w[q]
        for q in range(dy):
            s += data[o_c + p * dy + q] * w[dx + q]
        if lin:
            s += data[o_vb + p]
    else:
        q = i - dx
        for r in range(dy):
            s += data[o_a + q * dy + r] * w[dx + r]
        for p in range(dx):
            s += data[o_c + p * dy + q] * w[p]
        if lin:
            s += data[o_va + q]
    return s


@cuda.jit(device=True)
def quad_component_grad(i, z, data):
    """Component i of the gradient over z = (x, y) (the CPU ``quad_grad``)."""
    return _quad_affine_component(i, z, data, True)


@cuda.jit(device=True)
def quad_component_hvp(i, z, v, data):
    """Component i of [[B, C], [C^T, A]] v (the CPU ``quad_hvp``; independent of z)."""
    return _quad_affine_component(i, v, data, False)


@cuda.jit(device=True)
def quad_component_value(z, data):
    """y.A y/2 + x.B x/2 + x.C y + a.y + b.x (one thread; the CPU ``quad_value``)."""
    dx, dy, o_a, o_b, o_c, o_va, o_vb = _row_layout(data)
    s = 0.0
    for p in range(dx):
        t = 0.5 * data[o_b + p * dx + p] * z[p] + data[o_vb + p]
        for q in range(p + 1, dx):
            t += data[o_b + p * dx + q] * z[q]
        for q in range(dy):
            t += data[o_c + p * dy + q] * z[dx + q]
        s += z[p] * t
    for q in range(dy):
        t = 0.5 * data[o_a + q * dy + q] * z[dx + q] + data[o_va + q]
        for r in range(q + 1, dy):
            t += data[o_a + q * dy + r] * z[dx + r]
        s += z[dx + q] * t
    return s


def quadratic_batched_problem(dx, dy):
    """The quadratic's :class:`BatchedBilevelProblem` for sizes (dx, dy).

    Every size shares one compiled kernel: the callbacks are the same functions (the kernel
    cache key) and read the sizes from the data rows.
    """
    return BatchedBilevelProblem(quad_component_grad, quad_component_grad, quad_component_hvp,
                                 dims=(dx, dy), upper_hvp=quad_component_hvp,
                                 upper_value=quad_component_value)


class BatchedQuadratic:
    """A batch of :class:`~mlocore.problems.quadratic.QuadraticBilevel` problems.

    Attributes
    ----------
    problem : BatchedBilevelProblem
        The quadratic's device callbacks with dims (dx, dy).
    upper_data, lower_data : ndarray, shape (n_problems, quadratic_row_length(dx, dy))
        Rows of the upper / lower mean matrices (module docstring, "Data row layout").
    quads : list of QuadraticBilevel
        The problems, in row order (their ``.problem`` is the CPU reference).
    dx, dy, n_problems : int
    """

    def __init__(self, quads):
        quads = list(quads)
        if not quads:
            raise ValueError("make_batched_quadratic: need at least one QuadraticBilevel")
        for k, q in enumerate(quads):
            if not isinstance(q, QuadraticBilevel):
                raise TypeError(f"make_batched_quadratic: item {k} is a {type(q).__name__}, "
                                "expected a QuadraticBilevel (from make_quadratic)")
            if (q.dx, q.dy) != (quads[0].dx, quads[0].dy):
                raise ValueError(f"make_batched_quadratic: all problems need the same (dx, dy);"
                                 f" item 0 has ({quads[0].dx}, {quads[0].dy}), item {k} has "
                                 f"({q.dx}, {q.dy})")
        self.quads = quads
        self.dx, self.dy = quads[0].dx, quads[0].dy
        self.n_problems = len(quads)
        self.upper_data = np.ascontiguousarray(np.stack([quadratic_row(q.upper_means)
                                                         for q in quads]))
        self.lower_data = np.ascontiguousarray(np.stack([quadratic_row(q.lower_means)
                                                         for q in quads]))
        self.problem = quadratic_batched_problem(self.dx, self.dy)

    def __repr__(self):
        return f"BatchedQuadratic(n_problems={self.n_problems}, dx={self.dx}, dy={self.dy})"

    def _rows(self, x):
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.n_problems, self.dx):
            raise ValueError(f"x must have shape ({self.n_problems}, {self.dx}), got {x.shape}")
        return x

    def y_star(self, x):
        """Closed-form lower solutions, one row per problem."""
        x = self._rows(x)
        return np.stack([q.y_star(xi) for q, xi in zip(self.quads, x)])

    def hypergrad(self, x):
        """Closed-form hypergradients, one row per problem."""
        x = self._rows(x)
        return np.stack([q.hypergrad(xi) for q, xi in zip(self.quads, x)])

    def adjoint(self, x):
        """Closed-form adjoints ``v = A^{-1} grad_y f(x, y*(x))``, one row per problem."""
        x = self._rows(x)
        out = []
        for q, xi in zip(self.quads, x):
            F, _, K, f_y, _ = q.upper_means
            grad_y_f = F @ q.y_star(xi) + K.T @ xi + f_y
            out.append(np.linalg.solve(q.lower_means[0], grad_y_f))
        return np.stack(out)

    @property
    def x_star(self):
        return np.stack([q.x_star for q in self.quads])


def make_batched_quadratic(quads):
    """Pack ``make_quadratic(...)`` problems of one (dx, dy) into a :class:`BatchedQuadratic`.

    Example::

        from mlocore.problems import make_quadratic
        bq = make_batched_quadratic([make_quadratic(dx=2, dy=4, seed=s) for s in range(3)])
        res = batched_hypergrad(bq.problem, x, y0, bq.upper_data, bq.lower_data)
    """
    return BatchedQuadratic(quads)
