"""Problems of the CUDA backend's "one large problem" mode: objectives with device callbacks.

A :class:`DeviceObjective` mirrors :class:`mlocore.Objective` (README, "Quickstart"), with
callbacks that work on device arrays and write their results in place:

    grad(z, out, *args)       out <- gradient over the joint vector z = concat(x, y)
    hvp(z, v, out, *args)     out <- Hessian over z times v
    value(z, *args) -> float  (optional)
    grad_x(z, out, *args), grad_y(z, out, *args)      (optional blocks, out of size dx / dy)
    hvp_yy(z, v_y, out, *args), hvp_xy(z, v_y, out, *args)   (H_yy v_y, H_xy v_y)

Callbacks are plain Python functions that launch kernels (``kernel[blocks, threads](...)``);
they must not modify z or v. ``args`` are device arrays (host arrays are copied to the device
once, at construction, and counted in ``transfers``) or scalars.

:class:`DeviceOracle` is the solvers' view of one objective: counted calls (the same counter
slots as the CPU kernels, :mod:`mlocore._kernels.oracles`), errors that name the callback, the
first-point check, and central-difference Hessian-vector products when ``hvp`` is absent.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .._callbacks import CallbackError
from .._config import FD_REL_STEP
from .._problem import (BilevelProblem, check_block_oracles, check_quadratic_declaration,
                        parse_bilevel_dims, parse_constraints)
from .._kernels.oracles import (LOWER_GRAD, LOWER_GRAD_Y, LOWER_HVP, LOWER_HVP_XY,
                                LOWER_HVP_YY, LOWER_VALUE, UPPER_GRAD, UPPER_GRAD_X,
                                UPPER_GRAD_Y, UPPER_HVP, UPPER_VALUE)
from . import _linalg as dl
from ._device import Transfers, to_device, to_host

__all__ = ["DeviceObjective", "DeviceBilevelProblem", "DeviceOracle"]


BLOCK_NAMES = ("grad_x", "grad_y", "hvp_yy", "hvp_xy")
#: number of vector arguments (before out) of each block callback
BLOCK_NVEC = {"grad_x": 1, "grad_y": 1, "hvp_yy": 2, "hvp_xy": 2}


class DeviceObjective:
    """One level's objective, defined by device callbacks over the joint vector z.

    Parameters
    ----------
    grad : callable
        ``grad(z, out, *args)``: writes the gradient over all of z into the device array
        ``out`` (shape ``z.shape``); returns nothing.
    hvp : callable, optional
        ``hvp(z, v, out, *args)``: writes the Hessian (over z) times v into ``out``. When
        absent, products are central differences of ``grad`` (two gradient calls and one
        counted read-back of ``|z|, |v|`` each), as on the CPU.
    value : callable, optional
        ``value(z, *args) -> float`` (reported as ``fun``); its read-back is the callback's
        own business and is not counted.
    args : tuple
        Device arrays (used in place), host arrays (copied once here, counted in
        :attr:`transfers`) or scalars, passed after the vectors.
    n_samples : int, optional
        Number of samples of a finite-sum objective (the stochastic methods of
        :func:`mlocore.stochastic.minimize_device`, docs/mathematics.md section 4). The
        callbacks then take a device int64 index array right after the vectors,
        ``grad(z, idx, out, *args)``, ``hvp(z, v, idx, out, *args)``, ``value(z, idx,
        *args)``, and return the *mean* over the samples in idx (the convention of
        ``mlocore.Objective(..., n_samples=n)``). None (default): a deterministic objective.
    grad_x, grad_y : callable, optional
        Block oracles of a bilevel problem, ``z = (x, y)``: ``grad_x(z, out, *args)`` writes
        the x-block of the gradient (out of size dx), ``grad_y(z, out, *args)`` the y-block
        (size dy). The lower solvers call the lower ``grad_y`` instead of the joint gradient.
    hvp_yy : callable, optional
        ``hvp_yy(z, v_y, out, *args)``: ``out <- H_yy v_y`` (v_y and out of size dy); the
        linear solvers (CG, Neumann, direct), Newton-CG, power iteration and the unrolled
        loops call it for every product with the lower Hessian.
    hvp_xy : callable, optional
        ``hvp_xy(z, v_y, out, *args)``: ``out <- H_xy v_y = d/dx <grad_y g, v_y>`` (out of
        size dx), once per implicit hypergradient and once per unrolled step back.
    quadratic : bool
        Declares the objective quadratic in z, as ``mlocore.Objective(quadratic=True)``: the
        n-level recursion skips the curvature terms that vanish because of it. Checked once at
        the first point, as on the CPU (three gradient calls whose inputs and outputs are
        copied between host and device, counted).

    Notes
    -----
    Callbacks run on the host and launch kernels: they must give every launch an explicit
    grid, keep float64, and not read z back to the host (that would defeat the device mode;
    such reads are not counted).

    Block oracles follow the contract of :class:`mlocore.Objective` (same names, the device
    calling convention; with ``n_samples`` they take idx after the vectors, as the joint
    ones): where one is absent the joint callback is used, each given block is checked once
    against the joint callback (errors name the callback), and oracle counts count block
    calls separately (``upper_grad_x``, ``lower_hvp_yy``, ...), as on the CPU. They are used
    by :class:`DeviceBilevelProblem`'s deterministic solvers (hypergrad, solve_lower,
    minimize_bilevel's "aid"/"itd"/"alternating", HyperObjective); the stochastic device
    methods and the batched problems use the joint callbacks only, and
    :class:`~mlocore.cuda.DeviceMultilevelProblem` rejects them.
    """

    def __init__(self, grad, hvp=None, value=None, args=(), n_samples=None, *,
                 grad_x=None, grad_y=None, hvp_yy=None, hvp_xy=None, quadratic=False):
        if not isinstance(quadratic, (bool, np.bool_)):
            raise TypeError(f"DeviceObjective quadratic must be True or False, got "
                            f"{quadratic!r}")
        for name, fn in (("grad", grad), ("hvp", hvp), ("value", value), ("grad_x", grad_x),
                         ("grad_y", grad_y), ("hvp_yy", hvp_yy), ("hvp_xy", hvp_xy)):
            if fn is None and name != "grad":
                continue
            if not callable(fn):
                raise TypeError(f"DeviceObjective {name} must be callable, got "
                                f"{type(fn).__name__}")
        if n_samples is not None and (isinstance(n_samples, bool) or
                                      not isinstance(n_samples, numbers.Integral) or
                                      n_samples < 1):
            raise ValueError(f"DeviceObjective n_samples must be None or a positive integer, "
                             f"got {n_samples!r}")
        self.n_samples = None if n_samples is None else int(n_samples)
        self.grad, self.hvp, self.value = grad, hvp, value
        self.grad_x, self.grad_y, self.hvp_yy, self.hvp_xy = grad_x, grad_y, hvp_yy, hvp_xy
        self.quadratic = bool(quadratic)
        self.transfers = Transfers()
        self._args = dl.device_args(args, self.transfers, "DeviceObjective")

    @property
    def args(self):
        """The callbacks' extra arguments, on the device (read-only)."""
        return self._args

    @property
    def blocks(self) -> tuple:
        """Names of the block oracles given (``grad_x``, ``grad_y``, ``hvp_yy``, ``hvp_xy``)."""
        return tuple(n for n in BLOCK_NAMES if getattr(self, n) is not None)

    def full_batch(self):
        """A deterministic DeviceObjective computing this one's full-batch mean (its
        callbacks, block oracles included, get ``idx = 0..n-1``); ``self`` when it is
        deterministic. Memoized; no transfer (the args are already on the device). The
        deterministic solvers (hypergrad, solve_lower, minimize_bilevel's "aid"/"itd") use
        it, as the CPU backend runs them on the full batch."""
        if self.n_samples is None:
            return self
        if getattr(self, "_full", None) is None:
            from numba import cuda
            full = cuda.to_device(np.arange(self.n_samples, dtype=np.int64))
            self.transfers.h2d += 1
            self.transfers.h2d_bytes += full.nbytes
            obj = self

            def with_full(name, nvec):
                fn = getattr(obj, name)
                if fn is None:
                    return None

                def full_fn(*a):  # (vectors..., [out], *args): idx after the vectors
                    return fn(*a[:nvec], full, *a[nvec:])
                full_fn.__name__ = getattr(fn, "__name__", name)
                return full_fn

            self._full = DeviceObjective(
                with_full("grad", 1), hvp=with_full("hvp", 2), value=with_full("value", 1),
                args=self.args, **{b: with_full(b, BLOCK_NVEC[b]) for b in BLOCK_NAMES})
        return self._full

    def __repr__(self):
        parts = [f"grad={getattr(self.grad, '__name__', self.grad)!s}"]
        for name in ("hvp", "value") + BLOCK_NAMES:
            fn = getattr(self, name)
            if fn is not None:
                parts.append(f"{name}={getattr(fn, '__name__', fn)!s}")
        if self.n_samples is not None:
            parts.append(f"n_samples={self.n_samples}")
        return f"DeviceObjective({', '.join(parts)})"


