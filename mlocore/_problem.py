"""Problem definitions: :class:`Objective` and :class:`BilevelProblem` (the public contract)."""
from __future__ import annotations

import numbers

import numba
import numpy as np

from ._callbacks import (VEC, BundleCache, CallbackError, FnTuple, KeyedArgs, compile_callback,
                         missing_callback)
from ._config import FD_REL_STEP
from ._kernels.oracles import (FN_NAMES, HAS_GRAD_X, HAS_GRAD_Y, HAS_HVP, HAS_HVP_XY,
                               HAS_HVP_YY, HAS_VALUE)

__all__ = ["Objective", "BilevelProblem", "MultilevelProblem", "Ball"]


class Objective:
    """One level's objective, defined by callbacks over the joint vector z.

    Parameters
    ----------
    grad : callable
        ``grad(z, *args) -> ndarray`` of shape ``z.shape``: the gradient over all of z.
    hvp : callable, optional
        ``hvp(z, v, *args)``: Hessian (over z) times v. When absent, Hessian-vector
        products are central differences of ``grad`` (two gradient calls each).
    value : callable, optional
        ``value(z, *args) -> float``. Needed for reported objective values and line searches.
    tvp : callable, optional
        ``tvp(z, u, w, *args)``: third-order product d/ds hvp(z + s u, w) at s = 0
        (used by the n-level "exact" mode).
    args : tuple
        Extra arguments passed to every callback, as scipy's ``args``. Pass data here, never
        through closures (Numba would freeze closed-over arrays into the compiled code).
    n_samples : int, optional
        For stochastic objectives: callbacks take an int64 index array right after the
        vectors (``grad(z, idx, *args)``). Deterministic methods use the full batch.
    grad_x, grad_y : callable, optional
        Block oracles of a bilevel problem, ``z = (x, y)``: ``grad_x(z, *args)`` (length dx)
        and ``grad_y(z, *args)`` (length dy), the blocks of ``grad``. The lower solvers call
        ``grad_y`` of the lower objective instead of the joint gradient.
    hvp_yy : callable, optional
        ``hvp_yy(z, v_y, *args) -> H_yy v_y`` (length dy), ``v_y`` of length dy. The linear
        solvers (CG, Neumann, direct), Newton-CG and the unrolled loops call it for every
        product with the lower Hessian instead of ``hvp`` on the direction ``(0, v_y)``,
        which computes two blocks more.
    hvp_xy : callable, optional
        ``hvp_xy(z, v_y, *args) -> H_xy v_y = d/dx <grad_y g, v_y>`` (length dx): the cross
        product, needed once per implicit hypergradient and once per unrolled step.
    hvp_block : callable, optional
        Block oracle of a level of a :class:`MultilevelProblem`, ``z = concat(x_1..x_n)``:
        ``hvp_block(z, v_j, i, j, *args) -> H_ij v_j`` (length d_i), the block x_i of this
        objective's Hessian over z applied to the direction that is ``v_j`` (length d_j) in
        block x_j and zero elsewhere; ``i`` and ``j`` are 1-based level indices (int64). It
        must equal ``hvp(z, w)[x_i]`` with ``w = (0, .., v_j, .., 0)``. The CPU recursion
        calls it for the Hessian products of the innermost level n, once per pair of
        blocks, where that takes at most n calls: ``H_nn v`` in its solvers, the cross
        blocks ``H[x_<n, x_n] v`` and ``H[x_n, x_<n] s`` of the adjoints and tangents, and
        level n's columns in dense form (docs/mathematics.md section 3); the other levels'
        products stay joint.
    grad_block : callable, optional
        ``grad_block(z, i, *args) -> grad_{x_i} f`` (length d_i, i 1-based), the block x_i
        of ``grad``; the innermost level's solver calls it (i = n) instead of ``grad``.
    quadratic : bool
        A declaration that the objective is quadratic in z (constant Hessian, zero
        third-order products). The n-level recursion then knows, without evaluating them,
        that the best-response curvature terms of the levels above it vanish when every
        level below them is quadratic too (docs/mathematics.md section 3), and skips them:
        this is exact, not an approximation, as long as the declaration is true. It is
        checked once, at the first point the problem is used at: the gradient must be affine
        along a probe direction (:func:`check_quadratic_declaration`, three gradient calls);
        a false declaration is a :class:`CallbackError`. Default False.

    Notes
    -----
    Callbacks may be ``@numba.njit`` functions or plain NumPy functions; the latter are compiled
    by mlocore, and a function Numba cannot compile gives a :class:`CallbackError` that names it
    and quotes Numba's reason. Vectors passed to callbacks are C-contiguous float64 arrays that
    callbacks must not modify.

    Block oracles are optional: where one is absent, mlocore slices the joint callback. Each
    given block is checked once, at the first point a problem is used at, against the joint
    callback (or central differences of ``grad`` when there is no ``hvp``): a wrong shape or
    a disagreement is a :class:`CallbackError` that names the callback. ``grad_x``,
    ``grad_y``, ``hvp_yy`` and ``hvp_xy`` are used by :class:`BilevelProblem`;
    ``hvp_block`` and ``grad_block`` by the CPU engine of :class:`MultilevelProblem` (every
    pair ``(i, j)`` is checked at the first point). Blocks of a stochastic objective take
    the index array as the joint callbacks do (``hvp_yy(z, v_y, idx, *args)``); the CPU
    stochastic methods call them where a step needs one block, with the same random draws
    as with the joint callbacks, and check them once more on a minibatch.
    """

    def __init__(self, grad, hvp=None, value=None, tvp=None, args=(), n_samples=None, *,
                 grad_x=None, grad_y=None, hvp_yy=None, hvp_xy=None, hvp_block=None,
                 grad_block=None, quadratic=False):
        if not isinstance(quadratic, (bool, np.bool_)):
            raise TypeError(f"Objective quadratic must be True or False, got {quadratic!r}")
        for name, fn in (("grad", grad), ("hvp", hvp), ("value", value), ("tvp", tvp),
                         ("grad_x", grad_x), ("grad_y", grad_y), ("hvp_yy", hvp_yy),
                         ("hvp_xy", hvp_xy), ("hvp_block", hvp_block),
                         ("grad_block", grad_block)):
            if fn is None and name != "grad":
                continue
            if not callable(fn):
                raise TypeError(f"Objective {name} must be callable, got {type(fn).__name__}")
        if isinstance(args, list):
            args = tuple(args)
        if not isinstance(args, tuple):
            args = (args,)
        if n_samples is not None:
            if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) \
                    or n_samples < 1:
                raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
            n_samples = int(n_samples)
        self.grad, self.hvp, self.value, self.tvp = grad, hvp, value, tvp
        self.grad_x, self.grad_y, self.hvp_yy, self.hvp_xy = grad_x, grad_y, hvp_yy, hvp_xy
        self.hvp_block, self.grad_block = hvp_block, grad_block
        self._args = args
        self.n_samples = n_samples
        self.quadratic = bool(quadratic)
        self._compiled = None

    @property
    def args(self):
        """The extra arguments (read-only: callbacks are compiled for them; build a new
        Objective for other data)."""
        return self._args

    @args.setter
    def args(self, value):
        raise AttributeError("Objective.args cannot be changed: the callbacks are compiled for "
                             "them; build a new Objective with the new args")

    def __setattr__(self, name, value):
        # a changed callback invalidates the compiled form and the one-time checks
        if (name in _CALLBACK_NAMES or name == "quadratic") \
                and getattr(self, "_compiled", None) is not None:
            object.__setattr__(self, "_compiled", None)
        object.__setattr__(self, name, value)

    @property
    def blocks(self) -> tuple:
        """Names of the block oracles given (``grad_x``, ``grad_y``, ``hvp_yy``, ``hvp_xy``)."""
        return tuple(n for n in _BLOCK_NAMES if getattr(self, n) is not None)

    @property
    def level_blocks(self) -> tuple:
        """Names of the multilevel block oracles given (``hvp_block``, ``grad_block``)."""
        return tuple(n for n in _LEVEL_BLOCK_NAMES if getattr(self, n) is not None)

    def __repr__(self):
        parts = [f"grad={getattr(self.grad, '__name__', self.grad)!s}"]
        for name in _CALLBACK_NAMES[1:]:
            fn = getattr(self, name)
            if fn is not None:
                parts.append(f"{name}={getattr(fn, '__name__', fn)!s}")
        if self.n_samples is not None:
            parts.append(f"n_samples={self.n_samples}")
        if self.quadratic:
            parts.append("quadratic=True")
        return f"Objective({', '.join(parts)})"

    # -- compiled form --------------------------------------------------------------------
    def compiled(self, role: str) -> "CompiledObjective":
        """Callbacks compiled for the kernels' calling convention (cached on the object)."""
        if self._compiled is None:
            self._compiled = CompiledObjective(self, role)
        return self._compiled


