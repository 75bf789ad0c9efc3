"""Compiling user callbacks and calling compiled kernels with them.

Design choice (measured with numba 0.68 on the 2-core CI machine, see README "Performance
notes"): kernels receive user callbacks as first-class ``numba.types.FunctionType`` values,
not as dispatcher objects. A kernel is then compiled once per *argument-type* signature and
cached on disk (``cache=True``), whatever the callbacks are; a new problem only pays for
compiling its own callbacks (0.1-0.5 s each, about 1.2 s for a typical problem; measured in
``benchmarks/ratios.py``) instead of about 1-15 s per kernel per problem, uncacheable.
The price is an indirect call (~30 ns) per oracle call and, per kernel call, a look-up of each
callback's address that numba does in Python (~25 us per callback). We memoize that look-up for
the dispatchers mlocore compiled itself (``_install_address_memo``), which brings it to ~5 us.

Kernels are never called through their dispatcher (which would re-specialize on each
dispatcher type); :func:`call_kernel` compiles (or loads from the cache) the overload for the
exact signature and calls its entry point.
"""
from __future__ import annotations

import functools
import inspect
import threading
import weakref
import warnings

import numba
import numpy as np
from numba import types
from numba.core.errors import NumbaExperimentalFeatureWarning, NumbaError

from ._kernels.oracles import OracleBundle, make_bundle

__all__ = ["CallbackError", "compile_callback", "missing_callback", "placeholder", "call_kernel",
           "call_bound", "call_bound_typed", "FnTuple"]

VEC = types.float64[::1]
IDX = types.int64[::1]


class CallbackError(ValueError):
    """A user callback cannot be compiled, raised, or returned something unusable."""


# ---------------------------------------------------------------------------------------
# Memoized first-class-function addresses (performance shim, see module docstring).
# ---------------------------------------------------------------------------------------
_memo_lock = threading.Lock()


def _install_address_memo():
    try:
        from numba.experimental import function_type as _ft
        orig_wrapper, orig_jit = _ft._get_wrapper_address, _ft._get_jit_address
    except (ImportError, AttributeError):  # pragma: no cover - other numba versions
        return
    if getattr(orig_wrapper, "_mlocore_memo", False):
        return

    def _memoized(orig, tag):
        # numba passes the same unpickled Signature object on every call from one call site,
        # so the table (an attribute of the dispatchers mlocore compiled) is keyed by its id;
        # the Signature is stored to keep that id valid. ``recompile()`` of a registered
        # dispatcher clears its table (see ``_register``).
        def get(func, sig):
            table = getattr(func, "_mlocore_addresses", None)
            if table is None:
                return orig(func, sig)
            key = (tag, id(sig))
            hit = table.get(key)
            if hit is not None and hit[0] is sig:
                return hit[1]
            addr = orig(func, sig)
            with _memo_lock:
                table[key] = (sig, addr)
            return addr
        get._mlocore_memo = True
        return get

    _ft._get_wrapper_address = _memoized(orig_wrapper, "w")
    _ft._get_jit_address = _memoized(orig_jit, "j")


_install_address_memo()


def _numba_reason(exc: BaseException) -> str:
    msg = str(exc)
    # numba messages carry ANSI bold codes and long tracebacks of the typing stack
    for code in ("\x1b[1m", "\x1b[0m"):
        msg = msg.replace(code, "")
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    return "\n".join(lines[:12])


def _describe(func) -> str:
    py = getattr(func, "py_func", func)
    name = getattr(py, "__qualname__", repr(py))
    try:
        where = f" ({inspect.getsourcefile(py)}:{inspect.getsourcelines(py)[1]})"
    except (TypeError, OSError):
        where = ""
    return f"{name}{where}"


_JITTED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _register(disp):
    """Give ``disp`` an address table, cleared whenever the dispatcher recompiles."""
    with _memo_lock:
        if getattr(disp, "_mlocore_addresses", None) is not None:
            return
        disp._mlocore_addresses = {}
        original = disp.recompile

        def recompile():
            disp._mlocore_addresses.clear()
            original()
            disp._mlocore_addresses.clear()
            _GENERATION[0] += 1  # bundles holding the old addresses are rebuilt

        disp.recompile = recompile


def _jit_plain(func):
    """njit a plain function once per process (kept while the function lives).

    Not cached on disk: Numba's disk cache does not key on global variables, so a plain
    function reading a module global would silently keep the value of an earlier run.
    Users who want disk caching decorate with ``@njit(cache=True)`` themselves.
    """
    try:
        disp = _JITTED.get(func)
    except TypeError:
        disp = None
    if disp is None:
        disp = numba.njit(func)
        try:
            _JITTED[func] = disp
        except TypeError:
            pass
    return disp


