"""Compiled kernels (CPU, numba njit). Private: the public modules validate input first.

Numba's disk cache invalidates a cached function only when *its own* source file changes,
not when a function it inlines from another file (or a constant from ``_config``) does. So
at import the kernels' sources are hashed together, and when the hash differs from the one
stored beside the cache, this package's cache files are removed (they recompile once).
"""
import hashlib
import os


def _guard_cache():
    here = os.path.dirname(os.path.abspath(__file__))
    parent = os.path.dirname(here)
    sources = sorted(os.path.join(here, f) for f in os.listdir(here) if f.endswith(".py"))
    sources.append(os.path.join(parent, "_config.py"))
    digest = hashlib.sha256()
    for path in sources:
        with open(path, "rb") as fh:
            digest.update(fh.read())
    stamp = digest.hexdigest()
    cache = os.path.join(here, "__pycache__")
    stamp_file = os.path.join(cache, "mlocore-kernels.stamp")
    try:
        with open(stamp_file) as fh:
            if fh.read().strip() == stamp:
                return
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
        pass


_guard_cache()