_BLOCK_NAMES = ("grad_x", "grad_y", "hvp_yy", "hvp_xy")
_LEVEL_BLOCK_NAMES = ("hvp_block", "grad_block")
_CALLBACK_NAMES = ("grad", "hvp", "value", "tvp") + _BLOCK_NAMES + _LEVEL_BLOCK_NAMES
#: name -> (number of vector arguments, flag bit) of the optional callbacks in ``fns``
_OPTIONAL = {"hvp": (2, HAS_HVP), "value": (1, HAS_VALUE), "grad_x": (1, HAS_GRAD_X),
             "grad_y": (1, HAS_GRAD_Y), "hvp_yy": (2, HAS_HVP_YY), "hvp_xy": (2, HAS_HVP_XY)}


class CompiledObjective:
    """Kernel-facing form: ``fns`` (every slot of :data:`FN_NAMES`, an
    :class:`~mlocore._kernels.oracles.OracleBundle`),
    ``flags`` (which optional callbacks are real, bits of :mod:`._kernels.oracles`), args.

    For stochastic objectives the full-batch index array is prepended to ``args``, so that
    deterministic kernels call ``grad(z, idx, *args)`` as ``grad(z, *args_full)``.
    """

    def __init__(self, objective: Objective, role: str):
        args = objective.args
        if objective.n_samples is not None:
            args = (np.arange(objective.n_samples, dtype=np.int64),) + tuple(args)
        try:
            argt = tuple(numba.typeof(a) for a in args)
        except ValueError as exc:
            raise TypeError(f"{role} args contain a value Numba cannot pass to compiled code: "
                            f"{exc}") from None
        self.role = role
        self.args = args
        self.kargs = KeyedArgs(args)  # what kernels receive (type key computed once)
        self.grad, gt = compile_callback(objective.grad, f"{role}.grad", (VEC,) + argt, "vector")
        funcs, fntypes = [self.grad], [gt]
        flags = 0
        for name in FN_NAMES[1:]:
            nvec, bit = _OPTIONAL[name]
            kind = "scalar" if name == "value" else "vector"
            user = getattr(objective, name)
            if user is not None:
                fn, ft = compile_callback(user, f"{role}.{name}", (VEC,) * nvec + argt, kind)
                flags |= bit
            else:
                fn, ft = missing_callback(nvec, (VEC,) * nvec + argt, kind)
            setattr(self, name, fn)
            funcs.append(fn)
            fntypes.append(ft)
        self.tvp = None
        if objective.tvp is not None:
            self.tvp, _ = compile_callback(objective.tvp, f"{role}.tvp", (VEC, VEC, VEC) + argt,
                                           "vector")
        # multilevel block oracles: the level indices are int64 after the vectors
        self.hvp_block = self.grad_block = None
        if objective.hvp_block is not None:
            self.hvp_block, _ = compile_callback(
                objective.hvp_block, f"{role}.hvp_block",
                (VEC, VEC, numba.int64, numba.int64) + argt, "vector")
        if objective.grad_block is not None:
            self.grad_block, _ = compile_callback(
                objective.grad_block, f"{role}.grad_block", (VEC, numba.int64) + argt,
                "vector")
        self.level_blocks = objective.level_blocks
        self._innermost = {}  # level offsets -> _InnermostBlocks
        self._rows = None
        self.flags = flags
        self.has_hvp = bool(flags & HAS_HVP)
        self.has_value = bool(flags & HAS_VALUE)
        self.has_tvp = objective.tvp is not None
        self.blocks = objective.blocks
        self.quadratic = bool(getattr(objective, "quadratic", False))
        self._bundle = BundleCache(FnTuple(funcs, fntypes))
        self.checked_dx = None  #: the dx of the bilevel problem it was checked for
        #: kernel entry points bound to these callbacks (:func:`~mlocore._callbacks.call_bound`)
        self.bound_kernels = {}

    @property
    def fns(self):
        """What kernels receive: the :class:`~mlocore._kernels.oracles.OracleBundle`."""
        return self._bundle.get()

    def _call(self, name, fn, *vecs):
        try:
            return fn(*vecs, *self.args)
        except Exception as exc:
            raise CallbackError(f"callback {self.role}.{name} raised "
                                f"{type(exc).__name__}: {exc}") from exc

    def check_at(self, z: np.ndarray, dx: int = None, offsets=None):
        """Call each callback once at z and check shapes and finiteness (clear errors early);
        with ``dx`` (bilevel problems) also each block oracle against the joint callback,
        with ``offsets`` (the block offsets of a multilevel problem) each multilevel block
        oracle (:func:`check_level_block_oracles`)."""
        n = z.shape[0]
        g = self._call("grad", self.grad, z.copy())
        _check_vector(f"{self.role}.grad", g, n)
        if self.has_hvp:
            v = np.linspace(1.0, 2.0, n)
            _check_vector(f"{self.role}.hvp", self._call("hvp", self.hvp, z.copy(), v), n)
        if self.has_tvp:
            u = np.linspace(-1.0, 1.0, n)
            v = np.linspace(1.0, 2.0, n)
            _check_vector(f"{self.role}.tvp", self._call("tvp", self.tvp, z.copy(), u, v), n)
        if self.has_value:
            f = self._call("value", self.value, z.copy())
            if not np.isfinite(f):
                raise CallbackError(f"callback {self.role}.value returned {f} at the initial "
                                    "point; expected a finite number")
        if self.blocks:
            if dx is None:
                raise ValueError(f"{self.role} has block oracles ({', '.join(self.blocks)}), "
                                 "which only a BilevelProblem uses; give the levels of a "
                                 "multilevel problem hvp_block / grad_block instead")
            self._check_blocks(z, dx, g)
        if self.level_blocks:
            if offsets is None:
                raise ValueError(f"{self.role} has multilevel block oracles "
                                 f"({', '.join(self.level_blocks)}), which only the CPU "
                                 "engine of a MultilevelProblem uses; give a bilevel "
                                 "problem grad_x / grad_y / hvp_yy / hvp_xy instead")

            def call(name, *a):
                return self._call(name, getattr(self, name),
                                  *(x.copy() if isinstance(x, np.ndarray) else x for x in a))
            check_level_block_oracles(self.role, self.level_blocks, z, offsets, call,
                                      self.has_hvp, g)
        if self.quadratic:
            check_quadratic_declaration(
                self.role, lambda w: self._call("grad", self.grad, w), z)
        return g

    def _check_blocks(self, z, dx, g):
        """Each block oracle against the joint callback at z (:func:`check_block_oracles`)."""
        def call(name, *vecs):
            return self._call(name, getattr(self, name), *(v.copy() for v in vecs))
        check_block_oracles(self.role, self.blocks, z, dx, call, self.has_hvp, g)

    def has_hvp_block(self):
        return bool(self.flags & (HAS_HVP_YY | HAS_HVP_XY))

    def hvp_rows(self):
        """``rows(z, v_j, j, i0, i1, off, *args)``: the blocks ``i0..i1`` of
        ``hvp_block(z, v_j, i, j)`` stacked (rows ``off[i0 - 1]:off[i1]``), one compiled
        call for a block column (None without ``hvp_block``)."""
        if self.hvp_block is None:
            return None
        if self._rows is None:
            params = "".join(f", a{i}" for i in range(len(self.args)))
            src = (f"def hvp_rows(z, v, j, i0, i1, off{params}):\n"
                   "    base = off[i0 - 1]\n"
                   "    out = np.empty(off[i1] - base)\n"
                   "    for i in range(i0, i1 + 1):\n"
                   f"        h = _f(z, v, i, j{params})\n"
                   "        if h.shape[0] != off[i] - off[i - 1]:\n"
                   f"            raise ValueError('callback {self.role}.hvp_block returned an "
                   "array whose size differs from x_i')\n"
                   "        out[off[i - 1] - base:off[i] - base] = h\n"
                   "    return out\n")
            argt = tuple(numba.typeof(a) for a in self.args)
            types_ = (VEC, VEC) + (numba.int64,) * 3 + (numba.int64[::1],) + argt
            disp, _ = _compile_wrapper("hvp_rows", src, self.hvp_block,
                                       f"{self.role}.hvp_block", types_)
            # the compiled entry point: no type dispatch per call (the engine passes
            # exactly these types)
            self._rows = disp.overloads[types_].entry_point
        return self._rows

    def innermost(self, offsets):
        """The kernel-facing form of the innermost level n of a multilevel problem with
        multilevel block oracles, as a bilevel lower objective with ``x = x_<n``,
        ``y = x_n``: ``grad_y = grad_block(., n)``, ``hvp_yy = hvp_block(., ., n, n)`` and
        ``hvp_xy`` = the blocks ``i < n`` of ``hvp_block(., ., i, n)`` (compiled
        wrappers; the bilevel kernels then call them through their flags). ``None``
        without block oracles."""
        if not self.level_blocks:
            return None
        offsets = tuple(int(o) for o in offsets)  # one wrapper per layout of the levels
        if offsets not in self._innermost:
            self._innermost[offsets] = _InnermostBlocks(self, offsets)
        return self._innermost[offsets]