def compile_callback(func, role: str, argtypes: tuple, kind: str):
    """Compile ``func`` for ``argtypes`` and return ``(dispatcher, FunctionType)``.

    Parameters
    ----------
    func : callable
        A numba ``@njit`` dispatcher or a plain Python/NumPy function (then jitted here).
    role : str
        Name used in error messages, e.g. ``"lower.hvp"``.
    argtypes : tuple of numba types
        The exact argument types the kernels call it with.
    kind : {"vector", "scalar"}
        What the callback must return: a 1-D float64 array or a real scalar.
    """
    if not callable(func):
        raise CallbackError(f"{role} must be callable, got {type(func).__name__}")
    if isinstance(func, numba.core.registry.CPUDispatcher):
        disp = func
        if not disp._can_compile and tuple(argtypes) not in disp.overloads:
            # an @njit with explicit signatures that do not match mlocore's calling types
            disp = _jit_plain(disp.py_func)
    elif hasattr(func, "py_func") or isinstance(func, numba.core.dispatcher.Dispatcher):
        raise CallbackError(f"{role}: {_describe(func)} is a {type(func).__name__}; "
                            "expected a CPU @njit function or a plain Python function")
    else:
        disp = _jit_plain(func)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NumbaExperimentalFeatureWarning)
            disp.compile(argtypes)
    except NumbaError as exc:
        raise CallbackError(
            f"Numba could not compile callback {role} = {_describe(func)} for arguments "
            f"({', '.join(str(t) for t in argtypes)}). Numba says:\n{_numba_reason(exc)}"
        ) from None
    except TypeError as exc:
        raise CallbackError(
            f"callback {role} = {_describe(func)} does not accept arguments "
            f"({', '.join(str(t) for t in argtypes)}): {exc}") from None
    cres = disp.overloads.get(tuple(argtypes))
    if cres is None:  # explicit-signature dispatchers may have converted types
        raise CallbackError(f"callback {role} = {_describe(func)} has no overload for "
                            f"({', '.join(str(t) for t in argtypes)})")
    rtype = cres.signature.return_type
    if kind == "vector":
        ok = isinstance(rtype, types.Array) and rtype.ndim == 1 and rtype.dtype == types.float64
        want = "a 1-D float64 array"
    else:
        ok = isinstance(rtype, (types.Float, types.Integer)) and not isinstance(rtype, types.Boolean)
        want = "a real scalar"
    if not ok:
        raise CallbackError(f"callback {role} = {_describe(func)} must return {want}; "
                            f"Numba infers that it returns {rtype}")
    _register(disp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumbaExperimentalFeatureWarning)
        return disp, types.FunctionType(cres.signature)


@functools.lru_cache(maxsize=None)
def placeholder(kind: str, nvec: int, nargs: int):
    """The ``@njit(cache=True)`` placeholder ``missing_{kind}_{nvec}_{nargs}(v0.., a0..)``
    for an absent optional callback: it returns ``np.empty(0)`` ("vector") or NaN
    ("scalar") and is never called (kernels take every callback slot they might use; flags
    tell them which are real).

    One factory for every arity. Its source is compiled with this file as its file name and
    this module as its module, so that numba's disk cache keeps it like any function
    written here (the cache is keyed by the function's name and code, and refreshed when
    this file changes).
    """
    name = f"missing_{kind}_{nvec}_{nargs}"
    params = ", ".join([f"v{i}" for i in range(nvec)] + [f"a{i}" for i in range(nargs)])
    body = "np.empty(0)" if kind == "vector" else "np.nan"
    namespace = {"np": np, "__name__": __name__}
    exec(compile(f"def {name}({params}):\n    return {body}\n", __file__, "exec"), namespace)
    return numba.njit(cache=True)(namespace[name])


def missing_callback(nvec: int, argtypes: tuple, kind: str = "vector"):
    """A compiled placeholder with the arity of ``argtypes`` (``nvec`` vectors first) for an
    absent optional callback: a missing ``hvp`` is replaced by differences of ``grad`` and
    the placeholder is never called."""
    disp = placeholder(kind, nvec, len(argtypes) - nvec)
    return compile_callback(disp, "placeholder", argtypes, kind)


class FnTuple:
    """Compiled callbacks with their numba type, passed to kernels as one argument.

    ``FnTuple(funcs, fntypes)`` is a tuple of first-class functions;
    ``FnTuple(func, fntype, single=True)`` is one first-class function.
    """

    __slots__ = ("funcs", "nbtype")

    def __init__(self, funcs, fntypes, single=False):
        if single:
            self.funcs, self.nbtype = funcs, fntypes
        else:
            self.funcs = tuple(funcs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NumbaExperimentalFeatureWarning)
                self.nbtype = types.Tuple(tuple(fntypes))


_ENTRY_POINTS: dict = {}

# numba warns that first-class functions are experimental each time it unboxes one; mlocore
# relies on them deliberately (module docstring), so that one warning is silenced.
warnings.filterwarnings("ignore", message="First-class function type feature is experimental",
                        category=NumbaExperimentalFeatureWarning)


def _nbtype(value):
    if isinstance(value, FnTuple):
        return value.nbtype
    if isinstance(value, OracleBundle):
        return value._type
    if isinstance(value, KeyedArgs):
        return numba.typeof(value.value)
    if isinstance(value, tuple) and any(type(v) in _CONTAINERS for v in value):
        return types.Tuple(tuple(_nbtype(v) for v in value))
    return numba.typeof(value)