class DeviceBilevelProblem:
    """``min_x f(x, y*(x))``, ``y*(x) = argmin_y g(x, y)``, with device callbacks.

    Parameters
    ----------
    upper, lower : DeviceObjective
        f and g over the joint vector z of size ``dx + dy``.
    dims : tuple of int
        ``(dx, dy)``.
    bounds : optional
        Box on x, as for :class:`mlocore.BilevelProblem`: ``scipy.optimize.Bounds``, a
        sequence of ``dx`` pairs ``(lo, hi)``, or one pair of scalars/arrays; ``None``
        entries mean unbounded.
    project : callable, optional
        ``project(x) -> x``: projection onto the feasible set of x (instead of bounds), e.g.
        :class:`mlocore.Ball`. A *host* function of a NumPy array x: the deterministic
        drivers (:func:`mlocore.minimize_bilevel`'s "aid", "itd", "alternating") keep x,
        which is small, on the host and project there, as the CPU backend does.

    Notes
    -----
    As :class:`mlocore.BilevelProblem`: ``g(x, .)`` must be strongly convex (docs/mathematics.md
    section 1). The callbacks are checked once, at the first point a solver sees (errors name
    the callback). Constraints are honoured by ``minimize_bilevel`` (projected steps, as on the
    CPU: on the host in the deterministic drivers, by a kernel in the stochastic loops for
    bounds and Ball).
    ``hypergrad``, ``solve_lower`` and :class:`mlocore.HyperObjective` ignore them, as on the
    CPU (scipy's L-BFGS-B takes its ``bounds`` itself).
    """

    #: routes :func:`mlocore.hypergrad` and :func:`mlocore.solve_lower` to the CUDA backend
    on_device = True

    def __init__(self, upper, lower, dims, bounds=None, project=None):
        if not isinstance(upper, DeviceObjective) or not isinstance(lower, DeviceObjective):
            raise TypeError("upper and lower must be DeviceObjective instances (device "
                            f"callbacks), got {type(upper).__name__} and "
                            f"{type(lower).__name__}")
        self.upper, self.lower = upper, lower
        self.dx, self.dy = parse_bilevel_dims(dims)
        self.dims = (self.dx, self.dy)
        self.lb, self.ub, self._project = parse_constraints(bounds, project, self.dx)
        self._checked = False

    # the CPU's: x is on the host in the drivers that project
    constrained = BilevelProblem.constrained
    project = BilevelProblem.project

    @property
    def transfers(self) -> dict:
        """Host -> device copies made at construction (both objectives' args)."""
        u, lo = self.upper.transfers.as_dict(), self.lower.transfers.as_dict()
        return {k: u[k] + lo[k] for k in u}

    def __repr__(self):
        return (f"DeviceBilevelProblem(dims={self.dims}, upper={self.upper!r}, "
                f"lower={self.lower!r})")