def _compile_wrapper(name, src, target, role, types_):
    """Compile the generated source ``src`` of the function ``name``, which calls the block
    oracle ``target`` as ``_f`` (wrappers of a level's arity), for the types ``types_``:
    ``(dispatcher, first-class function type)`` as :func:`compile_callback` gives them."""
    namespace = {"_f": target, "np": np}
    exec(compile(src, f"<{role} from the block oracle>", "exec"), namespace)
    return compile_callback(namespace[name], role, types_, "vector")


class _InnermostBlocks:
    """See :meth:`CompiledObjective.innermost`: ``fns``, ``kargs``, ``flags`` and
    ``bound_kernels`` as the bilevel kernels take them."""

    def __init__(self, comp, offsets):
        n = len(offsets) - 1
        nargs = len(comp.args)
        argt = tuple(numba.typeof(a) for a in comp.args)
        base = comp._bundle.fntuple
        funcs, fntypes = list(base.funcs), list(base.nbtype.types)
        flags = comp.flags
        params = "".join(f", a{i}" for i in range(nargs))
        wrappers = {}
        if comp.grad_block is not None:
            wrappers[FN_NAMES.index("grad_y")] = (
                "grad_y", HAS_GRAD_Y, (VEC,) + argt,
                f"def grad_y(z{params}):\n    return _f(z, {n}{params})\n", comp.grad_block)
        if comp.hvp_block is not None:
            wrappers[FN_NAMES.index("hvp_yy")] = (
                "hvp_yy", HAS_HVP_YY, (VEC, VEC) + argt,
                f"def hvp_yy(z, v{params}):\n    return _f(z, v, {n}, {n}{params})\n",
                comp.hvp_block)
            body = "".join(f"    out[{offsets[i - 1]}:{offsets[i]}] = _f(z, v, {i}, {n}{params})"
                           f"\n" for i in range(1, n))
            wrappers[FN_NAMES.index("hvp_xy")] = (
                "hvp_xy", HAS_HVP_XY, (VEC, VEC) + argt,
                f"def hvp_xy(z, v{params}):\n    out = np.empty({offsets[n - 1]})\n{body}"
                "    return out\n", comp.hvp_block)
        for slot, (name, bit, types_, src, target) in wrappers.items():
            fn, ft = _compile_wrapper(name, src, target, f"{comp.role}.{name}", types_)
            funcs[slot], fntypes[slot] = fn, ft
            flags |= bit
        self.role = comp.role
        self.args, self.kargs = comp.args, comp.kargs
        self.flags = flags
        self._bundle = BundleCache(FnTuple(funcs, fntypes))
        self.bound_kernels = {}

    @property
    def fns(self):
        return self._bundle.get()


