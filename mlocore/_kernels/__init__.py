"""Compiled kernels (CPU, numba njit). Private: the public modules validate input first.

Numba's disk cache invalidates a cached function only when *its own* source file changes,
not when a function it inlines from another file (or a constant from ``_config``) does. So
at import a package's kernel sources are hashed together (with the files they inline
from), and when the hash differs from the one stored beside the cache, that package's
cache files are removed (they recompile once): :func:`guard_cache`, called here for this
package and by :mod:`mlocore.stochastic` for its own.
"""
import hashlib
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = os.path.join(os.path.dirname(_HERE), "_config.py")


def _py_files(directory):
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if f.endswith(".py"))


def cache_stamp(package_dir, extra_sources=()):
    """The hash of the ``.py`` files of ``package_dir`` and of ``extra_sources``."""
    digest = hashlib.sha256()
    for path in _py_files(package_dir) + list(extra_sources):
        with open(path, "rb") as fh:
            digest.update(fh.read())
    return digest.hexdigest()


def guard_cache(package_dir, extra_sources=(), stamp_name="mlocore-kernels.stamp"):
    """Clear the numba cache files of ``package_dir/__pycache__`` when the sources changed.

    Parameters
    ----------
    package_dir : str
        A package whose modules hold ``@njit(cache=True)`` functions.
    extra_sources : sequence of str
        Files outside the package whose functions or constants its kernels inline.
    stamp_name : str
        The stamp file (in the cache directory) holding the hash of the last check.

    Returns
    -------
    bool
        True when the cache files were cleared (the stamp changed).
    """
    stamp = cache_stamp(package_dir, extra_sources)
    cache = os.path.join(package_dir, "__pycache__")
    stamp_file = os.path.join(cache, stamp_name)
    try:
        with open(stamp_file) as fh:
            if fh.read().strip() == stamp:
                return False
    except OSError:
        pass
    try:
        os.makedirs(cache, exist_ok=True)
        for name in os.listdir(cache):
            if name.endswith((".nbi", ".nbc")):
                os.remove(os.path.join(cache, name))
        with open(stamp_file, "w") as fh:
            fh.write(stamp)
    except OSError:  # read-only install: numba then caches elsewhere, keyed by its own rules
        return False
    return True


def kernel_sources():
    """This package's kernel sources and ``_config.py``: what kernels elsewhere inline."""
    return _py_files(_HERE) + [_CONFIG]


guard_cache(_HERE, [_CONFIG])