#: the counter slots (grad, hvp, value) of each role
SLOTS = {"upper": (UPPER_GRAD, UPPER_HVP, UPPER_VALUE),
         "lower": (LOWER_GRAD, LOWER_HVP, LOWER_VALUE)}
#: the counter slots of the block oracles (those the CPU counts; the others are never called
#: by a solver)
BLOCK_SLOTS = {("upper", "grad_x"): UPPER_GRAD_X, ("upper", "grad_y"): UPPER_GRAD_Y,
               ("lower", "grad_y"): LOWER_GRAD_Y, ("lower", "hvp_yy"): LOWER_HVP_YY,
               ("lower", "hvp_xy"): LOWER_HVP_XY}


def call_device_callback(role, name, fn, args):
    """``fn(*args)``; an exception it raises becomes a CallbackError naming the callback
    (``role.name``) and the exception."""
    try:
        return fn(*args)
    except CallbackError:
        raise
    except Exception as exc:
        raise CallbackError(f"callback {role}.{name} raised {type(exc).__name__}: "
                            f"{exc}") from exc


class DeviceOracle:
    """Counted, error-wrapped calls of one objective's device callbacks.

    Parameters
    ----------
    objective : DeviceObjective
    role : {"upper", "lower"}
    counts : ndarray of int64
        The oracle counters (:func:`mlocore._results.new_counts`), incremented per call.
    counter : Transfers
        Counts the read-backs made here (difference HVPs, checks).
    n : int
        Size of z.
    dx : int, optional
        Size of x in ``z = (x, y)`` (bilevel problems): needed by the block methods
        (:meth:`grad_y`, :meth:`hvp_yy`, :meth:`hvp_xy`, :meth:`cross_pair`), which call
        the block callback when given and otherwise slice the joint one, as the CPU's
        :mod:`mlocore._kernels.oracles`.
    """

    def __init__(self, objective, role, counts, counter, n, dx=None):
        self.obj, self.role, self.counts, self.counter, self.n = \
            objective, role, counts, counter, int(n)
        self.dx = None if dx is None else int(dx)
        self.slot_grad, self.slot_hvp, self.slot_value = SLOTS[role]
        self.has_hvp = objective.hvp is not None
        self.has_value = objective.value is not None
        self.blocks = getattr(objective, "blocks", ())
        self._fd = None  # work vectors of difference HVPs, allocated on first use
        self._work = None  # direction (0, p) and joint product of the block fallbacks

    def _call(self, name, fn, *vecs):
        return call_device_callback(self.role, name, fn, vecs + tuple(self.obj.args))

    def grad(self, z, out):
        """``out <- grad(z)``."""
        self.counts[self.slot_grad] += 1
        self._call("grad", self.obj.grad, z, out)

    def value(self, z) -> float:
        self.counts[self.slot_value] += 1
        f = self._call("value", self.obj.value, z)
        try:
            return float(f)
        except (TypeError, ValueError):
            raise CallbackError(f"callback {self.role}.value returned {type(f).__name__}; "
                                "expected a real number") from None

    def hvp(self, z, v, out):
        """``out <- H(z) v``: the callback, or central differences of grad with step
        ``FD_REL_STEP (1 + |z|) / |v|`` (as the CPU's ``hvp_of``)."""
        if self.has_hvp:
            self.counts[self.slot_hvp] += 1
            self._call("hvp", self.obj.hvp, z, v, out)
            return
        if self._fd is None:
            self._fd = (dl.Scalars(self.counter), dl.empty(self.n), dl.empty(self.n),
                        dl.empty(self.n))
        scalars, zs, gp, gm = self._fd
        scalars.dot(z, z, dl.S_AUX)
        scalars.dot(v, v, dl.S_AUX2)
        s = scalars.read()
        vn = math.sqrt(s[dl.S_AUX2])
        if vn == 0.0:
            dl.fill(out, 0.0)
            return
        eps = FD_REL_STEP * (1.0 + math.sqrt(s[dl.S_AUX])) / vn
        self.counts[self.slot_grad] += 2
        dl.axpy_into(zs, z, eps, v)
        self._call("grad", self.obj.grad, zs, gp)
        dl.axpy_into(zs, z, -eps, v)
        self._call("grad", self.obj.grad, zs, gm)
        dl.difference_quotient(out, gp, gm, 2.0 * eps)

    # -- blocks ------------------------------------------------------------------------
    def _block(self, name, *vecs):
        """The block callback ``name`` on device vectors (the last one ``out``), counted."""
        self.counts[BLOCK_SLOTS[(self.role, name)]] += 1
        self._call(name, getattr(self.obj, name), *vecs)

    def _joint_y_product(self, z, p):
        """The joint product with direction ``(0, p)`` (counted as ``hvp``, or two ``grad``
        calls by differences); returns the work vector holding it."""
        if self._work is None:
            self._work = (dl.zeros(self.n), dl.empty(self.n))
        w, h = self._work
        dl.copy(p, w[self.dx:])
        self.hvp(z, w, h)
        return h

    def grad_y(self, z, g):
        """``grad_y`` at z into ``g[dx:]`` (g a joint-size work vector; the ``grad_y``
        callback writes the view, else the joint gradient fills g); returns ``g[dx:]``."""
        gy = g[self.dx:]
        if "grad_y" in self.blocks:
            self._block("grad_y", z, gy)
        else:
            self.grad(z, g)
        return gy

    def hvp_yy(self, z, p, out):
        """``out <- H_yy p``: the ``hvp_yy`` callback, or the y-block of the joint product
        with direction ``(0, p)``."""
        if "hvp_yy" in self.blocks:
            self._block("hvp_yy", z, p, out)
        else:
            dl.copy(self._joint_y_product(z, p)[self.dx:], out)
        return out

    def hvp_xy(self, z, p, out):
        """``out <- H_xy p`` (size dx): the ``hvp_xy`` callback, or the x-block of the joint
        product with direction ``(0, p)``."""
        if "hvp_xy" in self.blocks:
            self._block("hvp_xy", z, p, out)
        else:
            dl.copy(self._joint_y_product(z, p)[:self.dx], out)
        return out

    def cross_pair(self, z, p, out_x, out_y):
        """``(H_xy p, H_yy p)`` into ``(out_x, out_y)``: the two block callbacks when both
        are given, else one joint product with direction ``(0, p)`` (the CPU's
        ``lower_cross_pair``)."""
        if "hvp_yy" in self.blocks and "hvp_xy" in self.blocks:
            self._block("hvp_xy", z, p, out_x)
            self._block("hvp_yy", z, p, out_y)
        else:
            h = self._joint_y_product(z, p)
            dl.copy(h[:self.dx], out_x)
            dl.copy(h[self.dx:], out_y)

    # -- checks ------------------------------------------------------------------------
    def check_at(self, z, dx=None):
        """Call each callback once at z and require finite results (clear errors early);
        with ``dx`` (bilevel problems) also check each block oracle against the joint
        callback (:func:`mlocore._problem.check_block_oracles`).

        The direction of the hvp check is the power iteration's start vector, made on the
        device; each check reads back one scalar (``sum |out|``), counted. The block check
        reads back z, its direction, the joint products it compares with and each block's
        output, once each (counted).
        """
        scalars = dl.Scalars(self.counter)
        out = dl.empty(self.n)
        dl.fill(out, np.nan)  # a callback that leaves entries unwritten is caught too
        self._call("grad", self.obj.grad, z, out)
        self._require_finite("grad", out, scalars)
        if self.has_hvp:
            v = dl.start_vector(self.n)
            dl.fill(out, np.nan)
            self._call("hvp", self.obj.hvp, z, v, out)
            self._require_finite("hvp", out, scalars)
        if self.has_value:
            f = self._call("value", self.obj.value, z)
            if not isinstance(f, numbers.Real) or not np.isfinite(f):
                raise CallbackError(f"callback {self.role}.value returned {f!r} at the initial "
                                    "point; expected a finite number")
        if self.blocks:
            if dx is None:
                raise ValueError(f"{self.role} has block oracles ({', '.join(self.blocks)}), "
                                 "which only a DeviceBilevelProblem uses; give the levels of a "
                                 "multilevel problem the joint callbacks only")
            self._check_blocks(z, int(dx))
        if getattr(self.obj, "quadratic", False):
            check_quadratic_declaration(self.role, self._host_grad, to_host(z, self.counter))

    def _host_grad(self, zh):
        """grad at a host point, as a host vector (copies counted; for one-time checks)."""
        zd = to_device(f"{self.role}.grad input", zh, self.counter, self.n)
        out = dl.empty(self.n)
        self._call("grad", self.obj.grad, zd, out)
        return to_host(out, self.counter)

    def _check_blocks(self, z, dx):
        """The CPU's block check (:func:`~mlocore._problem.check_block_oracles`) on host
        copies: z, the direction v (the power iteration's start vector, made on the device)
        and each compared output are read back once each (counted); ``(0, v)`` is made on
        the device, and only the points of difference quotients (no ``hvp``) are copied in."""
        n = self.n
        dy = n - dx
        sizes = {"grad": n, "hvp": n, "grad_x": dx, "grad_y": dy, "hvp_yy": dy, "hvp_xy": dx}
        vd = dl.start_vector(dy)
        wd = dl.zeros(n)
        dl.copy(vd, wd[dx:])
        zh, vh = to_host(z, self.counter), to_host(vd, self.counter)
        wh = np.zeros(n)
        wh[dx:] = vh
        on_device = {zh.tobytes(): z, vh.tobytes(): vd, wh.tobytes(): wd}

        def call(name, *vecs):
            dev = tuple(on_device.get(a.tobytes()) for a in vecs)
            dev = tuple(to_device(f"{self.role}.{name} input", a, self.counter, a.shape[0])
                        if d is None else d for a, d in zip(vecs, dev))
            out = dl.empty(sizes[name])
            dl.fill(out, np.nan)  # entries left unwritten are caught too
            self._call(name, getattr(self.obj, name), *dev, out)
            host = to_host(out, self.counter)
            if not np.all(np.isfinite(host)):
                raise self._nonfinite_error(name, out.shape[0])
            return host

        check_block_oracles(self.role, self.blocks, zh, dx, call, self.has_hvp, v=vh)

    def _nonfinite_error(self, name, size):
        return CallbackError(f"callback {self.role}.{name} wrote non-finite values (NaN or "
                             "inf, or left entries of out unwritten) at the initial point; "
                             f"expected finite values in all {size} entries of out")

    def _require_finite(self, name, out, scalars):
        scalars.abs_sum(out, dl.S_AUX)
        total = scalars.read()[dl.S_AUX]
        if not np.isfinite(total):
            raise self._nonfinite_error(name, out.shape[0])