#: probe step of the quadratic declaration check, relative to ``1 + max |z|``
QUADRATIC_PROBE_STEP = 0.1
#: largest accepted second difference of a declared-quadratic gradient, relative to the
#: first difference (round-off is ~1e-15 of it; any curvature of the Hessian along the
#: probe shows as ~ step * |D^3| / |D^2|)
QUADRATIC_PROBE_RTOL = 1e-6


def check_quadratic_declaration(role, grad, z):
    """Check ``Objective(quadratic=True)`` at z: a quadratic objective has an affine
    gradient, so ``grad(z + d) + grad(z - d) - 2 grad(z)`` vanishes to round-off. ``grad``
    maps a host vector to a host vector (three calls, not counted as oracle calls); ``d`` is
    a fixed, dense probe direction of length ``QUADRATIC_PROBE_STEP (1 + max |z|)``.

    Raises
    ------
    CallbackError
        The second difference exceeds ``QUADRATIC_PROBE_RTOL`` times the first: the
        declaration is false, and the curvature terms it lets the recursion skip are not zero.
    """
    n = z.shape[0]
    d = np.cos(1.3 * np.arange(n) + 0.7)
    d *= QUADRATIC_PROBE_STEP * (1.0 + np.max(np.abs(z))) / np.linalg.norm(d)
    g0, gp, gm = grad(z.copy()), grad(z + d), grad(z - d)
    second = np.linalg.norm(gp + gm - 2.0 * g0)
    first = np.linalg.norm(gp - gm)
    if not second <= QUADRATIC_PROBE_RTOL * first + 1e-300:
        raise CallbackError(
            f"{role} is declared quadratic (quadratic=True) but its gradient is not affine: "
            f"|grad(z+d) + grad(z-d) - 2 grad(z)| = {second:.3e} against "
            f"|grad(z+d) - grad(z-d)| = {first:.3e} (relative {second / max(first, 1e-300):.1e}"
            f", accepted {QUADRATIC_PROBE_RTOL:g}) along a probe of length "
            f"{np.linalg.norm(d):.3g}; remove the declaration")


