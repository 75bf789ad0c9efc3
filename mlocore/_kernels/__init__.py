"""Compiled kernels (CPU, numba njit). Private: the public modules validate input first."""