#: bumped whenever a callback mlocore compiled is recompiled (``disp.recompile()``)
_GENERATION = [0]


class BundleCache:
    """The :class:`~mlocore._kernels.oracles.OracleBundle` of an :class:`FnTuple`, built once
    (kernels then unbox one pointer instead of every function) and rebuilt after a callback
    was recompiled, whose new machine code lives at a new address."""

    __slots__ = ("fntuple", "_bundle", "_generation")

    def __init__(self, fntuple: "FnTuple"):
        self.fntuple = fntuple
        self._generation = -1
        self._bundle = None

    def get(self) -> OracleBundle:
        if self._generation != _GENERATION[0]:
            self._generation = _GENERATION[0]
            self._bundle = call_kernel(make_bundle, self.fntuple)
        return self._bundle


class KeyedArgs:
    """An ``args`` tuple with its type key computed once (objectives' data; see call_kernel)."""

    __slots__ = ("value", "key")

    def __init__(self, value):
        self.value = tuple(value)
        self.key = _fast_key(self.value)


_SCALARS = (float, int, bool, type(None), np.float64, np.int64, np.bool_)
#: NPY_ARRAY_C_CONTIGUOUS | F_CONTIGUOUS | ALIGNED | WRITEABLE: what numba's array type
#: depends on (``flags.num`` also holds OWNDATA and others, which it does not)
_LAYOUT_FLAGS = 0x1 | 0x2 | 0x100 | 0x400
_CONTAINERS = (FnTuple, KeyedArgs, tuple, OracleBundle)


def _fast_key(value):
    """A cheap hashable stand-in for ``numba.typeof(value)`` (numba's typeof costs ~10 us)."""
    t = type(value)
    if t is np.ndarray:  # dtype, ndim and the flag bits (layout, writeable, aligned)
        return (value.dtype.num, value.ndim, value.flags.num & _LAYOUT_FLAGS)
    if t in _SCALARS:
        return t
    if t is FnTuple:
        return id(value.nbtype)  # numba types are interned; kept alive by _ENTRY_POINTS
    if t is OracleBundle:
        return id(value._type)
    if t is KeyedArgs:
        return value.key
    if t is tuple:
        return tuple(_fast_key(v) for v in value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return t
    return numba.typeof(value)


def _unwrap(value):
    t = type(value)
    if t is FnTuple:
        return value.funcs
    if t is KeyedArgs:
        return value.value
    if t is tuple and any(type(v) in _CONTAINERS for v in value):
        return tuple(_unwrap(v) for v in value)
    return value


def call_kernel(kernel, *args):
    """Call the njit ``kernel`` on ``args``; :class:`FnTuple` arguments become function tuples.

    The overload for the exact argument types is compiled (or loaded from numba's disk cache)
    on first use and its entry point memoized by a cheap type key.
    """
    return _entry_point(kernel, args)(*map(_unwrap, args))


def _entry_point(kernel, args):
    key = (kernel, tuple(map(_fast_key, args)))
    entry = _ENTRY_POINTS.get(key)
    if entry is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NumbaExperimentalFeatureWarning)
            sig = tuple(_nbtype(a) for a in args)
            kernel.compile(sig)
        entry = kernel.overloads[sig].entry_point
        _ENTRY_POINTS[key] = (entry, sig)
    else:
        entry = entry[0]
    return entry


_BOUND_CACHE_SIZE = 64


def call_bound(cache, owner, kernel, fixed, *varying):
    """``call_kernel(kernel, *fixed(), *varying)`` with the leading arguments that
    ``fixed()`` returns (callback bundles, data, flags of one problem) keyed and unwrapped
    once, when the entry is first made.

    ``cache`` is a dict that lives as long as the objects ``fixed`` comes from (the compiled
    objectives hold it) and ``owner`` identifies ``fixed`` within it. ``varying`` holds the
    per-call arguments; their Python types are part of the key, so they must be validated
    values whose numba type follows from their Python type: float64 / int64 arrays that
    are 1-D, C-contiguous and writeable (what :func:`mlocore._validation.as_vector` and the
    kernels return), Python or NumPy scalars. A repeated call then costs one dict lookup
    before the kernel's own entry (a few microseconds less than :func:`call_kernel` on
    kernels with ~20 arguments). Entries are dropped when a callback was recompiled.
    """
    return call_bound_typed(cache, owner, kernel, fixed, tuple(map(type, varying)), varying)


def call_bound_typed(cache, owner, kernel, fixed, varying_types, varying):
    """:func:`call_bound` with ``varying_types == tuple(map(type, varying))`` given by a
    caller that holds it already (validated options keep the types of their values)."""
    key = (kernel, owner, varying_types)
    hit = cache.get(key)
    if hit is None or hit[0] != _GENERATION[0]:
        fixed = tuple(fixed())
        entry = _entry_point(kernel, fixed + varying)
        hit = (_GENERATION[0], entry, tuple(map(_unwrap, fixed)))
        if len(cache) >= _BOUND_CACHE_SIZE:  # e.g. one objective paired with many others
            cache.clear()
        cache[key] = hit
    return hit[1](*hit[2], *varying)