def check_block_oracles(role, blocks, z, dx, call, has_hvp, g=None, v=None):
    """Check each block oracle of one objective against its joint callback at z (host
    arrays): same shape, same values (to 1e-8 relative with an ``hvp``; to 1e-5 against
    central differences of ``grad`` without one). Shared by the CPU and device backends.

    Parameters
    ----------
    role : str
        ``"upper"`` or ``"lower"`` (errors name ``role.callback``).
    blocks : tuple of str
        The block oracles given (names of :attr:`Objective.blocks`).
    z : ndarray
        The point, on the host.
    dx : int
        Size of x (z = (x, y)).
    call : callable
        ``call(name, *vecs) -> ndarray``: the callback ``name`` ("grad", "hvp" or a block)
        at the host vectors ``vecs`` (z first), its result on the host.
    has_hvp : bool
        Whether the objective has a joint ``hvp``.
    g : ndarray, optional
        The joint gradient at z, when already computed.
    v : ndarray, optional
        The direction of the product checks, size dy (default ``linspace(1, 2, dy)``); the
        joint products take ``(0, v)``.

    Raises
    ------
    CallbackError
        A block of the wrong shape, non-finite, or disagreeing with the joint callback.
    """
    n = z.shape[0]
    dy = n - dx
    if v is None:
        v = np.linspace(1.0, 2.0, dy)
    joint_h, rtol = None, 1e-8
    if "hvp_yy" in blocks or "hvp_xy" in blocks:
        w = np.zeros(n)
        w[dx:] = v
        if has_hvp:
            joint_h = call("hvp", z, w)
        else:
            eps = FD_REL_STEP * (1.0 + np.linalg.norm(z)) / np.linalg.norm(w)
            joint_h = (call("grad", z + eps * w) - call("grad", z - eps * w)) / (2.0 * eps)
            rtol = 1e-5
    if g is None and ("grad_x" in blocks or "grad_y" in blocks):
        g = call("grad", z)
    checks = {"grad_x": ((), lambda: g[:dx], 1e-8, "grad[:dx]"),
              "grad_y": ((), lambda: g[dx:], 1e-8, "grad[dx:]"),
              "hvp_yy": ((v,), lambda: joint_h[dx:], None, "the y-block of hvp(z, (0, v))"),
              "hvp_xy": ((v,), lambda: joint_h[:dx], None, "the x-block of hvp(z, (0, v))")}
    for name in blocks:
        vecs, want_fn, tol, what = checks[name]
        if tol is None:
            tol = rtol
            if not has_hvp:
                what += ", by central differences of grad"
        size = dx if name in ("grad_x", "hvp_xy") else dy
        _compare_block(f"{role}.{name}", call(name, z, *vecs), want_fn, what, tol,
                       "x" if size == dx else "y", size)


