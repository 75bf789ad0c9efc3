"""CUDA kernels declared at import and built with ``numba.cuda.jit`` on first use.

``import mlocore`` does not import ``numba.cuda`` (about 0.1 s). The method modules declare
their device kernels with :func:`kernel` and :func:`device_function` and name the CUDA
modules they use with :class:`LazyModule`. The first launch (or ``py_func`` access) of a
declared kernel imports numba.cuda, jit-wraps the kernel and replaces, in the globals of
its module, every declared kernel, device function and lazy module by the real object
(recursively for the kernels it calls): the compiled code sees real device functions and
the real ``cuda`` module (which numba's simulator swaps by identity).
"""
import importlib
import warnings

__all__ = ["LazyModule", "kernel", "device_function"]


class LazyModule:
    """A module imported on first attribute access (``numba.cuda``, ``mlocore.cuda._linalg``)."""

    def __init__(self, name):
        self._name = name
        self._module = None

    def load(self):
        if self._module is None:
            with warnings.catch_warnings():  # the simulator's numba.cuda.random warns
                warnings.simplefilter("ignore")
                self._module = importlib.import_module(self._name)
        return self._module

    def __getattr__(self, attr):
        return getattr(self.load(), attr)


_CUDA = LazyModule("numba.cuda")


class _Declared:
    """A Python function to be wrapped by ``numba.cuda.jit(**options)`` when first used."""

    def __init__(self, fn, options):
        self.fn = fn
        self.options = options
        self._dispatcher = None
        self.__name__, self.__qualname__ = fn.__name__, fn.__qualname__
        self.__doc__, self.__module__ = fn.__doc__, fn.__module__

    def compiled(self):
        if self._dispatcher is None:
            self._dispatcher = _CUDA.jit(**self.options)(self.fn)
            resolve(self.fn.__globals__)
        return self._dispatcher

    @property
    def py_func(self):
        self.compiled()
        return self.fn

    def __getitem__(self, config):
        return self.compiled()[config]


def resolve(namespace):
    """Replace the declared kernels and lazy modules of ``namespace`` by the real objects."""
    for name, value in list(namespace.items()):
        if isinstance(value, _Declared):
            namespace[name] = value.compiled()
        elif isinstance(value, LazyModule):
            namespace[name] = value.load()


def kernel(fn):
    """Declare a CUDA kernel (``@numba.cuda.jit``), built on first launch."""
    return _Declared(fn, {})


def device_function(fn):
    """Declare a CUDA device function (``@numba.cuda.jit(device=True)``)."""
    return _Declared(fn, {"device": True})