def _compare_block(full, got, want_fn, what, tol, block, size, pair=""):
    """A block oracle's output ``got`` against the joint callback's block ``want_fn()``
    (length ``size``, the size of x-block ``block``): same shape, finite, and within
    ``tol (1 + |want|)``; ``pair`` names the block indices in the messages."""
    at = f" for {pair}" if pair else ""
    if not isinstance(got, np.ndarray) or got.shape != (size,):
        shape = getattr(got, "shape", type(got).__name__)
        raise CallbackError(f"callback {full} returned shape {shape}{at}; expected "
                            f"({size},), the size of {block}")
    if not np.all(np.isfinite(got)):
        raise CallbackError(f"callback {full} returned non-finite values{at} at the "
                            "initial point")
    want = want_fn()
    err = float(np.linalg.norm(got - want))
    scale = float(np.linalg.norm(want))
    if not err <= tol * (1.0 + scale):
        raise CallbackError(
            f"callback {full} disagrees with the joint callback at the initial point{at}: "
            f"|{full.rsplit('.', 1)[-1]} - {what}| = {err:.3e} (|{what}| = {scale:.3e}, "
            f"allowed {tol:g} (1 + |.|)); the block oracles must compute the blocks of grad "
            "and hvp")


def check_level_block_oracles(role, names, z, offsets, call, has_hvp, g=None):
    """Check the multilevel block oracles ``hvp_block`` (every pair ``(i, j)``) and
    ``grad_block`` (every i) of one level at z against its joint callbacks (``hvp``, or
    central differences of ``grad`` without one): same shape, finite, and agreeing to 1e-8
    relative (1e-5 against differences). ``call(name, *a)`` calls the callback ``name`` with
    the host arguments ``a`` (z first); the directions are ``linspace(1, 2, d_j)``.

    Raises
    ------
    CallbackError
        A block of the wrong shape, non-finite, or disagreeing with the joint callback
        (the message names the level's callback and the pair of levels).
    """
    n = len(offsets) - 1
    N = z.shape[0]
    if g is None:
        g = call("grad", z)

    def compare(full, got, want, i, what, tol, pair):
        _compare_block(full, got, lambda: want, what, tol, f"x_{i}", want.shape[0], pair)

    if "grad_block" in names:
        for i in range(1, n + 1):
            lo, hi = offsets[i - 1], offsets[i]
            compare(f"{role}.grad_block", call("grad_block", z, np.int64(i)), g[lo:hi],
                    i, f"grad[x_{i}]", 1e-8, f"i={i}")
    if "hvp_block" in names:
        for j in range(1, n + 1):
            lo, hi = offsets[j - 1], offsets[j]
            v = np.linspace(1.0, 2.0, hi - lo)
            w = np.zeros(N)
            w[lo:hi] = v
            if has_hvp:
                h, tol, how = call("hvp", z, w), 1e-8, ""
            else:
                eps = FD_REL_STEP * (1.0 + np.linalg.norm(z)) / np.linalg.norm(w)
                h = (call("grad", z + eps * w) - call("grad", z - eps * w)) / (2.0 * eps)
                tol, how = 1e-5, ", by central differences of grad"
            for i in range(1, n + 1):
                a, b = offsets[i - 1], offsets[i]
                got = call("hvp_block", z, v, np.int64(i), np.int64(j))
                compare(f"{role}.hvp_block", got, h[a:b], i,
                        f"hvp(z, w)[x_{i}] (w = v in x_{j}){how}", tol, f"i={i}, j={j}")


def _check_vector(role, out, n):
    if not isinstance(out, np.ndarray) or out.shape != (n,):
        shape = getattr(out, "shape", type(out).__name__)
        raise CallbackError(f"callback {role} returned shape {shape}; expected ({n},), the "
                            "shape of the joint vector z")
    if not np.all(np.isfinite(out)):
        raise CallbackError(f"callback {role} returned non-finite values at the initial point")


class Ball:
    """The Euclidean ball ``{x : |x - center| <= radius}`` as an upper feasible set:
    ``BilevelProblem(..., project=Ball(radius, center))``. Callable (the projection), and
    recognised by the stochastic loops, which project in compiled code."""

    def __init__(self, radius, center=None):
        if isinstance(radius, bool) or not isinstance(radius, numbers.Real) \
                or not np.isfinite(radius) or radius <= 0:
            raise ValueError(f"Ball radius must be a finite number > 0, got {radius!r}")
        self.radius = float(radius)
        if center is not None:
            center = np.array(center, dtype=np.float64, copy=True)
            if center.ndim != 1 or not np.all(np.isfinite(center)):
                raise ValueError(f"Ball center must be a finite 1-D array, got {center!r}")
        self.center = center

    def center_for(self, dx):
        if self.center is None:
            return np.zeros(dx)
        if self.center.shape != (dx,):
            raise ValueError(f"Ball center has shape {self.center.shape}; x has shape ({dx},)")
        return self.center

    def __call__(self, x):
        x = np.asarray(x, dtype=np.float64)
        c = self.center_for(x.shape[0])
        d = x - c
        r = float(np.linalg.norm(d))
        return x.copy() if r <= self.radius else c + (self.radius / r) * d

    def __repr__(self):
        return f"Ball(radius={self.radius:g})"


def parse_bilevel_dims(dims):
    """``(dx, dy)`` from ``dims``, a pair of positive integers (ValueError otherwise); shared
    by the CPU, device and batched bilevel problems."""
    try:
        dx, dy = dims
    except (TypeError, ValueError):
        raise ValueError(f"dims must be a pair (dx, dy), got {dims!r}") from None
    for name, d in (("dx", dx), ("dy", dy)):
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1:
            raise ValueError(f"dims must be positive integers, got {name}={d!r}")
    return int(dx), int(dy)


class BilevelProblem:
    """``min_x f(x, y*(x))`` with ``y*(x) = argmin_y g(x, y)``, over ``z = concat(x, y)``.

    Parameters
    ----------
    upper, lower : Objective
        f and g, each over the joint vector z of size ``dx + dy``.
    dims : tuple of int
        ``(dx, dy)``.
    bounds : optional
        Box on x: ``scipy.optimize.Bounds``, a sequence of ``dx`` pairs ``(lo, hi)``, or one
        pair of scalars/arrays; ``None`` entries mean unbounded.
    project : callable, optional
        ``project(x) -> x``: projection onto the feasible set of x (instead of bounds).

    Notes
    -----
    ``g(x, .)`` must be strongly convex: ``H_yy`` is inverted at the solution
    (docs/mathematics.md section 1), and the lower solvers need positive curvature wherever they
    go, from y0 on (Newton-CG stops with status 3, "not positive definite", otherwise).
    """

    def __init__(self, upper, lower, dims, bounds=None, project=None):
        if not isinstance(upper, Objective) or not isinstance(lower, Objective):
            raise TypeError("upper and lower must be mlocore.Objective instances, got "
                            f"{type(upper).__name__} and {type(lower).__name__}")
        self.upper, self.lower = upper, lower
        self.dx, self.dy = parse_bilevel_dims(dims)
        self.dims = (self.dx, self.dy)
        self.lb, self.ub, self._project = parse_constraints(bounds, project, self.dx)

    @property
    def constrained(self) -> bool:
        return self._project is not None or self.lb is not None

    def project(self, x: np.ndarray) -> np.ndarray:
        """Project x onto the feasible set (a copy; x itself is not modified)."""
        if self._project is not None:
            try:
                out = self._project(x.copy())
            except Exception as exc:
                raise CallbackError(f"callback project raised {type(exc).__name__}: {exc}") \
                    from exc
            out = np.asarray(out, dtype=np.float64)
            if out.shape != (self.dx,) or not np.all(np.isfinite(out)):
                raise CallbackError(f"callback project returned shape {out.shape} or non-finite"
                                    f" values; expected a finite array of shape ({self.dx},)")
            return out
        if self.lb is not None:
            return np.clip(x, self.lb, self.ub)
        return x.copy()

    def __repr__(self):
        return f"BilevelProblem(dims={self.dims}, upper={self.upper!r}, lower={self.lower!r})"


def parse_constraints(bounds, project, dx):
    """``(lb, ub, project)`` of an upper variable of size dx: bounds or a projection (a
    callable or :class:`Ball`), not both (shared by the CPU and device problem classes)."""
    if bounds is not None and project is not None:
        raise ValueError("give either bounds or project, not both")
    if project is not None and not callable(project):
        raise TypeError(f"project must be callable, got {type(project).__name__}")
    lb, ub = _parse_bounds(bounds, dx)
    return lb, ub, project


def _parse_bounds(bounds, dx):
    """Box bounds on x: ``scipy.optimize.Bounds``, ``dx`` pairs ``(lo, hi)`` (scipy's
    convention; it wins when ``dx == 2`` makes a sequence ambiguous), or one pair
    ``(lo, hi)`` of scalars or length-``dx`` arrays. ``None`` means unbounded."""
    if bounds is None:
        return None, None
    if hasattr(bounds, "lb") and hasattr(bounds, "ub"):  # scipy.optimize.Bounds
        lo, hi = bounds.lb, bounds.ub
    else:
        try:
            seq = list(bounds)
        except TypeError:
            raise ValueError(f"bounds must be scipy.optimize.Bounds, {dx} pairs (lo, hi), or "
                             f"one pair; got {bounds!r}") from None
        if len(seq) == dx and all(np.ndim(b) == 1 and len(b) == 2 for b in seq):
            lo = [b[0] for b in seq]
            hi = [b[1] for b in seq]
        elif len(seq) == 2:
            lo, hi = seq
        else:
            raise ValueError(f"bounds must be scipy.optimize.Bounds, {dx} pairs (lo, hi), or "
                             f"one pair; got {bounds!r}")

    def side(v, fill):
        if v is None:
            return np.full(dx, fill)
        arr = np.array([fill if e is None else e
                        for e in np.atleast_1d(np.asarray(v, dtype=object))], dtype=np.float64)
        if arr.shape not in ((1,), (dx,)):
            raise ValueError(f"bounds: expected scalars or arrays of length {dx}, got length "
                             f"{arr.shape[0]}")
        return np.broadcast_to(arr, (dx,)).copy()

    lo, hi = side(lo, -np.inf), side(hi, np.inf)
    if np.any(np.isnan(lo)) or np.any(np.isnan(hi)) or np.any(lo > hi):
        raise ValueError(f"bounds must satisfy lo <= hi, got lo={lo}, hi={hi}")
    if np.any(lo == np.inf) or np.any(hi == -np.inf):
        raise ValueError(f"bounds are infeasible: lo={lo}, hi={hi}")
    return lo, hi


class MultilevelProblem:
    """An n-level problem: level 1 (outermost) minimizes ``F = phi_1``, each lower level k
    minimizes its reduced objective given the levels above (docs/mathematics.md section 3).

    Parameters
    ----------
    levels : sequence of Objective
        ``[f_1, ..., f_n]``, level 1 outermost; every objective is over the joint vector
        ``z = concat(x_1, ..., x_n)``.
    dims : sequence of int
        ``(d_1, ..., d_n)``.
    bounds, project
        Constraints on x_1, as for :class:`BilevelProblem`.

    Notes
    -----
    Each lower level k >= 2 must be strongly convex in x_k near the solution: the Hessian of
    its reduced objective phi_k in x_k is inverted (Gu & Chen 2024, Lemmas 3.1-3.2).
    """

    def __init__(self, levels, dims, bounds=None, project=None):
        levels = list(levels)
        if len(levels) < 2:
            raise ValueError(f"a multilevel problem needs at least 2 levels, got {len(levels)}")
        for k, obj in enumerate(levels, start=1):
            if not isinstance(obj, Objective):
                raise TypeError(f"level {k} must be an mlocore.Objective, got "
                                f"{type(obj).__name__}")
        self._set_layout(levels, dims, bounds, project)

    def _set_layout(self, levels, dims, bounds, project):
        """Validate dims (one positive size per level) and the constraints on x_1; set
        ``levels``, ``dims``, ``n``, ``offsets``, ``size``, ``lb``, ``ub`` (shared with
        :class:`mlocore.cuda.DeviceMultilevelProblem`)."""
        try:
            dims = tuple(dims)
        except TypeError:
            raise ValueError(f"dims must be a sequence of {len(levels)} integers, got "
                             f"{dims!r}") from None
        if len(dims) != len(levels):
            raise ValueError(f"dims has {len(dims)} entries but there are {len(levels)} levels")
        for k, d in enumerate(dims, start=1):
            if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1:
                raise ValueError(f"dims must be positive integers, got d_{k}={d!r}")
        self.levels = levels
        self.dims = tuple(int(d) for d in dims)
        self.n = len(levels)
        self.offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum(self.dims)]))
        self.size = self.offsets[-1]
        self.lb, self.ub, self._project = parse_constraints(bounds, project, self.dims[0])

    def block(self, k: int) -> slice:
        """The slice of z holding x_k (k = 1..n)."""
        return slice(self.offsets[k - 1], self.offsets[k])

    def project(self, x1: np.ndarray) -> np.ndarray:
        """Project x_1 onto its feasible set (a copy)."""
        return BilevelProblem.project(self, x1)

    @property
    def dx(self):  # BilevelProblem.project reads dx
        return self.dims[0]

    def __repr__(self):
        return f"MultilevelProblem(n={self.n}, dims={self.dims})"
